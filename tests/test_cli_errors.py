"""The recipe layer as a plain process (world size 1, no torchrun): every recipe runs, the fabricate keys
work with each, `plan` needs no GPU and says by its exit code whether the layout fits, and every mistake a
user can make ends in one named message (no traceback unless verbose=true) and a non-zero exit."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from launch import entry
from streaming_adapters.run import main
from streaming_adapters.checkpoint.coverage import (IncompleteCheckpointError, check_coverage,
                                                    missing_layers, missing_shard_files)
from streaming_adapters.checkpoint.index import CheckpointIndex

pytestmark = pytest.mark.dist


class Ran:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capfd, tmp_path, monkeypatch):
    """The entry point in this process (the same code as the command; saves the ~3 s import of a fresh
    process per call on the 2-core CI machine).  The exit codes and the lack of tracebacks of a real
    process are checked with ``entry`` below."""
    monkeypatch.chdir(tmp_path)

    def run(args: list[str], check: bool = True) -> Ran:
        capfd.readouterr()
        rc = main(args, exit_process=False)
        out, err = capfd.readouterr()
        if check:
            assert rc == 0, (rc, out[-2000:], err[-2000:])
        return Ran(rc, out, err)
    return run


def one_message(p, *want: str) -> None:
    """A failed run: exit 2, the named message once, nothing from Python's traceback machinery."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("error: ") == 1, p.stderr
    for w in want:
        assert w in p.stderr, (w, p.stderr)


def test_plan_without_a_gpu_exit_code_says_whether_it_fits(checkpoints, tmp_path, cli):
    ck = checkpoints("llama", "fp8_block")
    p = cli(["plan", f"checkpoint.path={ck}", "device=cuda", f"report.path={tmp_path / 'plan.json'}"])
    assert "GPU capacity unknown" in p.stdout and "GPU need" in p.stdout, p.stdout
    # The llama fixture needs 5.6 MiB of GPU memory per rank (BF16 shard 3.7 MiB + the staging ring).
    assert "5.6 MiB of GPU memory" in p.stdout, p.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["fits"] is True
    p = entry(["plan", f"checkpoint.path={ck}", "device=cuda", "gpu_memory_gb=0.004"], check=False)
    assert p.returncode == 3 and "DOES NOT FIT: rank 0 needs 5.6 MiB of GPU memory, 4.1 MiB available" in p.stdout
    p = cli(["plan", f"checkpoint.path={ck}", "device=cuda", "gpu_memory_gb=80"])
    assert "DOES NOT FIT" not in p.stdout and "unknown" not in p.stdout


@pytest.mark.parametrize("recipe,family,extra,want", [
    ("load_check", "qwen3", ["verify=true"], "verify: 0 mismatched shard(s)"),
    ("demo", "llama", ["parallel.tp=1", "checkpoint.fabricate.config.hidden_size=256",
                       "checkpoint.fabricate.config.intermediate_size=512",
                       "checkpoint.fabricate.config.vocab_size=1000",
                       "checkpoint.fabricate.config.num_attention_heads=4",
                       "checkpoint.fabricate.config.head_dim=64"], "verify: 0 mismatched shard(s)"),
    ("dequantize_bf16", "deepseek_v3", ["verify=true"], "(bf16): OK"),
    ("fp8_to_nvfp4", "llama", ["verify=true"], "(compressed-tensors): OK"),
    ("plan", "qwen3_moe", [], "naive path"),
])
def test_every_recipe_as_a_plain_process_with_fabricate_keys(tmp_path, cli, recipe, family, extra, want):
    ck, out = tmp_path / "ck", tmp_path / "out"
    args = ["--config-name", recipe, f"checkpoint.path={ck}", f"checkpoint.fabricate.family={family}",
            "checkpoint.fabricate.config.num_hidden_layers=2", *extra]
    if recipe in ("dequantize_bf16", "fp8_to_nvfp4"):
        args.append(f"output.path={out}")
    p = cli(args)
    assert f"fabricated a {family} fp8_block checkpoint" in p.stdout and want in p.stdout, p.stdout[-2000:]
    assert json.loads((ck / "config.json").read_text())["num_hidden_layers"] == 2
    if recipe in ("dequantize_bf16", "fp8_to_nvfp4"):
        report = json.loads((out / "report.json").read_text())
        assert report["verify"]["ok"] and report["world_size"] == 1 and report["bytes_read"] > 0
    else:  # no output folder: no report unless report.path says, and never in the working folder
        assert "report: not written" in p.stdout and not (tmp_path / "report.json").exists()


def test_wrong_values_and_ignored_options_are_one_message(checkpoints, tmp_path, cli):
    ck = checkpoints("llama", "fp8_block")
    p = entry(["--config-name", "fp8_to_nvfp4", f"checkpoint.path={ck}", f"output.path={tmp_path / 'o'}",
               "device=gpu", "output.format=modelop", "benchmark.layers=3", "parallel.tp=2"], check=False)
    one_message(p, "ConfigError", "device=gpu is not one of: cpu, cuda",
                "output.format=modelop is not one of: null, compressed-tensors, modelopt (did you mean modelopt?)",
                "benchmark.layers=3 is ignored by fp8_to_nvfp4",
                "parallel.tp=2 is ignored by fp8_to_nvfp4: conversion splits every step over all ranks")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    p = cli(["--config-name", "dequantize_bf16", f"checkpoint.path={ck}", f"output.path={tmp_path / 'o'}",
             "output.format=modelopt", "verbose=true"], check=False)
    assert p.returncode == 2 and "output.format=modelopt is ignored by dequantize_bf16" in p.stderr
    assert "Traceback" in p.stderr  # verbose=true: the traceback too
    p = cli(["--config-name", "load_check", f"checkpoint.path={ck}", "device=cuda"], check=False)
    one_message(p, "device=cuda but this machine (or CUDA_VISIBLE_DEVICES) shows no GPU")
    p = cli(["--config-name", "benchmark", "checkpoint.fabricate.family=llama"], check=False)
    one_message(p, "checkpoint.fabricate.family=llama is ignored by benchmark")


def test_unwritable_output_is_one_message(checkpoints, tmp_path, cli):
    ck = checkpoints("llama", "fp8_block")
    (tmp_path / "a_file").write_text("not a folder\n")
    p = entry(["--config-name", "dequantize_bf16", f"checkpoint.path={ck}",
               f"output.path={tmp_path / 'a_file' / 'out'}"], check=False)
    one_message(p, "OutputWriteError", "a_file", "what to do: a file is in the way of the output folder")
    p = cli(["--config-name", "load_check", f"checkpoint.path={ck}", "report.path=/proc/no/report.json"],
            check=False)
    one_message(p, "/proc/no", "what to do")


def _drop_layer(path, layer: int) -> None:
    for f in path.glob("*.safetensors"):
        sd = load_file(f)
        keep = {k: v for k, v in sd.items() if f"layers.{layer}." not in k}
        if len(keep) != len(sd):
            save_file(keep, f, metadata={"format": "pt"})


def test_incomplete_checkpoint_is_refused(checkpoints, tmp_path, cli):
    src = checkpoints("llama", "fp8_block")  # 3 layers in model-0000{1,2,3}-of-00003.safetensors
    # 1. A folder without an index that lost one of its numbered shards.
    a = tmp_path / "no_index"
    shutil.copytree(src, a)
    (a / "model.safetensors.index.json").unlink()
    (a / "model-00002-of-00003.safetensors").unlink()
    assert missing_shard_files(sorted(p.name for p in a.glob("*.safetensors"))) == [
        "model-00002-of-00003.safetensors"]
    p = entry(["--config-name", "dequantize_bf16", f"checkpoint.path={a}", f"output.path={tmp_path / 'o'}"],
              check=False)
    one_message(p, "IncompleteCheckpointError", "1 numbered shard file(s) are missing: "
                "model-00002-of-00003.safetensors")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    # 2. Files complete, but decoder layer 1's tensors are not in any of them (config says 3 layers).
    b = tmp_path / "no_layer"
    shutil.copytree(src, b)
    (b / "model.safetensors.index.json").unlink()
    _drop_layer(b, 1)
    index = CheckpointIndex.open(b)
    assert missing_layers(index) == (3, [1])
    with pytest.raises(IncompleteCheckpointError, match=r"decoder layer\(s\) 1 of 3 have no tensors"):
        check_coverage(index)
    p = cli(["--config-name", "load_check", f"checkpoint.path={b}"], check=False)
    one_message(p, "decoder layer(s) 1 of 3 have no tensors", "num_hidden_layers=3", "model.layers.1.*")
    # The complete checkpoint passes.
    check_coverage(CheckpointIndex.open(src))


def test_a_path_with_an_equals_sign_is_one_message_that_says_how_to_quote(checkpoints, tmp_path):
    """Hydra's override grammar refuses a bare '=' in a value (/data/run=1/ckpt): one message, and its
    suggested quoting loads the checkpoint."""
    ck = tmp_path / "run=1" / "ck"
    shutil.copytree(checkpoints("llama", "fp8_block"), ck)
    p = entry(["--config-name", "plan", f"checkpoint.path={ck}"], check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert f"""quote the value for Hydra, e.g. checkpoint.path="'{ck}'\"""" in p.stderr, p.stderr
    ok = entry(["--config-name", "plan", f"checkpoint.path='{ck}'"])
    assert "DOES NOT FIT" not in ok.stdout and ok.returncode == 0
