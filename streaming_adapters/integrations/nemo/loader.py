"""``PartsLoad``: plan every part before any I/O (every rank, errors raised on all ranks), then hand NeMo one
``CheckpointLoadPart`` at a time.

1. **Destinations in checkpoint names.**  Without a NeMo adapter the model's names are Hugging Face names.
   With one (NeMo's MoE families: grouped experts ``[E, H, 2I]``), its ``convert_single_tensor_to_hf(...,
   for_checkpoint_load=True)`` gives per-expert *views* of the model's storage in checkpoint layout; a copy
   instead of a view would never reach the model, so it is an error.
2. **Requests and parts** (``models/loadplan.py``, shared with ``load_fp8_checkpoint``).  The family's key
   mapper turns each destination into boxes of checkpoint tensors -> views of the local shard (missing /
   shape / dtype problems are errors on every rank; checkpoint tensors no rank uses are logged); one part per
   decoder layer (the family's ``layer_of``), plus one for the rest.  A part whose FP8 bytes on this rank exceed
   ``max_part_bytes`` is split.
3. **Agreement.**  Ranks agree on the number of parts (one all-gather) and a rank with fewer splits its
   largest parts: pipeline stages holding 2 and 3 layers issue the same number of ``dcp.load`` collectives (a
   stage with fewer model tensors than parts makes every rank raise the same error, not a hang).
4. **Reading.**  NeMo runs ``dcp.load(part.checkpoint_tensors)`` with its own reader, then ``part.finish()``.
   The part names its checkpoint tensors (NeMo checks they exist and are requested once) as
   :class:`~.parts.BoxDestination` s with no boxes, so NeMo's reader reads nothing; ``finish`` hands every
   request to the read core (``read/``: ``make_executor``), which reads the boxes chunk by chunk straight into
   the views of the local shards -- the path of ``load_fp8_checkpoint``'s DCP reader -- and then gathers
   errors from every rank (a rank failing alone would leave the others waiting in the next ``dcp.load``).

Memory model (per rank): the model's own shards + the read core's transient (one staging buffer of at most
``chunk_bytes`` of codes on CPU, the pipeline's rings on CUDA, plus the dequantization scratch).  No host
temporary of a box, a tensor or a part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ...checkpoint.index import CheckpointIndex
from ...checkpoint.byteio import BoxReader
from ...dist import all_gather_object, is_dist, run_then_gather
from ...errors import DestinationError
from ...formats import get_adapter
from ...models.families import get_family
from ...models.loadplan import LoadPlan, PartPlan, agree_mapping, agree_parts, bound_parts, plan_load
from ...read import DEFAULT_BACKEND, DEFAULT_CHUNK_BYTES, make_executor
from .parts import BoxDestination

logger = logging.getLogger("streaming_adapters.nemo")

# 4 GiB of FP8 codes per part and rank: a DeepSeek-V3 layer (~11.5 GB of FP8 experts) is one part from EP4
# up; larger slices are split by tensor.  Not a memory bound any more (parts are read straight into the
# shards): it sets how much one dcp.load + finish covers, kept for the options' compatibility.
DEFAULT_MAX_PART_BYTES = 4 << 30
GiB = float(1 << 30)


@dataclass
class PartsLoadStats:
    """This rank's numbers for one load (``adapter.last_load``); ``ranks`` holds every rank's.

    ``bytes_read``: checkpoint bytes the read core read (codes, scale windows, plain tensors);
    ``peak_temporary_bytes``: the read core's largest transient (staging + scratch + scale window), the only
    host memory a load adds beyond the model's shards."""

    rank: int = 0
    parts: int = 0
    tensors: int = 0
    quantized: int = 0
    bytes_read: int = 0
    peak_temporary_bytes: int = 0
    seconds: float = 0.0
    ranks: list | None = None

    def summary_line(self) -> str:
        rs = self.ranks or [asdict(self)]
        gb = sum(r["bytes_read"] for r in rs) / GiB
        peak = max(r["peak_temporary_bytes"] for r in rs) / (1 << 20)
        secs = max(r["seconds"] for r in rs)
        return (f"streaming_adapters: FP8 checkpoint loaded through NeMo in {self.parts} parts on {len(rs)} rank(s): "
                f"{sum(r['tensors'] for r in rs)} boxes ({sum(r['quantized'] for r in rs)} FP8), {gb:.3f} GB read "
                f"in {secs:.2f} s ({gb / max(secs, 1e-9):.2f} GB/s), largest read transient {peak:.1f} MiB per rank")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _aliases(dest: torch.Tensor, source: torch.Tensor) -> bool:
    a, b = _local(dest), _local(source)
    if a.numel() == 0:
        return True
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def checkpoint_destinations(model_state_dict: dict, inner, device_mesh,
                            path: str = "") -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Native key -> ``[(checkpoint-layout key, destination)]``; destinations alias model storage."""
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, value in model_state_dict.items():
        if not isinstance(value, torch.Tensor) or key.endswith("_extra_state"):
            out[key] = []
            continue
        if inner is None:
            out[key] = [(key, value)]
            continue
        items = inner.convert_single_tensor_to_hf(key, value, quantization=False, for_checkpoint_load=True,
                                                  device_mesh=device_mesh, exclude_key_regex=r".*_extra_state.*")
        for hf_key, dest in items:
            if dest is not value and not _aliases(dest, value):
                raise DestinationError(
                    f"NeMo's {type(inner).__name__} returned a copy, not a view of the model's storage, for {hf_key}",
                    file=path, tensor=hf_key, expected=f"checkpoint-layout views of {key}",
                    fix="this parallel layout of the model's grouped experts is not supported by the streaming loader "
                    "(report it with the distributed: section); disable it to keep NeMo's own loader")
        out[key] = list(items)
    return out


class PartsLoad:
    """One base-checkpoint load into one model (stage) on this rank.  Construct on every rank (collective)."""

    def __init__(self, path: str | Path, model_state_dict: dict, *, inner=None, device_mesh=None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
                 io_backend: str = DEFAULT_BACKEND) -> None:
        self.t0 = time.perf_counter()
        self.chunk_bytes, self.io_backend = chunk_bytes, io_backend
        self.stats = PartsLoadStats(rank=dist.get_rank() if is_dist() else 0)
        error: BaseException | None = None
        plan, self.logical, where = LoadPlan(), {}, str(path)
        try:
            self.index = CheckpointIndex.open(path)
            where = str(self.index.path)
            self.logical = get_adapter(path, index=self.index).plan.logical
            family = get_family(self.index.config)
            dests = checkpoint_destinations(model_state_dict, inner, device_mesh, where)
            plan = plan_load(dests, family.mapper(), self.logical, family)
            plan.parts = bound_parts(plan.parts, max_part_bytes, self.logical)
        except Exception as e:  # noqa: BLE001 -- every rank raises (gathered), none waits in a collective
            error = e
        # A missing source is an error here (NeMo would leave the tensor unset); unused tensors are only logged.
        unexpected = agree_mapping(error, plan, self.logical, None, path=where, strict=True,
                                   unexpected_is_error=False)
        if unexpected and self.stats.rank == 0:
            logger.warning("streaming_adapters: %d checkpoint tensor(s) are not used by the model (examples=%s)",
                           len(unexpected), unexpected[:5])
        self.parts = agree_parts(plan.parts, None, pad=False, path=where)

    # -- parts ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        from nemo_automodel.components.checkpoint.state_dict_adapter import (
            CheckpointLoadPart,
        )

        self.stats.parts = len(self.parts)
        for i, plan in enumerate(self.parts):
            tensors, temporary, finish = self._materialize(plan, last=i == len(self.parts) - 1)
            yield CheckpointLoadPart(checkpoint_tensors=tensors, model_keys=frozenset(plan.model_keys),
                                     temporary_checkpoint_keys=frozenset(temporary), finish=finish)

    def _materialize(self, plan: PartPlan, last: bool):
        """DCP destinations of one part (none of them read: see the module docstring) and its finish."""
        tensors = {key: BoxDestination(self.logical[key].stored.shape, self.logical[key].stored.torch_dtype, [])
                   for key in sorted(plan.ckpt_keys)}
        jobs = [(self.logical[r.ckpt_key], r.start, r.length, r.view) for r in plan.requests]

        def finish() -> None:
            # Every rank learns of any rank's failure here (a scale that is not finite, a shard truncated
            # mid-load): the others would otherwise wait in the next part's dcp.load for a rank that is gone.
            run_then_gather(lambda: self._fill(jobs))
            jobs.clear(), tensors.clear()
            if last:
                self._report()

        return tensors, set(), finish

    def _fill(self, jobs: list) -> None:
        """The part's boxes read by the read core straight into the shard views, one executor per destination
        device (``make_executor`` picks CPU or the CUDA pipeline), each filling all of its boxes in one call."""
        by_device: dict[torch.device, list] = {}
        # In file order, as the DCP reader reads: each shard's tensors front to back (the page cache's readahead).
        for job in sorted(jobs, key=lambda j: (j[0].stored.file, j[0].stored.begin, tuple(j[1]))):
            by_device.setdefault(job[3].device, []).append(job)
        with BoxReader(self.index.path, self.io_backend) as io:
            for device, mine in by_device.items():
                ex = make_executor(io, device, chunk_bytes=self.chunk_bytes)
                ex.fill(mine)
                self.stats.tensors += ex.tensors
                self.stats.quantized += ex.quantized
                self.stats.peak_temporary_bytes = max(self.stats.peak_temporary_bytes, ex.peak_transient_bytes)
            self.stats.bytes_read += io.bytes_read

    def _report(self) -> None:
        self.stats.seconds = time.perf_counter() - self.t0
        self.stats.ranks = [asdict(s) | {"ranks": None} for s in all_gather_object(self.stats)]
        if self.stats.rank == 0:
            logger.info(self.stats.summary_line())
