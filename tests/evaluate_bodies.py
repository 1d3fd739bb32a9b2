"""Bodies run on every rank of a gloo pool (tests/test_evaluate_dist.py)."""

from __future__ import annotations


def evaluate_rows(path: str, reference: str | None, emulate: bool, n: int, seed: int, out_dir: str | None) -> dict:
    import streaming_adapters as sa
    from test_evaluate import rows

    r = sa.evaluate(path, rows(n, seed=seed), reference=reference, emulate_activations=emulate, out_dir=out_dir)
    return {k: v for k, v in r.items() if k not in ("seconds", "world", "layer_seconds")}


def evaluate_failing(path: str, reference: str | None, n: int, fail_rank: int, fail_layer: int):
    """evaluate() where, on ``fail_rank`` only, the forward of decoder layer ``fail_layer`` (of the evaluated
    model) raises ENOSPC.  Returns (class name, message) of what this rank raised, or None; restores the module
    for the pool's next test."""
    import torch.distributed as dist

    import streaming_adapters as sa
    from calib_bodies import enospc_at_call
    from streaming_adapters.quality import run
    from test_evaluate import rows

    real = run.forward_rows
    step = 2 if reference is not None else 1  # the reference's layer runs after the model's
    if dist.get_rank() == fail_rank:
        run.forward_rows = enospc_at_call(real, fail_layer * step + 1, fail_rank)
    try:
        sa.evaluate(path, rows(n, seed=3), reference=reference)
        return None
    except Exception as e:  # noqa: BLE001 -- the test looks at what every rank raised
        return type(e).__name__, str(e)
    finally:
        run.forward_rows = real


def evaluate_with_rank_paths(paths: list[str], data: list[str]):
    """evaluate(paths[rank], data[rank]) -- what a job sees when a node lacks a file the others have (a
    node-local copy of the checkpoint or of the rows).  Returns (class name, message) or None."""
    import torch.distributed as dist

    import streaming_adapters as sa

    r = dist.get_rank()
    try:
        sa.evaluate(paths[r], data[r])
        return None
    except Exception as e:  # noqa: BLE001 -- the test looks at what every rank raised
        return type(e).__name__, str(e)
