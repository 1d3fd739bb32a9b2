"""Prints how the fuzz cases ended, per category (exact loads and refusals by error class)."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter):
    mod = next((m for name, m in list(sys.modules.items()) if name.endswith("fuzz_checkpoints")), None)
    outcomes = getattr(mod, "OUTCOMES", None)
    if not outcomes:
        return
    terminalreporter.section("fuzz outcomes (category: outcome x count)")
    for cat in sorted(outcomes):
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(outcomes[cat].items()))
        terminalreporter.write_line(f"{cat:>16}: {counts}")
