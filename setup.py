# The compiled parts are built by cffi in API mode (csrc/ffi_*.py): the C
# helper of csrc/ and the binding to libvfio-user.  Everything else is in
# pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=[
        "csrc/ffi_blocks.py:ffibuilder",
        "csrc/ffi_vfu.py:ffibuilder",
    ],
)
