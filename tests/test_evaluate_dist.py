"""evaluate on 2 gloo ranks (rows split): every number equal to world 1's, bit for bit.

Why exact, not within a tolerance: a row's sums depend only on the row (batch 1), and every rank adds the
gathered per-row sums in row order (quality/metrics.py), so no reduction order depends on the world size."""

from __future__ import annotations

import json

import pytest

import evaluate_bodies as B
from streaming_adapters.testing.dist_pool import ProcessGroupPool

pytestmark = pytest.mark.dist


def test_world_2_equals_world_1(checkpoints, tmp_path):
    # Two differently seeded fixtures of one shape: non-zero KL and per-layer error, no conversion to wait for
    # (the emulation hooks are per row too; tests/test_evaluate_emulate.py checks them).
    q, ref = str(checkpoints("llama", "fp8_block")), str(checkpoints("llama", "fp8_block", seed=1))
    one = B.evaluate_rows(q, ref, False, 5, 7, None)
    pool = ProcessGroupPool(2)
    try:
        two = pool.run(B.evaluate_rows, q, ref, False, 5, 7, str(tmp_path / "out"))
    finally:
        pool.close()
    assert two[0] == two[1] == one
    assert one["rows"] == 5 and one["kl"] > 0 and len(one["layers"]) == 3
    saved = json.loads((tmp_path / "out" / "report.json").read_text())  # rank 0 wrote it
    assert saved["world"] == 2 and saved["kl"] == one["kl"] and saved["layers"] == one["layers"]


def test_one_rank_failing_mid_layer_fails_every_rank(checkpoints):
    """Rank 1's forward of layer 1 fails (ENOSPC): both ranks raise one error naming rank 1 and its cause,
    instead of rank 0 going on into the reference's fill (a collective) and waiting there until the process
    group's timeout; the same ranks then evaluate again, equal to one process."""
    q, ref = str(checkpoints("llama", "fp8_block")), str(checkpoints("llama", "fp8_block", seed=1))
    pool = ProcessGroupPool(2)
    try:
        failed = pool.run(B.evaluate_failing, q, ref, 4, 1, 1)
        again = pool.run(B.evaluate_rows, q, ref, False, 4, 3, None)
    finally:
        pool.close()
    for r in failed:
        assert r[0] == "DistributedCheckpointError", r
        assert "1 rank(s) failed; rank 1: OSError: [Errno 28] No space left on device (injected on rank 1)" in r[1], r
    assert again[0] == again[1] == B.evaluate_rows(q, ref, False, 4, 3, None)


def test_a_file_missing_on_one_node_fails_every_rank(checkpoints, tmp_path):
    """Rank 1 cannot read its rows file, then (second run) its checkpoint's config.json, as a node whose local
    copy is missing: both ranks raise one error naming rank 1 before the first collective (the embedding's
    fill), instead of rank 0 waiting there until the process group's timeout."""
    import shutil

    import torch

    q = checkpoints("llama", "fp8_block")
    broken = tmp_path / "ckpt"
    shutil.copytree(q, broken)
    (broken / "config.json").unlink()
    ids = tmp_path / "ids.pt"
    torch.save({"input_ids": torch.randint(3, 1000, (2, 8))}, ids)
    pool = ProcessGroupPool(2)
    try:
        no_rows = pool.run(B.evaluate_with_rank_paths, [str(q)] * 2, [str(ids), str(tmp_path / "none.pt")])
        no_config = pool.run(B.evaluate_with_rank_paths, [str(q), str(broken)], [str(ids)] * 2)
    finally:
        pool.close()
    for r in no_rows:
        assert r[0] == "DistributedCheckpointError" and "1 rank(s) failed; rank 1:" in r[1], r
        assert "none.pt" in r[1], r
    for r in no_config:
        assert r[0] == "DistributedCheckpointError" and "1 rank(s) failed; rank 1:" in r[1], r
        assert "config.json" in r[1], r
