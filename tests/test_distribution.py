"""The package as distributed: its version, licence and requirements as
pyproject.toml declares them, ``python -m vfiouser_vmem``, and an sdist that
holds what the wheel is built from and is made without libvfio-user.

The wheel itself, and the declared floors of the requirements, take minutes:
integration/test_wheel.py and integration/test_packaging.py."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import vfiouser_vmem

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_version_is_the_one_pyproject_declares() -> None:
    declared = PYPROJECT["project"]["version"]
    assert importlib.metadata.version("vfiouser-vmem") == declared
    assert vfiouser_vmem.__version__ == declared


def test_a_tree_without_metadata_has_a_version_that_says_so() -> None:
    # As if the package were imported from a source tree never installed.
    code = (
        "import importlib.metadata as m\n"
        "def missing(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import vfiouser_vmem\n"
        "print(vfiouser_vmem.__version__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0+unknown\n"


def test_python_m_vfiouser_vmem_is_the_command(tmp_path: Path) -> None:
    # From a directory that holds no package: the installed one runs.
    run = [sys.executable, "-m", "vfiouser_vmem"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: vfiouser-vmem ")
    assert "serve" in helped.stdout
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"vfiouser-vmem {vfiouser_vmem.__version__}\n")
    wrong = subprocess.run([*run, "no-such-command"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert wrong.returncode == 2 and "no-such-command" in wrong.stderr


def test_the_licence_is_the_one_the_metadata_names() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License\n")
    assert "Copyright (c) 2026, The vfiouser-vmem authors" in text
    assert "Neither the name of the copyright holder" in text  # the third clause
    project = PYPROJECT["project"]
    assert (project["license"], project["license-files"]) == ("BSD-3-Clause", ["LICENSE"])
    # PEP 639: the expression replaces the licence classifiers.
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    metadata = importlib.metadata.metadata("vfiouser-vmem")
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in metadata.get_all("License-File", [])


def declared_requirements() -> list[Requirement]:
    return [Requirement(r) for r in (*PYPROJECT["build-system"]["requires"], *PYPROJECT["project"]["dependencies"],
                                     *PYPROJECT["project"]["optional-dependencies"]["test"])]


def test_every_requirement_has_a_floor() -> None:
    # integration/test_packaging.py installs each of them at its floor.
    without = [str(r) for r in declared_requirements() if not [s for s in r.specifier if s.operator == ">="]]
    assert without == []


def source_files() -> list[str]:
    """What git knows of the work tree (tracked, or new and not ignored):
    what scripts/build-wheel makes its sdist from."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    return [name for name in out.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the sources, as scripts/build-wheel makes: nothing is
    written into the work tree."""
    copy = tmp_path / "src"
    for name in source_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    return copy


@pytest.fixture
def no_libvfio_user(tmp_path: Path) -> dict[str, str]:
    """An environment in which neither of csrc/ffi_vfu.py's ways finds
    libvfio-user: no prefix, and pkg-config searching an empty directory."""
    empty = tmp_path / "no-pkgconfig"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LIBVFIO_USER_PREFIX", "PKG_CONFIG_PATH")}
    env["PKG_CONFIG_LIBDIR"] = str(empty)
    # The control: here the lookup does fail, so that a command that succeeds
    # here shows that it never looked.
    lookup = subprocess.run(
        [sys.executable, "-c", "import runpy; runpy.run_path('csrc/ffi_vfu.py')['find_libvfio_user']()"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert lookup.returncode != 0 and "libvfio-user not found" in lookup.stderr, lookup.stderr
    return env


def test_the_sdist_is_made_without_libvfio_user_and_holds_the_build(
        tmp_path: Path, tree: Path, no_libvfio_user: dict[str, str]) -> None:
    out = tmp_path / "dist"
    made = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
        cwd=tree, env=no_libvfio_user, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    sdist = out / made.stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        top = f"vfiouser_vmem-{PYPROJECT['project']['version']}/"
        members = {m.name.removeprefix(top) for m in archive.getmembers() if m.isfile()}

    files = source_files()
    csrc = {n for n in files if n.startswith("csrc/") and (n.endswith((".c", ".h")) or n.startswith("csrc/ffi_"))}
    package = {n for n in files if n.startswith("vfiouser_vmem/") and n.endswith((".py", "/py.typed"))}
    wanted = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "PKG-INFO"} | csrc | package
    assert {"csrc/ffi_vfu.py", "csrc/ffi_blocks.py", "csrc/vmem_queue.h", "vfiouser_vmem/py.typed"} <= wanted
    assert wanted - members == set()
    # Nothing of a build (the editable install's modules lie next to the sources).
    assert [m for m in members if m.endswith((".so", ".o", ".pyc")) or m.startswith("tests/")] == []


def test_egg_info_needs_no_libvfio_user(tree: Path, no_libvfio_user: dict[str, str]) -> None:
    # setuptools executes csrc/ffi_vfu.py for every command, this one too.
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info"], cwd=tree, env=no_libvfio_user,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
