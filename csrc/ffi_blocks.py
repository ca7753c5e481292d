"""cffi (API mode) builder of ``vfiouser_vmem._blocks``: the C helper of csrc/
(the block bitmap and discard loop, vmem_blocks; guest memory access under
a SIGBUS guard, vmem_guest; the request path of the virtqueue, vmem_queue;
the system calls of the memory backends, vmem_hostmem)."""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ("vmem_blocks", "vmem_guest", "vmem_queue", "vmem_config", "vmem_hostmem")

ffibuilder = FFI()
for part in PARTS:
    with open(os.path.join(HERE, f"{part}.h")) as header:
        # The header's declarations between the CDEF markers are cffi-parsable.
        text = header.read()
        ffibuilder.cdef(text.split("/* CDEF-BEGIN */")[1].split("/* CDEF-END */")[0])
ffibuilder.set_source(
    "vfiouser_vmem._blocks",
    "".join(f'#include "{part}.h"\n' for part in PARTS),
    sources=[os.path.relpath(os.path.join(HERE, f"{part}.c")) for part in PARTS],
    include_dirs=[HERE],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
