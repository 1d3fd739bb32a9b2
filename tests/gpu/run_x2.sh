#!/usr/bin/env bash
# 2x H200, in stages (one device call each, so none passes the 10-minute limit):
#   bench   the side-by-side benchmark of issue 7: 8 Llama-70B-shaped layers, TP=2, cold cache; then the
#           pread + POSIX_FADV_RANDOM variant of the load
#   nemo    NeMo AutoModel on 2 GPUs (NCCL, no CPU shim): tests/gpu/nemo_x2.sh
#   scale   weak scaling 1 -> 2 GPUs (4 layers on 1 GPU; 8 on 2 come from `bench`), the x4 run's closest proxy
#   123b    issue 8 at TP=2 (x8/x4 not lent): 16 Mistral-Large-123B-shaped layers, load, NVFP4 conversion and
#           transformers' dequantize=True side by side, plus the pre-flight plan for TP=2/4/8
# Results: a tarball in $OUT; tables on stdout.  SA_DRY=1: the same on CPU with tiny shapes.
source tests/gpu/setup.sh
source tests/gpu/bench_fn.sh
set +e
for stage in "${@:-bench}"; do
    case $stage in
        bench)
            bench x2 llama70b 8 2 '[raw_read,streaming_adapters,transformers_dequantize,convert_nvfp4,read_write,torch_quantized_reader]'
            bench x2_pread llama70b 8 2 '[raw_read,streaming_adapters]' io.backend=pread ;;
        bench2)  # the load path again after a change (peers already measured in `bench` left out)
            bench x2b llama70b 8 2 '[raw_read,streaming_adapters,streaming_adapters]' ;;  # 2nd: Triton JIT cached
        nemo) bash tests/gpu/nemo_x2.sh 2>&1 | tee "$RES/nemo_x2.txt" | tail -30 ;;
        scale) bench x1 llama70b 4 1 '[raw_read,streaming_adapters,convert_nvfp4]' ;;
        readers8) bench x2r8 llama70b 8 2 '[streaming_adapters]' io.readers=8 ;;
        123b)
            bench tp2_123b mistral_large_123b 16 2 '[raw_read,streaming_adapters,convert_nvfp4,transformers_dequantize]'
            for tp in 2 4 8; do
                python3 -m streaming_adapters.run plan checkpoint.path=/tmp/bench/mistral_large_123b-16 parallel.tp=$tp \
                    device=$DEV report.path=$RES/plan_123b_tp$tp.json | grep -v "^report"
            done ;;
    esac
done
