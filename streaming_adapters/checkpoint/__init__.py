"""The source checkpoint: validated headers (``index``) and byte-range reads (``byteio``)."""

from .index import CheckpointIndex, TensorInfo

__all__ = ["CheckpointIndex", "TensorInfo"]
