# Sourced by run_x2.sh / run_x4.sh after setup.sh: `bench NAME SHAPE LAYERS NPROC PEERS [overrides...]` runs
# the benchmark recipe into $RES/NAME.  SA_DRY=1: CPU and tiny shapes, to check a script before device time.
DEV=cuda; if [[ ${SA_DRY:-0} == 1 ]]; then DEV=cpu; fi
shape() { if [[ ${SA_DRY:-0} == 1 ]]; then echo tiny; else echo "$1"; fi; }
OUT=${OUT:-/tmp/out}; RES=/tmp/results; mkdir -p "$RES" "$OUT"
trap 'tar czf "$OUT/results.tgz" -C /tmp results' EXIT  # one tarball back ($OUT takes at most 8 files)
bench() {
    local name=$1 shape=$2 layers=$3 nproc=$4 peers=$5; shift 5
    # The published numbers are cold (page cache dropped as root before each run); benchmark.cold is off by
    # default, so ask for it unless the caller chose (run_scale.sh's warm runs pass benchmark.cold=false).
    [[ " $* " == *" benchmark.cold="* ]] || set -- benchmark.cold=true "$@"
    python3 -m streaming_adapters.run --config-name benchmark device=$DEV benchmark.shape=$(shape $shape) \
        benchmark.layers=$layers benchmark.nproc=$nproc checkpoint.path=/tmp/bench/$shape-$layers \
        benchmark.workdir=/tmp/bench/work-$name report.path=$RES/$name/report.json "benchmark.peers=$peers" "$@" \
        2>&1 | tee "$RES/$name.log" | grep "^|\|^checkpoint\|FAILED\|^timings" | tail -14
}
