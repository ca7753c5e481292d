"""The error tree (vfiouser_vmem/errors.py): one root, drawn in its docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import vfiouser_vmem
from vfiouser_vmem import errors
from vfiouser_vmem.cli import EXIT_FAILURE, EXIT_USAGE, exit_code


def _package_modules():
    for info in pkgutil.iter_modules(vfiouser_vmem.__path__):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"vfiouser_vmem.{info.name}")


def test_every_public_exception_of_the_package_is_a_vmem_error() -> None:
    found = {}
    for module in _package_modules():
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
                    and obj.__module__.startswith("vfiouser_vmem")):
                found[name] = obj
    assert found, "no exception classes found: the walk is broken"
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, errors.VmemError))
    assert outside == []
    # One home: each is defined in errors.py (the other modules re-export).
    assert sorted(name for name, cls in found.items() if cls.__module__ != "vfiouser_vmem.errors") == []


def test_the_docstring_draws_every_class() -> None:
    tree = errors.__doc__ or ""
    missing = [name for name in errors.__all__ if f" {name}" not in tree]
    assert missing == []


@pytest.mark.parametrize(("exc", "code"), [
    (errors.ConfigError("bad flag"), EXIT_USAGE),
    (errors.MetricsAddressError("bad address"), EXIT_USAGE),
    (errors.SocketPathInUse("/run/x.sock", "in use"), EXIT_FAILURE),
    (errors.DiscardFailed(5, "EIO", offset=0), EXIT_FAILURE),
    (PermissionError(13, "denied"), EXIT_FAILURE),
    (RuntimeError("a bug"), None),
])
def test_exit_codes_follow_from_the_class(exc: BaseException, code: int | None) -> None:
    assert exit_code(exc) == code
