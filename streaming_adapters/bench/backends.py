"""CPU load speed of the two byte sources, ``pread`` (the default) and ``mmap``, on one fabricated checkpoint.

One process, no process group: ``load_fp8_state_dict`` into a plain BF16 state dict, the backends alternated
run by run (so page-cache state and machine load hit both alike; the first run of each warms the cache).
``python -m streaming_adapters.bench.backends /tmp/bench-tiny --layers 20 --runs 4`` (20 "tiny" layers: ~230 MB).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    import torch

    from ..formats import get_adapter
    from ..load import load_fp8_state_dict
    from .checkpoint import fabricate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--shape", default="tiny")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--runs", type=int, default=4)
    a = p.parse_args(argv)
    path = fabricate(a.path, a.shape, a.layers)
    lts = get_adapter(path).plan.logical
    sd = {k: torch.empty(lt.shape, dtype=torch.bfloat16 if lt.scale is not None else lt.dtype)
          for k, lt in lts.items()}
    times: dict[str, list[float]] = {"pread": [], "mmap": []}
    peak: dict[str, int] = {}
    for _ in range(a.runs + 1):  # one extra round, dropped: it warms the page cache for both
        for backend in times:
            t = time.perf_counter()
            rep = load_fp8_state_dict(sd, path, io_backend=backend)
            times[backend].append(time.perf_counter() - t)
            peak[backend] = rep.peak_transient_bytes
    gb = rep.bytes_read / 1e9
    for backend, ts in times.items():
        ts = ts[1:]
        print(f"{backend}: {gb:.3f} GB read, runs {', '.join(f'{x:.2f}' for x in ts)} s, median "
              f"{statistics.median(ts):.2f} s = {gb / statistics.median(ts):.2f} GB/s, peak transient "
              f"{peak[backend] / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
