"""One benchmark peer, run on every rank of a fresh torchrun job (so each peer starts from a clean process):

    python -m torch.distributed.run --nproc-per-node N -m streaming_adapters.bench.peers \\
        --peer streaming_adapters --checkpoint DIR --device cpu --out result.json

Peers (TP layout over the N ranks where it applies; destinations allocated before the clock starts):

    raw_read                 pread of exactly the bytes this rank's TP shard needs, no dequant (the limit)
    streaming_adapters       load_fp8_state_dict into TP DTensors
    torch_quantized_reader   dcp.load with torch's QuantizedHuggingFaceStorageReader into the same DTensors
    transformers_dequantize  from_pretrained(FineGrainedFP8Config(dequantize=True)): what every rank does
                             today (the whole BF16 model); one process
    convert_nvfp4            convert_checkpoint(target="nvfp4", format="compressed-tensors") over N ranks
    read_write               read the checkpoint and write the same number of bytes (conversion's limit)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

PEERS = ("raw_read", "streaming_adapters", "torch_quantized_reader", "transformers_dequantize", "convert_nvfp4",
         "read_write")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def _tp_state_dict(path: str, device: str):
    from ..checkpoint.index import CheckpointIndex
    from ..formats import get_adapter
    from ..layouts import Layout, build_state_dict

    index = CheckpointIndex.open(path)
    adapter = get_adapter(path, index=index)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    sd, boxes = build_state_dict(adapter.plan.logical, Layout(tp=world), rank, device, fill=0.0)
    return index, adapter, sd, boxes


def run_peer(peer: str, path: str, device: str, workdir: str, readers: int = 8, io_backend: str = "pread") -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    dev = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
    from ..report import rss_anon_bytes

    # The process baseline (interpreter, torch, CUDA context, process group) before anything of the peer's.
    result: dict = {"peer": peer, "rank": rank, "rss_baseline": rss_anon_bytes()}
    if peer in ("raw_read", "streaming_adapters", "torch_quantized_reader"):
        index, adapter, sd, boxes = _tp_state_dict(path, dev)
        result["shard_bytes"] = sum(v.to_local().nbytes for v in sd.values())
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if peer == "raw_read":
        result["bytes"] = _raw_read(index, adapter, boxes, readers)
    elif peer == "streaming_adapters":
        from .. import load_fp8_state_dict

        rep = load_fp8_state_dict(sd, path, readers=readers, io_backend=io_backend)
        result["bytes"] = rep.bytes_read
        result["timings"] = rep.ranks[rank].timings
        result["transient"] = rep.peak_transient_bytes
    elif peer == "torch_quantized_reader":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

        dcp.load(sd, storage_reader=QuantizedHuggingFaceStorageReader(path, block_size=128))
    elif peer == "transformers_dequantize":
        from transformers import AutoModelForCausalLM, FineGrainedFP8Config

        kw = {"device_map": dev} if device == "cuda" else {}  # device_map needs accelerate; CPU is the default
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16, **kw)
        result["model_bytes"] = sum(p.nbytes for p in model.parameters())
    elif peer == "convert_nvfp4":
        from ..convert import convert_checkpoint

        rep = convert_checkpoint(path, Path(workdir) / "nvfp4", target="nvfp4", format="compressed-tensors",
                                 device=dev, overwrite=True, progress=False, readers=readers, io_backend=io_backend)
        result["bytes"] = rep.bytes_read
        result["bytes_written"] = rep.bytes_written
    elif peer == "read_write":
        result["bytes"] = _read_write(path, Path(workdir) / "copy", rank, dist.get_world_size() if dist.is_initialized() else 1)
    else:
        raise SystemExit(f"unknown peer {peer!r}; known: {PEERS}")
    _sync(device)
    result["seconds"] = time.perf_counter() - t0
    if device == "cuda":
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() - base_gpu
        result["gpu_total_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _raw_read(index, adapter, boxes, readers: int) -> int:
    """The limit: the same boxes this rank's load reads, pread by ``readers`` threads (the same number of
    reads in flight as the GPU pipeline) into reused buffers, kernel readahead on, nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    from ..checkpoint.byteio import BoxReader
    from ..read import iter_subboxes

    jobs = []
    for name, (start, length) in boxes.items():
        info = adapter.plan.logical[name].stored
        jobs += [(info, s, n) for s, n in iter_subboxes(start, length, (32 << 20) // info.itemsize)]
    with BoxReader(index.path, "pread", advise_random=False) as io:
        bufs = [torch.empty(32 << 20, dtype=torch.uint8) for _ in range(readers)]

        def work(k: int) -> int:
            total = 0
            for info, s, n in jobs[k::readers]:
                total += io.read(info, s, n, out=bufs[k]).nbytes
            return total

        with ThreadPoolExecutor(readers) as pool:
            return sum(pool.map(work, range(readers)))


def _read_write(path: str, out: Path, rank: int, world: int) -> int:
    """Every rank copies whole files (disjoint), pread -> pwrite in 64 MiB pieces, fsync."""
    files = sorted(Path(path).glob("*.safetensors"))
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    buf = bytearray(64 << 20)
    total = 0
    for f in files[rank::world]:
        with open(f, "rb", buffering=0) as src, open(out / f.name, "wb", buffering=0) as dst:
            while n := src.readinto(buf):
                dst.write(memoryview(buf)[:n])
                total += n
            os.fsync(dst.fileno())
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True, choices=PEERS)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default="/tmp/sa_bench")
    p.add_argument("--out", required=True)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument("--io-backend", default="pread", choices=["mmap", "pread"])
    a = p.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if a.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    elif a.device == "cuda":
        torch.cuda.set_device(0)
    res = run_peer(a.peer, a.checkpoint, a.device, a.workdir, a.readers, a.io_backend)
    res["pid"] = os.getpid()
    gathered = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, res)
        dist.destroy_process_group()
    else:
        gathered = [res]
    if res["rank"] == 0:
        Path(a.out).write_text(json.dumps(gathered, indent=2))


if __name__ == "__main__":
    main()
