"""A calibration run in its own process, for the SIGKILL-then-resume tests (argv: checkpoint work_dir [memory]:
with "memory" the hidden states stay in memory and are saved after every layer, else they spill)."""

import sys

from test_calibrate_engine import targets_of, tokens

from streaming_adapters.calibrate.engine import calibrate_activations

memory = sys.argv[3:] == ["memory"]
calibrate_activations(sys.argv[1], tokens(12, seed=9), targets_of(sys.argv[1]),
                      host_budget_bytes=1 << 30 if memory else 0, work_dir=sys.argv[2], persist_every_s=0)
