#!/usr/bin/env bash
# The real multi-node test: a 2-node Slurm cluster on this machine runs the REAL sbatch files, which
# convert a fixture FP8 checkpoint across 2 nodes x 2 processes (CPU, gloo), twice:
#   1. NVFP4 W4A16 (recipe fp8_to_nvfp4): byte-identical to a single-process conversion;
#   2. NVFP4 W4A4 (recipe fp8_to_nvfp4_w4a4, 8 calibration samples x 32 tokens, split over the 4 ranks):
#      byte-identical to a single-process W4A4 run of the same recipe, and (tests/slurm/check_w4a4.py) every
#      input scale finite and > 0, equal inside q_a/kv_a and gate/up, every W4A16 tensor byte for byte;
#   3. evaluate (recipe evaluate) of that W4A4 output against the FP8 checkpoint with the activations
#      emulated, the 8 rows split over the 4 ranks: every number of report.json equal to one process's
#      (tests/slurm/check_evaluate.py).
# One cluster serves both runs; stops only the daemons it started (local_cluster.sh / run_slurm_test.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PY=${SA_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
CLUSTER=$REPO/tests/slurm/local_cluster.sh
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sa-slurm-conv.XXXXXX")
started_cluster=0
cleanup() {
    local rc=$?
    if [[ $started_cluster == 1 ]]; then "$CLUSTER" stop >/dev/null || rc=1; fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Fixture, calibration tokens (ids below the fixture's vocab_size 1001) and the single-process references.
"$PY" - "$WORK" <<'PYEOF'
import json, random, sys
from streaming_adapters.testing.fixtures import make_checkpoint
make_checkpoint(sys.argv[1] + "/fp8", "deepseek_v3", "fp8_block")
rng = random.Random(0)
with open(sys.argv[1] + "/calib.jsonl", "w") as f:
    f.writelines(json.dumps({"input_ids": [rng.randrange(3, 1001) for _ in range(32)]}) + "\n" for _ in range(8))
PYEOF
CALIB="calibration.data=$WORK/calib.jsonl calibration.samples=8 calibration.seq_len=32"
"$PY" -m streaming_adapters.run --config-name fp8_to_nvfp4 checkpoint.path="$WORK/fp8" \
    output.path="$WORK/single" io.step_mb=0.25 report.progress=false report.path="$WORK/single.report.json" >/dev/null
# shellcheck disable=SC2086  # CALIB: word-split on purpose
"$PY" -m streaming_adapters.run --config-name fp8_to_nvfp4_w4a4 checkpoint.path="$WORK/fp8" $CALIB \
    output.path="$WORK/single-w4a4" io.step_mb=0.25 report.progress=false \
    report.path="$WORK/single-w4a4.report.json" >/dev/null

EVAL="evaluate.data=$WORK/calib.jsonl evaluate.reference=$WORK/fp8 evaluate.emulate_activations=true evaluate.seq_len=32"
# shellcheck disable=SC2086  # EVAL: word-split on purpose
"$PY" -m streaming_adapters.run --config-name evaluate checkpoint.path="$WORK/single-w4a4" $EVAL \
    evaluate.out_dir="$WORK/single-eval" >/dev/null

if ! "$CLUSTER" status >/dev/null 2>&1; then
    started_cluster=1
    "$CLUSTER" start | sed 's/^/  /'
fi

export SA_TEST_ENTRY=streaming_adapters.run SA_PYTHON="$PY"
REPORT_OK="$PY -c \"import json,sys; r=json.load(open('@OUT@/report.json')); assert r['world_size']==@WORLD@ and len(r['ranks'])==@WORLD@, r['world_size']; print('byte-identical to 1 process; world size', r['world_size'])\""

echo "== W4A16: fp8_to_nvfp4"
# Byte-identical: every file of the output, and the report says every rank took part.
SA_TEST_RECIPE=fp8_to_nvfp4 \
SA_TEST_OVERRIDES="checkpoint.path=$WORK/fp8 output.path=@OUT@/nvfp4 parallel.dp_shard=@WORLD@ io.step_mb=0.25 report.progress=false report.path=@OUT@/report.json" \
SA_TEST_CHECK="diff -r $WORK/single @OUT@/nvfp4 && $REPORT_OK" \
    tests/slurm/run_slurm_test.sh

echo "== W4A4: fp8_to_nvfp4_w4a4"
# Calibration imports transformers on every rank and runs 8 samples through 2 layers: on a 2-core machine
# a 4-rank job takes ~40 s, two of them in a row, hence the longer wait.
SA_TEST_RECIPE=fp8_to_nvfp4_w4a4 SA_TEST_TIMEOUT=${SA_TEST_TIMEOUT:-300} \
SA_TEST_OVERRIDES="checkpoint.path=$WORK/fp8 $CALIB output.path=@OUT@/nvfp4 parallel.dp_shard=@WORLD@ io.step_mb=0.25 report.progress=false report.path=@OUT@/report.json" \
SA_TEST_CHECK="diff -r $WORK/single-w4a4 @OUT@/nvfp4 && $PY tests/slurm/check_w4a4.py @OUT@/nvfp4 $WORK/single @OUT@/report.json @WORLD@" \
    tests/slurm/run_slurm_test.sh

echo "== evaluate: the W4A4 output against the FP8 checkpoint, activations emulated"
SA_TEST_RECIPE=evaluate SA_TEST_TIMEOUT=${SA_TEST_TIMEOUT:-300} \
SA_TEST_OVERRIDES="checkpoint.path=$WORK/single-w4a4 $EVAL evaluate.out_dir=@OUT@/ev" \
SA_TEST_CHECK="$PY tests/slurm/check_evaluate.py @OUT@/ev $WORK/single-eval @WORLD@" \
    tests/slurm/run_slurm_test.sh
