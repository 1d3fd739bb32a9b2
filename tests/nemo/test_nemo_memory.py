"""Per-rank peak anonymous memory of ``NeMoAutoModelForCausalLM.from_pretrained`` under FSDP2 on two ranks,
sampled from outside the ranks (``/proc/<pid>/status`` RssAnon, every 2 ms, by this process).

A 150M-parameter Llama-shaped block-FP8 checkpoint (hidden 1024, 12 layers, vocab 8000; 300 MB in BF16), as
NeMo's Llama class and, with the same tensors, as a Mistral checkpoint (a class NeMo leaves to transformers).
With the hook each rank holds its shard plus the read core's transient (one staging buffer of the largest
box, at most ``chunk_bytes``, + scratch); without it the Mistral load builds and dequantizes the whole BF16 model
on every rank before sharding (NeMo issue #2114).  The before/after of the parts' host temporaries (removed)
is measured on larger layers by ``benchmarks/nemo_host_peak.py``."""

from __future__ import annotations

import json
import os

import nemo_bodies as B
import pytest

from streaming_adapters.bench.checkpoint import fabricate

pytestmark = pytest.mark.dist
MiB = B.MiB


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemo_mem")
    llama = fabricate(root / "llama", "tiny", layers=12)  # random codes and scales: ~3 s
    mistral = root / "mistral"
    mistral.mkdir()
    for f in llama.iterdir():  # the same tensors under a Mistral config (hard links: no copy)
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            os.link(f, mistral / f.name)
    for path, arch, mt in ((llama, "LlamaForCausalLM", "llama"), (mistral, "MistralForCausalLM", "mistral")):
        cfg = json.loads((llama / "config.json").read_text())
        cfg.update(architectures=[arch], model_type=mt, torch_dtype="bfloat16")
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"llama": str(llama), "mistral": str(mistral)}


def test_fsdp2_peak_rss_is_the_shard_not_the_model(big, nemo_checkpoints):
    small = str(nemo_checkpoints("llama"))
    table = {
        ("Llama (NeMo class)", "hook"): B.measure_peak(big["llama"], True, small),
        ("Mistral (transformers class)", "hook"): B.measure_peak(big["mistral"], True, small),
        ("Llama (NeMo class)", "no hook: FP8 codes copied"): B.measure_peak(big["llama"], False, small),
        ("Mistral (transformers class)", "no hook: whole model per rank"): B.measure_peak(big["mistral"], False, small),
    }
    print("\nmodel | path | rank | shard MiB | full BF16 MiB | peak RssAnon +MiB | at end +MiB | temporary MiB | "
          "parts | s")
    for (model, path), rows in table.items():
        for i, r in enumerate(rows):
            tmp = "-" if r["temporary"] is None else f"{r['temporary'] / MiB:.1f}"
            print(f"{model} | {path} | {i} | {r['shard'] / MiB:.1f} | {r['full'] / MiB:.1f} | {r['peak'] / MiB:.1f} | "
                  f"{r['end'] / MiB:.1f} | {tmp} | {r['parts'] or '-'} | {r['seconds']:.2f}")
    for key in (("Llama (NeMo class)", "hook"), ("Mistral (transformers class)", "hook")):
        for r in table[key]:
            assert r["samples"] > 50, r
            assert r["end"] >= 0.9 * r["shard"], (key, r)                           # the shard was written
            assert r["peak"] <= r["shard"] + r["temporary"] + 64 * MiB, (key, r)  # shard + transient + NeMo's own
            assert r["peak"] < 0.7 * r["full"], (key, r)                            # never the whole model
            assert r["parts"] == 13 and r["temporary"] < 16 * MiB, (key, r)  # 13 parts; staging of the 7.8 MiB box
    for r in table[("Mistral (transformers class)", "no hook: whole model per rank")]:
        # NeMo today: the whole BF16 model on every rank (its BF16 embeddings and head, 11% of this model, may stay
        # page-cache views of the file, which RssAnon does not count)
        assert r["peak"] >= 0.8 * r["full"] and r["peak"] >= 1.5 * r["shard"], r
