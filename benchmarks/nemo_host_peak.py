"""Host peak of NeMo AutoModel loading an FP8 checkpoint through the hook, two code trees side by side.

Each rank's peak ``RssAnon`` during ``NeMoAutoModelForCausalLM.from_pretrained`` (FSDP2 on 2 gloo ranks, CPU),
sampled every 2 ms from outside the ranks (``testing/rss.RssSampler``), minus its value when the load starts;
each load in fresh processes after a warm-up load of a small 1-layer model (imports and first-call caches stay
outside the measurement), as ``tests/nemo/test_nemo_memory.py`` does::

    python benchmarks/nemo_host_peak.py --python .venv-nemo/bin/python --tree old=073565c --tree new=.

A tree is a folder holding ``streaming_adapters/`` or a git revision of this repository (its
``streaming_adapters/`` extracted with ``git archive`` into a temporary folder; 073565c is the code before
issue 12 item 2b).  Every tree is measured in its own interpreter of ``--python`` (one with nemo_automodel: the
NeMo venv, ``bash tests/nemo/run.sh`` creates it) with ``PYTHONPATH=<tree>:tests:tests/nemo`` (the tree's
``streaming_adapters``, this checkout's test bodies), ``--repeat`` times, alternating trees.  The checkpoint:
Llama-3-8B's layer shape (hidden 4096, intermediate 14336, 32/8 heads) with ``--layers`` layers and a vocab of
8000: 218 MB of block-FP8 codes per layer, so one layer's slice on a rank (109 MB under FSDP2=2, the host
temporary of the old code) stands out of the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             head_dim=128, vocab_size=8000, tie_word_embeddings=False)


def make_checkpoint(path: Path, layers: int, shape: str = "nemo_peak") -> Path:
    """A block-FP8 Llama checkpoint of SHAPE (``bench.checkpoint.fabricate``'s writer, our shape) or a preset."""
    from streaming_adapters.bench import checkpoint as ck

    ck.SHAPES.setdefault("nemo_peak", ("llama", SHAPE))  # this script's shape, beside the named presets
    ck.fabricate(path, shape, layers=layers)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def resolve_tree(spec: str, scratch: Path) -> Path:
    """A folder as it is; a git revision: its ``streaming_adapters/`` extracted under ``scratch``."""
    if Path(spec).is_dir():
        return Path(spec)
    dst = scratch / spec
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", spec, "streaming_adapters"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    return dst


def run_tree(python: str, tree: Path, path: Path, warmup: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (tree, REPO / "tests", REPO / "tests/nemo")))
    out = subprocess.run([python, __file__, "--measure", str(path), "--warmup", str(warmup)], env=env,
                         check=True, capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1]
    got = json.loads(line)
    if not Path(got["package"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: streaming_adapters was imported from {got['package']}")
    return got["rows"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[],
                    help="NAME=PATH of a folder holding streaming_adapters/, or NAME=REV (a git revision)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter with nemo_automodel (NeMo venv)")
    ap.add_argument("--root", default="/tmp/nemo_host_peak", help="where the checkpoints are written (once)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # child: one measurement with this interpreter's streaming_adapters
        import streaming_adapters

        import nemo_bodies

        rows = nemo_bodies.measure_peak(args.measure, True, args.warmup, timeout_s=600)
        print(json.dumps({"package": streaming_adapters.__file__, "rows": rows}, default=str))
        return
    scratch = Path(tempfile.mkdtemp(prefix="nemo_host_peak_trees_"))
    trees = [(n, resolve_tree(p, scratch)) for n, p in (t.split("=", 1) for t in args.tree or [f"new={REPO}"])]
    root = Path(args.root)
    path = make_checkpoint(root / f"llama_{args.layers}l", args.layers)
    # A small warm-up model (hidden 1024, 11 MB of FP8): a large one could still be being freed when the
    # measured load starts, lowering that rank's peak over its start (seen once: -78 MiB).
    warmup = make_checkpoint(root / "tiny_1l_warmup", 1, "tiny")
    results: dict[str, list[list[dict]]] = {n: [] for n, _ in trees}
    try:
        for _ in range(args.repeat):
            for name, tree in trees:
                results[name].append(run_tree(args.python, tree, path, warmup))
                print(f"{name}: {[round(r['peak'] / MiB, 1) for r in results[name][-1]]}", file=sys.stderr,
                      flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fp8 = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint: {path} ({args.layers} layers, {fp8 / MiB:.0f} MiB on disk); FSDP2 on 2 gloo ranks, CPU")
    print("tree | run | rank | shard MiB | peak RssAnon +MiB | peak - shard MiB | at end +MiB | reported temporary MiB "
          "| parts | s")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    for name, runs in results.items():
        for k, rows in enumerate(runs):
            for i, r in enumerate(rows):
                print(f"{name} | {k} | {i} | {r['shard'] / MiB:.1f} | {r['peak'] / MiB:.1f} | "
                      f"{(r['peak'] - r['shard']) / MiB:.1f} | {r['end'] / MiB:.1f} | {r['temporary'] / MiB:.1f} | "
                      f"{r['parts']} | {r['seconds']:.2f}")


if __name__ == "__main__":
    main()
