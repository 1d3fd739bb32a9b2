"""Every command in README.md and docs/*.md is real: each recipe command composes through the real config
schema (a renamed key, recipe or choice fails here) with a world size that matches its launcher, each named
file / module / extra exists, and the plain-process ones run as written on fabricated checkpoints.  The
torchrun ones run as written in ``bash tests/doc_commands/run.sh`` (heavier: a CI step of its own)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib

import pytest

from doc_commands.commands import ROOT, all_commands, substitute
from streaming_adapters.config import validate
from streaming_adapters.run import compose, main

COMMANDS = all_commands()
RECIPES = [c for c in COMMANDS if c.kind == "recipe"]


def _id(c) -> str:
    return f"{c.where}:{c.text[:40]}"


def test_every_command_is_classified():
    unknown = [(c.where, c.text) for c in COMMANDS if c.kind == "unknown"]
    assert not unknown, f"add these to tests/doc_commands/commands.py: {unknown}"
    # The README's own commands are all real (no placeholders but the documented /ckpt paths).
    assert len([c for c in RECIPES if c.where.startswith("README")]) >= 8


@pytest.mark.parametrize("c", RECIPES, ids=_id)
def test_recipe_commands_compose_through_the_schema(c):
    name, overrides = c.recipe
    cfg = compose(name, overrides)
    validate(cfg)
    product = cfg.parallel.tp * cfg.parallel.dp_shard * cfg.parallel.pp * cfg.parallel.ep
    if cfg.task not in ("benchmark", "plan") and not cfg.dry_run:
        assert product == c.nproc, f"{c.where}: parallel.* = {product} ranks, the command starts {c.nproc}"
    for f in c.files:
        assert (ROOT / f).is_file(), f


@pytest.mark.parametrize("c", [c for c in COMMANDS if c.kind in ("file", "nemo")], ids=_id)
def test_named_files_exist(c):
    for f in c.files:
        assert (ROOT / f).is_file(), f"{c.where}: {f} does not exist"
    text = (ROOT / c.files[-1]).read_text()
    for w in c.words:  # a script's stage (`run_x2.sh 123b`), the stand-in entry point's keys (`out_dir=`)
        assert w in text, f"{c.where}: {c.files[-1]} knows no {w!r}"


def test_modules_docs_and_extras_exist():
    for c in COMMANDS:
        if c.kind == "docs":
            assert c.words[0] in ("recipes", "troubleshooting") and (ROOT / "docs" / f"{c.words[0]}.md").is_file()
        if c.kind == "module":
            assert importlib.util.find_spec(c.words[0]) is not None, c.words[0]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for c in COMMANDS:
        if c.kind == "pip":
            for extra in (e for tok in c.text.split() if "[" in tok for e in tok.split("[")[1].rstrip("]'").split(",")):
                assert extra in extras, f"{c.where}: no extra [{extra}] in pyproject.toml"


# The benchmark commands fabricate GBs and run for minutes: composed above, run by hand (docs/benchmarks.md).
PLAIN = [c for c in RECIPES if c.launcher == "python" and c.nproc == 1 and compose(*c.recipe).task != "benchmark"
         and (compose(*c.recipe).device == "cpu" or compose(*c.recipe).task == "plan")]


@pytest.mark.parametrize("c", PLAIN, ids=_id)
def test_plain_process_commands_run_as_written(c, checkpoints, tmp_path, monkeypatch, capfd):
    """In this process (the same code as the command, without a fresh interpreter's import per run);
    /ckpt/... paths become a fabricated checkpoint and a scratch output folder."""
    monkeypatch.chdir(tmp_path)
    assert main(substitute(c.argv, checkpoints, tmp_path), exit_process=False) == 0, capfd.readouterr()
    out = capfd.readouterr().out
    assert "[streaming_adapters]" in out or "pre-flight" in out, out


def test_no_benchmark_script_shadows_an_installed_package():
    # `python benchmarks/X.py` puts benchmarks/ first on sys.path: a file named like a package that
    # transformers imports (kernels.py did: PyPI `kernels`) breaks every import of it.
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        assert importlib.util.find_spec(f.stem) is None, f"benchmarks/{f.name} shadows the package {f.stem}"


def test_layout_table_runs(tmp_path):
    # The documented command, restricted to one model (the full table is ~40 s of CPU: tests/doc_commands).
    p = subprocess.run([sys.executable, "benchmarks/layout_table.py", str(tmp_path), "llama70b"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # The README's row: Llama-3.1-70B at TP=8 holds a 16.1 GiB BF16 shard per GPU.
    assert "| Llama-3.1-70B (FP8 block) | 70 GB | tp=8 dp=1 ep=1 (8) | 16.1 GiB |" in p.stdout, p.stdout


@pytest.mark.parametrize("c", [c for c in COMMANDS if c.kind == "python_code" and c.words], ids=_id)
def test_python_snippets_compile(c):
    """``python -c "..."`` lines of the docs are valid Python as written (the recipe commands after them run)."""
    compile(c.words[0], c.where, "exec")
