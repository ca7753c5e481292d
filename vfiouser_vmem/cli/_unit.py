"""``vfiouser-vmem install-unit``: the systemd template unit of this
installation (docs/operating.md, "Under systemd").

The unit is shipped in the package (cli/systemd/vfiouser-vmem@.service)
with two placeholders: ``@EXEC@``, the command of the installation that
writes it (a venv's, a wheel's, a distribution's: the unit must name the
one that runs, not whichever ``vfiouser-vmem`` is first on PATH at boot),
and ``@CONFIG_DIR@``, where ``INSTANCE.toml`` is read from.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from vfiouser_vmem.errors import ConfigError

__all__ = ["UNIT_NAME", "install_unit", "render_unit", "this_command"]

UNIT_NAME = "vfiouser-vmem@.service"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_CONFIG_DIR = "/etc/vfiouser-vmem"


def this_command() -> str:
    """The absolute path of this installation's ``vfiouser-vmem`` script:
    beside the interpreter (a venv, or pip's --prefix), else on PATH."""
    beside = Path(sys.executable).parent / "vfiouser-vmem"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("vfiouser-vmem")
    if found is None:
        raise ConfigError("install-unit: cannot find this installation's vfiouser-vmem command (not beside "
                          f"{sys.executable}, not on PATH); give it with --exec")
    return os.path.abspath(found)


def _unit_word(text: str, what: str) -> str:
    """``text`` as one word of a unit file's command line: specifiers
    (``%``) doubled, quoted when it holds white space (systemd.service(5),
    "Command lines")."""
    if not os.path.isabs(text):
        raise ConfigError(f"install-unit: {what} {text!r} must be an absolute path")
    if any(c in text for c in "\"\\\n"):
        raise ConfigError(f"install-unit: {what} {text!r} holds a quote, backslash or newline; use another path")
    text = text.replace("%", "%%")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def render_unit(exec_path: str, config_dir: str = DEFAULT_CONFIG_DIR) -> str:
    template = resources.files("vfiouser_vmem.cli").joinpath("systemd", UNIT_NAME).read_text()
    config = _unit_word(config_dir.rstrip("/") or "/", "--config-dir")
    # The config path is a word with %i appended: quoting must cover the whole word.
    config_word = config[:-1] + '/%i.toml"' if config.endswith('"') else config + "/%i.toml"
    return (template.replace("@EXEC@", _unit_word(exec_path, "--exec"))
            .replace("@CONFIG_DIR@/%i.toml", config_word))


def install_unit(unit_dir: str = DEFAULT_UNIT_DIR, *, exec_path: str | None = None,
                 config_dir: str = DEFAULT_CONFIG_DIR) -> tuple[Path, bool]:
    """Write the unit into ``unit_dir`` and make ``config_dir``; returns the
    unit's path and whether it changed."""
    text = render_unit(exec_path or this_command(), config_dir)
    directory = Path(unit_dir)
    if not directory.is_dir():
        raise ConfigError(f"install-unit: the unit directory {unit_dir!r} does not exist")
    path = directory / UNIT_NAME
    try:
        changed = not path.exists() or path.read_text() != text
        if changed:
            tmp = path.with_name(f".{UNIT_NAME}.tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        os.makedirs(config_dir, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"install-unit: {exc.filename or unit_dir}: {exc.strerror or exc}") from None
    return path, changed
