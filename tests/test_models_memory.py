"""Peak anonymous memory of load_fp8_checkpoint: a 500M-parameter Llama-shaped model under real FSDP2 on
two ranks, sampled from outside the ranks by this (parent) process.  Method: docs/models.md, "Memory"."""

from __future__ import annotations

import os

import pytest

import model_bodies as B
from streaming_adapters.bench.checkpoint import fabricate
from streaming_adapters.testing.dist_pool import ProcessGroupPool
from streaming_adapters.testing.rss import RssSampler

pytestmark = pytest.mark.dist
MiB = 1 << 20


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    # hidden 1024, intermediate 2816, 8/2 heads, vocab 8000, 44 layers: 512M parameters, 505 MB block FP8.
    # Random codes and scales (bench/checkpoint.py): ~5 s here, make_checkpoint's quantization ~30 s.
    return str(fabricate(tmp_path_factory.mktemp("mem500") / "ckpt", "tiny", layers=44))


@pytest.fixture(scope="module")
def pool():
    # glibc keeps freed blocks under its (dynamic, up to 32 MiB) mmap threshold in the heap, where they
    # stay in RssAnon: a fixed 1 MiB threshold makes RssAnon follow live allocations.  glibc reads the
    # variable at process start, so it must be in the environment the workers are spawned with.
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 * MiB)
    try:
        p = ProcessGroupPool(2)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_") if old is None else os.environ.update(MALLOC_MMAP_THRESHOLD_=old)
    yield p
    p.close()


def test_fsdp2_500m_peak_rss_within_shard_plus_group(pool, big_checkpoint):
    pool.run(B.memory_warmup, big_checkpoint)
    with RssSampler(pool.pids, interval_s=0.002) as rss:
        results = pool.run(B.memory_body, big_checkpoint)
    for pid, r in zip(pool.pids, results):
        assert r["params"] > 250e6  # half of 512M per rank
        base = rss.at(pid, r["t_build"])
        peak = rss.peak(pid, r["t_build"], r["t_end"])
        n = len(rss.window(pid, r["t_build"], r["t_end"]))
        bound = r["shard"] + r["group"] + 64 * MiB
        print(f"rank pid {pid}: shard {r['shard'] / MiB:.1f} MiB, group {r['group'] / MiB:.1f} MiB, "
              f"peak +{(peak - base) / MiB:.1f} MiB over {n} samples (bound {bound / MiB:.1f} MiB); "
              f"load {r['seconds']:.2f} s")
        assert n > 100, n  # sampled every few ms through the whole build + load
        assert peak - base <= bound, (peak - base, bound)
        assert peak - base >= r["shard"] * 0.95  # the shard itself was written (the sampler saw it)
