#!/usr/bin/env bash
# Multi-node Slurm test: submits the REAL launch/slurm/*.sbatch files to a real 2-node Slurm cluster on
# this machine (tests/slurm/local_cluster.sh), CPU/gloo, 2 nodes x 2 ranks, and checks what the ranks wrote.
#
# Usage: tests/slurm/run_slurm_test.sh [RECIPE [hydra overrides...]]
#
# By default the jobs run the stand-in tests/slurm/dist_smoke.py (world size reached, all_reduce correct,
# one file per rank). To run the real entry point instead, set (see docs/slurm.md):
#   SA_TEST_ENTRY       module the jobs run with -m [dist_smoke, found via PYTHONPATH=tests/slurm]
#   SA_TEST_RECIPE      recipe (--config-name) [smoke]; or the first argument
#   SA_TEST_OVERRIDES   Hydra overrides, space-separated [out_dir=@OUT@ expect_world_size=@WORLD@];
#                       or the remaining arguments
#   SA_TEST_CHECK       bash command run from the repo root after each job succeeded; non-zero = fail
#                       [python3 tests/slurm/dist_smoke.py --check @OUT@ --world-size @WORLD@ --nodes @NODES@]
#   In overrides and the check, @OUT@ is a fresh per-variant output dir (also exported as SA_TEST_OUT),
#   @WORLD@ the world size, @NODES@ the node count, @VARIANT@ torchrun|srun.
# Other knobs:
#   SA_TEST_VARIANTS    which sbatch files [torchrun srun]
#   SA_TEST_NODES, SA_TEST_PROCS_PER_NODE   [2, 2]
#   SA_TEST_TIMEOUT     seconds to wait for all jobs before cancelling them [150]
#   SA_TEST_SBATCH_ARGS extra sbatch options, space-separated []
#   SA_TEST_KEEP=1      keep the cluster running and the work dir afterwards (to iterate)
#   SA_PYTHON           interpreter for the jobs [python3's sys.executable, which skips pyenv shims]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=$REPO/tests/slurm/local_cluster.sh
cd "$REPO"

NODES=${SA_TEST_NODES:-2}
PPN=${SA_TEST_PROCS_PER_NODE:-2}
WORLD=$((NODES * PPN))
RECIPE=${1:-${SA_TEST_RECIPE:-smoke}}
if (($# > 1)); then
    OVERRIDES=("${@:2}")
else
    read -r -a OVERRIDES <<<"${SA_TEST_OVERRIDES-out_dir=@OUT@ expect_world_size=@WORLD@}"
fi
CHECK=${SA_TEST_CHECK-python3 tests/slurm/dist_smoke.py --check @OUT@ --world-size @WORLD@ --nodes @NODES@}
read -r -a VARIANTS <<<"${SA_TEST_VARIANTS:-torchrun srun}"
read -r -a EXTRA_SBATCH <<<"${SA_TEST_SBATCH_ARGS:-}"
TIMEOUT=${SA_TEST_TIMEOUT:-150}
KEEP=${SA_TEST_KEEP:-0}

t0=$SECONDS
say() { printf '[slurm-test %3ds] %s\n' $((SECONDS - t0)) "$*"; }
fail() { say "FAIL: $*"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sa-slurm-test.XXXXXX")
declare -A JOB=()  # variant -> job id

cleanup() {
    local rc=$?
    if [[ $KEEP == 1 ]]; then
        say "SA_TEST_KEEP=1: cluster left running ($CLUSTER stop), work dir $WORK"
    else
        if ((${#JOB[@]} > 0)); then scancel "${JOB[@]}" 2>/dev/null || true; fi
        # Only stop a cluster this test started: someone iterating on a running one keeps it.
        if [[ ${started_cluster:-0} == 1 ]]; then "$CLUSTER" stop >/dev/null || rc=1; fi
        if ((rc == 0)); then rm -rf "$WORK"; else say "work dir kept: $WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # run the EXIT trap (stop the daemons) on Ctrl-C too

subst() {  # subst VARIANT STRING: fill the @...@ placeholders
    local s=$2
    s=${s//@OUT@/$WORK/out-$1}
    s=${s//@WORLD@/$WORLD}
    s=${s//@NODES@/$NODES}
    printf '%s' "${s//@VARIANT@/$1}"
}

# --- cluster -----------------------------------------------------------------------------------------------
started_cluster=0
if ! "$CLUSTER" status >/dev/null 2>&1; then
    started_cluster=1
    "$CLUSTER" start | sed 's/^/  /'
fi
eval "$("$CLUSTER" env)"  # SLURM_CONF, SA_SLURM_NODE_NS
export PATH=$PATH:/usr/sbin
say "cluster up (node namespaces: $SA_SLURM_NODE_NS)"

# --- submit ------------------------------------------------------------------------------------------------
# What a CPU user of the sbatch files sets; everything else is the files' own defaults.
export SA_CPU=1 SA_NPROC_PER_NODE=$PPN
export SA_ENTRY=${SA_TEST_ENTRY:-dist_smoke}
export PYTHONPATH=$REPO/tests/slurm${PYTHONPATH:+:$PYTHONPATH}
SA_PYTHON=${SA_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
export SA_PYTHON
# Without per-node namespaces the node names n1/n2 do not resolve inside jobs: point at loopback.
if [[ $SA_SLURM_NODE_NS != 1 ]]; then export SA_HEAD_ADDR=127.0.0.1; fi

for v in "${VARIANTS[@]}"; do
    file=launch/slurm/streaming_adapters_$v.sbatch
    [[ -f $file ]] || fail "no $file (SA_TEST_VARIANTS='${VARIANTS[*]}')"
    args=()
    for o in "${OVERRIDES[@]}"; do args+=("$(subst "$v" "$o")"); done
    # --gpus-per-node=0 overrides the files' GPU default; --ntasks-per-node matters to the srun file only
    # (the torchrun file runs one task per node and takes SA_NPROC_PER_NODE ranks from it).
    tasks=$PPN
    [[ $v == torchrun ]] && tasks=1
    JOB[$v]=$(SA_TEST_OUT=$(subst "$v" @OUT@) sbatch --parsable --job-name="sa-test-$v" \
        --nodes="$NODES" --ntasks-per-node="$tasks" --gpus-per-node=0 --time=5 \
        --output="$WORK/$v-%j.out" "${EXTRA_SBATCH[@]}" "$file" "$RECIPE" "${args[@]}")
    say "submitted $v: job ${JOB[$v]}: $RECIPE ${args[*]}"
done

# --- wait: poll squeue (sbatch --wait polls after 2, 8, 32 s: a 14 s job would return at 42 s) ----------------
deadline=$((SECONDS + TIMEOUT))
pending=("${VARIANTS[@]}")
while ((${#pending[@]} > 0)); do
    still=()
    for v in "${pending[@]}"; do
        if [[ -n $(squeue -h -j "${JOB[$v]}" 2>/dev/null) ]]; then still+=("$v"); else say "$v job ${JOB[$v]} left the queue"; fi
    done
    pending=("${still[@]}")
    ((${#pending[@]} == 0)) && break
    if ((SECONDS > deadline)); then
        squeue || true
        say "timeout after ${TIMEOUT}s waiting for: ${pending[*]}; cancelling"
        for v in "${pending[@]}"; do scancel "${JOB[$v]}" || true; done
        break
    fi
    sleep 0.5
done

# --- check -------------------------------------------------------------------------------------------------
show_logs() {  # the job's own log, then what the daemons said
    local f
    for f in "$WORK/$1"-*.out; do
        if [[ -f $f ]]; then printf -- '----- %s\n' "$f"; cat "$f"; else echo "(no job log $f)"; fi
    done
    local state_dir
    state_dir=$(dirname "$SLURM_CONF")
    for f in "$state_dir"/log/slurmd-*.log "$state_dir"/log/slurmctld.log; do
        # pmix: Debian builds the plugin but not the library; MpiDefault=none never uses it. Noise.
        if [[ -f $f ]]; then printf -- '----- last lines of %s\n' "$f"; grep -v pmix "$f" | tail -n 15; fi
    done
}

failed=()
for v in "${VARIANTS[@]}"; do
    info=$(scontrol show job "${JOB[$v]}")
    state=$(grep -oE 'JobState=[A-Z_]+' <<<"$info") || state='JobState=?'
    exitcode=$(grep -oE '(^| )ExitCode=[0-9:]+' <<<"$info" | tr -d ' ') || exitcode='ExitCode=?'
    if [[ $state != JobState=COMPLETED || $exitcode != ExitCode=0:0 ]]; then
        say "$v job ${JOB[$v]}: $state $exitcode"
        show_logs "$v"
        failed+=("$v")
        continue
    fi
    check=$(subst "$v" "$CHECK")
    if [[ -n $check ]] && ! SA_TEST_OUT=$(subst "$v" @OUT@) bash -c "$check"; then
        say "$v job ${JOB[$v]}: COMPLETED, but the check failed: $check"
        show_logs "$v"
        failed+=("$v")
        continue
    fi
    say "$v job ${JOB[$v]}: OK ($state $exitcode, check passed)"
done

((${#failed[@]} == 0)) || fail "${failed[*]}"
say "PASS: ${VARIANTS[*]} on $NODES nodes x $PPN ranks"
