"""Child processes of the tests: stopped by PID, their stderr collected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

#: The server's command, from the venv the tests run in.
EXE = [os.path.join(os.path.dirname(sys.executable), "vfiouser-vmem")]


def terminate(proc: subprocess.Popen, timeout_s: float = 20) -> tuple[int, str]:
    """SIGTERM a child we started (SIGKILL if it does not exit in time);
    returns its exit code and the rest of its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    """``vfiouser-vmem serve ARGS`` as a child, once it says it is ready;
    returns it and its first line (AssertionError with its stderr if it
    did not start)."""
    proc = subprocess.Popen([*EXE, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = proc.stdout.readline()
    if "ready" not in first_line:
        rc, err = terminate(proc)
        raise AssertionError(f"serve did not start ({rc}): {first_line!r}\n{err}")
    return proc, first_line


def fd_count(pid: int) -> int:
    """How many fds process ``pid`` holds (the fuzzers' and soaks' leak check)."""
    return len(os.listdir(f"/proc/{pid}/fd"))
