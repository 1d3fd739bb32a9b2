"""The NeMo tests in GPU mode: 2 ranks under torchrun, NCCL, no CPU shim (``bash tests/gpu/nemo_x2.sh``).

For FSDP2=2 and TP=2 (NeMo's own ``distributed:`` sections), Llama (NeMo's class) and Mistral (transformers'):

* with the hook, every local shard bit-equal to the reference (the CUDA path: Triton dequantization into the
  shard) and logits equal to NeMo's load of the BF16 copy;
* without it, NeMo's Llama holds the FP8 codes (asserted, as on CPU);
* per-rank peak GPU memory of ``from_pretrained`` (``max_memory_allocated``) next to the rank's shard, on a
  290M-parameter checkpoint (hidden 1024, 24 layers).

Without CUDA (``SA_DRY=1`` in run_x2.sh style, or any CPU machine) it runs the same on gloo with the CPU shim
and a 12-layer checkpoint, to check the script before spending device time.  Exit status 1 if any check fails.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import nemo_bodies as B
import torch
import torch.distributed as dist

MiB = B.MiB
DENSE = {"num_attention_heads": 4, "num_key_value_heads": 2}


def fixtures(root: Path, layers: int) -> dict:
    from streaming_adapters.bench.checkpoint import fabricate
    from streaming_adapters.testing.fixtures import make_checkpoint

    small = {f: make_checkpoint(root / f, f, "fp8_block", architectures=[a], **DENSE).path
             for f, a in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"))}
    copies = {f: B.bf16_copy(p) for f, p in small.items()}
    big_llama = fabricate(root / "big-llama", "tiny", layers=layers)
    big_mistral = root / "big-mistral"
    big_mistral.mkdir(exist_ok=True)
    for f in big_llama.iterdir():
        if (f.suffix == ".safetensors" or f.name.endswith(".index.json")) and not (big_mistral / f.name).exists():
            os.link(f, big_mistral / f.name)
    for path, arch, mt in ((big_llama, "LlamaForCausalLM", "llama"), (big_mistral, "MistralForCausalLM", "mistral")):
        cfg = json.loads((big_llama / "config.json").read_text())
        cfg.update(architectures=[arch], model_type=mt, torch_dtype="bfloat16")
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"small": {k: str(v) for k, v in small.items()}, "copy": {k: str(v) for k, v in copies.items()},
            "big": {"llama": str(big_llama), "mistral": str(big_mistral)}}


def correctness(paths: dict, layout: str, family: str) -> dict:
    hooked = B.load_and_check(paths["small"][family], layout, hook=True)
    ref = B.load_and_check(paths["copy"][family], layout, hook=True)
    p = hooked["params"]
    exact = bool(p["checked"]) and len(p["exact"]) == p["checked"] and hooked["streaming_class"]
    same = torch.equal(hooked["out"], ref["out"])
    diff = (hooked["out"].float() - ref["out"].float()).abs().max().item()
    row = {"case": f"{family} FP8 correctness", "layout": layout, "exact": f"{len(p['exact'])}/{p['checked']}",
           "logits": "equal" if same else f"max|d|={diff:.3g}", "ok": exact and same, "s": hooked["seconds"]}
    if family == "llama":  # NeMo today, for the side-by-side
        plain = B.load_and_check(paths["small"][family], layout, hook=False)["params"]
        row["without hook"] = f"{len(plain['codes'])}/{plain['quantized']} hold FP8 codes"
        row["ok"] = row["ok"] and len(plain["codes"]) == plain["quantized"] > 0
    return row


def memory(paths: dict, layout: str, family: str) -> dict:
    r = B.memory_body(paths["big"][family], layout, True)
    peak = r.get("gpu_peak")
    row = {"case": f"{family} memory", "layout": layout, "shard MiB": f"{r['shard'] / MiB:.0f}",
           "full MiB": f"{r['full'] / MiB:.0f}", "host temp MiB": f"{(r['temporary'] or 0) / MiB:.1f}",
           "parts": r["parts"], "s": r["seconds"]}
    if peak is not None:
        row["peak GPU MiB"] = f"{peak / MiB:.0f}"
        # the shard, one chunk of codes on the device (64 MiB) and NeMo's own buffers; never the whole model
        row["ok"] = peak <= r["shard"] + 160 * MiB and peak < 0.75 * r["full"]
    else:
        row["ok"] = True
    return row


def main() -> int:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # 5 minutes: a rank stuck in a collective after its peer failed ends the run instead of eating device time.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank()
    root = Path(os.environ.get("SA_NEMO_DIR", "/tmp/sa_nemo_x2"))
    paths = [fixtures(root, 24 if cuda else 12) if rank == 0 else None]
    dist.broadcast_object_list(paths, src=0)
    paths = paths[0]
    rows = []
    for layout in ("fsdp2", "tp2"):
        for family in ("llama", "mistral"):
            for fn in (correctness, memory):
                try:
                    row = fn(paths, layout, family)
                except Exception as e:  # noqa: BLE001 -- report and go on; the other rank fails the same way
                    row = {"case": f"{family} {fn.__name__}", "layout": layout, "ok": False,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    traceback.print_exc()
                rows.append(dict(row, rank=rank))
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, rows)
    ok = all(r["ok"] for rs in everything for r in rs)
    if rank == 0:
        cols = ["case", "layout", "rank", "ok", "exact", "logits", "without hook", "shard MiB", "peak GPU MiB",
                "full MiB", "host temp MiB", "parts", "s", "error"]
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in sorted((r for rs in everything for r in rs), key=lambda r: (r["layout"], r["case"], r["rank"])):
            cells = [f"{r[c]:.2f}" if c == "s" and c in r else str(r.get(c, "")) for c in cols]
            print("| " + " | ".join(cells) + " |")
        device = torch.cuda.get_device_name() if cuda else "CPU (dry run: gloo + CPU shim)"
        print(f"\nNeMo x2 on {device}: {'PASS' if ok else 'FAIL'}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
