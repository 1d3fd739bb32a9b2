#!/usr/bin/env bash
# The real multi-node test: a 2-node Slurm cluster on this machine runs the REAL sbatch files, which
# convert a fixture FP8 checkpoint to NVFP4 across 2 nodes x 2 processes (CPU, gloo); the output must be
# byte-identical to a single-process conversion.  Stops only the daemons it started (run_slurm_test.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PY=${SA_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sa-slurm-conv.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Fixture and the single-process reference output.
"$PY" - "$WORK/fp8" <<'PYEOF'
import sys
from streaming_adapters.testing.fixtures import make_checkpoint
make_checkpoint(sys.argv[1], "deepseek_v3", "fp8_block")
PYEOF
"$PY" -m streaming_adapters.run --config-name fp8_to_nvfp4 checkpoint.path="$WORK/fp8" \
    output.path="$WORK/single" io.step_mb=0.25 report.progress=false report.path="$WORK/single.report.json" >/dev/null

export SA_TEST_ENTRY=streaming_adapters.run SA_PYTHON="$PY"
export SA_TEST_RECIPE=fp8_to_nvfp4
export SA_TEST_OVERRIDES="checkpoint.path=$WORK/fp8 output.path=@OUT@/nvfp4 parallel.dp_shard=@WORLD@ io.step_mb=0.25 report.progress=false report.path=@OUT@/report.json"
# Byte-identical: every file of the output, and the report says every rank took part.
export SA_TEST_CHECK="diff -r $WORK/single @OUT@/nvfp4 && $PY -c \"import json,sys; r=json.load(open('@OUT@/report.json')); assert r['world_size']==@WORLD@ and len(r['ranks'])==@WORLD@, r['world_size']; print('byte-identical to 1 process; world size', r['world_size'])\""
exec tests/slurm/run_slurm_test.sh
