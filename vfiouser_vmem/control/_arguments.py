"""What a QMP request must hold, checked as QEMU checks it, with QEMU's texts.

The request (qmp_dispatch_check_obj, in its order): "QMP input must be a
JSON object", "QMP input member 'execute' must be a string", "QMP input
member 'arguments' must be an object", "QMP input member 'x' is
unexpected", "QMP input lacks member 'execute'".

The arguments (the generated marshallers: members in schema order, missing
then wrong type, then members nobody asked for): "Parameter 'x' is
missing", "Invalid parameter type for 'x', expected: string" (or array),
"Parameter 'x' is unexpected", "Parameter 'enable[0]' does not accept value
'y'".

All are class ``GenericError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["COMMAND_ARGS", "CommandError", "check_arguments", "check_request"]


class CommandError(Exception):
    """A command failed; the server answers ``{"error": {"class": ..., "desc": ...}}``.

    Never leaves the server (clients see errors.QmpError)."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class _Arg:
    name: str
    kind: str  # "str", "int", "any" or "capabilities"
    required: bool = True


#: Every command the server knows, with its arguments in schema order.
COMMAND_ARGS: dict[str, tuple[_Arg, ...]] = {
    "qmp_capabilities": (_Arg("enable", "capabilities", required=False),),
    "query-version": (),
    "query-commands": (),
    "query-status": (),
    "qom-get": (_Arg("path", "str"), _Arg("property", "str")),
    "qom-set": (_Arg("path", "str"), _Arg("property", "str"), _Arg("value", "any")),
    "qom-list": (_Arg("path", "str"),),
    "query-memory-devices": (),
    "query-memory-size-summary": (),
    "query-memdev": (),
    "x-query-numa": (),
    "human-monitor-command": (_Arg("command-line", "str"), _Arg("cpu-index", "int", required=False)),
}

#: The capabilities QEMU knows (QMPCapability); we offer none of them.
_KNOWN_CAPABILITIES = ("oob",)


def check_request(request: Any) -> tuple[str, dict[str, Any]]:
    """The command name and arguments of a request (QEMU's
    qmp_dispatch_check_obj, in its order)."""
    if not isinstance(request, dict):
        raise CommandError("QMP input must be a JSON object")
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise CommandError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise CommandError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise CommandError(f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise CommandError("QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


def check_arguments(command: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Validate like QEMU's generated marshallers: members in schema order
    (missing, then wrong type), then members nobody asked for."""
    checked: dict[str, Any] = {}
    for arg in COMMAND_ARGS[command]:
        name = arg.name
        if name not in arguments:
            if arg.required:
                raise CommandError(f"Parameter '{name}' is missing")
            continue
        value = arguments[name]
        kind = arg.kind
        if kind == "str":
            if not isinstance(value, str):
                raise CommandError(f"Invalid parameter type for '{name}', expected: string")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise CommandError(f"Invalid parameter type for '{name}', expected: integer")
        elif kind == "capabilities":
            if not isinstance(value, list):
                raise CommandError(f"Invalid parameter type for '{name}', expected: array")
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise CommandError(f"Invalid parameter type for '{name}[{i}]', expected: string")
                if item not in _KNOWN_CAPABILITIES:
                    raise CommandError(f"Parameter '{name}[{i}]' does not accept value '{item}'")
        checked[name] = value
    if len(checked) != len(arguments):  # checked holds only members of arguments
        for name in arguments:
            if name not in checked:
                raise CommandError(f"Parameter '{name}' is unexpected")
    return checked
