#!/usr/bin/env bash
# One H100/H200: issue 14's side by side, W4A4 calibration of an 8B-shaped Llama (random FP8 weights) by this
# project vs llm-compressor 0.14.0.1 oneshot (+ the BF16 copy it needs) vs ModelOpt 0.47.0 layer-wise
# (benchmarks/calibration_side_by_side.py).  Carry .whl (the lead's: compressed-tensors, modelopt, pydantic,
# loguru, ...) and .whl-sxs (llmcompressor, datasets 4.8.4, dill, multiprocess, nvidia-ml-py, pulp); the machine has
# torch, transformers 5.17, accelerate, pandas, pyarrow, xxhash, fsspec, scipy and no internet.  ModelOpt imports
# pulp (< 4) at import time: .whl-sxs carries pulp 3.3.2 (16 MiB; the whole carry is ~24 MiB of the 64 allowed).
# Knobs: SXS_LAYERS (4), SXS_SAMPLES (128), SXS_SEQ (2048), SXS_T (seconds, 480), SXS_OFFLOAD (cpu: ModelOpt's
# decoder layers wait in host memory; disk; none), SXS_PEERS (all).
# SXS_SIM=1: a CPU rehearsal with the caller's PY and SITE (packages already installed there), tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no internet there: never wait on the hub
if [[ -z ${SXS_SIM:-} ]]; then
    source tests/gpu/setup.sh     # .whl -> /tmp/site, PYTHONPATH=/tmp/site:$PWD:$PWD/tests, machine facts
    source tests/gpu/bench_fn.sh  # RES=/tmp/results, tarred into $OUT at exit
    PY=python3 SITE=/tmp/site DEV=cuda
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl-sxs/*.whl
    SHAPE="--hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256"
    SIZE="--layers ${SXS_LAYERS:-4} --samples ${SXS_SAMPLES:-128} --seq-len ${SXS_SEQ:-2048}"
else
    RES=${RES:-/tmp/results}; mkdir -p "$RES"; DEV=cpu
    export PYTHONPATH=$SITE:$PWD:$PWD/tests
    SHAPE="--hidden 256 --intermediate 768 --heads 4 --kv-heads 2 --vocab 4096"
    SIZE="--layers 2 --samples 8 --seq-len 128"
fi
"$PY" -c "import llmcompressor, modelopt, datasets, compressed_tensors, transformers, torch; print('llmcompressor', \
llmcompressor.__version__, 'modelopt', modelopt.__version__, 'datasets', datasets.__version__, 'compressed-tensors', \
compressed_tensors.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" 2>&1 \
    | grep -v -i warn | tee "$RES/cal_sxs_versions.txt" || true  # a failed import shows again as that peer's failure
set +e
# shellcheck disable=SC2086
PEERS=${SXS_PEERS:-streaming_adapters,streaming_adapters_modelopt,bf16_copy,llmcompressor,modelopt}
timeout "${SXS_T:-480}" "$PY" benchmarks/calibration_side_by_side.py --device $DEV $SHAPE $SIZE \
    --modelopt-offload "${SXS_OFFLOAD:-cpu}" --peers "$PEERS" \
    --workdir /tmp/calsxs 2>&1 | tee "$RES/cal_side_by_side.txt" | grep -v "it/s\]$" | tail -24
rc=${PIPESTATUS[0]}
for f in /tmp/calsxs/*.log; do cp "$f" "$RES/cal_sxs_$(basename "$f")"; done 2>/dev/null
exit "$rc"
