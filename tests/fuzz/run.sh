#!/usr/bin/env bash
# The checkpoint fuzz suite (tests/fuzz/fuzz_checkpoints.py): seeded mutations of a fabricated block-FP8
# checkpoint, each loaded bit-identically to an independent reference or refused with a named error.  Its own
# CI step; not collected by the default suite (the file is not test_*.py).  FUZZ_SEEDS=N cases per category
# (default 24: 16 categories, 384 cases).  Extra arguments go to pytest (e.g. -k codes).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pytest -q -p no:cacheprovider tests/fuzz/fuzz_checkpoints.py "$@"
