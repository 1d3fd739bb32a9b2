#!/usr/bin/env bash
# The NeMo AutoModel integration tests, in their own virtualenv: nemo_automodel 0.7.0 pins transformers 5.18.0,
# the main environment keeps 5.23.  Creates .venv-nemo on first use (a clean venv, not --system-site-packages:
# it must not see the main environment's transformers), reinstalls when pyproject.toml changes, then runs
# pytest there.  CPU, real gloo ranks; ~6 minutes on 2 cores.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${NEMO_VENV:-.venv-nemo}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -x $VENV/bin/python || $(cat "$VENV/.stamp" 2>/dev/null) != "$stamp" ]]; then
    echo "== creating $VENV (torch 2.13.0 CPU, then .[nemo,test]) =="
    [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -e ".[nemo,test]"
    echo "$stamp" > "$VENV/.stamp"
fi
"$VENV/bin/python" -c "import nemo_automodel, transformers, torch; print('nemo_automodel', nemo_automodel.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__)"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/nemo "$@"
