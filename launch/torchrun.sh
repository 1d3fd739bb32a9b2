#!/usr/bin/env bash
# One-node launch: torchrun --standalone --nproc-per-node N -m streaming_adapters.run --config-name RECIPE ...
#
# Usage: launch/torchrun.sh [--nproc N] [--cpu] RECIPE [hydra overrides...]
#   --nproc N   processes on this node [$SA_NPROC_PER_NODE, else the number of visible GPUs, else 1]
#   --cpu       CPU mode: gloo backend, no GPUs (same as SA_CPU=1)
#
# Environment (same names as the Slurm launchers, see docs/slurm.md):
#   SA_PYTHON   interpreter [$SA_VENV/bin/python if SA_VENV is set, else python3]
#   SA_VENV     virtualenv to run from
#   SA_ENTRY    module to run with -m [streaming_adapters.run]
#   SA_CPU=1    CPU mode; exports SA_DIST_BACKEND=gloo and hides GPUs
#   any other variable (OMP_NUM_THREADS, NCCL_*, ...) passes through to the ranks
#
# Example: launch/torchrun.sh --nproc 8 fp8_to_nvfp4 checkpoint.path=/ckpt/in output.path=/ckpt/out \
#              parallel.dp_shard=8 device=cuda
set -euo pipefail

die() { printf 'torchrun.sh: error: %s\n' "$*" >&2; exit 2; }

nproc=${SA_NPROC_PER_NODE:-}
cpu=${SA_CPU:-0}
while (($# > 0)); do
    case $1 in
        --nproc) (($# >= 2)) || die "--nproc needs a value"; nproc=$2; shift 2 ;;
        --nproc=*) nproc=${1#*=}; shift ;;
        --cpu) cpu=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (launcher options come before RECIPE; see --help)" ;;
        *) break ;;
    esac
done
(($# >= 1)) || die "usage: $0 [--nproc N] [--cpu] RECIPE [hydra overrides...]"
recipe=$1
shift

if [[ -n ${SA_VENV:-} ]]; then
    [[ -x $SA_VENV/bin/python ]] || die "SA_VENV=$SA_VENV has no bin/python"
    export VIRTUAL_ENV=$SA_VENV PATH=$SA_VENV/bin:$PATH
fi
python=${SA_PYTHON:-${SA_VENV:+$SA_VENV/bin/python}}
python=${python:-python3}
command -v "$python" >/dev/null || die "python '$python' not found (set SA_PYTHON or SA_VENV)"

if [[ $cpu == 1 ]]; then
    export SA_DIST_BACKEND=gloo CUDA_VISIBLE_DEVICES=""
    nproc=${nproc:-1}
elif [[ -z $nproc ]]; then
    # nvidia-smi -L prints one line per visible GPU; it ignores CUDA_VISIBLE_DEVICES, so honour that first.
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
        nproc=${#gpus[@]}
    elif command -v nvidia-smi >/dev/null && nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); then
        :
    else
        nproc=1
    fi
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"

# `python -m torch.distributed.run` is torchrun, but pinned to the chosen interpreter (the `torchrun` on
# PATH may belong to another environment). --standalone: a local c10d store on a free port, so several
# single-node jobs on one machine do not collide on 29500.
exec "$python" -m torch.distributed.run --standalone --nproc-per-node="$nproc" \
    -m "${SA_ENTRY:-streaming_adapters.run}" --config-name "$recipe" "$@"
