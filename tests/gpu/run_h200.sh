#!/usr/bin/env bash
# One H200 (or H100): kernels bit for bit and timed, the CUDA load / conversion paths bit for bit, and the
# CPU suite on this machine's torch (2.11: the oldest torch we support).  Results under $OUT.
source tests/gpu/setup.sh
# Everything goes to $RES; one tarball comes back ($OUT takes at most 8 files).
OUT=${OUT:-/tmp/out}; RES=/tmp/results; rm -rf "$RES"; mkdir -p "$RES" "$OUT"
trap 'tar czf "$OUT/results.tgz" -C /tmp results' EXIT
set +e
python3 -m pytest -q -x tests/gpu 2>&1 | tee "$RES/gpu_tests.txt" | tail -15
python3 benchmarks/bench_fp8_kernels.py 2>&1 | tee "$RES/kernels.txt" | tail -25
[[ -f benchmarks/bench_nvfp4_kernels.py ]] && python3 benchmarks/bench_nvfp4_kernels.py 2>&1 | tee "$RES/kernels_nvfp4.txt" | tail -20
python3 -m pytest -q -x -p no:cacheprovider tests/test_numerics_fp8.py tests/test_errors.py tests/test_convert_bf16.py \
    tests/test_dist_2.py 2>&1 | tee "$RES/cpu_suite_torch211.txt" | tail -5
