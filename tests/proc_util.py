"""Child processes of the tests: stopped by PID, their stderr collected."""

from __future__ import annotations

import signal
import subprocess


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
