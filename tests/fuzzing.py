"""What every fuzzer of the project shares: its budget, its seed, its count
and its reproducer (docs/reliability.md).

- **Budget.** A fuzzer runs ``budget(ci=..., long=...)`` inputs: the CI-sized
  run by default, the long run when ``VFIOUSER_VMEM_LONG=1`` is set.
  ``VFIOUSER_VMEM_FUZZ_COUNT=N`` sets the count of every fuzzer outright.
- **Seed.** ``VFIOUSER_VMEM_SEED=N`` replays a run; without it each run takes
  a fresh seed (so that CI explores), printed with the counts.
- **Count.** ``FuzzRun.done(n)`` books what was tried; the unit suite's
  terminal summary lists every fuzzer's inputs, seed and failures
  (tests/conftest.py), so the counts show in CI's output.
- **Reproducer.** A failure writes ``<name>-<seed>.json`` into
  ``VFIOUSER_VMEM_REPRO_DIR`` (default ``fuzz-failures/`` at the top of the
  checkout, git-ignored): the seed, the failing step, the error, and the
  inputs of the run in the fuzzer's own JSON form.  Copied into
  ``tests/fuzz_regressions/``, it is replayed by the fuzzer's regression test
  (``regressions(name)``) in every run from then on.
"""

from __future__ import annotations

import json
import os
import random
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LONG", "FuzzRun", "budget", "regressions", "RUNS", "REGRESSIONS_DIR"]

LONG = os.environ.get("VFIOUSER_VMEM_LONG", "") not in ("", "0")
REGRESSIONS_DIR = Path(__file__).parent / "fuzz_regressions"
_REPRO_DIR = Path(os.environ.get("VFIOUSER_VMEM_REPRO_DIR") or Path(__file__).parent.parent / "fuzz-failures")
#: Kept per run: the inputs a reproducer holds (the last ones, where a
#: run is too long to write whole).
KEPT_INPUTS = 5000


def budget(*, ci: int, long: int) -> int:
    """How many inputs this run tries."""
    forced = os.environ.get("VFIOUSER_VMEM_FUZZ_COUNT")
    if forced:
        return int(forced)
    return long if LONG else ci


def _seed() -> int:
    given = os.environ.get("VFIOUSER_VMEM_SEED")
    return int(given, 0) if given else int.from_bytes(os.urandom(4), "little")


@dataclass
class FuzzRun:
    """One fuzzer's run: ``rng`` from the seed, the inputs it records, the
    count it books.  Use as a context manager: an exception inside writes
    the reproducer and is re-raised with its path."""

    name: str
    unit: str = "inputs"
    seed: int = field(default_factory=_seed)
    count: int = 0
    failures: int = 0
    inputs: list[Any] = field(default_factory=list)
    dropped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        RUNS.append(self)

    def record(self, item: Any) -> None:
        """Keep one input (JSON-able) for the reproducer."""
        self.inputs.append(item)
        if len(self.inputs) > KEPT_INPUTS:
            del self.inputs[: len(self.inputs) - KEPT_INPUTS]
            self.dropped = self.count

    def done(self, n: int = 1) -> None:
        self.count += n

    def write_reproducer(self, error: BaseException) -> Path:
        _REPRO_DIR.mkdir(parents=True, exist_ok=True)
        path = _REPRO_DIR / f"{self.name}-{self.seed}.json"
        path.write_text(json.dumps({
            "fuzzer": self.name,
            "seed": self.seed,
            "step": self.count,
            "inputs_dropped_before": self.dropped,
            "error": "".join(traceback.format_exception_only(type(error), error)).strip(),
            "inputs": self.inputs,
        }, indent=1) + "\n")
        return path

    def __enter__(self) -> FuzzRun:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        self.failures += 1
        path = self.write_reproducer(exc)
        raise AssertionError(
            f"{self.name}: failed at {self.unit[:-1] if self.unit.endswith('s') else self.unit} "
            f"{self.count} (seed {self.seed}; replay with VFIOUSER_VMEM_SEED={self.seed}); "
            f"reproducer: {path}") from exc


#: Every run of this session, for the terminal summary.
RUNS: list[FuzzRun] = []


def regressions(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The saved reproducers of fuzzer ``name``: (file name, content)."""
    for path in sorted(REGRESSIONS_DIR.glob(f"{name}-*.json")):
        yield path.name, json.loads(path.read_text())
