#!/usr/bin/env bash
# 2x H200: the side-by-side benchmark of issue 7 (8 Llama-70B-shaped layers, TP=2, cold cache), the
# pread + FADV_RANDOM variant, and the NeMo AutoModel run on 2 GPUs (NCCL, no CPU shim).  Results in $OUT.
source tests/gpu/setup.sh
# SA_DRY=1: the same script on CPU with tiny shapes, to check it before spending device time.
DEV=cuda; if [[ ${SA_DRY:-0} == 1 ]]; then DEV=cpu; fi
shape() { if [[ ${SA_DRY:-0} == 1 ]]; then echo tiny; else echo "$1"; fi; }
# Everything goes to $RES; one tarball comes back ($OUT takes at most 8 files).
OUT=${OUT:-/tmp/out}; RES=/tmp/results; rm -rf "$RES"; mkdir -p "$RES" "$OUT"
trap 'tar czf "$OUT/results.tgz" -C /tmp results' EXIT
CK=/tmp/bench/llama70b-8
set +e
python3 -m streaming_adapters.run --config-name benchmark device=$DEV benchmark.shape=$(shape llama70b) benchmark.layers=8 \
    benchmark.nproc=2 checkpoint.path=$CK benchmark.workdir=/tmp/bench/work report.path=$RES/x2/report.json \
    'benchmark.peers=[raw_read,streaming_adapters,transformers_dequantize,convert_nvfp4,read_write,torch_quantized_reader]' \
    2>&1 | tee "$RES/x2_bench.log" | grep -v "^W11" | tail -14
python3 -m streaming_adapters.run --config-name benchmark device=$DEV benchmark.shape=$(shape llama70b) benchmark.layers=8 \
    benchmark.nproc=2 checkpoint.path=$CK benchmark.workdir=/tmp/bench/work report.path=$RES/x2_pread/report.json \
    io.backend=pread 'benchmark.peers=[raw_read,streaming_adapters]' 2>&1 | grep "^|" | tail -3
[[ -x tests/gpu/nemo_x2.sh ]] && bash tests/gpu/nemo_x2.sh 2>&1 | tee "$RES/nemo_x2.txt" | tail -25
