#!/usr/bin/env bash
# NeMo AutoModel 0.7.0 on 2 GPUs (NCCL, no CPU shim): FSDP2=2 and TP=2, FP8 Llama / Mistral with the hook
# bit-equal to the reference and logits equal to the BF16 copy, NeMo without the hook holding FP8 codes, and
# per-rank peak GPU memory next to the shard.  From the repository root:  bash tests/gpu/nemo_x2.sh
#
# The machine has torch, transformers 5.17, accelerate, safetensors, triton 3.6 and no internet.  Carried in
# .whl/nemo/ (21 MB): nemo_automodel 0.7.0 (needs transformers 5.18: it imports transformers.utils.hub.
# resolve_revision, which 5.17 lacks), transformers 5.18.0, torchao 0.18.0 (imported by nemo_automodel's
# QAT config at import), huggingface_hub 1.33.0 (transformers 5.18 needs >= 1.31).  megatron-fsdp,
# mistral-common, quack-kernels and nvidia-cutlass-dsl are not imported on this path.  They go into their own
# target (SITE, default /tmp/site-nemo), first on PYTHONPATH for this run only, so the other GPU scripts keep
# the machine's transformers 5.17.  SA_DRY=1 (or no GPU): the same run on CPU, gloo, CPU shim.
source tests/gpu/setup.sh
SITE=${SITE:-/tmp/site-nemo}; rm -rf "$SITE"  # a warm machine keeps the last call's packages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/nemo/*.whl
export PYTHONPATH=$SITE:$PYTHONPATH
python3 -c "import transformers, nemo_automodel, torch; print('nemo_automodel', nemo_automodel.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
if [[ ${SA_DRY:-0} == 1 ]]; then export CUDA_VISIBLE_DEVICES=; fi
LOG=/tmp/nemo_x2_full.log; [[ -d /tmp/results ]] && LOG=/tmp/results/nemo_x2_full.log  # in run_x2.sh's tarball
set +e
# A rank that fails inside a collective would leave the other waiting: bound the whole run (device time).
timeout 600 torchrun --nproc-per-node 2 tests/nemo/gpu_x2.py > "$LOG" 2>&1
rc=$?
grep -E "^\||^NeMo x2" "$LOG"
[[ $rc == 0 ]] || { echo "exit $rc; last errors ($LOG):"; grep -E "Error|error:|Traceback" "$LOG" | tail -20; }
exit $rc
