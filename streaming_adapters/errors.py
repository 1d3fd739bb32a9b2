"""Errors that say what went wrong, where, what was expected and what to do.

Every error this package raises on purpose is a :class:`CheckpointError` (a ``ValueError``), so that
``except Exception`` catches it.  torch DCP wraps failures in ``CheckpointException``, which derives from
``BaseException``; :func:`streaming_adapters.load.load_fp8_state_dict` unwraps those and re-raises our
error on every rank.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or a destination that cannot be loaded as asked.

    The message always has four parts: the file, the tensor, what was expected (with what was found),
    and what to do.  They are kept as attributes too, for tools that want to show them apart.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        expected: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = file
        self.tensor = tensor
        self.expected = expected
        self.fix = fix
        parts = [problem]
        if file is not None:
            parts.append(f"file: {file}")
        if tensor is not None:
            parts.append(f"tensor: {tensor}")
        if expected is not None:
            parts.append(f"expected: {expected}")
        if fix is not None:
            parts.append(f"what to do: {fix}")
        super().__init__("\n  ".join(parts))

    def __reduce__(self):  # keep the fields when pickled across ranks (all_gather_object)
        return (
            _rebuild,
            (type(self), self.problem, self.file, self.tensor, self.expected, self.fix),
        )


def _rebuild(cls, problem, file, tensor, expected, fix):
    return cls(problem, file=file, tensor=tensor, expected=expected, fix=fix)


class CorruptCheckpointError(CheckpointError):
    """A file is truncated, its header is not valid safetensors JSON, or an offset is out of range."""


class UnsafePathError(CheckpointError):
    """An index entry or file name points outside the checkpoint folder (a checkpoint is untrusted input)."""


class MissingScaleError(CheckpointError):
    """An FP8 weight has no scale: its codes would be meaningless without it."""


class ScaleLayoutError(CheckpointError):
    """A scale's shape, dtype or values do not match the format the config declares."""


class UnknownFormatError(CheckpointError):
    """The checkpoint's ``quant_method`` (or scale layout) has no registered adapter."""


class AlreadyNVFP4Error(CheckpointError):
    """An NVFP4 conversion of a checkpoint that is already NVFP4 (re-quantizing would only lose precision)."""


class DestinationError(CheckpointError):
    """A destination tensor has the wrong shape or dtype, or a requested key is missing."""


class CalibrationDataError(CheckpointError):
    """Calibration data (W4A4) that is missing, malformed, too short, or holds ids outside the vocabulary."""


class DistributedCheckpointError(CheckpointError):
    """Errors raised on one or more ranks, gathered so every rank raises the same error."""

    def __init__(self, errors: dict[int, BaseException]) -> None:
        self.errors = dict(sorted(errors.items()))
        first = next(iter(self.errors.values()))
        lines = [f"{len(self.errors)} rank(s) failed; rank {next(iter(self.errors))}: {first}"]
        for rank, err in list(self.errors.items())[1:4]:
            if str(err) != str(first):
                lines.append(f"rank {rank}: {err}")
        ValueError.__init__(self, "\n".join(lines))
        self.problem, self.file, self.tensor, self.expected, self.fix = (
            str(first), getattr(first, "file", None), getattr(first, "tensor", None),
            getattr(first, "expected", None), getattr(first, "fix", None),
        )

    def __reduce__(self):
        return (DistributedCheckpointError, (self.errors,))

    @property
    def first(self) -> BaseException:
        return next(iter(self.errors.values()))
