"""cffi (API mode) builder of ``vfiouser_vmem._blocks``: the C helper of csrc/."""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "vmem_blocks.h")) as header:
    # The header's declarations between the CDEF markers are cffi-parsable.
    text = header.read()
    ffibuilder.cdef(text.split("/* CDEF-BEGIN */")[1].split("/* CDEF-END */")[0])
ffibuilder.set_source(
    "vfiouser_vmem._blocks",
    '#include "vmem_blocks.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, "vmem_blocks.c"))],
    include_dirs=[HERE],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
