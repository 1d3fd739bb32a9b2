#!/usr/bin/env bash
# 4x H200: weak scaling (8 Llama-70B layers on 2 GPUs vs 16 on 4, TP over the GPUs, same bytes per GPU),
# and issue 8 at TP=4: a Mistral-Large-123B-shaped block-FP8 checkpoint (16 layers), load, NVFP4
# conversion and transformers' dequantize=True side by side.  Results in $OUT.
source tests/gpu/setup.sh
# SA_DRY=1: the same script on CPU with tiny shapes, to check it before spending device time.
DEV=cuda; if [[ ${SA_DRY:-0} == 1 ]]; then DEV=cpu; fi
shape() { if [[ ${SA_DRY:-0} == 1 ]]; then echo tiny; else echo "$1"; fi; }
# Everything goes to $RES; one tarball comes back ($OUT takes at most 8 files).
OUT=${OUT:-/tmp/out}; RES=/tmp/results; rm -rf "$RES"; mkdir -p "$RES" "$OUT"
trap 'tar czf "$OUT/results.tgz" -C /tmp results' EXIT
set +e
bench() {  # name shape layers nproc peers [extra overrides]
    local name=$1 shape=$2 layers=$3 nproc=$4 peers=$5; shift 5
    python3 -m streaming_adapters.run --config-name benchmark device=$DEV benchmark.shape=$(shape $shape) \
        benchmark.layers=$layers benchmark.nproc=$nproc checkpoint.path=/tmp/bench/$shape-$layers \
        benchmark.workdir=/tmp/bench/work-$name report.path=$RES/$name/report.json "benchmark.peers=$peers" "$@" \
        2>&1 | tee "$RES/$name.log" | grep "^|\|^checkpoint" | tail -9
}
bench weak2 llama70b 8 2 '[raw_read,streaming_adapters,convert_nvfp4]'
bench weak4 llama70b 16 4 '[raw_read,streaming_adapters,convert_nvfp4]'
bench weak2_warm llama70b 8 2 '[streaming_adapters]' benchmark.cold=false
bench weak4_warm llama70b 16 4 '[streaming_adapters]' benchmark.cold=false
bench tp4_123b mistral_large_123b 16 4 '[raw_read,streaming_adapters,convert_nvfp4,transformers_dequantize]'
python3 -m streaming_adapters.run plan checkpoint.path=/tmp/bench/mistral_large_123b-16 parallel.tp=4 device=$DEV \
    report.path=$RES/plan_123b.json | tail -9
