"""Bodies run on every rank of a gloo pool (tests/test_evaluate_dist.py)."""

from __future__ import annotations


def evaluate_rows(path: str, reference: str | None, emulate: bool, n: int, seed: int, out_dir: str | None) -> dict:
    import streaming_adapters as sa
    from test_evaluate import rows

    r = sa.evaluate(path, rows(n, seed=seed), reference=reference, emulate_activations=emulate, out_dir=out_dir)
    return {k: v for k, v in r.items() if k not in ("seconds", "world", "layer_seconds")}
