"""Distributed smoke test: a stand-in for ``streaming_adapters.run`` with the same command line.

Launched exactly like the real entry point (``torchrun`` or one ``srun`` task per rank, rendezvous from
the env:// variables), it joins the process group, does one all_reduce and writes
``<out_dir>/rank-<R>.json``; ``--check`` then verifies the files.  It needs nothing but torch, so it
tells launcher/cluster problems apart from recipe problems on any cluster::

    # on a Slurm cluster (GPUs: NCCL; SA_CPU=1: gloo)
    SA_ENTRY=dist_smoke PYTHONPATH=tests/slurm sbatch launch/slurm/streaming_adapters_torchrun.sbatch \
        smoke out_dir=$PWD/smoke-out expect_world_size=16
    python tests/slurm/dist_smoke.py --check smoke-out --world-size 16

Arguments (Hydra style, so a launcher needs no special case): ``--config-name NAME`` is accepted and
ignored; overrides ``out_dir=PATH`` (required) and ``expect_world_size=N`` (optional, fails the rank
early with a clear message).  The backend is ``$SA_DIST_BACKEND`` if set, else NCCL when CUDA is
available, else gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path


def _say(line: str) -> None:
    # One write(2) per line: several ranks share the job's output file and must not interleave mid-line.
    os.write(1, (line.rstrip("\n") + "\n").encode())


def _parse_overrides(argv: list[str]) -> dict[str, str]:
    parser = argparse.ArgumentParser(prog="dist_smoke")
    parser.add_argument("--config-name", "-cn", default=None)
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep:
            parser.error(f"expected key=value override, got {item!r}")
        overrides[key] = value
    if "out_dir" not in overrides:
        parser.error("missing override out_dir=PATH")
    return overrides


def run(argv: list[str]) -> int:
    overrides = _parse_overrides(argv)
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    expect = overrides.get("expect_world_size")
    if expect is not None and int(expect) != world:
        _say(f"[dist_smoke] rank {rank}: WORLD_SIZE={world} but expect_world_size={expect}")
        return 2

    backend = os.environ.get("SA_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        # sum over ranks of (rank + 1) = world * (world + 1) / 2: wrong if any rank is missing or doubled.
        value = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(value)
        got, want = value.item(), world * (world + 1) / 2
        record = {
            "rank": rank,
            "world_size": dist.get_world_size(),
            "local_rank": local_rank,
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            "backend": backend,
            "all_reduce": got,
            "expected": want,
        }
        out = Path(overrides["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".rank-{rank}.json.tmp"
        tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
        tmp.replace(out / f"rank-{rank}.json")  # atomic: the checker never sees half a file
        _say(f"[dist_smoke] rank {rank}/{world} local_rank {local_rank} node {record['node']} "
             f"backend {backend} all_reduce {got:g} (want {want:g})")
        dist.barrier()
        return 0 if got == want else 1
    finally:
        dist.destroy_process_group()


def check(out_dir: Path, world_size: int, nodes: int | None) -> int:
    """Every rank 0..world_size-1 wrote its file, saw the full world and the right sum."""
    problems: list[str] = []
    files = sorted(out_dir.glob("rank-*.json"))
    records = [json.loads(f.read_text()) for f in files]
    ranks = sorted(r["rank"] for r in records)
    if ranks != list(range(world_size)):
        problems.append(f"ranks present {ranks}, want 0..{world_size - 1} (files={[f.name for f in files]})")
    for r in records:
        if r["world_size"] != world_size or r["all_reduce"] != r["expected"]:
            problems.append(f"rank {r['rank']}: world_size={r['world_size']} all_reduce={r['all_reduce']} "
                            f"expected={r['expected']}")
    seen_nodes = sorted({r["node"] for r in records})
    if nodes is not None and len(seen_nodes) != nodes:
        problems.append(f"ranks ran on nodes {seen_nodes}, want {nodes} distinct nodes")
    for p in problems:
        print(f"dist_smoke --check {out_dir}: {p}", file=sys.stderr)
    if not problems:
        print(f"dist_smoke --check {out_dir}: OK, {world_size} ranks on nodes {seen_nodes}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check"]:
        p = argparse.ArgumentParser(prog="dist_smoke --check")
        p.add_argument("out_dir", type=Path)
        p.add_argument("--world-size", type=int, required=True)
        p.add_argument("--nodes", type=int, default=None, help="distinct SLURMD_NODENAME values expected")
        a = p.parse_args(argv[1:])
        return check(a.out_dir, a.world_size, a.nodes)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
