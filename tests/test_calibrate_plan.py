"""What `plan` / dry_run print for W4A4 calibration, and the refusal that names the knobs."""

from __future__ import annotations

from types import SimpleNamespace

from launch import entry
from streaming_adapters.calibrate import CalibrationConfig
from streaming_adapters.calibrate.plan import calibration_need, problems

GiB = 1 << 30


def mistral_large_123b(layers: int = 2) -> tuple[dict, dict]:
    """Headers of Mistral-Large-123B (hidden 12288, intermediate 28672, 96/8 heads, head 128), a few layers."""
    h, i, kv = 12288, 28672, 8 * 128
    shapes = {"model.embed_tokens.weight": (32768, h), "lm_head.weight": (32768, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    cfg = {"hidden_size": h, "intermediate_size": i, "num_attention_heads": 96}
    return {k: SimpleNamespace(shape=v) for k, v in shapes.items()}, cfg


def test_mistral_large_need_at_the_defaults():
    logical, cfg = mistral_large_123b()
    need = calibration_need(logical, cfg, CalibrationConfig(data="x"), world=1)
    layer = 2 * (2 * 12288 * 12288 + 2 * 1024 * 12288 + 3 * 28672 * 12288)
    assert need.layer_bytes == layer  # 2.58 GiB
    acts = 2048 * (12288 * 4 + 28672 * 3) * 2 + 96 * 2048 ** 2 * 6 + 2048 ** 2 * 2
    assert need.activation_bytes == acts  # 2.78 GiB: eager scores of 96 heads dominate
    assert need.device_bytes == layer + 2 * 32768 * 12288 + acts and need.device_bytes < 24 * GiB
    assert need.host_bytes == 512 * 2048 * 12288 * 2 == 24 * GiB and need.spill_bytes == 0
    assert problems(need, "cuda", host_capacity=64 * GiB, gpu_capacity=24 * GiB) == []
    # Four ranks: a quarter of the hidden states each; a 4 GiB budget spills them.
    need4 = calibration_need(logical, cfg, CalibrationConfig(data="x", host_budget_gb=4), world=4)
    assert need4.host_bytes == 0 and need4.spill_bytes == 6 * GiB


def test_refusal_names_the_knobs():
    logical, cfg = mistral_large_123b()
    need = calibration_need(logical, cfg, CalibrationConfig(data="x"), world=1)
    p = problems(need, "cuda", host_capacity=16 * GiB, gpu_capacity=4 * GiB)
    assert len(p) == 2
    assert "calibration.seq_len" in p[0] and "calibration.host_budget_gb" in p[1] and "add ranks" in p[1]


def test_dry_run_prints_the_calibration_line(checkpoints, tmp_path):
    out = entry(["--config-name", "fp8_to_nvfp4_w4a4", f"checkpoint.path={checkpoints()}",
                 f"calibration.data={tmp_path / 'x.jsonl'}", f"output.path={tmp_path / 'o'}", "dry_run=true"]).stdout
    assert "calibration: host (device=cpu) need" in out and "hidden states 640.0 MiB in host memory" in out
