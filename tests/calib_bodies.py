"""Rank bodies of the distributed calibration tests (importable by name for the process pool)."""

from __future__ import annotations


def convert_w4a4(src: str, dst: str, data: str, fmt: str, samples: int, seq_len: int) -> dict:
    from streaming_adapters.calibrate import CalibrationConfig
    from streaming_adapters.convert import convert_checkpoint

    rep = convert_checkpoint(src, dst, target="nvfp4", format=fmt, progress=False, step_bytes=1 << 18,
                             calibration=CalibrationConfig(data=data, samples=samples, seq_len=seq_len))
    return rep.calibration["input_amax"]


def enospc_at_call(real, n: int, rank: int):
    """``real`` wrapped to raise ENOSPC at its ``n``-th call (1-based), as a full node-local disk would."""
    import errno

    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(errno.ENOSPC, f"No space left on device (injected on rank {rank})")
        return real(*args, **kwargs)

    return failing


def calibrate_rows(src: str, lengths: list[int], budget: int, work_dir: str | None, persist_every_s: float | None,
                   fail_rank: int | None = None, fail_layer: int = 1):
    """``calibrate_activations`` on random rows of ``lengths``; on ``fail_rank`` the forward of decoder layer
    ``fail_layer`` raises ENOSPC (as a full node-local spill disk would).  Returns ("ok", amax, spilled) or
    ("error", class name, message); the engine is restored for the pool's next test."""
    import torch
    import torch.distributed as dist

    from streaming_adapters.calibrate import engine
    from streaming_adapters.calibrate.data import CalibrationTokens
    from test_calibrate_engine import targets_of

    g = torch.Generator().manual_seed(5)
    toks = CalibrationTokens([torch.randint(3, 1001, (n,), generator=g) for n in lengths], "test", max(lengths))
    rank = dist.get_rank() if dist.is_initialized() else 0
    real = engine.forward_rows
    if rank == fail_rank:
        engine.forward_rows = enospc_at_call(real, fail_layer + 1, rank)
    try:
        r = engine.calibrate_activations(src, toks, targets_of(src), host_budget_bytes=budget, work_dir=work_dir,
                                         persist_every_s=persist_every_s)
        return "ok", r.amax, r.spilled
    except Exception as e:  # noqa: BLE001 -- the test looks at what every rank raised
        return "error", type(e).__name__, str(e)
    finally:
        engine.forward_rows = real
