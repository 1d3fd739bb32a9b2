"""The per-layer engine against a whole-model BF16 forward with hooks (what both producers measure)."""

from __future__ import annotations

import pytest
import torch

from calib_fixtures import whole_model_amax
from streaming_adapters.calibrate.data import CalibrationTokens
from streaming_adapters.calibrate.engine import calibrate_activations
from streaming_adapters.checkpoint.index import CheckpointIndex
from streaming_adapters.convert.plan import make_plan
from streaming_adapters.errors import CheckpointError
from streaming_adapters.formats import get_adapter


def targets_of(path) -> set[str]:
    index = CheckpointIndex.open(path)
    plan = make_plan(index, get_adapter(path, index=index), "nvfp4", None, 1)
    return {n[: -len(".weight")] for n, q in plan.nvfp4.items() if q}


def tokens(n=4, seed=0) -> CalibrationTokens:
    g = torch.Generator().manual_seed(seed)
    return CalibrationTokens([torch.randint(3, 1001, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g)
                              for _ in range(n)], "test", 64)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_layer_by_layer_equals_whole_model(checkpoints, family):
    path = checkpoints(family, "fp8_block")
    toks = tokens()
    targets = targets_of(path)
    got = calibrate_activations(path, toks, targets)
    want = whole_model_amax(path, toks)
    assert set(got.amax) == targets and len(targets) == 6 * 3  # q k v o gate up (down: K=200 % 16 != 0)
    for name in targets:
        assert got.amax[name] == want[name], name
        assert got.amax[name] > 0
    assert got.tokens_sha256 == toks.sha256 and len(got.layers) == 3
    assert got.amax["model.layers.1.self_attn.q_proj"] == got.amax["model.layers.1.self_attn.v_proj"]


def test_spill_to_disk_gives_the_same_table(checkpoints, tmp_path):
    path = checkpoints("llama", "fp8_block")
    toks = tokens(3, seed=5)
    targets = targets_of(path)
    mem = calibrate_activations(path, toks, targets)
    disk = calibrate_activations(path, toks, targets, host_budget_bytes=0, work_dir=tmp_path / "w")
    assert disk.spilled and not mem.spilled
    assert disk.amax == mem.amax
    assert list((tmp_path / "w").iterdir()) == []  # spill files removed at the end


def test_unmatched_target_is_an_error(checkpoints):
    path = checkpoints("llama", "fp8_block")
    with pytest.raises(CheckpointError, match="would get no activation scale"):
        calibrate_activations(path, tokens(1), targets_of(path) | {"model.layers.0.mlp.nope"})


def test_moe_experts_follow_each_producers_rule(checkpoints):
    """Qwen3-MoE: experts linearized (calibrate/moe.py).  All-experts rule (llm-compressor): every expert's
    gate/up sees every token, so they share the MoE input's amax; routed rule (ModelOpt): each expert sees
    its tokens only (never more than that), then the max over the layer's experts is written."""
    from streaming_adapters.calibrate.scales import unify

    path = checkpoints("qwen3_moe", "fp8_block")
    targets = targets_of(path)
    every = calibrate_activations(path, tokens(3), targets, moe_all_experts=True).amax
    routed = calibrate_activations(path, tokens(3), targets, moe_all_experts=False).amax
    assert set(every) == set(routed) == targets and len(targets) == 2 * (4 + 3 * 5)
    for layer in (0, 1):
        e = f"model.layers.{layer}.mlp.experts."
        gates = {every[f"{e}{i}.gate_proj"] for i in range(5)} | {every[f"{e}{i}.up_proj"] for i in range(5)}
        assert len(gates) == 1 and gates.pop() > 0
        assert all(routed[f"{e}{i}.gate_proj"] <= every[f"{e}{i}.gate_proj"] for i in range(5))
        u = unify(routed, experts=True)
        assert len({u[f"{e}{i}.down_proj"] for i in range(5)}) == 1
        assert u[f"{e}0.down_proj"] == max(routed[f"{e}{i}.down_proj"] for i in range(5))
    assert every["model.layers.0.self_attn.q_proj"] == routed["model.layers.0.self_attn.q_proj"]


def test_mixtral_experts_are_calibrated_under_their_stored_names(checkpoints):
    """Mixtral stores ``block_sparse_moe.experts.{e}.w1/w3/w2``; the linearized experts (gate/up/down_proj) read
    those tensors and their amax lands on the stored names.  Attention equals the whole model's."""
    path = checkpoints("mixtral", "fp8_block")
    targets = targets_of(path)
    assert any(".block_sparse_moe.experts.0.w1" in t for t in targets)
    got = calibrate_activations(path, tokens(3), targets, moe_all_experts=True).amax
    assert set(got) == targets and all(v > 0 for v in got.values())
    e = "model.layers.0.block_sparse_moe.experts."
    n = sum(1 for t in targets if t.startswith(e) and t.endswith(".w1"))
    assert n > 1 and len({got[f"{e}{i}.{w}"] for i in range(n) for w in ("w1", "w3")}) == 1  # all tokens
    want = whole_model_amax(path, tokens(3))
    for name in targets:
        if ".self_attn." in name:
            assert got[name] == want[name], name


@pytest.mark.parametrize("where", ["spilled", "memory"])
def test_sigkill_mid_calibration_resumes_at_the_last_finished_layer(checkpoints, tmp_path, where):
    """Spilled: the ping-pong files; in memory: the rows saved at the layer boundary (persist_every_s=0)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = checkpoints("llama", "fp8_block", num_hidden_layers=6)
    want = calibrate_activations(path, tokens(12, seed=9), targets_of(path))
    work = tmp_path / "work"
    here = Path(__file__).parent
    proc = subprocess.Popen([sys.executable, str(here / "calib_kill_body.py"), str(path), str(work), where],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(here), *sys.path])})
    state, layer, deadline = work / "state-rank0.json", -1, time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            layer = json.loads(state.read_text())["layer"]
        except (OSError, ValueError, KeyError):
            layer = -1
        if layer >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(60) == -signal.SIGKILL, "the run ended before it could be killed"
    got = calibrate_activations(path, tokens(12, seed=9), targets_of(path), work_dir=work,
                                host_budget_bytes=1 << 30 if where == "memory" else 0)
    assert got.resumed_layers >= 3 and got.spilled == (where == "spilled")
    assert got.amax == want.amax
    assert list(work.iterdir()) == []  # spill files and state removed after success


def test_layer_forwards_keep_no_autograd_state(checkpoints):
    """Calibration never records a graph: with autograd on, every activation of a sample stays alive until the
    sample's output is dropped (22 GiB of GPU at Mistral-Large dims, seq 2048, on an H200; 2026-12-06)."""
    path = checkpoints("llama", "fp8_block")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        got = calibrate_activations(path, tokens(2), targets_of(path))
    assert saved == [] and len(got.amax) == 18
