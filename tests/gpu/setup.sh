# Source on the GPU machine, from the repository root: carried wheels (hydra, omegaconf, pytest) into
# /tmp/site, the package used from the source tree, machine facts printed once.
set -euo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
rm -rf /tmp/site  # a warm machine keeps the last call's packages
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
echo "cpus $(nproc), mem $(free -g | awk '/Mem/{print $2}') GiB, disk $(df -h /tmp | awk 'NR==2{print $4}') free"
