"""Calibration data: every local form, truncation, the tokens' hash, and errors before any compute."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from calib_fixtures import random_ids, write_jsonl, write_tokenizer
from streaming_adapters.calibrate.data import load_calibration_tokens, tokens_sha256
from streaming_adapters.errors import CalibrationDataError, CheckpointError


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1001}))
    return d


def test_input_ids_forms_agree_and_truncate(tmp_path):
    ids = torch.randint(0, 1001, (6, 40), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids}, tmp_path / "c.safetensors")
    torch.save({"input_ids": ids}, tmp_path / "c.pt")
    torch.save(ids.to(torch.int32), tmp_path / "bare.pt")
    write_jsonl(tmp_path / "c.jsonl", [{"input_ids": r} for r in ids.tolist()])
    got = [load_calibration_tokens(tmp_path / f, samples=4, seq_len=32, vocab_size=1001)
           for f in ("c.safetensors", "c.pt", "bare.pt", "c.jsonl")]
    for t in got:
        assert len(t.samples) == 4 and all(s.dtype == torch.int64 for s in t.samples)
        assert all(torch.equal(s, ids[i, :32]) for i, s in enumerate(t.samples))
        assert t.sha256 == got[0].sha256 == tokens_sha256([ids[i, :32] for i in range(4)])
    assert got[0].num_tokens == 128
    # the hash sees the split between samples, not only the concatenated ids
    assert tokens_sha256([ids[0, :32], ids[1, :32]]) != tokens_sha256([ids[0, :31], torch.cat([ids[0, 31:32], ids[1, :32]])])


def test_text_and_messages_use_the_checkpoint_tokenizer(tmp_path, tok_dir):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "w5 w6 w7"}, {"text": "w9 " * 50},
                                       {"messages": [{"role": "w3", "content": "w4 w8"}]}])
    t = load_calibration_tokens(tmp_path / "t.jsonl", checkpoint=tok_dir, samples=3, seq_len=10)
    assert t.samples[0].tolist() == [1, 5, 6, 7]             # BOS added for text
    assert t.samples[1].tolist() == [1] + [9] * 9             # truncated to seq_len, no padding
    assert t.samples[2].tolist() == [1, 3, 4, 8, 2]           # template's BOS only, not a second one


def test_shard_splits_samples_by_tokens():
    samples = [torch.zeros(n, dtype=torch.int64) for n in (10, 10, 10, 10, 40)]
    from streaming_adapters.calibrate.data import CalibrationTokens

    t = CalibrationTokens(samples, "x", 64)
    for world in (1, 2, 3, 4, 7):
        parts = [t.shard(r, world) for r in range(world)]
        assert sum(parts, []) == list(range(5))
    assert [t.shard(r, 2) for r in range(2)] == [[0, 1, 2, 3], [4]]


@pytest.mark.parametrize("content, match", [
    ('{"input_ids": [3]}\nnot json\n', "line 2 of the calibration data is not JSON"),
    ('{"prompt": "w3"}\n', "line 1 of the calibration data has no text, messages or input_ids"),
    ('{"input_ids": [3, 4.5]}\n', "input_ids of calibration sample 0 are not a list of integers"),
    ('{"input_ids": [3, 1001]}\n', "holds token id 1001, outside the vocabulary"),
    ('{"input_ids": [-1, 5]}\n', "holds token id -1, outside the vocabulary"),
    ('{"input_ids": []}\n', "calibration sample 0 has no tokens"),
    ('{"input_ids": [3]}\n{"input_ids": [4]}\n', "holds 2 sample\\(s\\), fewer than the 3 asked for"),
])
def test_bad_jsonl_is_refused_with_a_named_error(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(CalibrationDataError, match=match) as e:
        load_calibration_tokens(tmp_path / "bad.jsonl", samples=3, seq_len=8, vocab_size=1001)
    assert isinstance(e.value, CheckpointError) and e.value.file.endswith("bad.jsonl") and e.value.fix


def test_missing_unknown_and_unreadable_files(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration_tokens(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(CalibrationDataError, match="unknown calibration data type '.csv'"):
        load_calibration_tokens(tmp_path / "d.csv")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CalibrationDataError, match="cannot read the calibration data"):
        load_calibration_tokens(tmp_path / "junk.safetensors")
    save_file({"input_ids": torch.zeros(4, 3)}, tmp_path / "f.safetensors")
    with pytest.raises(CalibrationDataError, match="no integer input_ids"):
        load_calibration_tokens(tmp_path / "f.safetensors")
    write_jsonl(tmp_path / "t.jsonl", [{"text": "w3"}])
    with pytest.raises(CalibrationDataError, match="text calibration data needs a tokenizer"):
        load_calibration_tokens(tmp_path / "t.jsonl", samples=1)
    with pytest.raises(CalibrationDataError, match="no tokenizer could be loaded"):
        load_calibration_tokens(tmp_path / "t.jsonl", tokenizer=tmp_path, samples=1)


def test_datasets_folder(tmp_path, tok_dir):
    datasets = pytest.importorskip("datasets")
    rows = random_ids(3, 12)
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "ds"))
    t = load_calibration_tokens(tmp_path / "ds", checkpoint=tok_dir, samples=3, seq_len=8)
    assert [s.tolist() for s in t.samples] == [r[:8] for r in rows]
