#!/usr/bin/env bash
# W4A4 against the real producers, bit for bit, in their own virtualenv: llm-compressor 0.14.0.1 `oneshot`
# (scheme NVFP4) and ModelOpt 0.47.0 `mtq.quantize(NVFP4_DEFAULT_CFG)` + `export_hf_checkpoint`, both on the
# BF16 model dequantized from an FP8 fixture, against `convert_checkpoint(..., calibration=...)` on the FP8
# checkpoint, same tokens.  llm-compressor 0.14.0.1 resolves transformers 5.17 / compressed-tensors 0.19, so
# this cannot share the main environment.  Creates .venv-producers on first use (torch 2.13.0 CPU first, then
# the producers, then this package without its deps); reinstalls when this script changes.  CPU only.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${PRODUCERS_VENV:-.venv-producers}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=$(sha256sum tests/producers_w4a4/run.sh | cut -c1-16)
if [[ ! -x $VENV/bin/python || $(cat "$VENV/.stamp" 2>/dev/null) != "$stamp" ]]; then
    echo "== creating $VENV (torch 2.13.0 CPU, llmcompressor 0.14.0.1, nvidia-modelopt 0.47.0) =="
    [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q llmcompressor==0.14.0.1 nvidia-modelopt==0.47.0 pytest tokenizers
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    "$VENV/bin/python" -m pip install -q "hydra-core>=1.3" "psutil>=5.9" "tqdm>=4.60"
    echo "$stamp" > "$VENV/.stamp"
fi
"$VENV/bin/python" -c "import llmcompressor, modelopt, transformers, compressed_tensors, torch; \
print('llmcompressor', llmcompressor.__version__, 'modelopt', modelopt.__version__, 'transformers', \
transformers.__version__, 'compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__)"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/producers_w4a4 "$@"
