"""evaluate(): streamed layer by layer vs transformers' whole-model forward, metrics, outputs, spill, inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import streaming_adapters as sa
from nvfp4_bodies import CT, MO, make_nvfp4
from streaming_adapters.models.load import load_fp8_checkpoint


def rows(n=3, seed=0, lo=5, hi=33):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g) for _ in range(n)]


def whole_model_logits(path, samples, device: str = "cpu", attn: str = "sdpa"):
    """transformers' whole model (filled by the project's loader), one row at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(path))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    model.to_empty(device=device)
    load_fp8_checkpoint(model, path, strict=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)
    model.eval()
    with torch.no_grad():
        return [model(input_ids=s[None].to(device), attention_mask=torch.ones(1, s.numel(), dtype=torch.int64,
                      device=device), use_cache=False).logits[0].cpu() for s in samples]


def nll_of(logits, samples):
    tot = n = 0.0
    for lg, s in zip(logits, samples):
        lp = lg[:-1].float().log_softmax(-1)
        tot += float(-lp.gather(-1, s[1:, None]).double().sum())
        n += s.numel() - 1
    return tot / n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_streamed_logits_equal_whole_model(checkpoints, family, attn):
    # Same decoder-layer modules, same kwargs, batch 1: the streamed logits are the whole model's bit for bit.
    path = checkpoints(family, "fp8_block")
    samples = rows()
    got = sa.evaluate(path, samples, keep_logits=True, attn_implementation=attn)
    want = whole_model_logits(path, samples, attn=attn)
    for j, w in enumerate(want):
        assert got["logits"][j].dtype == torch.bfloat16
        assert torch.equal(got["logits"][j], w), j
    assert got["nll"] == pytest.approx(nll_of(want, samples), rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]), rel=1e-12)
    assert got["tokens"] == sum(s.numel() - 1 for s in samples) and got["rows"] == 3
    assert 100 < got["perplexity"] < 1e5  # random weights, vocab 1001: near-uniform, not degenerate


def test_reference_against_itself_is_zero_error(checkpoints):
    path = checkpoints("llama", "fp8_block")
    r = sa.evaluate(path, rows(2, seed=1), reference=path)
    assert r["kl"] == 0.0 and r["top1"] == 1.0 and r["ref_perplexity"] == r["perplexity"]
    assert [x["rel_l2"] for x in r["layers"]] == [0.0] * 3
    assert all(x["cosine"] == pytest.approx(1.0, abs=1e-12) for x in r["layers"])


@pytest.mark.parametrize("fmt", [CT, MO])
def test_nvfp4_against_fp8_reference_writes_report_and_plot(checkpoints, tmp_path_factory, tmp_path, fmt):
    src = checkpoints("llama", "fp8_block")
    q = make_nvfp4(src, tmp_path_factory.mktemp("nv") / fmt, fmt)
    samples = rows(3, seed=2)
    r = sa.evaluate(q, samples, reference=src, out_dir=tmp_path / "out", keep_logits=True)
    # The NVFP4 model's own logits: the whole model loaded through the same registry reader.
    want = whole_model_logits(q, samples)
    assert all(torch.equal(r["logits"][j], w) for j, w in enumerate(want))
    ref = whole_model_logits(src, samples)
    kl = sum(float((torch.log_softmax(b[:-1].float(), -1).exp() * (torch.log_softmax(b[:-1].float(), -1)
                    - torch.log_softmax(a[:-1].float(), -1))).sum(-1).double().sum()) for a, b in zip(want, ref))
    assert r["kl"] == pytest.approx(kl / r["tokens"], rel=1e-9) and r["kl"] > 0
    top1 = sum(int((a[:-1].argmax(-1) == b[:-1].argmax(-1)).sum()) for a, b in zip(want, ref)) / r["tokens"]
    assert r["top1"] == top1 and 0 < top1 <= 1
    # Error enters at every layer: 4-bit weights of a random model are far from the FP8 ones, but correlated.
    assert all(0 < x["rel_l2"] < 1.5 and 0.3 < x["cosine"] < 1 for x in r["layers"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["kl"] == r["kl"] and len(saved["layers"]) == 3 and "logits" not in saved
    svg = (tmp_path / "out" / "layers.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == 6  # 3 layers x 2 panels


def test_spilled_hidden_states_give_the_same_numbers(checkpoints, tmp_path):
    path = checkpoints("llama", "fp8_block")
    samples = rows(2, seed=3)
    mem = sa.evaluate(path, samples, reference=path)
    disk = sa.evaluate(path, samples, reference=path, host_budget_bytes=0, work_dir=tmp_path / "w")
    assert disk["spilled"] and not mem["spilled"]
    for k in ("nll", "perplexity", "kl", "top1", "layers"):
        assert disk[k] == mem[k], k
    assert list((tmp_path / "w").iterdir()) == []


def test_text_file_is_cut_into_rows(checkpoints, tmp_path):
    from calib_fixtures import write_tokenizer

    path = checkpoints("llama", "fp8_block")
    tok = write_tokenizer(tmp_path / "tok")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{3 + (i * 37) % 990}" for i in range(50)))
    r = sa.evaluate(path, text, tokenizer=tok, seq_len=16)
    # 50 words + BOS = 51 ids -> rows of 16, 16, 16, 3: 15 + 15 + 15 + 2 predictions.
    assert r["rows"] == 4 and r["tokens"] == 47
    ids = [1] + [3 + (i * 37) % 990 for i in range(50)]
    direct = sa.evaluate(path, [torch.tensor(ids[k:k + 16]) for k in range(0, 51, 16)])
    assert direct["nll"] == r["nll"]


def test_recipe_writes_table_report_and_plot(checkpoints, tmp_path):
    from launch import entry
    from safetensors.torch import save_file

    src = checkpoints("llama", "fp8_block")
    ids = torch.stack([r[:8] for r in rows(3, seed=5, lo=8)])
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    out = tmp_path / "ev"
    p = entry(["--config-name", "evaluate", f"checkpoint.path={src}", f"evaluate.data={tmp_path / 'ids.safetensors'}",
               f"evaluate.reference={src}", f"evaluate.out_dir={out}", f"report.path={tmp_path / 'r.json'}"])
    assert "top-1 agreement 100.00%" in p.stdout and "evaluate layer 3/3" in p.stdout, p.stdout[-2000:]
    r = json.loads((out / "report.json").read_text())
    assert r["rows"] == 3 and r["tokens"] == 21 and r["kl"] == 0.0
    assert r["nll"] == sa.evaluate(src, list(ids))["nll"]
    assert (out / "layers.svg").read_text().startswith("<svg")
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"] == r["perplexity"]


def test_recipe_refuses_options_evaluate_ignores(checkpoints, tmp_path):
    """config.USED['evaluate']: a conversion or load_check option on an evaluate command line is one
    ConfigError naming every ignored key and why, before any data or checkpoint is read (the data file here
    does not exist and the out_dir stays unwritten)."""
    from launch import entry

    src = checkpoints("llama", "fp8_block")
    out = tmp_path / "ev"
    p = entry(["--config-name", "evaluate", f"checkpoint.path={src}", f"evaluate.data={tmp_path / 'none.txt'}",
               f"evaluate.out_dir={out}", "evaluate.samples=2", "verify=true", "parallel.tp=2", "io.chunk_mb=8",
               "dry_run=true", f"output.path={tmp_path / 'o'}", "calibration.samples=4"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    assert p.stderr.count("error: ") == 1 and "ConfigError" in p.stderr, p.stderr
    for want in ("verify=True is ignored by evaluate: task evaluate does not read it",
                 "parallel.tp=2 is ignored by evaluate: evaluate splits the rows over all ranks",
                 "io.chunk_mb=8 is ignored by evaluate: task evaluate does not read it",
                 "dry_run=True is ignored by evaluate: evaluate has no pre-flight plan",
                 "output.path=", "is ignored by evaluate: evaluate writes no checkpoint",
                 "calibration.samples=4 is ignored by evaluate"):
        assert want in p.stderr, (want, p.stderr)
    # evaluate.* keys (samples, out_dir, data) are its own: none of them is named.
    assert "evaluate.samples=2 is" not in p.stderr and "evaluate.out_dir=" not in p.stderr
    assert not out.exists()


def test_attention_other_than_eager_or_sdpa_is_refused(checkpoints, tmp_path):
    from launch import entry

    src = checkpoints("llama", "fp8_block")
    p = entry(["--config-name", "evaluate", f"checkpoint.path={src}", f"evaluate.data={tmp_path / 'x.txt'}",
               "evaluate.attn_implementation=flash_attention_2", f"evaluate.out_dir={tmp_path / 'ev'}"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    assert "evaluate.attn_implementation=flash_attention_2 is not one of: eager, sdpa" in p.stderr, p.stderr
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \('eager', 'sdpa'\)"):
        sa.evaluate(src, rows(1), attn_implementation="flash_attention_2")
    assert not (tmp_path / "ev").exists()


def test_evaluate_is_a_plain_function_and_the_old_module_paths_still_import():
    """sa.evaluate is an ordinary function (no callable-module class swap); the implementation lives in
    streaming_adapters.quality, and the old streaming_adapters.evaluate.<module> paths are the same module
    objects (same classes), in a fresh interpreter where nothing was imported before."""
    import subprocess
    import sys

    code = (
        "import types, inspect, streaming_adapters as sa\n"
        "from streaming_adapters import evaluate\n"
        "from streaming_adapters.evaluate.emulate import InputScales\n"
        "from streaming_adapters.evaluate import metrics\n"
        "import streaming_adapters.evaluate.run\n"
        "import streaming_adapters.quality as q, streaming_adapters.quality.emulate as qe\n"
        "assert type(sa.evaluate) is types.FunctionType and evaluate is sa.evaluate is q.evaluate\n"
        "assert type(sa).__name__ == 'module' and type(q).__name__ == 'module'\n"
        "assert sa.evaluate.__module__ == 'streaming_adapters.quality.run'\n"
        "assert InputScales is qe.InputScales and metrics is q.metrics\n"
        "print(list(inspect.signature(sa.evaluate).parameters)[:4])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "['checkpoint', 'tokens', 'reference', 'emulate_activations']"
