"""NVFP4 inputs: what both producers' checkpoints share (formats.md §2), and their box decoder.

Per quantized Linear ``X`` with logical weight ``[..., N, K]`` (``K % 16 == 0``):

    packed codes   uint8 ``[..., N, K/2]``, low nibble = even column (E2M1 code = sign << 3 | mag)
    block scale    F8_E4M3 ``[..., N, K/16]``, one per 16 consecutive columns
    global scale   F32, one per tensor: compressed-tensors ``weight_global_scale [1]`` (divides),
                   ModelOpt ``weight_scale_2 []`` (multiplies)
    activation     W4A4 only (``input_global_scale`` / ``input_scale``): hidden, never used for weights

The adapters (``nvfp4_ct.py``, ``nvfp4_modelopt.py``) name the tensors; everything else is here.  A weight
loads as a BF16 logical tensor ``X.weight`` of the logical shape, whatever the stored name.

Boxes: rows split anywhere; a column range must start and end on a 16-column block (a whole byte *and* a
whole block scale), else :class:`~streaming_adapters.errors.ScaleLayoutError` names the box and the splits
that would work.  Memory per box: the codes (0.5 B per element; a page-cache view with mmap on CPU), the
scale window (1/16 B per element) and the decode's int32 index over one row sub-chunk (see
``numerics/nvfp4.decode_box_into``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar, Iterator

import torch

from ..checkpoint.index import TensorInfo
from ..errors import MissingScaleError, ScaleLayoutError
from ..numerics import nvfp4
from .base import AdapterPlan, LogicalTensor, ScaleGrid, StreamingFP8StateDictAdapter
from .decoder import Box, BoxDecoder

GROUP = nvfp4.GROUP  # 16 columns share one E4M3 block scale (both producers)


@dataclass(frozen=True)
class NVFP4Decoder(BoxDecoder):
    """Decodes boxes of one NVFP4 weight as its producer's decoder does (``rule``: ``"ct"`` divides by the
    global scale and decodes code 8 to -0.0; ``"modelopt"`` multiplies and decodes it to +0.0)."""

    block_scale: TensorInfo
    global_scale: TensorInfo
    rule: str
    elems_per_stored: ClassVar[int] = 2

    def check_box(self, lt, start, length) -> None:
        c0, n = start[-1], length[-1]
        if c0 % GROUP == 0 and n % GROUP == 0:
            return
        k = lt.shape[-1]
        ok = [w for w in (2, 3, 4, 6, 8, 16) if (k // GROUP) % w == 0]
        raise ScaleLayoutError(
            f"{_who()}the box rows {_span(start, length, -2)} columns [{c0}, {c0 + n}) of an NVFP4 weight does "
            f"not start and end on a {GROUP}-column block: NVFP4 packs 2 columns per byte and shares one "
            f"E4M3 scale per {GROUP} columns, so this shard cannot be decoded on its own",
            file=lt.stored.file, tensor=lt.name,
            expected=f"column shards on multiples of {GROUP} (K = {k} = {k // GROUP} blocks)",
            fix=f"shard this weight by rows (Shard(0)), or split its {k} columns into whole blocks: even "
            f"Shard(1) over {ok or 'no'} ranks works",
        )

    def split(self, start, length, max_elems) -> Iterator[Box]:
        # Split in block coordinates (16 columns = 1), so every sub-box keeps whole blocks.
        from ..read.boxes import iter_subboxes

        bstart = (*start[:-1], start[-1] // GROUP)
        blen = (*length[:-1], length[-1] // GROUP)
        for s, n in iter_subboxes(bstart, blen, max(1, max_elems // GROUP)):
            yield (*s[:-1], s[-1] * GROUP), (*n[:-1], n[-1] * GROUP)

    def stored_box(self, start, length) -> Box:
        return (*start[:-1], start[-1] // 2), (*length[:-1], length[-1] // 2)

    def read_scales(self, io, lt, start, length) -> tuple[torch.Tensor, torch.Tensor]:
        lo = (*start[:-1], start[-1] // GROUP)
        s8 = io.read(self.block_scale, lo, (*length[:-1], length[-1] // GROUP))
        g = io.read(self.global_scale).reshape(()).to(torch.float32)
        eff = nvfp4.effective_scales(s8, g, self.rule)
        finite = torch.isfinite(eff)
        if not bool(finite.all()):
            bad = tuple(int(i) + o for i, o in zip((~finite).nonzero()[0], lo))
            raise ScaleLayoutError(
                f"NVFP4 block scale {float(s8[tuple(b - o for b, o in zip(bad, lo))].float())} with global scale "
                f"{float(g)} gives a non-finite multiplier at block {list(bad)}: the weights of that block "
                "would be NaN/Inf",
                file=str(io.root / self.block_scale.file), tensor=self.block_scale.name,
                expected="finite E4M3 block scales and a finite, non-zero global scale "
                f"({self.global_scale.name})",
                fix="the checkpoint is damaged (or was exported from an all-zero weight, which ModelOpt writes "
                "with NaN scales); re-export it",
            )
        return s8.float(), g  # E4M3 values are exact in fp32: the GPU pipeline's window buffers are fp32

    def decode_into(self, dst, codes, window, extra) -> int:
        return nvfp4.decode_box_into(dst, codes.view(torch.uint8), window.to(dst.device), extra, rule=self.rule)


class NVFP4AdapterBase(StreamingFP8StateDictAdapter):
    """Plans NVFP4 checkpoints: subclasses name the packed weight (``packed_suffix``), the block and
    global scales, the hidden activation keys and the decode ``rule``."""

    packed_suffix: ClassVar[str] = "weight_packed"
    block_scale_suffix: ClassVar[str] = "weight_scale"
    global_scale_suffix: ClassVar[str] = "weight_global_scale"
    rule: ClassVar[str] = "ct"

    def scale_block(self, weight, scale):
        return (1,) * (len(weight.shape) - 1) + (GROUP,)

    def is_hidden(self, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return leaf in (self.block_scale_suffix, self.global_scale_suffix) or leaf in self.hidden_suffixes

    def _is_packed(self, name: str, info: TensorInfo) -> bool:
        return name.endswith("." + self.packed_suffix) and info.dtype == "U8"

    def check_config(self) -> None:
        """Refuse a quantization_config that names NVFP4 but describes something else (before any header)."""

    @cached_property
    def plan(self) -> AdapterPlan:
        self.check_config()
        logical: dict[str, LogicalTensor] = {}
        hidden: dict[str, TensorInfo] = {}
        for name, info in self._index.tensors.items():
            if self.is_hidden(name):
                hidden[name] = info
            elif self._is_packed(name, info):
                lt = self._packed_weight(name, info)
                logical[lt.name] = lt
            elif info.is_fp8:
                raise ScaleLayoutError(
                    f"an {info.dtype} tensor in an NVFP4 checkpoint, not an NVFP4 packed weight",
                    file=str(self._index.file_path(info.file)), tensor=name,
                    expected=f"NVFP4 weights as U8 {self.module_of(name)}.{self.packed_suffix} (or plain BF16 tensors)",
                    fix="the checkpoint mixes FP8 and NVFP4 modules, which no registered adapter reads; "
                    "re-export it in one format",
                )
            else:
                logical[name] = LogicalTensor(name, info.shape, info.torch_dtype, info, None)
        return AdapterPlan(logical, hidden)

    @staticmethod
    def module_of(name: str) -> str:
        return name.rsplit(".", 1)[0]

    def _packed_weight(self, name: str, info: TensorInfo) -> LogicalTensor:
        mod = self.module_of(name)
        where = str(self._index.file_path(info.file))
        if not info.shape:
            raise ScaleLayoutError("a 0-dim NVFP4 packed weight", file=where, tensor=name,
                                   expected="U8 [..., N, K/2]", fix="the checkpoint is damaged; re-export it")
        shape = (*info.shape[:-1], info.shape[-1] * 2)
        bs_name, gs_name = f"{mod}.{self.block_scale_suffix}", f"{mod}.{self.global_scale_suffix}"
        for need in (bs_name, gs_name):
            if need not in self._index:
                raise MissingScaleError(
                    "NVFP4 packed weight without its scales: its codes cannot be decoded",
                    file=where, tensor=name, expected=f"{bs_name} (F8_E4M3) and {gs_name} (F32) in the checkpoint",
                    fix="the checkpoint is incomplete (re-download it), or its scales have other names: "
                    "register an adapter for them (docs/adapters.md)",
                )
        bs, gs = self._index[bs_name], self._index[gs_name]
        want_bs = (*info.shape[:-1], shape[-1] // GROUP)
        if bs.dtype != "F8_E4M3" or bs.shape != want_bs or shape[-1] % GROUP:
            raise ScaleLayoutError(
                f"NVFP4 block scale {bs.dtype} {list(bs.shape)} does not match packed weight {list(info.shape)} "
                f"(logical {list(shape)})",
                file=str(self._index.file_path(bs.file)), tensor=bs_name,
                expected=f"F8_E4M3 {list(want_bs)}: one scale per {GROUP} columns, K a multiple of {GROUP}",
                fix="the checkpoint is not NVFP4 as its config says (group size 16); re-export it",
            )
        if gs.dtype != "F32" or math.prod(gs.shape) != 1:
            raise ScaleLayoutError(
                f"NVFP4 global scale {gs.dtype} {list(gs.shape)} is not one fp32 value",
                file=str(self._index.file_path(gs.file)), tensor=gs_name, expected="F32 [1] or []",
                fix="the checkpoint is damaged or of another format; re-export it",
            )
        grid = ScaleGrid(bs, self.scale_block(info, bs), "e4m3")
        return LogicalTensor(f"{mod}.weight", shape, self.output_dtype, info, grid,
                             NVFP4Decoder(bs, replace(gs, shape=(1,)), self.rule))  # [] read as [1]


def _span(start, length, dim) -> str:
    if len(start) < 2:
        return "[0, 1)"
    return f"[{start[dim]}, {start[dim] + length[dim]})"


def _who() -> str:
    try:
        import torch.distributed as dist

        return f"rank {dist.get_rank()}: " if dist.is_available() and dist.is_initialized() else ""
    except Exception:  # noqa: BLE001 -- only decorates a message
        return ""


def nvfp4_group_ok(weights: dict[str, Any] | None) -> bool:
    """A compressed-tensors / ModelOpt ``weights`` entry that describes NVFP4: 4-bit float, groups of 16."""
    w = weights or {}
    return int(w.get("num_bits", 0)) == 4 and w.get("type", "float") == "float" and int(w.get("group_size") or 0) == GROUP
