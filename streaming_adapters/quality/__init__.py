"""Quality of a checkpoint, streamed one decoder layer at a time (docs/evaluate.md).

``run`` (the loop: :func:`run.evaluate`, exported as ``streaming_adapters.evaluate``), ``metrics`` (perplexity,
KL, top-1, per-layer error), ``emulate`` (W4A4 activation quantize-dequantize), ``plot`` (SVG), ``data`` (rows
from a text file), ``config`` (recipe keys ``evaluate.*``), ``task`` (``task=evaluate``).

This package was ``streaming_adapters.evaluate`` before the function took that name; ``streaming_adapters``
keeps ``streaming_adapters.evaluate.<module>`` importable as aliases of these modules.
"""

from .run import evaluate

__all__ = ["evaluate"]
