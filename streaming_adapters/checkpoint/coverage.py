"""Is the checkpoint whole?  Refuse one that lacks decoder layers or shard files before anything is read.

A folder without ``model.safetensors.index.json`` is read as "every *.safetensors here", so a shard that
failed to download simply is not there: its tensors are absent, and a conversion would write an incomplete
checkpoint "successfully".  Two checks catch it from names alone:

* the config's ``num_hidden_layers`` (or ``text_config``'s) says layers 0..N-1 exist: every one must have
  at least one tensor (``...layers.<i>.``; extra ones such as DeepSeek's MTP layer N are allowed);
* files named ``model-0000k-of-0000n.safetensors`` must be all n of them (without an index: with one, the
  index names the files and each must exist).
"""

from __future__ import annotations

import re

from ..errors import CheckpointError
from .index import INDEX_NAME, CheckpointIndex

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
SHARD = re.compile(r"^(?P<stem>.*?)-(?P<k>\d{5})-of-(?P<n>\d{5})\.safetensors$")


class IncompleteCheckpointError(CheckpointError):
    """Decoder layers the config promises, or numbered shard files, are missing from the checkpoint."""


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (a missing-layer list can be long)."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def missing_shard_files(files: list[str]) -> list[str]:
    """Names ``<stem>-0000k-of-0000n.safetensors`` that a numbered series implies but ``files`` lacks."""
    series: dict[tuple[str, int], set[int]] = {}
    for f in files:
        m = SHARD.match(f.rsplit("/", 1)[-1])
        if m:
            series.setdefault((f[: len(f) - len(m.group(0))] + m.group("stem"), int(m.group("n"))), set()).add(
                int(m.group("k")))
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for (stem, n), have in sorted(series.items())
            for k in range(1, n + 1) if k not in have]


def missing_layers(index: CheckpointIndex) -> tuple[int | None, list[int]]:
    """(the config's layer count, the decoder layers below it that have no tensor)."""
    cfg = index.config
    n = cfg.get("num_hidden_layers")
    if n is None and isinstance(cfg.get("text_config"), dict):
        n = cfg["text_config"].get("num_hidden_layers")
    have = {int(m.group(1)) for name in index.tensors if (m := LAYER.search(name))}
    if not isinstance(n, int) or not have:  # no layer count, or names without `layers.<i>.`: cannot tell
        return None, []
    return n, [i for i in range(n) if i not in have]


def check_coverage(index: CheckpointIndex) -> None:
    """Raise :class:`IncompleteCheckpointError` naming what is missing (shard files first: the likely cause)."""
    # With an index, the index names the files (each checked to exist by CheckpointIndex.open); a series
    # gap then means the index chose other names, not a lost download.
    indexed = (index.path / INDEX_NAME).is_file()
    files = [] if indexed else missing_shard_files(sorted(index.file_sizes))
    if files:
        shown = ", ".join(files[:5]) + (" ..." if len(files) > 5 else "")
        raise IncompleteCheckpointError(
            f"{len(files)} numbered shard file(s) are missing: {shown}",
            file=str(index.path / files[0]), expected=f"every file of the series in {index.path}",
            fix="finish the download (huggingface-cli download resumes), or point at the complete folder")
    n, layers = missing_layers(index)
    if layers:
        raise IncompleteCheckpointError(
            f"decoder layer(s) {_ranges(layers)} of {n} have no tensors",
            file=str(index.path), tensor=f"model.layers.{layers[0]}.*",
            expected=f"tensors for every layer 0..{n - 1} (config.json num_hidden_layers={n})",
            fix="a shard file is missing or the download is incomplete: re-download the checkpoint")
