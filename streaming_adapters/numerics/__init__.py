"""Pure, vectorised numerics: FP8 dequantization (and, in ``nvfp4``, NVFP4 quantization)."""
