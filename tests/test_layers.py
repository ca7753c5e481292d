"""The package's layers (docs/architecture.md): no module imports a layer above its own.

Every module under vfiouser_vmem/ is parsed (never imported) and every
import statement in it is checked: module level, inside functions, under
``if TYPE_CHECKING:``, absolute and relative.  A type-only import is a
dependency all the same: it says which layer a module is written against.

Layers, lowest first (a module may import its own layer and those below):

    base       vfiouser_vmem.errors, vfiouser_vmem.util.*, and the compiled
               cffi modules vfiouser_vmem._blocks, vfiouser_vmem._vfu
    vfio_user  vfiouser_vmem.vfio_user.*
    virtio     vfiouser_vmem.virtio.*
    vmem       vfiouser_vmem.vmem.*
    control    vfiouser_vmem.control.*
    server     vfiouser_vmem.server.*
    cli        vfiouser_vmem.cli.*
    package    vfiouser_vmem/__init__.py, vfiouser_vmem/__main__.py (may import anything)

and three rules beside the order:

- ``_vfu`` (libvfio-user through cffi) is imported by the vfio_user layer
  only: the other layers reach libvfio-user through its binding;
- the virtio transport names no device type: no import of the virtio-mem
  layer (the order already says so), and no identifier or string literal of
  virtio-mem (``VirtioMem...``, ``VIRTIO_MEM...``, ``VIRTIO_ID_MEM``,
  ``virtio-mem``, ``virtio_mem``) in its code.  Comments and docstrings may
  speak of virtio-mem (the transport explains what it is used for); what
  this cannot see is knowledge without a name (a device id written as a
  bare number), which review has to catch;
- a module that is in no layer is reported, so that a new subpackage is
  placed before it is used.

``test_each_rule_catches_a_violation_in_a_copy`` shows the check failing:
it adds one forbidden import (or name) to a copy of the package and expects
exactly that one to be reported.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vfiouser_vmem"

#: Lowest first.
LAYERS = ["base", "vfio_user", "virtio", "vmem", "control", "server", "cli", "package"]
#: The cffi modules built from csrc/ (ffi_blocks.py, ffi_vfu.py): no .py source.
COMPILED = ("_blocks", "_vfu")
#: Subpackages that are a layer of their own (the name is the layer's).
SUBPACKAGE_LAYERS = ("vfio_user", "virtio", "vmem", "control", "server", "cli")
#: The only name a lower layer may import from the top package itself.  The
#: top package sets ``__version__`` (from its metadata) before it imports
#: any layer, so reading it from a lower layer runs nothing of the layers
#: above (while the package is being imported, the name is already there);
#: every other name of the top package is a re-export of some layer, and
#: importing it from below would be an upward dependency in disguise.
TOP_PACKAGE_NAMES_ALLOWED = {"__version__"}
#: The identifiers and strings the transport's code must not hold.
VIRTIO_MEM_WORDS = ("virtiomem", "virtio_mem", "virtio-mem", "virtio_id_mem")


@dataclass(frozen=True)
class Import:
    lineno: int
    #: The module the statement makes this module depend on.
    module: str
    #: For ``from vfiouser_vmem import NAME`` where NAME is no submodule.
    name: str | None = None


def modules_of(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the package."""
    root = package_dir.name
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([root, *parts])] = path
    return found


def layer_of(module: str, root: str) -> str | None:
    if module in (root, f"{root}.__main__"):
        return "package"
    parts = module.split(".")
    if parts[0] != root:
        return None
    sub = parts[1]
    if sub in ("errors", "util", *COMPILED):
        return "base"
    if sub in SUBPACKAGE_LAYERS:
        return sub
    return None


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_in(path: Path, module: str, known: set[str]) -> list[Import]:
    """Every import of the package's modules that ``path`` makes, wherever it
    stands (ast.walk sees function bodies and ``if TYPE_CHECKING:`` blocks)."""
    root = module.split(".")[0]
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    found.append(Import(node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve_relative(module, is_package, node.level, node.module)
            else:
                source = node.module or ""
            if source.split(".")[0] != root:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    # ``from pkg import submodule``: a dependency on that
                    # module (pkg's __init__ runs anyway, as for any import).
                    found.append(Import(node.lineno, submodule))
                else:
                    found.append(Import(node.lineno, source, None if alias.name == "*" else alias.name))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.split(".")[0] == root
              and (isinstance(node.func, ast.Name) and node.func.id == "__import__"
                   or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            # importlib.import_module("vfiouser_vmem....") / __import__(...)
            found.append(Import(node.lineno, node.args[0].value))
    return found


def _doc_strings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are documentation: docstrings and
    the bare string statements after an attribute (``x: int`` then
    ``\"\"\"what x is\"\"\"``)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def virtio_mem_names(path: Path) -> list[tuple[int, str]]:
    """(line, what) for each identifier or string literal of the code that
    names virtio-mem; comments (not in the ast) and docstrings are left out."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _doc_strings(tree)
    hits = []
    for node in ast.walk(tree):
        words: list[str] = []
        if isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words = [node.name]
        elif isinstance(node, ast.arg):
            words = [node.arg]
        elif isinstance(node, ast.alias):
            words = [node.name, node.asname or ""]
        elif isinstance(node, ast.keyword) and node.arg:
            words = [node.arg]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words = [node.value]
        for word in words:
            if any(bad in word.lower() for bad in VIRTIO_MEM_WORDS):
                hits.append((getattr(node, "lineno", 0), word))
    return hits


def layer_violations(package_dir: Path) -> list[str]:
    """What breaks the layering in the package at ``package_dir`` (its
    directory name is the package's name): one line per offence, naming the
    importing module, the imported one and both layers."""
    root = package_dir.name
    modules = modules_of(package_dir)
    known = set(modules) | {f"{root}.{name}" for name in COMPILED}
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    problems = []
    for module, path in modules.items():
        where = path.relative_to(package_dir.parent)
        layer = layer_of(module, root)
        if layer is None:
            problems.append(f"{where}: module {module} is in no layer (add it to LAYERS in tests/test_layers.py "
                            "and docs/architecture.md)")
            continue
        for imp in imports_in(path, module, known):
            target = layer_of(imp.module, root)
            at = f"{where}:{imp.lineno}: {module} (layer {layer})"
            if target is None:
                problems.append(f"{at} imports {imp.module}, which is in no layer")
            elif layer == "package":
                continue
            elif target == "package" and imp.name in TOP_PACKAGE_NAMES_ALLOWED:
                continue
            elif rank[target] > rank[layer]:
                what = f"{imp.module}.{imp.name}" if target == "package" and imp.name else imp.module
                problems.append(f"{at} imports {what} (layer {target}), a higher layer")
            elif imp.module == f"{root}._vfu" and layer != "vfio_user":
                problems.append(f"{at} imports {imp.module} (layer {target}): only the vfio_user layer "
                                "may use libvfio-user's cffi module")
        if layer == "virtio":
            for lineno, word in virtio_mem_names(path):
                problems.append(f"{where}:{lineno}: {module} (layer virtio) names virtio-mem ({word!r}); "
                                "the transport serves any VirtioDevice")
    return problems


def test_no_layer_imports_a_higher_one() -> None:
    assert layer_violations(PACKAGE) == []


def test_every_module_is_seen() -> None:
    # The walk finds the modules the layers are made of (a wrong root would
    # make the first test pass on nothing).
    modules = modules_of(PACKAGE)
    for module in ("vfiouser_vmem", "vfiouser_vmem.errors", "vfiouser_vmem.util.native",
                   "vfiouser_vmem.vfio_user._context", "vfiouser_vmem.virtio._pci", "vfiouser_vmem.vmem._model",
                   "vfiouser_vmem.server._app", "vfiouser_vmem.cli._main"):
        assert module in modules
    assert {layer_of(m, "vfiouser_vmem") for m in modules} == set(LAYERS)
    pci = imports_in(modules["vfiouser_vmem.virtio._pci"], "vfiouser_vmem.virtio._pci", set(modules))
    assert Import(pci[0].lineno, "vfiouser_vmem.errors", "DriverError") in pci


# (file, text appended, what the report must say)
MUTATIONS = {
    "upward import": (
        "virtio/_pci.py", "from vfiouser_vmem.server import DeviceServer\n",
        "vfiouser_vmem.virtio._pci (layer virtio) imports vfiouser_vmem.server (layer server), a higher layer"),
    "relative upward import": (
        "virtio/_pci.py", "from ..server import DeviceServer\n",
        "vfiouser_vmem.virtio._pci (layer virtio) imports vfiouser_vmem.server (layer server), a higher layer"),
    "relative import of a submodule": (
        "vmem/_spec.py", "from .. import control\n",
        "vfiouser_vmem.vmem._spec (layer vmem) imports vfiouser_vmem.control (layer control), a higher layer"),
    "function-local import": (
        "util/sizes.py", "def _late():\n    import vfiouser_vmem.vmem._model\n",
        "vfiouser_vmem.util.sizes (layer base) imports vfiouser_vmem.vmem._model (layer vmem), a higher layer"),
    "TYPE_CHECKING import": (
        "vfio_user/_context.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vfiouser_vmem.virtio import SplitQueue\n",
        "vfiouser_vmem.vfio_user._context (layer vfio_user) imports vfiouser_vmem.virtio (layer virtio), "
        "a higher layer"),
    "importlib": (
        "control/_protocol.py", "import importlib\nimportlib.import_module('vfiouser_vmem.cli')\n",
        "vfiouser_vmem.control._protocol (layer control) imports vfiouser_vmem.cli (layer cli), a higher layer"),
    "a re-export of the top package": (
        "vmem/_policy.py", "from vfiouser_vmem import open_server\n",
        "vfiouser_vmem.vmem._policy (layer vmem) imports vfiouser_vmem.open_server (layer package), "
        "a higher layer"),
    "_vfu outside vfio_user": (
        "util/native.py", "from vfiouser_vmem._vfu import lib as _vfu_lib\n",
        "vfiouser_vmem.util.native (layer base) imports vfiouser_vmem._vfu (layer base): only the vfio_user "
        "layer may use libvfio-user's cffi module"),
    "virtio-mem name in the transport": (
        "virtio/_pci.py", "def _probe(device):\n    return device.VIRTIO_ID_MEM\n",
        "vfiouser_vmem.virtio._pci (layer virtio) names virtio-mem ('VIRTIO_ID_MEM')"),
    "virtio-mem string in the transport": (
        "virtio/_virtqueue.py", "_KIND = 'virtio-mem'\n",
        "vfiouser_vmem.virtio._virtqueue (layer virtio) names virtio-mem ('virtio-mem')"),
    "a module in no layer": (
        "newthing.py", "", "module vfiouser_vmem.newthing is in no layer"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_rule_catches_a_violation_in_a_copy(tmp_path: Path, mutation: str) -> None:
    relative, text, expected = MUTATIONS[mutation]
    copy = tmp_path / PACKAGE.name
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    before = set(layer_violations(copy))
    target = copy / relative
    with target.open("a") as f:
        f.write("\n" + text)
    new = [line for line in layer_violations(copy) if line not in before]
    assert len(new) == 1, new
    assert expected in new[0], new[0]
    assert new[0].startswith(f"{PACKAGE.name}/{relative}")


def test_comments_and_docstrings_may_speak_of_virtio_mem(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text('"""For virtio-mem."""\n# VirtioMemDevice uses it\nclass A:\n    x: int\n'
                    '    """a virtio-mem thing"""\n')
    assert virtio_mem_names(path) == []
    path.write_text('log = f"{name}: virtio-mem"\n')
    assert virtio_mem_names(path) == [(1, ": virtio-mem")]
