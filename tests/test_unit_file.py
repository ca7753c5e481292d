"""The systemd template unit and ``vfiouser-vmem install-unit``
(cli/_unit.py); a real systemd runs it in integration/test_systemd.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from proc_util import EXE
from vfiouser_vmem.cli._unit import UNIT_NAME, install_unit, render_unit
from vfiouser_vmem.errors import ConfigError

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def verify(unit_text: str, tmp_path: Path, instance: str = "vm0") -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` of an instance of the template (a template
    itself cannot be verified).  It prints unknown keys and bad values but
    still exits 0 for many of them: the output must be empty too."""
    assert SYSTEMD_ANALYZE, "systemd-analyze is needed (Debian package systemd; scripts/setup.sh --kit)"
    path = tmp_path / UNIT_NAME.replace("@", f"@{instance}")
    path.write_text(unit_text)
    # Without man on PATH, as in a minimal image: verify runs `man` for each
    # Documentation=man:... entry and fails where the page is missing.
    return subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/nonexistent", "LANG": "C.UTF-8"})


def test_the_installed_unit_verifies_clean(tmp_path):
    subprocess.run([*EXE, "install-unit", "--unit-dir", str(tmp_path), "--config-dir", str(tmp_path / "conf")],
                   check=True, capture_output=True)
    text = (tmp_path / UNIT_NAME).read_text()
    assert f"ExecStart={EXE[0]} serve --config {tmp_path}/conf/%i.toml\n" in text
    assert "Type=notify\n" in text and "@EXEC@" not in text and "@CONFIG_DIR@" not in text
    assert (tmp_path / "conf").is_dir()
    result = verify(text, tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result


def test_verify_catches_a_broken_unit(tmp_path):
    # The check can fail: an unknown key, and a command that does not exist.
    good = render_unit(EXE[0])
    typo = verify(good.replace("Type=notify", "Typ=notify"), tmp_path)
    assert "Unknown key" in typo.stderr
    missing = verify(render_unit(str(tmp_path / "no-such-command")), tmp_path)
    assert missing.returncode != 0 and "no-such-command" in missing.stderr


def test_paths_with_spaces_and_percent_are_quoted_and_escaped(tmp_path):
    odd = tmp_path / "my 100% conf"
    text = render_unit(EXE[0], str(odd))
    assert f'--config "{tmp_path}/my 100%% conf/%i.toml"' in text
    result = verify(text, tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result


@pytest.mark.parametrize("exec_path, config_dir, message", [
    ("bin/vfiouser-vmem", "/etc/vfiouser-vmem", "--exec 'bin/vfiouser-vmem' must be an absolute path"),
    ("/usr/bin/vfiouser-vmem", "etc", "--config-dir 'etc' must be an absolute path"),
    ("/usr/bin/vfiouser-vmem", '/etc/"x"', "holds a quote"),
])
def test_bad_paths_are_refused(exec_path, config_dir, message):
    with pytest.raises(ConfigError, match=message):
        render_unit(exec_path, config_dir)


def test_install_is_idempotent_and_says_so(tmp_path):
    path, changed = install_unit(str(tmp_path), exec_path="/usr/bin/vfiouser-vmem", config_dir=str(tmp_path / "c"))
    assert changed and path == tmp_path / UNIT_NAME and (path.stat().st_mode & 0o777) == 0o644
    assert install_unit(str(tmp_path), exec_path="/usr/bin/vfiouser-vmem", config_dir=str(tmp_path / "c")) == (path,
                                                                                                              False)
    # Another installation's command: the unit is rewritten.
    assert install_unit(str(tmp_path), exec_path="/opt/v/bin/vfiouser-vmem", config_dir=str(tmp_path / "c"))[1]
    assert "ExecStart=/opt/v/bin/vfiouser-vmem " in path.read_text()


def test_install_unit_refuses_a_missing_unit_directory_with_exit_2(tmp_path):
    result = subprocess.run([*EXE, "install-unit", "--unit-dir", str(tmp_path / "nope")], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert f"the unit directory '{tmp_path}/nope' does not exist" in result.stderr
    assert not (tmp_path / "nope").exists()


def test_print_writes_nothing(tmp_path):
    result = subprocess.run([*EXE, "install-unit", "--print", "--unit-dir", str(tmp_path)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.startswith("# vfiouser-vmem") and "ExecStart=" in result.stdout
    assert list(tmp_path.iterdir()) == []
