#!/usr/bin/env bash
# Every CPU-runnable command of README.md and docs/*.md, run as written (torchrun groups, launch/torchrun.sh,
# the demo, the full layout table) on fabricated checkpoints.  The default suite composes all of them through
# the schema and runs the plain-process ones (tests/test_cli_doc_commands.py).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
SA_DOC_COMMANDS=1 exec python -m pytest -q -p no:cacheprovider tests/doc_commands "$@"
