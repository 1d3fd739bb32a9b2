"""The side-by-side benchmark: every peer on the same checkpoint, in fresh processes, in one run.

Memory is measured from outside: this process samples ``/proc/<pid>/status`` (``RssAnon``, anonymous
memory: what the peer allocated, not the page cache of the mapped checkpoint) of every worker every 10 ms
and keeps each worker's peak.  GPU peaks come from the workers' ``torch.cuda.max_memory_allocated``.  The
page cache is dropped before each timed run only with ``benchmark.cold=true`` (it drops the whole machine's
cache; needs root; one line says so); otherwise, or where not allowed, the table says "warm".  Output: a
table on stdout, ``benchmark.json``, ``benchmark.md`` and ``benchmark.svg`` (a bar
plot of wall time) in the report folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from ..report import rss_anon_of
from .checkpoint import fabricate

MiB, GiB = 1 << 20, 1 << 30


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class OutsideSampler:
    """Peak RssAnon of every descendant of a process, sampled every ``interval`` s."""

    def __init__(self, root_pid: int, interval: float = 0.01) -> None:
        self.root = root_pid
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kids = psutil.Process(self.root).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for k in kids:
                self.peaks[k.pid] = max(self.peaks.get(k.pid, 0), rss_anon_of(k.pid) or 0)
            time.sleep(self.interval)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._t.join()
        return self.peaks


def run_one(peer: str, checkpoint: Path, nproc: int, device: str, workdir: Path, cold: bool,
            extra: list[str] | None = None) -> dict:
    out = workdir / f"{peer}.json"
    out.unlink(missing_ok=True)
    dropped = drop_page_cache() if cold else False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "streaming_adapters.bench.peers", "--peer", peer, "--checkpoint", str(checkpoint),
           "--device", device, "--workdir", str(workdir), "--out", str(out), *(extra or [])]
    # CPUs this process may use (a cgroup / affinity limit, e.g. 4 of the GPU host's 32): torch's intra-op
    # threads sized on os.cpu_count() would oversubscribe them 8x.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cpus // nproc))}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    sampler = OutsideSampler(proc.pid)
    log, _ = proc.communicate()
    peaks = sampler.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        return {"peer": peer, "error": log[-2000:], "nproc": nproc}
    ranks = json.loads(out.read_text())
    worker = {r["pid"]: r for r in ranks}
    return {
        "peer": peer, "nproc": nproc, "cold": dropped,
        "seconds": max(r["seconds"] for r in ranks),
        "process_seconds": wall,
        "bytes": sum(r.get("bytes", 0) for r in ranks),
        "host_peak_bytes": max((peaks.get(pid, 0) for pid in worker), default=0),
        # What the peer added on top of its process baseline (outside peak - inside baseline), per rank.
        "host_added_bytes": max((peaks.get(pid, 0) - r.get("rss_baseline", 0) for pid, r in worker.items()), default=0),
        "gpu_peak_bytes": max((r.get("gpu_total_peak_bytes", 0) for r in ranks), default=0) or None,
        "shard_bytes": max((r.get("shard_bytes", 0) for r in ranks), default=0) or None,
        "model_bytes": ranks[0].get("model_bytes"),
        "ranks": ranks,
    }


def table(results: list[dict], ckpt_bytes: int, meta: dict) -> str:
    raw = next((r for r in results if r["peer"] == "raw_read" and "error" not in r), None)
    lines = [f"checkpoint {ckpt_bytes / 1e9:.2f} GB ({meta['shape']}, {meta['layers']} layers), device {meta['device']}, "
             f"{meta['machine']}, {meta['date']}",
             "| peer | ranks | cache | wall s | GB/s (checkpoint) | x raw read | host peak/rank | host added/rank "
             "| BF16 shard/rank | GPU peak/rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['peer']} | {r['nproc']} | - | failed: {r['error'].splitlines()[-1][:60] if r['error'] else '?'} | | | | | | |")
            continue
        gbps = ckpt_bytes / r["seconds"] / 1e9
        ratio = r["seconds"] / raw["seconds"] if raw else float("nan")
        gpu = f"{r['gpu_peak_bytes'] / GiB:.2f} GiB" if r.get("gpu_peak_bytes") else "-"
        shard = f"{r['shard_bytes'] / GiB:.2f} GiB" if r.get("shard_bytes") else "-"
        lines.append(f"| {r['peer']} | {r['nproc']} | {'cold' if r['cold'] else 'warm'} | {r['seconds']:.2f} | "
                     f"{gbps:.2f} | {ratio:.2f} | {r['host_peak_bytes'] / GiB:.2f} GiB | "
                     f"{r['host_added_bytes'] / GiB:.2f} GiB | {shard} | {gpu} |")
    return "\n".join(lines)


def svg(results: list[dict], title: str) -> str:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>"
    w, bar, gap, left = 720, 26, 10, 210
    top = max(r["seconds"] for r in ok)
    h = 40 + len(ok) * (bar + gap)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>",
             f"<text x='10' y='20' font-size='14'>{title}</text>"]
    for i, r in enumerate(ok):
        y = 35 + i * (bar + gap)
        bw = (w - left - 80) * r["seconds"] / top
        parts.append(f"<text x='10' y='{y + bar * 0.7}'>{r['peer']} ({r['nproc']} rank)</text>")
        parts.append(f"<rect x='{left}' y='{y}' width='{bw:.1f}' height='{bar}' fill='#4878a8'/>")
        parts.append(f"<text x='{left + bw + 5:.1f}' y='{y + bar * 0.7}'>{r['seconds']:.2f} s</text>")
    parts.append("</svg>")
    return "\n".join(parts)


def run_benchmark(cfg) -> dict:
    b = cfg.benchmark
    workdir = Path(b.workdir or tempfile.mkdtemp(prefix="sa_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(cfg.checkpoint.path) if cfg.checkpoint.path else workdir / "checkpoint"
    t0 = time.perf_counter()
    fabricate(ckpt, b.shape, b.layers)
    print(f"checkpoint ready at {ckpt} ({time.perf_counter() - t0:.1f} s)", flush=True)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    if b.cold:  # it affects every process on the machine, so it is opt-in and said out loud
        print("benchmark.cold=true: dropping the whole machine's page cache (sync; echo 3 > "
              "/proc/sys/vm/drop_caches) before each timed run; the table says warm where that is not allowed",
              flush=True)
    results = []
    for peer in b.peers:
        nproc = 1 if peer == "transformers_dequantize" else b.nproc
        r = run_one(peer, ckpt, nproc, cfg.device, workdir, b.cold,
                    ["--readers", str(cfg.io.readers), "--io-backend", cfg.io.backend])
        results.append(r)
        status = "FAILED" if "error" in r else f"{r['seconds']:.2f} s"
        print(f"  {peer:<24} {status}", flush=True)
        if "error" in r:
            print(r["error"][-1500:], flush=True)
    import datetime
    import platform

    meta = {"shape": b.shape, "layers": b.layers, "device": cfg.device, "nproc": b.nproc,
            "machine": f"{platform.node()} ({len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable, "
                       f"{psutil.virtual_memory().total / GiB:.0f} GiB)",
            "date": datetime.date.today().isoformat(), "checkpoint_bytes": ckpt_bytes,
            "command": " ".join(sys.argv)}
    if cfg.device == "cuda":
        import torch

        meta["machine"] += f", {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    text = table(results, ckpt_bytes, meta)
    for r in results:
        for x in r.get("ranks", []):
            if x.get("timings"):
                print(f"timings {r['peer']} rank {x['rank']}: " + ", ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in x["timings"].items()))
    print(text, flush=True)
    out_dir = Path(cfg.report.path).parent if cfg.report.path else workdir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.md").write_text(text + "\n")
    (out_dir / "benchmark.svg").write_text(svg(results, f"{b.shape} x {b.layers} layers, {cfg.device}, "
                                                        f"{b.nproc} ranks: wall time"))
    data = {"meta": meta, "results": results}
    (out_dir / "benchmark.json").write_text(json.dumps(data, indent=2))
    return {**data, "report_dir": str(out_dir)}
