"""The unit suite's terminal summary: what each fuzzer tried (tests/fuzzing.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fuzzing import LONG, RUNS  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    # The soaks with real guests (integration/test_soak.py) book theirs in
    # the same list; integration/conftest.py prints those.
    runs = [run for run in RUNS if not run.name.startswith("soak-")]
    if not runs:
        return
    terminalreporter.section(f"fuzzers ({'long' if LONG else 'CI-sized'} runs; VFIOUSER_VMEM_LONG=1 for long)")
    for run in runs:
        extra = "".join(f", {k} {v}" for k, v in run.extra.items())
        terminalreporter.write_line(
            f"{run.name:<28} {run.count:>8} {run.unit:<18} seed {run.seed:<11} failures {run.failures}{extra}")
