"""Sizes in QEMU's notation (docs/design.md, "The interface contract").

A size is a byte count, or a number with one of the suffixes K, M, G, T, P, E
(powers of 1024), as QEMU's ``qemu_strtosz`` takes them: ``512M``, ``8G``,
``1.5G``.  A trailing ``B`` after a suffix (``8GB``) is accepted as QEMU's
``-m`` does not, because people write it; a bare ``B`` means bytes.
"""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(i?B)?\s*$", re.IGNORECASE)
MAX_SIZE_BYTES = (1 << 64) - 1


def parse_size(text: str | int) -> int:
    """Return the byte count that ``text`` names; ValueError says what is wrong."""
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: expected a byte count or a number with K, M, G or T")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise ValueError(
                f"invalid size {text!r}: expected a byte count or a number with K, M, G or T (e.g. 512M, 8G)"
            )
        number, suffix, _ = match.groups()
        multiplier = _SUFFIXES[suffix.upper()]
        if "." in number:
            whole, frac = number.split(".")
            # Exact arithmetic: 1.5G is 1610612736 bytes, never a float rounding.
            value = int(whole) * multiplier + int(frac) * multiplier // (10 ** len(frac))
            if int(frac) * multiplier % (10 ** len(frac)):
                raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
        else:
            value = int(number) * multiplier
    if value < 0:
        raise ValueError(f"invalid size {text!r}: negative")
    if value > MAX_SIZE_BYTES:
        raise ValueError(f"invalid size {text!r}: larger than 16 EiB")
    return value


def format_size(size_bytes: int) -> str:
    """The shortest exact QEMU form of ``size_bytes``: ``1G``, ``1536M``, ``4097``."""
    for suffix in ("E", "P", "T", "G", "M", "K"):
        unit = _SUFFIXES[suffix]
        if size_bytes and size_bytes % unit == 0:
            return f"{size_bytes // unit}{suffix}"
    return str(size_bytes)


def human_size(size_bytes: int) -> str:
    """A readable, possibly rounded size for people: ``1.50 GiB``."""
    for suffix, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size_bytes >= unit:
            return f"{size_bytes / unit:.2f} {suffix}"
    return f"{size_bytes} B"
