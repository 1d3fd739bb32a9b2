"""Where a streamed layer's time goes (dev tool, GPU machine): one decoder layer of the checkpoint ``argv[1]``,
``argv[2]`` rows of 2048 tokens through ``calibrate.forward.forward_rows`` with calibration's amax hooks, timed
and then profiled (top CUDA kernels by time).  ``argv[3]``: attention implementation (eager / sdpa)."""

import sys
import time

import torch

from streaming_adapters.calibrate.engine import _hook
from streaming_adapters.calibrate.forward import forward_rows
from streaming_adapters.calibrate.skeleton import Skeleton
from streaming_adapters.calibrate.store import HiddenStore

path, rows, attn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dev = torch.device("cuda")
sk = Skeleton(path, dev, attn_implementation=attn)
S = 2048
store = HiddenStore([S] * rows, sk.hidden_size, budget_bytes=1 << 40, work_dir=None, pin=True)
for k in range(rows):
    store.write(k, torch.randn(S, sk.hidden_size, dtype=torch.bfloat16, device=dev))
store.advance()
t = time.perf_counter()
layer = sk.fill_layer(0)
torch.cuda.synchronize()
print(f"fill {time.perf_counter() - t:.2f} s ({attn})")
lin = sk.linear_names(0)
running = torch.zeros(len(lin), dtype=torch.bfloat16, device=dev)
for hooks in (False, True):
    hs = [m.register_forward_pre_hook(_hook(running, k)) for k, m in enumerate(lin.values())] if hooks else []
    forward_rows(layer, store, sk.layer_kwargs, dev)
    store.advance()
    t = time.perf_counter()
    forward_rows(layer, store, sk.layer_kwargs, dev)
    store.advance()
    dt = time.perf_counter() - t
    print(f"hooks={hooks}: {dt / rows * 1e3:.2f} ms per row")
    for h in hs:
        h.remove()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    forward_rows(layer, store, sk.layer_kwargs, dev)
    store.advance()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
sk.stop_prefetch()
