"""Side by side on a small model: ``streaming_adapters.evaluate`` vs transformers' whole-model evaluation of
the same NVFP4 checkpoint (issue 15's bar): time, peak GPU, peak host, perplexity of the same rows.

    python benchmarks/evaluate_side_by_side.py --device cpu                  # ~2 min on 2 CPU cores
    python benchmarks/evaluate_side_by_side.py --device cuda --hidden 4096 --intermediate 14336 \\
        --layers 8 --heads 32 --kv-heads 8 --vocab 128256 --rows 32 --seq-len 2048

The model: ``--checkpoint FP8_DIR`` (e.g. ``<workdir>/fp8`` of ``benchmarks/quality_table.py --workdir``,
the trained byte-level Llama: its rows are then held-out bytes of the Python standard library), else a Llama
with random FP8 weights fabricated from the shape options.  It is converted FP8 -> NVFP4 W4A16
(compressed-tensors ``nvfp4-pack-quantized``, on ``--device``), then every peer evaluates the same rows of
that one NVFP4 folder in a fresh interpreter:

* ``streaming_adapters``: ``sa.evaluate(nvfp4, rows, device=...)``, one decoder layer at a time;
* ``transformers``: ``AutoModelForCausalLM.from_pretrained(nvfp4)`` (its compressed-tensors quantizer keeps
  the packed weights and decompresses each Linear to BF16 in its forward, the default), whole model;
* ``transformers_dequantize``: the same with ``CompressedTensorsConfig(dequantize=True)`` (weights
  decompressed to BF16 once, at load).

All three: the same attention (``--attn``: sdpa, transformers' default and ours, or eager), batch 1, BF16
logits, NLL from an fp32 log-softmax summed in fp64 (the transformers peers compute it here, independently of
the project).  Time and peaks cover loading plus evaluation, after the imports (CPU time too: the process's,
all threads, which a busy shared machine disturbs less than the wall time).  Peak host = the largest
``RssAnon`` of the peer's process, sampled from outside every 5 ms (``streaming_adapters/testing/rss.py``),
minus its value when the timed part began; peak GPU = ``torch.cuda.max_memory_allocated``.  The perplexities
must agree within ``--tolerance`` (relative, default 1e-3, see ``TOLERANCE``); the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/kernels.py shadows `kernels`

import torch  # noqa: E402

MiB = 1 << 20
PEERS = ("streaming_adapters", "transformers", "transformers_dequantize")
# Relative perplexity tolerance.  Same weights (the project's NVFP4 decode is bit-exact to compressed-tensors'
# decompressor), same layer code and batch 1: on CPU the logits are the same bits (tests/test_evaluate.py
# proves it for the streamed path) and so is the perplexity.  A GPU may pick other matmul kernels for the
# whole model than for one layer at a time; one BF16 ulp of a target logit (0.0625 at |logit| in [8, 16))
# moves the mean NLL by 0.0625 / tokens, so 1e-3 leaves room for such a difference at every 16th position of
# 2048 rows' worth of tokens while still catching a wrong weight or a wrong mask (changes of > 1%).
TOLERANCE = 1e-3


# --- the peers (each in its own interpreter) -------------------------------------------------------------
def nll_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lp = logits[:-1].float().log_softmax(-1)
    return float(-lp.gather(-1, ids[1:].to(lp.device)[:, None]).double().sum())


def run_peer(name: str, nvfp4: str, rows_file: str, device: str, attn: str) -> dict:
    from safetensors.torch import load_file

    rows = list(load_file(rows_file)["input_ids"])
    # Every peer imports the same modules before the clock starts (streaming_adapters builds the model with
    # transformers' own class too), so time and host memory compare the work, not the imports.
    import compressed_tensors  # noqa: F401
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model_type = json.loads((Path(nvfp4) / "config.json").read_text())["model_type"]
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    import streaming_adapters as sa
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.monotonic(), time.process_time()
    if name == "streaming_adapters":
        r = sa.evaluate(nvfp4, rows, device=device, attn_implementation=attn)
        nll, tokens = r["nll"] * r["tokens"], r["tokens"]
    else:
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if name.endswith("dequantize") else {}
        model = AutoModelForCausalLM.from_pretrained(nvfp4, dtype=torch.bfloat16, attn_implementation=attn,
                                                     device_map=device, **kw).eval()
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for ids in rows:
                logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
                nll += nll_of(logits, ids)
                tokens += ids.numel() - 1
    if cuda:
        torch.cuda.synchronize()
    t1, c1 = time.monotonic(), time.process_time()
    gpu = torch.cuda.max_memory_allocated() if cuda else None
    return {"t0": t0, "t1": t1, "seconds": t1 - t0, "cpu_seconds": c1 - c0, "nll": nll / tokens, "tokens": tokens,
            "perplexity": math.exp(nll / tokens), "gpu_peak_bytes": gpu}


def measure(name: str, nvfp4: Path, rows_file: Path, device: str, attn: str, work: Path) -> dict:
    from streaming_adapters.testing.rss import RssSampler

    out = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--peer", name, "--nvfp4", str(nvfp4), "--rows-file", str(rows_file),
           "--device", device, "--attn", attn, "--result", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RssSampler([proc.pid], interval_s=0.005) as rss:
        log, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"peer {name} failed ({proc.returncode}):\n{log[-4000:]}")
    r = json.loads(out.read_text())
    r["host_peak_bytes"] = rss.peak(proc.pid, r["t0"], r["t1"]) - rss.at(proc.pid, r["t0"])
    return r


# --- the model and the rows ------------------------------------------------------------------------------
def quality_table():
    spec = importlib.util.spec_from_file_location("quality_table", HERE / "quality_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare(a, work: Path) -> tuple[Path, Path, str]:
    import streaming_adapters as sa
    from safetensors.torch import save_file

    if a.checkpoint:
        fp8 = Path(a.checkpoint)
        what = f"trained Llama from `{fp8}`"
    else:
        from streaming_adapters.testing.fixtures import make_checkpoint

        fp8 = work / "fp8"
        if not (fp8 / "config.json").exists():
            make_checkpoint(fp8, "llama", "fp8_block", hidden_size=a.hidden, intermediate_size=a.intermediate,
                            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                            head_dim=a.hidden // a.heads, vocab_size=a.vocab, tie_word_embeddings=False)
        what = "Llama with random FP8 weights (fabricated)"
    cfg = json.loads((fp8 / "config.json").read_text())
    what += (f": hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, {cfg['num_hidden_layers']} "
             f"layers, {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, vocab {cfg['vocab_size']}")
    nv = work / "nvfp4"
    if not (nv / "config.json").exists():
        sa.convert_checkpoint(fp8, nv, target="nvfp4", format="compressed-tensors", device=a.device, progress=False)
    if cfg["vocab_size"] == 256:  # quality_table.py's byte-level model: held-out stdlib bytes
        qt = quality_table()
        rows = qt.as_rows(qt.corpus(a.seed)[1], a.rows, a.seq_len, a.seed + 11)
    else:
        g = torch.Generator().manual_seed(a.seed)
        rows = torch.randint(0, cfg["vocab_size"], (a.rows, a.seq_len), generator=g)
    rows_file = work / "rows.safetensors"
    save_file({"input_ids": rows.contiguous()}, str(rows_file))
    return nv, rows_file, what


def gib(b) -> str:
    return "-" if b is None else f"{b / MiB:,.0f} MiB"


def table(results: dict, a, what: str, nv: Path) -> str:
    nv_bytes = sum(f.stat().st_size for f in nv.glob("*.safetensors"))
    base = results["streaming_adapters"]
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"{platform.machine()} CPU"
    lines = [f"Model: {what}; NVFP4 W4A16 compressed-tensors, {nv_bytes / MiB:.0f} MiB on disk. Rows: {a.rows} x "
             f"{a.seq_len} tokens ({base['tokens']} predicted). Device: `{a.device}`. Attention: {a.attn}.", "",
             "| peer | time (load + evaluate) | CPU time | peak GPU | peak host (added) | perplexity | "
             "rel. diff vs streaming_adapters |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rel = abs(r["perplexity"] - base["perplexity"]) / base["perplexity"]
        lines.append(f"| {name} | {r['seconds']:.1f} s | {r['cpu_seconds']:.1f} s | {gib(r['gpu_peak_bytes'])} | {gib(r['host_peak_bytes'])} | "
                     f"{r['perplexity']:.10g} | {rel:.2e} |")
    lines += ["", f"Machine: {dev}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch "
              f"{torch.__version__}, transformers {_version('transformers')}, compressed-tensors "
              f"{_version('compressed-tensors')}. Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
              f"Command: `python benchmarks/evaluate_side_by_side.py {' '.join(sys.argv[1:])}`."]
    return "\n".join(lines)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--checkpoint", default=None, help="an FP8 checkpoint (e.g. quality_table.py's <workdir>/fp8)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention of every peer")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative perplexity agreement")
    ap.add_argument("--workdir", default=None, help="keeps the fabricated and converted checkpoints")
    # internal: one peer in this fresh interpreter
    ap.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--nvfp4", help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer:
        device = "cuda:0" if a.device == "cuda" else "cpu"
        Path(a.result).write_text(json.dumps(run_peer(a.peer, a.nvfp4, a.rows_file, device, a.attn)))
        return 0
    peers = [p for p in a.peers.split(",") if p]
    if "streaming_adapters" not in peers or any(p not in PEERS for p in peers):
        ap.error(f"--peers must include streaming_adapters and name only {', '.join(PEERS)}")
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="sa-sbs-")
    work = Path(a.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    nv, rows_file, what = prepare(a, work)
    print(f"prepared {nv} in {time.time() - t:.1f} s", flush=True)
    results = {}
    for p in peers:
        results[p] = measure(p, nv, rows_file, a.device, a.attn, work)
        r = results[p]
        print(f"{p}: {r['seconds']:.1f} s, perplexity {r['perplexity']:.10g}, host +{gib(r['host_peak_bytes'])}, "
              f"GPU {gib(r['gpu_peak_bytes'])}", flush=True)
    print(table(results, a, what, nv))
    base = results["streaming_adapters"]["perplexity"]
    worst = max(abs(r["perplexity"] - base) / base for r in results.values())
    if tmp is not None:
        tmp.cleanup()
    if worst > a.tolerance:
        print(f"FAIL: perplexities differ by {worst:.2e} relative (> {a.tolerance:g})")
        return 1
    print(f"perplexities agree within {a.tolerance:g} relative (worst {worst:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
