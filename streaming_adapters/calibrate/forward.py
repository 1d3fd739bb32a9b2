"""Every row of a :class:`~.store.HiddenStore` through one decoder layer: the one forward loop of calibration
and evaluation.

On CUDA with pinned rows the copies leave the compute stream: row ``j + 1`` is uploaded on its own stream
while row ``j`` computes, and row ``j``'s output is downloaded on another, so the GPU never waits for a copy.
At Mistral-Large dims a 2048-token row is 48 MiB each way (0.9 ms at 55 GB/s) against ~10 ms of compute: in
order on one stream that was ~0.9 s of a 512-row layer (H100, 2026-12-06).  Stream order and events keep it
exact: row ``j``'s output is copied after row ``j``'s forward, which waits for row ``j``'s upload, so an
in-place store (the output overwriting the input rows) stays correct; an upload's device buffer is taken after
every earlier forward was queued, and each tensor used on a side stream is recorded on it.

Elsewhere (CPU, rows spilled to a memory-mapped file) the copies are plain and in order.

On by default since ``tests/gpu/test_gpu_stream.py`` passed on an H100 (2026-12-07 04:05 UTC, 11 tests: the
streamed amax and logits equal the whole model's with the copies in order and overlapped, and overlapped rows
equal in-order ones bit for bit).  ``SA_OVERLAP_COPIES=0`` puts the copies back on the compute stream (the
pinned D2H is still asynchronous: ``HiddenStore.write``), e.g. to rule them out when chasing a wrong value.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from .store import HiddenStore


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def overlap_copies() -> bool:
    return os.environ.get("SA_OVERLAP_COPIES", "1") != "0"


@torch.no_grad()  # autograd would keep every activation of a row: 22 GiB at 123B dims, seq 2048 (H200)
def forward_rows(layer: nn.Module, store: HiddenStore, kwargs_of: Callable[[int], dict[str, Any]],
                 dev: torch.device) -> None:
    """Replace every row of ``store`` by ``layer(row)`` (batch 1; ``kwargs_of(seq_len)`` the layer's keyword
    arguments); ``store.advance()`` is the caller's."""
    n = len(store)
    if dev.type != "cuda" or not store.pinned or not overlap_copies():
        for j in range(n):
            x = store.read(j).to(dev, non_blocking=store.pinned)
            store.write(j, _hidden(layer(x[None], **kwargs_of(x.shape[0])))[0])
        return
    compute = torch.cuda.current_stream(dev)
    up, down = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def upload(j: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        src = store.read(j)
        x = torch.empty(src.shape, dtype=src.dtype, device=dev)
        up.wait_stream(compute)  # x's memory may be an earlier row's, still read by queued compute
        with torch.cuda.stream(up):
            x.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(up)
        x.record_stream(up)
        return x, ready

    nxt = upload(0) if n else None
    for j in range(n):
        x, ready = nxt
        nxt = upload(j + 1) if j + 1 < n else None  # queued before row j's forward: overlaps it
        compute.wait_event(ready)
        out = _hidden(layer(x[None], **kwargs_of(x.shape[0])))[0]
        down.wait_stream(compute)
        with torch.cuda.stream(down):
            store.write(j, out)
        out.record_stream(down)
