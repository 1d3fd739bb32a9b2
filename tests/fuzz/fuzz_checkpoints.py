"""Fuzz: hundreds of seeded mutations of a fabricated block-FP8 checkpoint, one pytest case each.  Every case
must either load bit-identically to an independent reference (``safetensors`` + fp32 math, no code of this
package) or be refused with a :class:`~streaming_adapters.errors.CheckpointError` subclass.  Anything else --
a raw exception, a crash, a load that differs from the reference, a non-finite value -- fails the case.

Run with ``tests/fuzz/run.sh`` (its own CI step; the default suite does not collect ``fuzz_*.py``).
``FUZZ_SEEDS=N`` sets the cases per category (default 24: 16 categories x 24 = 384 cases, ~2-4 minutes on
the 2-core CI machine).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import streaming_adapters as sa
from streaming_adapters.errors import CheckpointError

SEEDS = int(os.environ.get("FUZZ_SEEDS", "24"))
# category -> outcome ("exact" or the refusing error's class) -> count; printed by tests/fuzz/conftest.py.
OUTCOMES: dict[str, dict[str, int]] = {}
BLOCK = (128, 128)
# module -> (shape, scale encoding).  256/384 are exact multiples of 128 (the block size is proven); 200 x 320
# is not (a 2 x 3 grid that 107..199 x 107..159 also give).
QUANT = {
    "model.layers.0.mlp.down_proj": ((256, 384), "F32"),
    "model.layers.0.mlp.up_proj": ((200, 320), "F32"),
    "model.layers.1.self_attn.o_proj": ((384, 256), "F8_E8M0"),
    "model.layers.1.mlp.gate_proj": ((130, 256), "U8"),
}
PLAIN = {"model.embed_tokens.weight": ((50, 64), torch.bfloat16), "model.norm.weight": ((64,), torch.float32)}
FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


# -- the base checkpoint ------------------------------------------------------------------------------------
def _build_base(path: Path) -> None:
    g = torch.Generator().manual_seed(1234)
    files: list[dict[str, torch.Tensor]] = [{}, {}]
    for i, (mod, (shape, enc)) in enumerate(QUANT.items()):
        w = torch.randn(shape, generator=g) * 0.05
        grid = tuple(math.ceil(d / b) for d, b in zip(shape, BLOCK))
        amax = torch.zeros(grid)
        for r in range(grid[0]):
            for c in range(grid[1]):
                amax[r, c] = w[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].abs().max()
        s = (amax / 448).clamp(min=1e-8)
        if enc != "F32":
            s = torch.exp2(torch.ceil(torch.log2(s)))  # power-of-two (UE8M0) scales
        s_exp = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
        files[i % 2][f"{mod}.weight"] = (w / s_exp).clamp(-448, 448).to(torch.float8_e4m3fn)
        stored = {"F32": s, "F8_E8M0": s.to(torch.float8_e8m0fnu),
                  "U8": s.to(torch.float8_e8m0fnu).view(torch.uint8)}[enc]
        files[(i + 1) % 2][f"{mod}.weight_scale_inv"] = stored  # scales in the other file, as the index allows
    for i, (name, (shape, dtype)) in enumerate(PLAIN.items()):
        files[i % 2][name] = (torch.randn(shape, generator=g)).to(dtype)
    path.mkdir(parents=True)
    wm = {}
    for fname, tensors in zip(FILES, files):
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        wm.update({k: fname for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                "weight_block_size": list(BLOCK)}}, indent=1))


# -- the independent reference ------------------------------------------------------------------------------
def _decode_scale(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return torch.where(t == 255, float("nan"), torch.exp2(t.to(torch.float32) - 127))
    return t.to(torch.float32)


def reference(path: Path) -> dict[str, torch.Tensor]:
    """What a correct load gives, from ``safetensors`` (which validates the headers itself), the index, and
    the TRUE block size of the base checkpoint (a config that declares another one must not load)."""
    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    raw: dict[str, torch.Tensor] = {}
    for fname in sorted(set(wm.values())):
        with safe_open(str(path / fname), "pt") as f:
            for k in f.keys():
                if wm.get(k, fname) == fname:  # a tensor the index does not list is read from its file, as
                    assert k not in raw, k      # transformers does; listed elsewhere, the index wins
                    raw[k] = f.get_tensor(k)
    out = {}
    for mod, ((n, k), _) in QUANT.items():
        w, s = raw[f"{mod}.weight"], _decode_scale(raw[f"{mod}.weight_scale_inv"])
        assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (n, k)
        s = s.reshape(math.ceil(n / 128), math.ceil(k / 128))
        s_exp = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        out[f"{mod}.weight"] = (w.to(torch.float32) * s_exp).to(torch.bfloat16)
    for name in PLAIN:
        out[name] = raw[name]
    return out


def load(path: Path, io_backend: str = "mmap") -> dict[str, torch.Tensor]:
    sd = {f"{m}.weight": torch.full(shape, float("nan"), dtype=torch.bfloat16) for m, (shape, _) in QUANT.items()}
    sd.update({n: torch.full(shape, float("nan"), dtype=dt) for n, (shape, dt) in PLAIN.items()})
    sa.load_fp8_state_dict(sd, path, io_backend=io_backend)
    return sd


# -- raw header editing -------------------------------------------------------------------------------------
def read_st(f: Path) -> tuple[dict, bytes]:
    b = f.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def write_st(f: Path, header: dict | bytes, data: bytes, delta: int = 0) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text) + delta) + text + data)


def _tensor_file(path: Path, rng: random.Random) -> tuple[Path, dict, bytes, str]:
    f = path / rng.choice(FILES)
    hdr, data = read_st(f)
    name = rng.choice(sorted(k for k in hdr if k != "__metadata__"))
    return f, hdr, data, name


def _set_value(path: Path, name: str, fn) -> None:
    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    f = path / wm[name]
    with safe_open(str(f), "pt") as g:
        tensors = {k: g.get_tensor(k) for k in g.keys()}
    tensors[name] = fn(tensors[name].clone())
    save_file(tensors, str(f), metadata={"format": "pt"})


# -- mutations: one function per category, each seeded --------------------------------------------------
def m_header_length(path, rng):
    f = path / rng.choice(FILES)
    hdr, data = read_st(f)
    write_st(f, hdr, data, delta=rng.choice([-8, -7, -3, -2, -1, 1, 2, 5, 8, 64, -64]))


def m_offsets(path, rng):
    f, hdr, data, name = _tensor_file(path, rng)
    b, e = hdr[name]["data_offsets"]
    k = rng.choice([-4, -2, -1, 1, 2, 4, 128, len(data)])
    hdr[name]["data_offsets"] = rng.choice([[b + k, e + k], [b, e + k], [b + k, e], [e, b], [b, b]])
    write_st(f, hdr, data)


def m_overlap(path, rng):
    f = path / rng.choice(FILES)
    hdr, data = read_st(f)
    names = sorted(k for k in hdr if k != "__metadata__")
    a, c = rng.sample(names, 2)
    ha, hc = hdr[a], hdr[c]
    if rng.random() < 0.5:  # c takes a's bytes, with a's dtype and shape (the same span)
        hdr[c] = dict(ha)
    else:  # c starts inside a
        shift = rng.randrange(1, max(2, ha["data_offsets"][1] - ha["data_offsets"][0]))
        span = hc["data_offsets"][1] - hc["data_offsets"][0]
        hdr[c]["data_offsets"] = [ha["data_offsets"][0] + shift, ha["data_offsets"][0] + shift + span]
    write_st(f, hdr, data)


def m_duplicate_keys(path, rng):
    f = path / rng.choice(FILES)
    hdr, data = read_st(f)
    names = sorted(k for k in hdr if k != "__metadata__")
    text = json.dumps(hdr, separators=(",", ":"))
    a, c = rng.sample(names, 2)
    if rng.random() < 0.5:  # a second entry named a, with c's offsets: the last one wins in json.loads
        text = text[:-1] + "," + json.dumps(a) + ":" + json.dumps(hdr[c], separators=(",", ":")) + "}"
    else:  # a duplicate field inside an entry
        entry = json.dumps(hdr[a], separators=(",", ":"))
        twice = entry[:-1] + ',"dtype":' + json.dumps(rng.choice(["F32", "U8", "F8_E4M3"])) + "}"
        text = text.replace(entry, twice, 1)
    write_st(f, text.encode(), data)


def m_dtype(path, rng):
    f, hdr, data, name = _tensor_file(path, rng)
    hdr[name]["dtype"] = rng.choice(["F32", "BF16", "F16", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "BOOL",
                                     "F64", "f32", "F4", "", None, 8, ["F32"]])
    write_st(f, hdr, data)


def m_shape(path, rng):
    f, hdr, data, name = _tensor_file(path, rng)
    shape = list(hdr[name]["shape"])
    choice = rng.randrange(8)
    if choice == 0 and len(shape) == 2:
        shape = shape[::-1]
    elif choice == 1:
        shape = [math.prod(shape)]
    elif choice == 2:
        shape = shape + [1]
    elif choice == 3:
        shape = [2 ** 62, 2 ** 62] + shape
    elif choice == 4:
        shape = [-1] + shape
    elif choice == 5:
        shape = [0] + shape
    elif choice == 6:
        shape = [float(d) for d in shape]
    else:
        shape = [True] * len(shape)
    hdr[name]["shape"] = shape
    write_st(f, hdr, data)


def m_nesting(path, rng):
    f = path / rng.choice(FILES)
    hdr, data = read_st(f)
    depth = rng.choice([50, 5000, 200_000])
    deep = "[" * depth + "]" * depth
    text = json.dumps(hdr, separators=(",", ":"))
    target = rng.choice(["header", "config", "index"])
    if target == "header":
        write_st(f, (text[:-1] + ',"x":' + deep + "}").encode(), data)
    else:
        p = path / ("config.json" if target == "config" else "model.safetensors.index.json")
        p.write_text(p.read_text().rstrip()[:-1] + ',"x":' + deep + "}")


def m_big_int(path, rng):
    digits = rng.choice([20, 400, 4301, 10_000])
    big = "9" * digits
    target = rng.choice(["shape", "offset", "config", "metadata"])
    if target in ("shape", "offset", "metadata"):
        f, hdr, data, name = _tensor_file(path, rng)
        text = json.dumps(hdr, separators=(",", ":"))
        entry = json.dumps(hdr[name], separators=(",", ":"))
        if target == "shape":
            new = entry.replace('"shape":[', f'"shape":[{big},', 1)
        elif target == "offset":
            new = entry.replace('"data_offsets":[', f'"data_offsets":[{big},', 1)
        else:
            new = entry[:-1] + f',"extra":{big}}}'
        write_st(f, text.replace(entry, new, 1).encode(), data)
    else:
        p = path / "config.json"
        p.write_text(p.read_text().replace('"weight_block_size": [\n   128,', f'"weight_block_size": [\n   {big},'))


def m_block_size(path, rng):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = rng.choice([
        [129, 129], [112, 128], [128, 129], [130, 130], [127, 128], [64, 128], [256, 256], [128, 128], [0, 128],
        [-128, 128], ["128", 128], [128.0, 128], [True, 128], [128], [128, 128, 1], "128", None, {}, [1, 1],
        [128, 128], [128, 128]])
    (path / "config.json").write_text(json.dumps(cfg))


def m_scale_value(path, rng):
    mod, (shape, enc) = rng.choice(sorted(QUANT.items()))
    idx = (rng.randrange(math.ceil(shape[0] / 128)), rng.randrange(math.ceil(shape[1] / 128)))
    if enc == "F32":
        v = rng.choice([float("nan"), float("inf"), float("-inf"), 3e38, 1e36, 7.5e35, 7.6e35, 0.0, -0.0, -1.0,
                        1e-45, 2.0, 448.0, 1e-38])
        fn = lambda t: (t.__setitem__(idx, v), t)[1]  # noqa: E731
    else:
        byte = rng.choice([0, 1, 100, 127, 200, 253, 254, 255])
        fn = lambda t: (t.view(torch.uint8).__setitem__(idx, byte), t)[1]  # noqa: E731
    _set_value(path, f"{mod}.weight_scale_inv", fn)


def m_codes(path, rng):
    mod, (shape, _) = rng.choice(sorted(QUANT.items()))
    n = rng.choice([1, 1, 3, 50])
    codes = [rng.choice([0x7F, 0xFF, 0x7E, 0xFE, 0x80, 0x00, 0x01, rng.randrange(256)]) for _ in range(n)]
    where = [(rng.randrange(shape[0]), rng.randrange(shape[1])) for _ in range(n)]

    def fn(t):
        u = t.view(torch.uint8)
        for (r, c), code in zip(where, codes):
            u[r, c] = code
        return t

    _set_value(path, f"{mod}.weight", fn)


def m_config_types(path, rng):
    cfg = json.loads((path / "config.json").read_text())
    key = rng.choice(["quantization_config", "quant_method", "fmt", "activation_scheme", "whole"])
    val = rng.choice(["fp8", ["fp8"], 3, 1.5, True, None, {"quant_method": "fp8"}, {}, "", [[[]]]])
    if key == "quantization_config":
        cfg["quantization_config"] = val
    elif key == "whole":
        (path / "config.json").write_text(json.dumps(val))
        return
    else:
        cfg["quantization_config"][key] = val
    (path / "config.json").write_text(json.dumps(cfg))


def m_index(path, rng):
    p = path / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    wm = idx["weight_map"]
    name = rng.choice(sorted(wm))
    choice = rng.randrange(10)
    if choice == 0:
        wm[name] = ""
    elif choice == 1:
        wm[name] = FILES[0] if wm[name] == FILES[1] else FILES[1]
    elif choice == 2:
        del wm[name]
    elif choice == 3:
        wm["model.layers.9.extra.weight"] = FILES[0]
    elif choice == 4:
        wm[name] = 7
    elif choice == 5:
        wm[name] = "../" + wm[name]
    elif choice == 6:
        wm[name] = "missing.safetensors"
    elif choice == 7:
        idx["weight_map"] = rng.choice([[], "x", None, {}])
    elif choice == 8:  # duplicate key in the index's weight_map (the first one wins nowhere: refused)
        text = json.dumps(idx)
        other = FILES[0] if wm[name] == FILES[1] else FILES[1]
        p.write_text(text.replace('"weight_map": {', f'"weight_map": {{{json.dumps(name)}: "{other}", ', 1))
        return
    else:
        wm[name] = "./" + wm[name]
    p.write_text(json.dumps(idx))


def m_truncate(path, rng):
    f = path / rng.choice(FILES)
    b = f.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    cut = rng.choice([0, 3, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(b) - 1, len(b) - 4096, len(b) + 1, len(b) + 7])
    if cut <= len(b):
        f.write_bytes(b[:max(cut, 0)])
    else:
        f.write_bytes(b + bytes(cut - len(b)))  # trailing bytes


def m_header_bytes(path, rng):
    f = path / rng.choice(FILES)
    b = bytearray(f.read_bytes())
    n = struct.unpack("<Q", b[:8])[0]
    for _ in range(rng.choice([1, 2, 5])):
        b[8 + rng.randrange(n)] = rng.choice([0x00, 0x01, 0x22, 0x2C, 0x30, 0x39, 0x5B, 0x7B, 0x7D, 0xC3, 0xFF,
                                              rng.randrange(256)])
    f.write_bytes(bytes(b))


def m_metadata(path, rng):
    f = path / rng.choice(FILES)
    hdr, data = read_st(f)
    hdr["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, ["pt"], "pt", None, {}, {"a": {"b": "c"}},
                                      {"\ud800": "x"}])
    try:
        text = json.dumps(hdr, separators=(",", ":"), ensure_ascii=True).encode()
    except ValueError:
        return
    write_st(f, text, data)


CATEGORIES = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("m_") and callable(fn)}


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("fuzz") / "base"
    _build_base(path)
    ref = reference(path)
    got = load(path)
    assert all(torch.equal(got[k], ref[k]) for k in ref), "the unmutated checkpoint must load exactly"
    return path, ref


@pytest.mark.parametrize("seed", range(SEEDS))
@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_mutation_is_exact_or_refused(base, tmp_path, category, seed):
    src, _ = base
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    rng = random.Random(f"{category}-{seed}")
    CATEGORIES[category](path, rng)
    try:
        got = load(path, rng.choice(["mmap", "pread"]))
    except CheckpointError as e:  # a refusal: it must name a file or a tensor and say what to do
        _count(category, type(e).__name__)
        msg = str(e)
        assert "what to do:" in msg or "rank(s) failed" in msg, msg
        return
    # Loaded: then the checkpoint must still mean what it meant, and the reference must agree bit for bit.
    try:
        ref = reference(path)
    except Exception as e:  # noqa: BLE001 -- safetensors or the reference refuses what we loaded
        pytest.fail(f"loaded, but the independent reference cannot read the mutated checkpoint: {e!r}")
    for k, r in ref.items():
        assert torch.isfinite(got[k].float()).all(), f"{k}: non-finite values loaded"
        assert torch.equal(got[k], r), f"{k}: loaded values differ from the reference"
    _count(category, "exact")


def _count(category: str, outcome: str) -> None:
    by = OUTCOMES.setdefault(category, {})
    by[outcome] = by.get(outcome, 0) + 1
