"""A calibration run in its own process, for the SIGKILL-then-resume test (argv: checkpoint work_dir)."""

import sys

from test_calibrate_engine import targets_of, tokens

from streaming_adapters.calibrate.engine import calibrate_activations

calibrate_activations(sys.argv[1], tokens(12, seed=9), targets_of(sys.argv[1]), host_budget_bytes=0,
                      work_dir=sys.argv[2])
