"""Side by side, W4A4 NVFP4 calibration (issue 14's bar): this project from the FP8 checkpoint vs
llm-compressor ``oneshot(scheme="NVFP4")`` and ModelOpt's layer-wise ``mtq.quantize(NVFP4_DEFAULT_CFG)`` +
``export_hf_checkpoint``, both on the BF16 copy they need: wall time, peak GPU, peak host, and the output
tensors compared.

    python benchmarks/calibration_side_by_side.py --device cpu          # tiny, in .venv-producers (~4 min)
    python benchmarks/calibration_side_by_side.py --device cuda --hidden 4096 --intermediate 14336 \\
        --layers 4 --heads 32 --kv-heads 8 --vocab 128256 --samples 128 --seq-len 2048

Needs llm-compressor 0.14.0.1 and nvidia-modelopt 0.47.0 importable (``bash tests/producers_w4a4/run.sh``
makes ``.venv-producers`` on CPU; ``tests/gpu/run_cal_sxs.sh`` installs carried wheels on a GPU machine).
A Llama with random block-FP8 weights is fabricated from the shape options, and ``--samples`` rows of
``--seq-len`` random token ids are written once (``ids.safetensors``); then each peer runs in a fresh
interpreter, one after the other:

* ``streaming_adapters`` / ``streaming_adapters_modelopt``: ``convert_checkpoint(fp8, target="nvfp4",
  calibration=CalibrationConfig(data=ids.safetensors, ...))``, compressed-tensors / ModelOpt format, straight
  from the FP8 checkpoint;
* ``bf16_copy``: the BF16 checkpoint both producers need (llm-compressor 0.14 refuses FP8 input), made with
  this project's ``convert_checkpoint(fp8, target="bf16")`` (bit-exact dequantization) and timed;
* ``llmcompressor``: ``from_pretrained(bf16)`` on the host (its sequential pipeline onloads one layer at a
  time to the GPU), ``oneshot`` with ``QuantizationModifier(targets="Linear", scheme="NVFP4",
  ignore=["lm_head"])`` on the same ids (batch 1, no padding), ``save_pretrained(save_compressed=True)``;
* ``modelopt``: ``from_pretrained(bf16)`` with the decoder layers offloaded (``--modelopt-offload``: ``cpu``
  = accelerate keeps them in host memory and runs them on the GPU, ``disk`` = in an offload folder, ``none``
  = the whole model on the device), ``mtq.quantize`` with ``NVFP4_DEFAULT_CFG`` and its layer-wise
  algorithm (``{"method": "max", "layerwise": {"enable": True, "calib_mutates_weights": False}}``, as its
  ``nvfp4_experts_only-kv_fp8_layerwise_offload`` recipe), ``export_hf_checkpoint`` (its streaming writer
  when the model is offloaded).

Time and peaks cover loading, calibration and writing, after the imports.  Peak host = the largest
``RssAnon`` of the peer's process sampled from outside every 5 ms minus its value when the timed part began
(page-locked memory is not in ``RssAnon``: this project's pinned hidden states are printed beside, from its
report); peak GPU = ``torch.cuda.max_memory_allocated``.  The outputs are compared tensor by tensor, bit for
bit: llm-compressor's against ``streaming_adapters``, ModelOpt's against ``streaming_adapters_modelopt``.  On
CPU they must be identical (tests/producers_w4a4 proves it at tiny size; ModelOpt's CPU export divides by
2688 where its GPU export multiplies by fp32(1/2688), so on CPU its export runs under ``GpuScalarDivision``
as in those tests); the script exits 1 otherwise (``--strict``, the default on CPU).  On a GPU the counts are
reported: other kernels may round a BF16 activation differently.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernels.py shadows `kernels`

import torch  # noqa: E402

MiB = 1 << 20
PEERS = ("streaming_adapters", "streaming_adapters_modelopt", "bf16_copy", "llmcompressor", "modelopt")
# Which output each producer's is compared with (same format).
REFERENCE = {"llmcompressor": "streaming_adapters", "modelopt": "streaming_adapters_modelopt"}
TOKENIZER_VOCAB = 1001  # llm-compressor loads a processor; the ids are given, so any tokenizer serves


# --- the peers (each in its own interpreter) -------------------------------------------------------------
class GpuScalarDivision(torch.overrides.TorchFunctionMode):
    """``tensor / python_number`` as CUDA computes it: ``x * (fp32(1) / fp32(b))``, not the CPU's IEEE
    quotient.  Only around ModelOpt's CPU export, whose scales are ``amax.float() / 2688``; the same wrapper
    as tests/producers_w4a4 (formats.md §2.2: this project writes the GPU export's arithmetic)."""

    DIVS = (torch.Tensor.__truediv__, torch.Tensor.div, torch.div, torch.true_divide)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in self.DIVS and len(args) == 2 and not kwargs and isinstance(args[0], torch.Tensor)
                and isinstance(args[1], (int, float))
                and args[0].dtype in (torch.float32, torch.bfloat16, torch.float16)):
            x = args[0]
            inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(args[1]), dtype=torch.float32)
            return (x.to(torch.float32) * inv).to(x.dtype)
        return func(*args, **kwargs)


def modelopt_device_map(offload: str, layers: int, cuda: bool):
    if not cuda:
        return {"": "cpu"} if offload != "disk" else _layers_on("disk", "cpu", layers)
    return {"": 0} if offload == "none" else _layers_on(offload, 0, layers)


def _layers_on(where, main, layers: int) -> dict:
    # Embedding, final norm, rotary and lm_head on the executing device; every decoder layer offloaded.
    return {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main,
            **{f"model.layers.{i}": where for i in range(layers)}}


def run_peer(name: str, a, work: Path) -> dict:
    from safetensors.torch import load_file

    cuda = a.device == "cuda"
    device = "cuda:0" if cuda else "cpu"
    ids = load_file(str(work / "ids.safetensors"))["input_ids"]
    fp8, bf16, out = work / "fp8", work / "bf16", work / f"out-{name}"
    # Imports before the clock: the time and host memory compare the work, not the imports.
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM
    import transformers.models.llama.modeling_llama  # noqa: F401  (the class every peer builds)
    from streaming_adapters.calibrate import CalibrationConfig
    from streaming_adapters.convert import convert_checkpoint
    if name == "llmcompressor":
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from transformers import AutoTokenizer
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    if name == "modelopt":
        import copy

        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    if cuda:
        torch.cuda.set_device(0)
        torch.cuda.reset_peak_memory_stats()
    extra = {}
    t0, c0 = time.monotonic(), time.process_time()
    if name.startswith("streaming_adapters"):
        fmt = "modelopt" if name.endswith("modelopt") else "compressed-tensors"
        r = convert_checkpoint(fp8, out, target="nvfp4", format=fmt, device=device, progress=False,
                               calibration=CalibrationConfig(data=str(work / "ids.safetensors"),
                                                             samples=a.samples, seq_len=a.seq_len))
        layers = (r.calibration or {}).get("layers") or []
        extra["pinned_bytes"] = max((L.get("hidden_host_bytes", 0) for L in layers), default=0) if cuda else 0
        extra["attention_kernel"] = (r.calibration or {}).get("attention_kernel", "")
    elif name == "bf16_copy":
        convert_checkpoint(fp8, bf16, target="bf16", device=device, progress=False)
    elif name == "llmcompressor":
        model = AutoModelForCausalLM.from_pretrained(str(bf16), dtype=torch.bfloat16)
        oneshot(model=model, processor=AutoTokenizer.from_pretrained(str(bf16)), dataset=ds,
                recipe=QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"]),
                num_calibration_samples=a.samples, max_seq_length=a.seq_len)
        model.save_pretrained(str(out), save_compressed=True)
    elif name == "modelopt":
        kw = {"offload_folder": str(work / "offload")} if a.modelopt_offload == "disk" else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(bf16), dtype=torch.bfloat16, device_map=modelopt_device_map(a.modelopt_offload, a.layers, cuda),
            **kw).eval()
        cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
        if a.modelopt_layerwise:
            cfg["algorithm"] = {"method": "max", "layerwise": {"enable": True, "calib_mutates_weights": False}}

        def forward_loop(m):
            # No KV cache, as ModelOpt's own loop (dataset_utils._disable_use_cache): with one, its layer-wise
            # replay of a layer whose outputs were captured first attends to that capture's zeroed cache
            # (DynamicLayer.reset) -- measured here: layer 0's o_proj input amax 6.0 instead of 9.69.
            with torch.no_grad():
                for row in ids:
                    m(row[None].to(device), use_cache=False)

        mtq.quantize(model, cfg, forward_loop)
        with (contextlib.nullcontext() if cuda else GpuScalarDivision()):
            export_hf_checkpoint(model, export_dir=str(out))
    if cuda:
        torch.cuda.synchronize()
    t1, c1 = time.monotonic(), time.process_time()
    return {"t0": t0, "t1": t1, "seconds": t1 - t0, "cpu_seconds": c1 - c0,
            "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, **extra}


def measure(name: str, a, work: Path) -> dict:
    from streaming_adapters.testing.rss import RssSampler

    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(work / ("bf16" if name == "bf16_copy" else f"out-{name}"), ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--peer", name, "--workdir", str(work)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # cwd = work: llm-compressor writes its logs (sparse_logs/) into the working folder
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work, env=env)
    with RssSampler([proc.pid], interval_s=0.005) as rss:
        log, _ = proc.communicate()
    (work / f"{name}.log").write_text(log)
    if proc.returncode != 0 or not result.exists():
        return {"error": f"exit {proc.returncode}: " + (log.strip().splitlines() or ["(no output)"])[-1][:300],
                "log_tail": log[-3000:]}
    r = json.loads(result.read_text())
    r["host_peak_bytes"] = rss.peak(proc.pid, r["t0"], r["t1"]) - rss.at(proc.pid, r["t0"])
    return r


# --- the model, the tokens, the comparison ---------------------------------------------------------------
def prepare(a, work: Path) -> str:
    from safetensors.torch import save_file
    from streaming_adapters.testing.fixtures import make_checkpoint

    fp8 = work / "fp8"
    if not (fp8 / "config.json").exists():
        make_checkpoint(fp8, "llama", "fp8_block", hidden_size=a.hidden, intermediate_size=a.intermediate,
                        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                        head_dim=a.hidden // a.heads, vocab_size=a.vocab, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(3, a.vocab, (a.samples, a.seq_len), generator=g)
    save_file({"input_ids": ids.contiguous()}, str(work / "ids.safetensors"))
    params = sum(f.stat().st_size for f in fp8.glob("*.safetensors"))
    return (f"Llama with random block-FP8 weights: hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} "
            f"layers, {a.heads}/{a.kv_heads} heads, vocab {a.vocab}; {params / MiB:,.0f} MiB of FP8 checkpoint")


def finish_bf16(bf16: Path) -> None:
    """What a user adds to a converted folder for the producers: the architecture (from_pretrained picks the
    class by it) and a tokenizer (llm-compressor loads a processor even for token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((bf16 / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (bf16 / "config.json").write_text(json.dumps(cfg, indent=2))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TOKENIZER_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(bf16))


def read_all(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(theirs: Path, mine: Path) -> dict:
    """Tensors that differ in bits (or exist on one side only); input scales counted apart."""
    a, b = read_all(theirs), read_all(mine)
    only = sorted(set(a) ^ set(b))
    differ = []
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.numel() == y.numel():
            x = x.reshape(y.shape)  # ModelOpt writes 0-dim scales where compressed-tensors writes [1]
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(
            x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))  # bits: -0.0 != 0.0, NaN == NaN
        if not same:
            differ.append(k)
    inputs = [k for k in a if k.endswith(("input_global_scale", "input_scale"))]
    return {"tensors": len(a), "differ": len(differ), "only_one_side": len(only), "examples": (only + differ)[:4],
            "input_scales": len(inputs), "input_scales_differ": sum(k in differ for k in inputs)}


def mib(b) -> str:
    return "-" if b is None else f"{b / MiB:,.0f} MiB"


def table(a, what: str, res: dict, cmp: dict, work: Path) -> str:
    copy_s = res.get("bf16_copy", {}).get("seconds")
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"{platform.machine()} CPU"
    lines = [f"Model: {what}. Tokens: {a.samples} x {a.seq_len} random ids, batch 1. Device: `{a.device}`.", "",
             "| peer | input | time | + BF16 copy | CPU time | peak GPU | peak host (added) | output | "
             "tensors differing (input scales) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | | failed: {r['error']} | | | | | | |")
            continue
        inp = {"bf16_copy": "FP8 -> BF16", "llmcompressor": "BF16 copy", "modelopt": "BF16 copy"}.get(name, "FP8")
        total = f"{r['seconds'] + copy_s:.1f} s" if name in REFERENCE and copy_s is not None else "-"
        host = mib(r["host_peak_bytes"]) + (f" + {mib(r['pinned_bytes'])} pinned" if r.get("pinned_bytes") else "")
        folder = work / ("bf16" if name == "bf16_copy" else f"out-{name}")
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.exists() else None
        c = cmp.get(name)
        diff = "-" if c is None else (f"{c['differ'] + c['only_one_side']} of {c['tensors']} vs "
                                      f"{REFERENCE[name]} ({c['input_scales_differ']} of {c['input_scales']})")
        lines.append(f"| {name} | {inp} | {r['seconds']:.1f} s | {total} | {r['cpu_seconds']:.1f} s | "
                     f"{mib(r['gpu_peak_bytes'])} | {host} | {mib(size)} | {diff} |")
    kernels = [f"{name}: {r['attention_kernel']}" for name, r in res.items() if r.get("attention_kernel")]
    if kernels:
        lines += ["", "This project's attention probabilities: " + "; ".join(kernels) + "."]
    lines += ["", f"Machine: {dev}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch "
              f"{torch.__version__}, transformers {_version('transformers')}, llm-compressor "
              f"{_version('llmcompressor')}, nvidia-modelopt {_version('nvidia-modelopt')}, compressed-tensors "
              f"{_version('compressed-tensors')}. ModelOpt offload: `{a.modelopt_offload}`, layer-wise: "
              f"{a.modelopt_layerwise}. Date: "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
              f"Command: `python benchmarks/calibration_side_by_side.py {' '.join(sys.argv[1:])}`."]
    return "\n".join(lines)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    ap.add_argument("--modelopt-offload", choices=("cpu", "disk", "none"), default="cpu",
                    help="where ModelOpt's decoder layers wait between their turns (cpu: host memory)")
    ap.add_argument("--modelopt-layerwise", action=argparse.BooleanOptionalAction, default=True,
                    help="ModelOpt's layer-wise calibration (else its whole-model max calibration)")
    ap.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                    help="exit 1 when an output differs from ours (default: on for cpu, off for cuda)")
    ap.add_argument("--workdir", default=None, help="keeps the checkpoints and outputs (default: a temp folder)")
    ap.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)  # internal: one peer, this interpreter
    a = ap.parse_args()
    if a.peer:
        work = Path(a.workdir)
        (work / f"{a.peer}.json").write_text(json.dumps(run_peer(a.peer, a, work)))
        return 0
    peers = [p for p in a.peers.split(",") if p]
    if any(p not in PEERS for p in peers):
        ap.error(f"--peers names only {', '.join(PEERS)}")
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="sa-calsxs-")
    work = Path(a.workdir or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    what = prepare(a, work)
    print(f"prepared {work / 'fp8'} in {time.time() - t:.1f} s", flush=True)
    need_bf16 = any(p in REFERENCE for p in peers)
    if need_bf16 and "bf16_copy" not in peers and not (work / "bf16" / "config.json").exists():
        peers.insert(0, "bf16_copy")  # the producers cannot run without it
    order = sorted(peers, key=lambda p: PEERS.index(p))  # the BF16 copy before the producers
    res, cmp = {}, {}
    for p in order:
        res[p] = r = measure(p, a, work)
        if "error" in r:
            print(f"{p}: FAILED {r['error']}\n{r['log_tail']}", flush=True)
            continue
        if p == "bf16_copy":
            finish_bf16(work / "bf16")
        print(f"{p}: {r['seconds']:.1f} s, host +{mib(r['host_peak_bytes'])}, GPU {mib(r['gpu_peak_bytes'])}",
              flush=True)
    for p, ref in REFERENCE.items():
        if p in res and ref in res and "error" not in res[p] and "error" not in res[ref]:
            try:
                cmp[p] = compare(work / f"out-{p}", work / f"out-{ref}")
            except Exception:  # a comparison that cannot run is reported, the table still printed
                cmp[p] = None
                traceback.print_exc()
    print(table(a, what, res, cmp, work))
    strict = a.device == "cpu" if a.strict is None else a.strict
    bad = [p for p, c in cmp.items() if c is None or c["differ"] or c["only_one_side"]]
    for p in (p for p in bad if cmp[p] is not None):
        print(f"{p} vs {REFERENCE[p]}: {cmp[p]['differ']} tensors differ, {cmp[p]['only_one_side']} on one side "
              f"only, e.g. {cmp[p]['examples']}")
    failed = [p for p, r in res.items() if "error" in r]
    if tmp is not None:
        tmp.cleanup()
    if failed or (strict and bad):
        print(f"FAIL: {'failed: ' + ', '.join(failed) if failed else ''} {'differ: ' + ', '.join(bad) if bad else ''}")
        return 1
    print("all peers ran" + ("; outputs identical to ours" if cmp and not bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
