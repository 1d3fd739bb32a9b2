#!/usr/bin/env bash
# One H100/H200: the GPU tests, a 1-GPU load/convert baseline (issue 12 compares it with an earlier commit's
# package in .oldpkg, on the same card), the W4A4 calibration bar (issue 14) and the evaluate bars (issue 15)
# at Mistral-Large-123B layer shapes, and evaluate side by side with transformers on an 8B-shaped Llama.
# STEPS picks what runs (default: all): tests soft base cal eval sxs (soft: the eager-softmax launch choices
# side by side, tests/gpu/bench_softmax.py; the later steps use the fastest, through SA_EAGER_TUNING).  Each
# step has its own time limit so one stuck step cannot eat the call; logs come back in one tarball.  Knobs:
# CAL_SAMPLES (512), EV_ROWS (128), LAYERS (2), CAL_T / EV_T / SXS_T / TESTS_T / SOFT_T (seconds), TESTS
# (pytest paths), CAL_ATTNS / EV_ATTNS (attention implementations to run, e.g. "eager sdpa"; for CAL_ATTNS
# "stock" is eager with SA_FUSED_EAGER=0, ATen's own passes), OVERLAP (SA_OVERLAP_COPIES for the benches; 0
# puts the copies back in order).
source tests/gpu/setup.sh
source tests/gpu/bench_fn.sh
set +e
L=${LAYERS:-2}
export SA_OVERLAP_COPIES=${OVERLAP:-1}  # calibrate/forward.py overlaps the copies by default (0: in order)
STEPS=" ${STEPS:-tests base cal eval sxs} "
if [[ $STEPS == *" tests "* ]]; then
    timeout ${TESTS_T:-170} python3 -m pytest -q -x -p no:cacheprovider ${TESTS:-tests/gpu} 2>&1 | tee "$RES/gpu_tests.txt" | tail -8
fi
if [[ $STEPS == *" soft "* ]]; then
    timeout ${SOFT_T:-120} python3 tests/gpu/bench_softmax.py "$RES/best_tuning.txt" 2>&1 | tee "$RES/softmax.txt"
    [[ -s $RES/best_tuning.txt ]] && export SA_EAGER_TUNING=$(cat "$RES/best_tuning.txt") && echo "SA_EAGER_TUNING=$SA_EAGER_TUNING"
fi
if [[ $STEPS == *" base "* ]]; then
    timeout 150 bash -c "source tests/gpu/bench_fn.sh; bench base1 llama70b 4 1 '[raw_read,streaming_adapters,convert_nvfp4]'"
    # .oldpkg (ignored; carried): an earlier commit's streaming_adapters/ + recipes/, timed on the same machine
    # right after, so a refactor's load / conversion times are compared on one card.
    # (run from inside .oldpkg: `python -m` puts the working folder first on sys.path)
    if [[ -d .oldpkg/streaming_adapters ]]; then
        timeout 150 bash -c "export PYTHONPATH=/tmp/site:$PWD/.oldpkg; source tests/gpu/bench_fn.sh; cd .oldpkg; \
            bench base1_old llama70b 4 1 '[streaming_adapters,convert_nvfp4]'"
        timeout 100 bash -c "source tests/gpu/bench_fn.sh; bench base1_again llama70b 4 1 '[streaming_adapters,convert_nvfp4]'"
    fi
fi
mkdir -p /tmp/ev; [[ $STEPS == *" cal "* && ! -e /tmp/ev/fp8 ]] && ln -sfn /tmp/cal/ckpt /tmp/ev/fp8
if [[ $STEPS == *" cal "* ]]; then
    for attn in ${CAL_ATTNS:-eager}; do  # eager: llm-compressor's (compressed-tensors); sdpa: ModelOpt's
        fused=1; a=$attn; [[ $attn == stock ]] && fused=0 a=eager
        SA_FUSED_EAGER=$fused timeout ${CAL_T:-200} python3 benchmarks/calibration_w4a4.py --layers $L \
            --samples ${CAL_SAMPLES:-512} --workdir /tmp/cal --attn $a 2>&1 | tee "$RES/calibration-$attn.txt" \
            | grep -v "it/s\]$" | tail -12
        cp /tmp/cal/calibration_bench.json "$RES/calibration_bench-$attn.json" 2>/dev/null
    done
fi
if [[ $STEPS == *" eval "* ]]; then
    for attn in ${EV_ATTNS:-sdpa}; do
        timeout ${EV_T:-200} python3 benchmarks/evaluate_gpu.py --layers $L --rows ${EV_ROWS:-128} --workdir /tmp/ev \
            --attn $attn 2>&1 | tee "$RES/evaluate-$attn.txt" | grep -v "it/s\]$" | tail -12
        cp /tmp/ev/evaluate_bench.json "$RES/evaluate_bench-$attn.json" 2>/dev/null
    done
fi
if [[ $STEPS == *" sxs "* ]]; then
    timeout ${SXS_T:-240} python3 benchmarks/evaluate_side_by_side.py --device cuda --hidden 4096 --intermediate 14336 \
        --layers ${SXS_LAYERS:-4} --heads 32 --kv-heads 8 --vocab 128256 --rows ${SXS_ROWS:-16} --seq-len 2048 \
        --workdir /tmp/sxs 2>&1 | tee "$RES/side_by_side.txt" | grep -v "it/s\]$" | tail -14
fi
if [[ $STEPS == *" prof "* ]]; then  # after cal: its checkpoint
    for attn in ${PROF_ATTNS:-eager}; do
        timeout ${PROF_T:-90} python3 tests/gpu/profile_layer.py /tmp/cal/ckpt ${PROF_ROWS:-24} $attn 2>&1 \
            | tee "$RES/profile-$attn.txt" | tail -30
    done
fi
