"""W4A4 producers' reference suite: run by ``bash tests/producers_w4a4/run.sh`` in its own virtualenv
(``.venv-producers``: llm-compressor 0.14.0.1 + nvidia-modelopt 0.47.0, transformers 5.17).  Without them
(the main environment) this folder is not collected; CI runs it as its own named step."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # calib_fixtures, helpers

collect_ignore_glob = [] if importlib.util.find_spec("llmcompressor") and importlib.util.find_spec("modelopt") \
    else ["test_*.py"]


@pytest.fixture(scope="session")
def setup(checkpoints, tmp_path_factory):
    """``setup(family, ragged=True, **config)`` -> (FP8 fixture, its BF16 dequantization for the producers,
    token ids (lengths 24..48, or all 48 without ``ragged``), the ids as a .jsonl, a work folder); built once
    per (family, ragged, config overrides)."""
    from calib_fixtures import random_ids, write_jsonl, write_tokenizer
    from streaming_adapters.convert import convert_checkpoint
    from w4a4_runs import ARCH, SAMPLES, SEQ_LEN

    cache: dict[tuple, tuple] = {}

    def make(family: str, ragged: bool = True, **config):
        key = (family, ragged, tuple(sorted(config.items())))
        if key in cache:
            return cache[key]
        # intermediate 208: FP8 blocks cut inside (208 % 128 != 0) but every Linear NVFP4-able (208 % 16 == 0)
        src = checkpoints(family, "fp8_block", intermediate_size=208, **config)
        d = tmp_path_factory.mktemp("-".join([f"prod-{family}"] + ([] if ragged else ["equal-lengths"])
                                             + [f"{k}={v}" for k, v in sorted(config.items())]))
        bf16 = d / "bf16"
        convert_checkpoint(src, bf16, target="bf16", progress=False)
        cfg = json.loads((bf16 / "config.json").read_text())
        cfg["architectures"] = [ARCH[family]]  # from_pretrained picks the class by it
        (bf16 / "config.json").write_text(json.dumps(cfg))
        write_tokenizer(bf16)
        ids = random_ids(SAMPLES, SEQ_LEN, seed=7, ragged=ragged)
        data = write_jsonl(d / "ids.jsonl", [{"input_ids": r} for r in ids])
        cache[key] = src, bf16, ids, data, d
        return cache[key]

    return make
