"""Bad input fails loudly, before anything is written, naming the file, the tensor, what was expected and
what to do.  (The same errors on every rank of a group: tests/test_dist_2.py.)"""

from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import streaming_adapters as sa
from helpers import poisoned_like
from reference import reference_state_dict
from streaming_adapters.errors import (
    CorruptCheckpointError,
    DestinationError,
    MissingScaleError,
    ScaleLayoutError,
    UnknownFormatError,
    UnsafePathError,
)

W = "model.layers.1.mlp.down_proj.weight"
S = "model.layers.1.mlp.down_proj.weight_scale_inv"


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    """A private, mutable copy of a block-FP8 Llama checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama", "fp8_block"), dst)
    return dst


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite(path, name, fn):
    """Apply ``fn(tensors)`` to the file that holds ``name`` and fix the index."""
    idx = _index(path)
    f = path / idx["weight_map"][name]
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != f.name}
    idx["weight_map"].update({k: f.name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))


def _load(path, keys=(W,)):
    ref_shapes = {W: (320, 200)}
    sd = {k: poisoned_like(ref_shapes.get(k, (320, 200))) for k in keys}
    return sa.load_fp8_state_dict(sd, path)


def _assert_actionable(err, *, file=None, tensor=None):
    msg = str(err)
    assert "expected:" in msg and "what to do:" in msg, msg
    if file is not None:
        assert file in msg, msg
    if tensor is not None:
        assert tensor in msg, msg


def test_fp8_weight_without_scale(ckpt):
    _rewrite(ckpt, S, lambda t: t.pop(S))
    with pytest.raises(MissingScaleError) as e:
        _load(ckpt)
    _assert_actionable(e.value, tensor=W, file=_index(ckpt)["weight_map"][W])
    assert S in str(e.value)


def test_scale_grid_does_not_match_config_block(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 128]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScaleLayoutError) as e:
        _load(ckpt)
    _assert_actionable(e.value)
    assert "grid" in str(e.value) and "[64, 128]" in str(e.value)


def test_scale_on_a_non_fp8_tensor(ckpt):
    _rewrite(ckpt, W, lambda t: t.__setitem__(W, t[W].to(torch.bfloat16)))
    with pytest.raises(ScaleLayoutError) as e:
        _load(ckpt)
    _assert_actionable(e.value, tensor=W)
    assert "not FP8" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_scale(ckpt, bad):
    def poison(t):
        t[S] = t[S].clone()
        t[S][1, 0] = bad

    _rewrite(ckpt, S, poison)
    with pytest.raises(ScaleLayoutError) as e:
        _load(ckpt)
    _assert_actionable(e.value, tensor=S)
    assert "[1, 0]" in str(e.value) and "not finite" in str(e.value)


def test_truncated_file(ckpt):
    f = ckpt / _index(ckpt)["weight_map"][W]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptCheckpointError) as e:
        _load(ckpt)
    _assert_actionable(e.value, file=f.name)
    assert "truncated" in str(e.value)


def test_corrupt_header(ckpt):
    f = ckpt / _index(ckpt)["weight_map"][W]
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n // 2] = 0x01  # a control byte is invalid anywhere in JSON
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as e:
        _load(ckpt)
    _assert_actionable(e.value, file=f.name)
    assert "JSON" in str(e.value)


def test_garbage_header_length(ckpt):
    f = ckpt / _index(ckpt)["weight_map"][W]
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="header length"):
        _load(ckpt)


def test_index_names_a_missing_file(ckpt):
    idx = _index(ckpt)
    victim = idx["weight_map"][W]
    (ckpt / victim).unlink()
    with pytest.raises(CorruptCheckpointError) as e:
        _load(ckpt)
    _assert_actionable(e.value, file=victim)
    assert "does not exist" in str(e.value)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entry_pointing_outside_the_folder(ckpt, evil):
    (ckpt.parent / "outside.safetensors").write_bytes((ckpt / _index(ckpt)["weight_map"][W]).read_bytes())
    idx = _index(ckpt)
    idx["weight_map"][W] = evil
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(UnsafePathError) as e:
        _load(ckpt)
    _assert_actionable(e.value, file=evil)


def test_symlink_pointing_outside_the_folder(ckpt):
    idx = _index(ckpt)
    real = ckpt / idx["weight_map"][W]
    outside = ckpt.parent / "elsewhere.safetensors"
    shutil.move(real, outside)
    real.symlink_to(outside)
    with pytest.raises(UnsafePathError):
        _load(ckpt)


def test_destination_shape_differs(ckpt):
    sd = {W: poisoned_like((320, 256))}
    with pytest.raises(DestinationError) as e:
        sa.load_fp8_state_dict(sd, ckpt)
    _assert_actionable(e.value, tensor=W)
    assert "[320, 256]" in str(e.value) and "[320, 200]" in str(e.value)
    assert torch.isnan(sd[W]).all(), "nothing may be written on a failed validation"


def test_destination_dtype_cannot_hold_fp8(ckpt):
    with pytest.raises(DestinationError, match="cannot hold"):
        sa.load_fp8_state_dict({W: torch.zeros(320, 200, dtype=torch.int8)}, ckpt)


def test_missing_key_lists_examples_and_close_matches(ckpt):
    with pytest.raises(DestinationError) as e:
        sa.load_fp8_state_dict({"model.layers.1.mlp.down_proj.weigth": poisoned_like((320, 200))}, ckpt)
    assert "close matches" in str(e.value) and W in str(e.value)


def test_unknown_quant_method_lists_registered_ones(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "fp9"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownFormatError) as e:
        _load(ckpt)
    _assert_actionable(e.value, file="config.json")
    for m in ("fp8", "compressed-tensors", "modelopt", "fbgemm_fp8"):
        assert m in str(e.value)


def test_errors_are_exceptions_not_base_exceptions(ckpt):
    _rewrite(ckpt, S, lambda t: t.pop(S))
    try:
        _load(ckpt)
    except Exception as e:  # noqa: BLE001 -- the point: `except Exception` catches it
        assert isinstance(e, sa.CheckpointError)
    else:
        raise AssertionError("no error")


def test_a_good_load_after_errors_is_still_exact(checkpoints):
    path = checkpoints("llama", "fp8_block")
    ref = reference_state_dict(path)
    sd = {W: poisoned_like(ref[W].shape)}
    sa.load_fp8_state_dict(sd, path)
    assert torch.equal(sd[W].view(torch.int16), ref[W].view(torch.int16))
    assert math.isfinite(float(sd[W].float().abs().max()))
