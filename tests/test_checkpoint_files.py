"""One notion of "a file of this checkpoint" (checkpoint/files.py): aliases are one file, nothing outside the
folder is read or copied (except the Hugging Face hub cache's own blobs/), regular files only, bounded copies."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from streaming_adapters.checkpoint import CheckpointIndex
from streaming_adapters.checkpoint import files as ckfiles
from streaming_adapters.convert import convert_checkpoint
from streaming_adapters.errors import CheckpointError, UnsafePathError

INDEX = "model.safetensors.index.json"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _hub_cache(src: Path, cache: Path, repo: str = "models--org--name") -> Path:
    """The layout huggingface_hub writes: blobs named by sha256, snapshot files as relative links to them."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / repo / "snapshots" / rev
    (cache / repo / "blobs").mkdir(parents=True)
    (cache / repo / "refs").mkdir()
    (cache / repo / "refs" / "main").write_text(rev)
    snap.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, cache / repo / "blobs" / sha)
        os.symlink(f"../../blobs/{sha}", snap / p.name)
    return snap


def _tensors(folder: Path) -> dict[str, bytes]:
    wm = json.loads((folder / INDEX).read_text())["weight_map"]
    out = {}
    for f in sorted(set(wm.values())):
        with safe_open(folder / f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
    return out


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    src = checkpoints("llama", "fp8_block")
    out = tmp_path_factory.mktemp("ref") / "out"
    convert_checkpoint(src, out, target="bf16", progress=False)
    return src, out


def test_hub_cache_layout_is_accepted_and_converts_identically(converted, tmp_path):
    src, want = converted
    snap = _hub_cache(src, tmp_path / "hub")
    assert all((snap / n).is_symlink() for n in os.listdir(snap))
    idx = CheckpointIndex.open(snap)
    assert set(idx.file_sizes) == {p.name for p in src.glob("*.safetensors")}
    out = tmp_path / "out"
    convert_checkpoint(snap, out, target="bf16", progress=False)
    assert sorted(os.listdir(out)) == sorted(os.listdir(want))
    for n in os.listdir(want):
        assert (out / n).read_bytes() == (want / n).read_bytes(), n
    assert not (out / "tokenizer_config.json").is_symlink()  # copied as a file, not as a link into the cache


def test_link_into_another_repositorys_blobs_is_refused(checkpoints, tmp_path):
    src = checkpoints("llama", "fp8_block")
    snap = _hub_cache(src, tmp_path / "hub")
    other = _hub_cache(src, tmp_path / "hub2", repo="models--evil--other")
    os.unlink(snap / "config.json")
    target = next(p for p in (other.parent.parent / "blobs").iterdir()
                  if p.read_bytes() == (src / "config.json").read_bytes())
    os.symlink(os.path.relpath(target, snap), snap / "config.json")
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder"):
        CheckpointIndex.open(snap)


@pytest.mark.parametrize("name", ["config.json", INDEX, "model-00002-of-00003.safetensors"])
def test_link_outside_the_folder_is_refused(checkpoints, tmp_path, name):
    ck = _copy(checkpoints("llama", "fp8_block"), tmp_path / "ck")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(ck / name, outside / name)
    os.symlink(outside / name, ck / name)
    with pytest.raises(UnsafePathError, match="points outside") as e:
        CheckpointIndex.open(ck)
    assert e.value.file == str(ck / name) and str(outside / name) in str(e.value)


def test_extra_file_linked_outside_or_to_a_device_is_not_copied(checkpoints, tmp_path):
    ck = _copy(checkpoints("llama", "fp8_block"), tmp_path / "ck")
    (tmp_path / "secret.txt").write_text("not part of the checkpoint")
    os.symlink(tmp_path / "secret.txt", ck / "tokenizer.json")
    with pytest.raises(UnsafePathError, match="points outside"):
        convert_checkpoint(ck, tmp_path / "out1", target="bf16", progress=False)
    assert not (tmp_path / "out1").exists()
    os.unlink(ck / "tokenizer.json")
    os.symlink("/dev/zero", ck / "tokenizer.json")
    with pytest.raises(UnsafePathError, match="points outside"):
        convert_checkpoint(ck, tmp_path / "out2", target="bf16", progress=False)


def test_fifo_or_device_in_the_folder_is_refused(checkpoints, tmp_path):
    ck = _copy(checkpoints("llama", "fp8_block"), tmp_path / "ck")
    os.mkfifo(ck / "vocab.txt")  # an extra file: copying it would block forever
    with pytest.raises(UnsafePathError, match="not a regular file") as e:
        convert_checkpoint(ck, tmp_path / "out", target="bf16", progress=False)
    assert "a FIFO" in str(e.value)
    os.unlink(ck / "vocab.txt")
    os.unlink(ck / "model-00003-of-00003.safetensors")
    os.mkfifo(ck / "model-00003-of-00003.safetensors")  # a shard
    with pytest.raises(UnsafePathError, match="not a regular file"):
        CheckpointIndex.open(ck)


def test_two_spellings_of_one_shard_are_one_file(converted, tmp_path):
    src, want = converted
    ck = _copy(src, tmp_path / "ck")
    index = json.loads((ck / INDEX).read_text())
    spell = ["./{}", "{}/", "{}", ".//{}"]
    for i, k in enumerate(sorted(index["weight_map"])):
        index["weight_map"][k] = spell[i % 4].format(index["weight_map"][k])
    (ck / INDEX).write_text(json.dumps(index))
    idx = CheckpointIndex.open(ck)
    assert set(idx.file_sizes) == {p.name for p in src.glob("*.safetensors")}
    out = tmp_path / "out"
    convert_checkpoint(ck, out, target="bf16", progress=False)
    assert sorted(os.listdir(out)) == sorted(os.listdir(want))
    assert _tensors(out) == _tensors(want)


# An empty name is refused earlier, as a damaged index (test_untrusted_headers.test_empty_weight_map_entry).
@pytest.mark.parametrize("bad", ["/abs/f.safetensors", "../f.safetensors", "a/../../f.safetensors", "a\\b"])
def test_bad_names_are_refused_by_name(checkpoints, tmp_path, bad):
    ck = _copy(checkpoints("llama", "fp8_block"), tmp_path / "ck")
    index = json.loads((ck / INDEX).read_text())
    index["weight_map"][sorted(index["weight_map"])[0]] = bad
    (ck / INDEX).write_text(json.dumps(index))
    with pytest.raises(UnsafePathError) as e:
        CheckpointIndex.open(ck)
    assert repr(bad) in str(e.value) or bad in str(e.value)


def test_a_shard_not_named_safetensors_is_not_overwritten_by_the_extra_copy(converted, tmp_path):
    src, want = converted
    ck = _copy(src, tmp_path / "ck")
    index = json.loads((ck / INDEX).read_text())
    old = "model-00002-of-00003.safetensors"
    os.rename(ck / old, ck / "model-00002.bin")
    index["weight_map"] = {k: ("model-00002.bin" if v == old else v) for k, v in index["weight_map"].items()}
    (ck / INDEX).write_text(json.dumps(index))
    out = tmp_path / "out"
    convert_checkpoint(ck, out, target="bf16", progress=False)
    assert (out / "model-00002.bin").read_bytes() == (want / old).read_bytes()  # converted, not the FP8 source


def test_shards_in_a_sub_folder_convert(converted, tmp_path):
    src, want = converted
    ck = _copy(src, tmp_path / "ck")
    (ck / "w").mkdir()
    index = json.loads((ck / INDEX).read_text())
    for f in {v for v in index["weight_map"].values()}:
        os.rename(ck / f, ck / "w" / f)
    index["weight_map"] = {k: f"w/{v}" for k, v in index["weight_map"].items()}
    (ck / INDEX).write_text(json.dumps(index))
    out = tmp_path / "out"
    convert_checkpoint(ck, out, target="bf16", progress=False)
    assert _tensors(out) == _tensors(want)


def test_extra_file_copy_is_bounded(checkpoints, tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    with open(root / "huge.pth", "wb") as f:
        f.truncate((1 << 30) + 1)  # sparse: claims 1 GiB + 1 byte, costs nothing
    with pytest.raises(CheckpointError, match="too large to copy") as e:
        ckfiles.copy_bounded(root, "huge.pth", tmp_path / "dst" / "huge.pth")
    assert str((1 << 30) + 1) in str(e.value) and not (tmp_path / "dst" / "huge.pth").exists()
    (root / "small.txt").write_text("x" * 100)
    ckfiles.copy_bounded(root, "small.txt", tmp_path / "dst" / "small.txt", limit=100)
    assert (tmp_path / "dst" / "small.txt").read_text() == "x" * 100


@pytest.mark.parametrize("name", ["config.json", ".hidden.safetensors", "sub/.x/f.safetensors"])
def test_a_shard_named_like_an_output_file_is_refused(checkpoints, tmp_path, name):
    """config.json / the index would be overwritten by the output's own; dot-names are bookkeeping."""
    ck = _copy(checkpoints("llama", "fp8_block"), tmp_path / "ck")
    index = json.loads((ck / INDEX).read_text())
    old = "model-00003-of-00003.safetensors"
    if name == "config.json":
        os.rename(ck / "config.json", ck / "cfg.bak")
    (ck / name).parent.mkdir(parents=True, exist_ok=True)
    os.rename(ck / old, ck / name)
    index["weight_map"] = {k: (name if v == old else v) for k, v in index["weight_map"].items()}
    (ck / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(ck, tmp_path / "out", target="bf16", progress=False)
    assert not (tmp_path / "out").exists() and name in str(e.value)


def test_output_path_without_a_name_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match="no folder name"):
        convert_checkpoint(checkpoints("llama", "fp8_block"), "/", target="bf16", progress=False)
