"""Heavy: collected only by ``bash tests/doc_commands/run.sh`` (SA_DOC_COMMANDS=1), not by the default suite."""

import os

collect_ignore_glob = [] if os.environ.get("SA_DOC_COMMANDS") == "1" else ["test_*.py"]
