"""A safetensors header is untrusted input: every rule ``safetensors`` (Rust) enforces is enforced here too,
then more (bounds on size and tensor count, deep nesting, huge ints), always as a named
``CorruptCheckpointError`` that names the file -- never a raw exception, never a shifted read."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import streaming_adapters as sa
from streaming_adapters.checkpoint import header as H
from streaming_adapters.checkpoint.index import CheckpointIndex
from streaming_adapters.errors import CheckpointError, CorruptCheckpointError, ScaleLayoutError


def _entries(*specs):
    """(name, dtype, shape, begin, end) -> header dict."""
    return {n: {"dtype": d, "shape": list(s), "data_offsets": [b, e]} for n, d, s, b, e in specs}


def _write(path, header, data: bytes, *, pad=True, length_delta=0):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (8 + -len(text) % 8)  # at least 8 spaces: the short-length case ends inside them
    path.write_bytes(struct.pack("<Q", len(text) + length_delta) + text + data)
    return path


GOOD = _entries(("a", "F32", (2,), 0, 8), ("b", "U8", (4,), 8, 12))
DATA = struct.pack("<2f", 1.5, -2.0) + bytes([1, 2, 3, 4])


def _open(tmp_path):
    return CheckpointIndex.open(tmp_path)


def _refused(tmp_path, match=None, *, safetensors_refuses=True):
    f = tmp_path / "model.safetensors"
    with pytest.raises(CorruptCheckpointError, match=match) as e:
        _open(tmp_path)
    assert str(f) in str(e.value) and "what to do:" in str(e.value)
    if safetensors_refuses:  # the rule is safetensors' own, not an invention of ours
        with pytest.raises(Exception):
            with safe_open(str(f), "pt") as g:
                [g.get_tensor(k) for k in g.keys()]
    return e.value


def test_a_good_file_loads_with_exact_offsets(tmp_path):
    _write(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, **GOOD}, DATA)
    idx = _open(tmp_path)
    n = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])[0]
    assert (idx["a"].begin, idx["a"].end, idx["b"].begin, idx["b"].end) == (8 + n, 16 + n, 16 + n, 20 + n)


def test_leading_whitespace_is_json_as_for_safetensors(tmp_path):
    f = _write(tmp_path / "model.safetensors", b"  " + json.dumps(GOOD).encode(), DATA)
    with safe_open(str(f), "pt") as g:
        assert g.get_tensor("a").tolist() == [1.5, -2.0]
    assert _open(tmp_path)["a"].nbytes == 8


def test_zero_size_tensors_share_an_offset(tmp_path):
    hdr = _entries(("e", "F32", (0, 7), 0, 0), ("a", "F32", (2,), 0, 8), ("z", "BF16", (3, 0), 8, 8))
    _write(tmp_path / "model.safetensors", hdr, DATA[:8])
    assert _open(tmp_path)["z"].nbytes == 0


@pytest.mark.parametrize("delta", [-1, -3, -7])
def test_header_length_a_few_bytes_short_inside_the_padding(tmp_path, delta):
    # The JSON still parses (the bytes cut off are spaces); the data would be read shifted by |delta| bytes.
    _write(tmp_path / "model.safetensors", GOOD, DATA, length_delta=delta)
    err = _refused(tmp_path, match="header length field or the offsets are wrong")
    assert f"{12 - delta} data bytes" in str(err)


def test_header_length_longer_than_the_json(tmp_path):
    _write(tmp_path / "model.safetensors", GOOD, DATA, length_delta=+4)
    _refused(tmp_path)


@pytest.mark.parametrize("hdr,match", [
    (_entries(("a", "F32", (2,), 0, 8), ("b", "U8", (4,), 4, 8)), "overlaps 'a'"),
    (_entries(("a", "F32", (2,), 0, 8), ("b", "F32", (2,), 0, 8)), "overlaps 'a'"),
    (_entries(("a", "F32", (2,), 4, 12)), "unused bytes at the start"),
    (_entries(("a", "F32", (1,), 0, 4), ("b", "U8", (4,), 8, 12)), "gap of 4 unused bytes"),
    (_entries(("a", "F32", (2,), 0, 8)), "no trailing bytes"),
])
def test_offsets_must_cover_the_data_exactly(tmp_path, hdr, match):
    _write(tmp_path / "model.safetensors", hdr, DATA)
    _refused(tmp_path, match=match)


@pytest.mark.parametrize("text,match", [
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[4],'
     b'"data_offsets":[8,12]}}', "duplicate JSON key 'a'"),
    (b'{"a":{"dtype":"U8","dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],'
     b'"data_offsets":[8,12]}}', "duplicate JSON key 'dtype'"),
    (json.dumps(GOOD).encode("utf-16"), "starts with"),
    (b"{" + json.dumps(GOOD).encode()[1:-1] + b',"c\xff":{}}', "not UTF-8"),
    (json.dumps(GOOD).encode() + b"\x00\x00", "not valid JSON"),
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', "not valid JSON"),
    (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', "JSON constant NaN"),
    (b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],'
     b'"data_offsets":[8,12]}}', "not valid Unicode"),
])
def test_json_that_safetensors_refuses(tmp_path, text, match):
    _write(tmp_path / "model.safetensors", text, DATA)
    _refused(tmp_path, match=match)


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "F32", "shape": [2 ** 62, 2 ** 62, 4], "data_offsets": [0, 8]}, "span 8 bytes"),
    ({"dtype": "F32", "shape": [2 ** 64], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}, "bad shape"),
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}, "bad data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "bad data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "bad data_offsets"),
    ({"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ([1, 2], "not an object"),
])
def test_bad_entries(tmp_path, entry, match):
    _write(tmp_path / "model.safetensors", {"a": entry, "b": GOOD["b"]}, DATA)
    _refused(tmp_path, match=match)


@pytest.mark.parametrize("meta", [{"format": 1}, ["pt"], {"format": {"x": "y"}}])
def test_metadata_must_be_strings(tmp_path, meta):
    _write(tmp_path / "model.safetensors", {"__metadata__": meta, **GOOD}, DATA)
    _refused(tmp_path, match="__metadata__")


def test_header_size_bound_before_reading_it(tmp_path):
    f = _write(tmp_path / "model.safetensors", GOOD, DATA)
    with open(f, "r+b") as g:  # sparse: a 65 MiB claim in a file that really is that large
        g.write(struct.pack("<Q", H.MAX_HEADER_BYTES + 8))
        g.truncate(H.MAX_HEADER_BYTES + 64)
    _refused(tmp_path, match="at most 67108864 bytes", safetensors_refuses=False)


def test_a_million_tensor_header_is_refused_fast_and_lean(tmp_path):
    # 2**18 + 1 entries (15 MB): refused by the count before json.loads builds ~0.4 GB of objects.
    n = H.MAX_TENSORS_PER_FILE + 1
    body = b",".join(b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(n))
    _write(tmp_path / "model.safetensors", b"{" + body + b"}", bytes(n))
    t0 = time.perf_counter()
    _refused(tmp_path, match=f"declares up to {n} tensors", safetensors_refuses=False)
    assert time.perf_counter() - t0 < 2.0  # measured 0.02 s; parsing it would take ~5 s


def test_truncated_inside_the_header(tmp_path):
    f = _write(tmp_path / "model.safetensors", GOOD, DATA)
    f.write_bytes(f.read_bytes()[:20])
    _refused(tmp_path, match="header length")


# -- config.json and the index ---------------------------------------------------------------------------
def _ckpt(tmp_path, config=None, index=None):
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(tmp_path / "model.safetensors"))
    if config is not None:
        raw = config if isinstance(config, bytes) else json.dumps(config).encode()
        (tmp_path / "config.json").write_bytes(raw)
    if index is not None:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


@pytest.mark.parametrize("qc", ["fp8", ["fp8"], 3, True])
def test_quantization_config_of_the_wrong_json_type(tmp_path, qc):
    _ckpt(tmp_path, {"model_type": "llama", "quantization_config": qc})
    with pytest.raises(CorruptCheckpointError, match="quantization_config is a JSON") as e:
        sa.get_adapter(tmp_path)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("text,match", [
    (b'{"model_type": "llama", "model_type": "mistral"}', "duplicate JSON key 'model_type'"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"a": ' + b"7" * 5000 + b"}", "not valid JSON"),
    (b'\xff\xfe{\x00}\x00', "not UTF-8"),
])
def test_bad_config_json(tmp_path, text, match):
    _ckpt(tmp_path, text)
    with pytest.raises(CorruptCheckpointError, match=match) as e:
        CheckpointIndex.open(tmp_path)
    assert "config.json" in str(e.value)


def test_empty_weight_map_entry(tmp_path):
    _ckpt(tmp_path, index={"weight_map": {"w": ""}})
    with pytest.raises(CorruptCheckpointError, match="empty file name") as e:
        CheckpointIndex.open(tmp_path)
    assert e.value.tensor == "w"


def test_errors_are_checkpoint_errors_and_exceptions():
    assert issubclass(CorruptCheckpointError, CheckpointError) and issubclass(CheckpointError, Exception)


# -- non-finite results of finite inputs ------------------------------------------------------------------
W = "model.layers.1.mlp.down_proj.weight"
S = "model.layers.1.mlp.down_proj.weight_scale_inv"


def _copy_with(checkpoints, tmp_path, fmt, name, fn):
    """A private copy of the llama ``fmt`` checkpoint with ``fn(tensor)`` applied to tensor ``name``."""
    import shutil

    from safetensors.torch import load_file

    dst = tmp_path / fmt
    shutil.copytree(checkpoints("llama", fmt), dst)
    f = dst / json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(f))
    tensors[name] = fn(tensors[name].clone())
    save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def _load(path, dtype=torch.bfloat16):
    sd = {W: torch.full((320, 200), float("nan"), dtype=dtype)}
    sa.load_fp8_state_dict(sd, path)
    return sd[W]


def _set(t, idx, value):
    t[idx] = value
    return t


@pytest.mark.parametrize("fmt,value,match", [
    ("fp8_block", 3e38, "overflows torch.bfloat16"),        # finite F32, 448 x 3e38 = Inf
    ("fp8_block", 1e36, "overflows torch.bfloat16"),        # above 3.39e38 / 448 = 7.57e35
    ("fp8_block", float("-inf"), "not finite"),
    ("fp8_block_u8", 254, "overflows torch.bfloat16"),      # UE8M0 byte 254 = 2**127
    ("fp8_block_u8", 255, "not finite"),                    # UE8M0 byte 255 = NaN
])
def test_scales_that_make_inf_or_nan_weights_are_refused(checkpoints, tmp_path, fmt, value, match):
    path = _copy_with(checkpoints, tmp_path, fmt, S, lambda t: _set(t, (2, 1), value))
    with pytest.raises(ScaleLayoutError, match=match) as e:
        _load(path)
    assert "[2, 1]" in str(e.value) and S in str(e.value) and "what to do:" in str(e.value)


def test_e8m0_byte_254_is_refused(checkpoints, tmp_path):
    path = _copy_with(checkpoints, tmp_path, "fp8_block_e8m0", S,
                      lambda t: _set(t.view(torch.uint8), (0, 0), 254).view(torch.float8_e8m0fnu))
    with pytest.raises(ScaleLayoutError, match=r"scale is 1.70141e\+38 at block \[0, 0\]"):
        _load(path)


def test_the_overflow_bound_follows_the_destination_dtype(checkpoints, tmp_path):
    # 200 x 448 = 89600 > 65504: Inf in FP16, fine in BF16 and FP32 (and then exact: reference math).
    path = _copy_with(checkpoints, tmp_path, "fp8_block", S, lambda t: _set(t, (2, 1), 200.0))
    with pytest.raises(ScaleLayoutError, match="overflows torch.float16"):
        _load(path, torch.float16)
    from reference import reference_state_dict

    assert torch.equal(_load(path, torch.bfloat16), reference_state_dict(path)[W])
    assert torch.isfinite(_load(path, torch.float32)).all()


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_codes_are_refused(checkpoints, tmp_path, code):
    path = _copy_with(checkpoints, tmp_path, "fp8_block", W,
                      lambda t: _set(t.view(torch.uint8), (300, 150), code).view(torch.float8_e4m3fn))
    with pytest.raises(CorruptCheckpointError, match=f"FP8 code {code:#04x} at element \\[300, 150\\]") as e:
        _load(path)
    assert W in str(e.value) and "what to do:" in str(e.value)


def test_a_shard_that_shrinks_during_a_load_is_a_named_error_not_sigbus(tmp_path):
    # In a child process: before the size re-check, touching the mapping past the new end killed the process
    # with SIGBUS (exit -7), which no `except` can catch.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, sys
        from streaming_adapters.checkpoint.byteio import BoxReader
        from streaming_adapters.checkpoint.index import CheckpointIndex
        from streaming_adapters.errors import CorruptCheckpointError
        idx = CheckpointIndex.open(sys.argv[1])
        for backend in ("mmap", "pread"):
            os.truncate(idx.path / "model.safetensors", idx["b"].end)
            with BoxReader(idx.path, backend) as io:
                assert int(io.read(idx["a"]).sum()) == sum(range(256)) * 32  # maps / opens the file
                os.truncate(idx.path / "model.safetensors", idx["a"].end)  # b is now past the end
                try:
                    print(int(io.read(idx["b"]).sum()))
                except CorruptCheckpointError as e:
                    print(backend, "named:", str(e).splitlines()[0], "|", e.file, e.tensor)
    """)
    hdr = _entries(("a", "U8", (8192,), 0, 8192), ("b", "U8", (65536,), 8192, 73728))
    _write(tmp_path / "model.safetensors", hdr, bytes(range(256)) * 32 + b"\x01" * 65536)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[0].startswith("mmap named: file is") and "truncated during the load" in lines[0], lines
    assert lines[1].startswith("pread named:") and "truncated" in lines[1], lines
    assert all(line.endswith(f"{tmp_path / 'model.safetensors'} b") for line in lines), lines


@pytest.mark.parametrize("extra", ['"x":1', '"x":' + "9" * 400, '"offsets":[0,8]'])
def test_entries_have_exactly_the_three_keys(tmp_path, extra):
    text = json.dumps(GOOD, separators=(",", ":")).encode()
    text = text.replace(b'"dtype":"F32"', b'"dtype":"F32",' + extra.encode())
    _write(tmp_path / "model.safetensors", text, DATA)
    _refused(tmp_path, match="header entry has keys", safetensors_refuses=extra.startswith('"x":9'))


@pytest.mark.parametrize("q", [["FP8"], "FP8", 1])
def test_modelopt_quantization_of_the_wrong_json_type(tmp_path, q):
    _ckpt(tmp_path)
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": q}))
    with pytest.raises(CorruptCheckpointError, match="quantization is a JSON") as e:
        sa.get_adapter(tmp_path)
    assert "hf_quant_config.json" in str(e.value)
