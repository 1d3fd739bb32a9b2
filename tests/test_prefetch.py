"""The page-cache prefetch of the next decoder layer's bytes (read/prefetch.py) and the byte ranges the
layer streamer gives it (calibrate/skeleton.py)."""

from __future__ import annotations

import os

import pytest
import torch

from streaming_adapters.calibrate.skeleton import Skeleton
from streaming_adapters.checkpoint.index import CheckpointIndex
from streaming_adapters.read.prefetch import PageCachePrefetch, merged_ranges


def test_merged_ranges_join_nearby_ranges_of_one_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    got = merged_ranges([(a, 100, 200), (b, 0, 10), (a, 0, 100), (a, 5 << 20, 6 << 20), (a, 150, 300)])
    assert got == [(a, 0, 300), (a, 5 << 20, 6 << 20), (b, 0, 10)]


def test_prefetch_reads_every_byte_once_and_skips_what_is_gone(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(6 << 20))
    p = PageCachePrefetch([(f, 0, 1 << 20), (f, 4 << 20, 5 << 20), (tmp_path / "gone.bin", 0, 10)],
                          chunk_bytes=300_000)
    p._thread.join(30)
    assert p.done() and p.bytes_read == 2 << 20
    # A range past the end of the file stops at the end: no error, nothing invented.
    q = PageCachePrefetch([(f, (6 << 20) - 10, 8 << 20)])
    q._thread.join(30)
    assert q.done() and q.bytes_read == 10


@pytest.mark.parametrize("family", ["llama", "ministral3_vlm"])
def test_layer_ranges_are_exactly_each_decoder_layers_tensors(checkpoints, family):
    path = checkpoints(family, "fp8_block")
    sk = Skeleton(path, torch.device("cpu"))
    ranges = sk._layer_ranges()
    index = CheckpointIndex.open(path)
    assert sorted(ranges) == list(range(sk.num_layers))
    for i in range(sk.num_layers):
        names = [n for n in index.tensors if f"layers.{i}." in n and "vision" not in n]
        want = sum(index[n].nbytes for n in names)
        assert sum(e - b for _, b, e in ranges[i]) == want and want > 0
    # Filling layer 0 starts the prefetch of layer 1; stopping it leaves no thread behind.
    sk.fill_layer(0)
    assert sk._prefetch is not None
    sk.stop_prefetch()
    assert sk._prefetch is None
