# The compiled parts are built by cffi in API mode (csrc/ffi_*.py): the C
# helper of csrc/ and the binding to libvfio-user.  Everything else is in
# pyproject.toml.
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


class BuildExt(build_ext):
    """Finds libvfio-user when the binding is built, not before.

    setuptools executes the cffi_modules files for every command (sdist and
    egg_info too), which need no libvfio-user; cffi calls ``pre_run`` just
    before it writes an extension's C source, that is, only for build_ext."""

    def pre_run(self, ext, ffi):
        if ext.name != "vfiouser_vmem._vfu":
            return
        spec = importlib.util.spec_from_file_location("_vmem_ffi_vfu", HERE / "csrc" / "ffi_vfu.py")
        ffi_vfu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ffi_vfu)
        for key, values in ffi_vfu.find_libvfio_user().items():
            getattr(ext, key).extend(values)


setup(
    cffi_modules=[
        "csrc/ffi_blocks.py:ffibuilder",
        "csrc/ffi_vfu.py:ffibuilder",
    ],
    cmdclass={"build_ext": BuildExt},
    # cffi compiles both modules against the stable ABI (.abi3.so, Py_LIMITED_API),
    # so one wheel serves every CPython from requires-python's 3.11 on.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
