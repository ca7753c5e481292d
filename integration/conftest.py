"""Fixtures of the real-QEMU tests: the kit, servers and guests that are
always stopped (by PID) and whose logs are printed when a test fails."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Guest, Kit, VmemServer, short_tmpdir, stop_and_report, node_failed  # noqa: E402

TIMINGS: list[tuple[str, float]] = []


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter):
    # The soaks (test_soak.py) book their runs in tests/fuzzing.py's RUNS;
    # the module is loaded only if a soak was.
    fuzzing = sys.modules.get("fuzzing")
    soaks = [run for run in getattr(fuzzing, "RUNS", ()) if run.name.startswith("soak-")]
    if soaks:
        mode = "long" if fuzzing.LONG else "CI-sized"
        terminalreporter.section(f"soaks with real guests ({mode} runs; VFIOUSER_VMEM_LONG=1 for long)")
        for run in soaks:
            extra = "".join(f", {k} {v}" for k, v in run.extra.items())
            terminalreporter.write_line(
                f"{run.name:<28} {run.count:>6} {run.unit:<14} seed {run.seed:<11} failures {run.failures}{extra}")
    if TIMINGS:
        terminalreporter.section("measured in the guests (TCG unless VMEM_ACCEL=kvm)")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{what:<60} {seconds:8.2f} s")


@pytest.fixture
def timing():
    def record(what: str, seconds: float) -> None:
        TIMINGS.append((what, seconds))

    return record


@pytest.fixture(scope="session")
def kit() -> Kit:
    return Kit.build()


@pytest.fixture
def workdir(request):
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(request, kit, workdir):
    """Start servers and guests through this; all are stopped at the end."""
    started: list[object] = []

    class Env:
        def server(self, **kw) -> VmemServer:
            s = VmemServer(workdir, **kw)
            started.append(s)
            return s

        def guest(self, sockets: list[str], **kw) -> Guest:
            g = Guest(kit, workdir, sockets, **kw)
            started.append(g)
            return g

    yield Env()
    failed = node_failed(request)
    for thing in reversed(started):
        stop_and_report(thing, failed)
