"""Quality of a checkpoint, streamed one decoder layer at a time (docs/evaluate.md).

``run`` (the loop), ``metrics`` (perplexity, KL, top-1, per-layer error), ``emulate`` (W4A4 activation
quantize-dequantize), ``plot`` (SVG), ``data`` (rows from a text file), ``config`` (recipe keys).

``streaming_adapters.evaluate(checkpoint, tokens, ...)`` calls :func:`run.evaluate`: this subpackage is a
callable module, so the public name and the package name are one.
"""

import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .run import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _Callable
