"""The reference side of ``verify_checkpoint``: the source checkpoint's values, computed by code that shares
nothing with the conversion's writer beyond the bytes on disk (issue 12, item 6).

The writer reads through ``checkpoint/byteio`` + ``fill.py`` / ``pipeline.py`` and dequantizes with
``numerics/fp8`` (LUT gathers, Triton); this module reads whole row chunks with the ``safetensors`` library
itself (``safe_open(...).get_slice``) and dequantizes with the formula in its plainest form::

    out = (fp32(code) * fp32(scale.repeat_interleave(block) per dim)).to(bfloat16)     (formats.md §1.1)

so a numerics bug in the writer shows as a mismatch instead of being reproduced on both sides.  NVFP4
sources (a BF16 target from an NVFP4 checkpoint) are unpacked here too: E2M1 table, low nibble first, block
scale ``s8 / gs`` (compressed-tensors) or ``s8 * w2`` (ModelOpt).  Memory: one row chunk of the tensor in
fp32 plus its expanded scales (the caller bounds the chunk, ``verify.ROW_CHUNK_ELEMS``), and one tensor's
scale grid (1/16384 of the weight for 128x128 blocks).
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from ..checkpoint.index import CheckpointIndex, TensorInfo
from ..errors import CheckpointError, CorruptCheckpointError, ScaleLayoutError

# 448 * s must stay finite in BF16 (max 3.39e38): larger scales make Inf weights, refused as the loader does.
_SCALE_LIMIT = torch.finfo(torch.bfloat16).max / 448.0
# E2M1 magnitudes of codes 0..7 (sign in bit 3), the OCP MX spec's table.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class ReferenceReader:
    """Row chunks of a checkpoint's logical tensors, dequantized independently of the writer."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._files: dict[str, object] = {}

    def __enter__(self) -> "ReferenceReader":
        return self

    def __exit__(self, *exc) -> None:
        self._files.clear()

    def _slice(self, info: TensorInfo, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        if r0 is None or not self.shape(info):
            return self._file(info).get_tensor(info.name)  # type: ignore[attr-defined]
        return self._file(info).get_slice(info.name)[r0:r1]  # type: ignore[attr-defined]

    def _file(self, info: TensorInfo):
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = safe_open(str(self.index.file_path(info.file)), framework="pt")
        return f

    def shape(self, info: TensorInfo) -> tuple[int, ...]:
        """The shape the file's header gives (the index may present a scale's [] as [1, 1])."""
        return tuple(self._file(info).get_slice(info.name).get_shape())  # type: ignore[attr-defined]

    def stored_rows(self, lt, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the stored tensor as they are (what a copied tensor must equal)."""
        return self._slice(lt.stored, r0, r1)

    def bf16_rows(self, lt, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of a quantized logical tensor, dequantized to BF16."""
        if lt.decoder is not None:
            return self._nvfp4_rows(lt, r0, r1)
        codes = self._slice(lt.stored, r0, r1)
        block = lt.scale.block
        grid = tuple(-(-d // b) for d, b in zip(lt.shape, block))
        b0 = block[0]
        g0 = r0 // b0  # the first scale row the chunk needs
        if self.shape(lt.scale.tensor) == grid:  # only the chunk's scale rows (group-16 grids are 1/16 of codes)
            raw = self._slice(lt.scale.tensor, g0, (r1 - 1) // b0 + 1)
        else:  # a [1] / 0-dim / shorter scale: one value per tensor or per row group, small
            raw, g0 = self._slice(lt.scale.tensor), 0
        if lt.scale.encoding == "u8_exponent":  # the same exponent byte as float8_e8m0fnu: 2**(b-127)
            raw = raw.view(torch.float8_e8m0fnu)
        s = raw.float().reshape(-1, *grid[1:])  # a [1] / 0-dim / [N, 1] scale is the grid with ones
        if not bool((s.abs() <= _SCALE_LIMIT).all()):  # NaN compares False: refused too
            bad = [int(i) for i in (~(s.abs() <= _SCALE_LIMIT)).nonzero()[0]]
            value = float(s[tuple(bad)])
            bad[0] += g0  # global block index
            raise ScaleLayoutError(
                f"scale is {value} at block {bad}: the weights of that block would be NaN/Inf "
                "(verify's reference)", file=str(self.index.file_path(lt.scale.tensor.file)),
                tensor=lt.scale.tensor.name, expected=f"finite scales of magnitude at most {_SCALE_LIMIT:.4g}",
                fix="the reference checkpoint is damaged; re-download or re-export it")
        s = s[r0 // b0 - g0: (r1 - 1) // b0 + 1 - g0]
        for d, b in enumerate(block):
            s = s.repeat_interleave(b, dim=d)
        s = s[r0 - (r0 // b0) * b0:][: r1 - r0]
        s = s[(slice(None),) + tuple(slice(0, n) for n in lt.shape[1:])]
        values = codes.float()
        if values.is_floating_point() and bool(values.isnan().any()):  # E4M3 codes 0x7f / 0xff
            raise CorruptCheckpointError(
                f"an FP8 code in rows {r0}..{r1 - 1} is NaN (verify's reference)",
                file=str(self.index.file_path(lt.stored.file)), tensor=lt.name,
                expected="codes other than 0x7f / 0xff (producers saturate to +-448, codes 0x7e / 0xfe)",
                fix="the reference checkpoint is damaged; re-download or re-export it")
        return (values * s).to(torch.bfloat16)

    def _nvfp4_rows(self, lt, r0: int, r1: int) -> torch.Tensor:
        dec = lt.decoder
        rule = getattr(dec, "rule", None)
        if rule not in ("ct", "modelopt"):
            raise CheckpointError(
                f"verify has no independent decoder for {type(dec).__name__}", tensor=lt.name,
                file=str(self.index.path), expected="an FP8 or NVFP4 (compressed-tensors / ModelOpt) source",
                fix="verify against an FP8 or NVFP4 checkpoint, or add the format's decode to verify_reference.py")
        packed = self._slice(lt.stored, r0, r1)
        s8 = self._slice(dec.block_scale, r0, r1).float()
        g = self._slice(dec.global_scale).float().reshape(())
        eff = s8 / g if rule == "ct" else s8 * g  # each producer's decoder: one fp32 operation
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
        mag = torch.tensor(_E2M1, dtype=torch.float32)[codes & 7]
        # compressed-tensors decodes code 8 to -0.0, ModelOpt to +0.0 (numerics/nvfp4.py): the sign applies
        # to zero only for the former.
        neg = (codes & 8) != 0
        val = torch.where(neg, -mag, mag) if rule == "ct" else torch.where(neg & (mag != 0), -mag, mag)
        group = codes.shape[-1] // s8.shape[-1]
        return (val * eff.repeat_interleave(group, dim=-1)).to(torch.bfloat16)
