"""Glue between Python objects and the C helper (csrc/, the ``_blocks`` cffi module).

State that C code reads and changes has one home, a cffi struct, and Python
objects expose its fields as attributes (:class:`CField`); C callbacks handed
to the vfio-user binding, another cffi module, travel as addresses.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias

from vfiouser_vmem._blocks import ffi, lib

__all__ = ["CData", "CField", "c_address"]

#: A cffi cdata (a struct, pointer or array of a C module): the compiled
#: modules have no stubs, so what they make is Any to a type checker.
CData: TypeAlias = Any


class _CBacked(Protocol):
    _c: CData  # the cffi struct that holds the CField attributes


class CField:
    """An attribute kept in a field of the object's cffi struct ``_c``:
    state that C code reads and writes (csrc/vmem_queue.h) has one home,
    so nothing is copied in and out around each call.  cffi refuses a
    value the C type cannot hold (OverflowError)."""

    __slots__ = ("field",)

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, obj: _CBacked | None, owner: type | None = None):
        if obj is None:
            return self
        return getattr(obj._c, self.field)

    def __set__(self, obj: _CBacked, value: int) -> None:
        setattr(obj._c, self.field, value)


def c_address(thing: str | object) -> int:
    """The address of a C function of the helper (by name) or of its cdata,
    for the vfio-user binding (``VfuContext.set_notify_serve``,
    ``set_fast_read``), which is another cffi module."""
    if isinstance(thing, str):
        thing = ffi.addressof(lib, thing)
    return int(ffi.cast("uintptr_t", thing))
