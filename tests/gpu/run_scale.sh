#!/usr/bin/env bash
# 4x or 8x H200 (SA_GPUS=4|8; for when those kinds are lent): weak scaling (8 Llama-70B layers on G/2 GPUs
# vs 16 on G, TP over the GPUs, the same bytes per GPU, cold and warm), and issue 8 at TP=G: a
# Mistral-Large-123B-shaped block-FP8 checkpoint (SA_LAYERS layers, default 16), load, NVFP4 conversion and
# transformers' dequantize=True side by side, plus the pre-flight plan.  Results: a tarball in $OUT.
source tests/gpu/setup.sh
source tests/gpu/bench_fn.sh
G=${SA_GPUS:-4}; H=$((G / 2)); L=${SA_LAYERS:-16}
set +e
bench weak$H llama70b 8 $H '[raw_read,streaming_adapters,convert_nvfp4]'
bench weak$G llama70b 16 $G '[raw_read,streaming_adapters,convert_nvfp4]'
bench weak${H}_warm llama70b 8 $H '[streaming_adapters]' benchmark.cold=false
bench weak${G}_warm llama70b 16 $G '[streaming_adapters]' benchmark.cold=false
bench tp${G}_123b mistral_large_123b $L $G '[raw_read,streaming_adapters,convert_nvfp4,transformers_dequantize]'
python3 -m streaming_adapters.run plan checkpoint.path=/tmp/bench/mistral_large_123b-$L parallel.tp=$G device=$DEV \
    report.path=$RES/plan_123b.json | tail -12
