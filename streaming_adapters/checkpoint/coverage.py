"""Is the checkpoint whole?  Refuse one that lacks decoder layers or shard files before anything is read.

A folder without ``model.safetensors.index.json`` is read as "every *.safetensors here", so a shard that
failed to download simply is not there: its tensors are absent, and a conversion would write an incomplete
checkpoint "successfully".  Two checks catch it from names alone:

* the config's ``num_hidden_layers`` (or ``text_config``'s) says layers 0..N-1 exist: every one must have
  at least one tensor (a decoder layer as the checkpoint's family names it, ``Family.layer_of``:
  ``...layers.<i>.`` by default; extra ones such as DeepSeek's MTP layer N are allowed);
* files named ``model-0000k-of-0000n.safetensors`` must be all n of them (without an index: with one, the
  index names the files and each must exist).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .index import INDEX_NAME, CheckpointIndex

if TYPE_CHECKING:
    from ..models.families import Family

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


def missing_layers(index: CheckpointIndex, family: Family | None = None) -> tuple[int | None, list[int]]:
    """(the config's layer count, the decoder layers below it that have no tensor); layers as ``family``
    (default: the one of the config's ``model_type``) names them."""
    return _scan_layers(index, family)[:2]


def _scan_layers(index: CheckpointIndex, family: Family | None) -> tuple[int | None, list[int], str]:
    """:func:`missing_layers`, and the prefix most layer tensors have (the language model's in a VLM)."""
    cfg = index.config
    n = cfg.get("num_hidden_layers")
    if n is None and isinstance(cfg.get("text_config"), dict):
        n = cfg["text_config"].get("num_hidden_layers")
    if family is None:
        from ..models.families import get_family  # models/ imports the loaders, which import this module

        family = get_family(cfg)
    layers = [li for name in index.tensors if (li := family.layer_of(name)) is not None]
    if not isinstance(n, int) or not layers:  # no layer count, or no name of a decoder layer: cannot tell
        return None, [], ""
    have = {i for _, i in layers}
    prefix = Counter(p for p, _ in layers).most_common(1)[0][0]
    return n, [i for i in range(n) if i not in have], prefix


def check_coverage(index: CheckpointIndex, family: Family | None = None) -> None:
    """Raise :class:`IncompleteCheckpointError` naming what is missing (shard files first: the likely cause).
    ``family``: how decoder layers are named (default: the config's ``model_type``'s)."""
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
    n, layers, prefix = _scan_layers(index, family)
    if layers:
        raise IncompleteCheckpointError(
            f"decoder layer(s) {_ranges(layers)} of {n} have no tensors",
            file=str(index.path), tensor=f"{prefix}.{layers[0]}.*",
            expected=f"tensors for every layer 0..{n - 1} (config.json num_hidden_layers={n})",
            fix="a shard file is missing or the download is incomplete: re-download the checkpoint")
