"""The user's path: every recipe end to end under torchrun on CPU, the pre-flight planner against a
measured run, and the promised messages for bad keys and impossible layouts."""

from __future__ import annotations

import json

import pytest

from launch import entry
from reference import load_all

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """A checkpoint large enough that per-rank memory is well above process noise (~176 MB)."""
    path = tmp_path_factory.mktemp("run") / "llama"
    from streaming_adapters.testing.fixtures import make_checkpoint

    make_checkpoint(path, "llama", "fp8_block", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=32000)
    return path


def test_list_and_help():
    out = entry(["--list"]).stdout.split()
    assert {"load_check", "dequantize_bf16", "fp8_to_nvfp4", "benchmark", "plan", "demo"} <= set(out)


def test_unknown_key_lists_the_valid_ones(checkpoints):
    p = entry(["--config-name", "load_check", f"checkpoint.path={checkpoints()}", "parallel.tpp=2"], check=False)
    assert p.returncode != 0
    assert "parallel.tpp" in p.stderr and "valid keys" in p.stderr and "parallel.tp" in p.stderr


def test_unknown_recipe(checkpoints):
    p = entry(["--config-name", "no_such_recipe"], check=False)
    assert p.returncode != 0 and "load_check" in p.stderr


def test_world_size_mismatch_is_a_clear_error(checkpoints):
    p = entry(["--config-name", "load_check", f"checkpoint.path={checkpoints()}", "parallel.tp=2"], nproc=1,
              check=False)
    assert p.returncode != 0 and "world size is 1" in p.stderr and "parallel.tp" in p.stderr


def test_impossible_layout_is_refused_with_layouts_that_fit(demo_ckpt, tmp_path):
    # The checkpoint is 211 MiB of BF16.  With 82 MiB per rank, TP=2 (~108 MiB/rank) cannot fit, and no
    # layout of 2 ranks can: the run is refused before any read, telling the user to add ranks.
    p = entry(["--config-name", "load_check", f"checkpoint.path={demo_ckpt}", "parallel.tp=2",
               "host_memory_gb=0.08"], nproc=2, check=False)
    assert p.returncode != 0, p.stderr  # ranks exit 2; torchrun reports 1
    assert "does not fit" in p.stderr and "add ranks" in p.stderr
    # With 4 ranks and 77 MiB each, PP=4 (the 64 MiB embedding on stage 0: 148 MiB with the pread staging
    # buffer of its 62.5 MiB chunk) does not fit but TP=4 does (53 MiB shard + 5 MiB scratch + its 15.6 MiB
    # chunk = 70 MiB): the pre-flight names it.
    p = entry(["plan", f"checkpoint.path={demo_ckpt}", "parallel.pp=4", "host_memory_gb=0.075"], check=False)
    assert p.returncode == 3  # does not fit: the exit code says so to scripts
    assert "DOES NOT FIT" in p.stdout and "naive path" in p.stdout
    fitting = p.stdout.split("layouts of this world size that fit:")[1]
    assert "tp=4 dp_shard=1 pp=1 ep=1" in fitting
    p = entry(["plan", f"checkpoint.path={demo_ckpt}", "parallel.tp=4", "host_memory_gb=0.075"])
    assert "DOES NOT FIT" not in p.stdout


@pytest.mark.parametrize("layout,nproc,family", [
    (["parallel.tp=2"], 2, "llama"),
    (["parallel.dp_shard=2"], 2, "qwen3"),
    (["parallel.pp=2"], 2, "llama"),
    (["parallel.ep=2"], 2, "qwen3_moe"),
    (["parallel.tp=2", "parallel.dp_shard=2"], 4, "deepseek_v3"),
])
def test_load_check_every_layout(checkpoints, tmp_path, layout, nproc, family):
    report = tmp_path / "report.json"
    p = entry(["--config-name", "load_check", f"checkpoint.path={checkpoints(family, 'fp8_block')}",
               "verify=true", f"report.path={report}", *layout], nproc=nproc)
    assert "verify: 0 mismatched shard(s)" in p.stdout
    r = json.loads(report.read_text())
    assert r["world_size"] == nproc and r["verify"]["mismatched_tensors"] == 0
    assert len(r["ranks"]) == nproc and all(x["bytes_read"] > 0 for x in r["ranks"])


def test_planner_matches_a_measured_run(demo_ckpt, tmp_path):
    plan = entry(["plan", f"checkpoint.path={demo_ckpt}", "parallel.tp=2", f"report.path={tmp_path / 'p.json'}"])
    planned = json.loads((tmp_path / "p.json").read_text())["ranks"]
    entry(["--config-name", "load_check", f"checkpoint.path={demo_ckpt}", "parallel.tp=2",
           f"report.path={tmp_path / 'm.json'}"], nproc=2)
    measured = json.loads((tmp_path / "m.json").read_text())
    assert "naive path" in plan.stdout
    for r in range(2):
        got, want = measured["ranks"][r]["bytes_read"], planned[r]["read_bytes"]
        assert abs(got - want) <= 0.15 * want, (r, got, want)
        host, want_host = measured["host_increase_bytes"][r], planned[r]["host_bytes"]
        assert abs(host - want_host) <= 0.15 * want_host, (r, host, want_host)


def test_dequantize_bf16_recipe(checkpoints, tmp_path):
    src = checkpoints("deepseek_v3", "fp8_block")
    entry(["--config-name", "dequantize_bf16", f"checkpoint.path={src}", f"output.path={tmp_path / 'out'}",
           "parallel.dp_shard=2", "io.step_mb=0.5"], nproc=2)
    assert set(load_all(tmp_path / "out")) == {k for k in load_all(src) if not k.endswith("_scale_inv")}
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    # Top level = the job (what the summary line shows); each rank's own numbers under `ranks`.
    assert r["world_size"] == 2 and len(r["ranks"]) == 2 and "rank" not in r
    assert r["bytes_read"] == sum(x["bytes_read"] for x in r["ranks"]) > max(x["bytes_read"] for x in r["ranks"])
    assert r["tensors"] == sum(x["tensors"] for x in r["ranks"])
    assert r["seconds"] == max(x["seconds"] for x in r["ranks"])
    assert abs(r["gb_per_s"] - r["bytes_read"] / r["seconds"] / 1e9) < 1e-9
    assert f"{r['tensors']} tensor shards" in r["summary"]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_fp8_to_nvfp4_recipe_with_verify(checkpoints, tmp_path, fmt):
    src = checkpoints("qwen3_moe", "fp8_block")
    p = entry(["--config-name", "fp8_to_nvfp4", f"checkpoint.path={src}", f"output.path={tmp_path / 'out'}",
               f"output.format={fmt}", "parallel.dp_shard=2", "verify=true"], nproc=2)
    assert ": OK" in p.stdout, p.stdout[-2000:]
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert r["verify"]["ok"] and r["verify"]["fused_groups"] > 0 and not r["verify"]["fused_violations"]
    assert 15 < r["verify"]["worst_snr_db"] < 25  # NVFP4 on Gaussian-ish weights: ~20 dB


def test_benchmark_recipe_tiny(tmp_path):
    # benchmark.cold is off by default: the machine's page cache is left alone, and no line says otherwise.
    p = entry(["--config-name", "benchmark", "benchmark.shape=tiny", "benchmark.layers=1",
               f"checkpoint.path={tmp_path / 'ckpt'}", f"benchmark.workdir={tmp_path / 'w'}",
               f"report.path={tmp_path / 'r' / 'report.json'}",
               "benchmark.peers=[raw_read,streaming_adapters,torch_quantized_reader]"], timeout=600)
    assert "page cache" not in p.stdout and "| warm |" in p.stdout
    assert json.loads((tmp_path / "r" / "report.json").read_text())["meta"]["shape"] == "tiny"
    table = (tmp_path / "r" / "benchmark.md").read_text()
    for peer in ("raw_read", "streaming_adapters", "torch_quantized_reader"):
        assert f"| {peer} | 2 |" in table, table
    data = json.loads((tmp_path / "r" / "benchmark.json").read_text())
    assert all("error" not in r and r["seconds"] > 0 for r in data["results"])
    assert (tmp_path / "r" / "benchmark.svg").read_text().startswith("<svg")
