"""W4A4 producers' reference suite: run by ``bash tests/producers_w4a4/run.sh`` in its own virtualenv
(``.venv-producers``: llm-compressor 0.14.0.1 + nvidia-modelopt 0.47.0, transformers 5.17).  Without them
(the main environment) this folder is not collected; CI runs it as its own named step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # calib_fixtures, helpers

collect_ignore_glob = [] if importlib.util.find_spec("llmcompressor") and importlib.util.find_spec("modelopt") \
    else ["test_*.py"]
