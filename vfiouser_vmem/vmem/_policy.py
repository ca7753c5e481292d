"""The plug policy: the host's say over each PLUG and UNPLUG.

The virtio-mem rules (spec 5.15.6) decide whether a request is valid; a
policy decides whether the host wants to grant a valid one now.  It is
consulted for every PLUG, UNPLUG and UNPLUG_ALL the rules would answer ACK,
before the block state changes, and answers:

- ``Response.ACK``: go on (the rules' answer stands);
- ``Response.NACK`` (PLUG only): not granted; Linux takes it as "more than
  requested_size" and retries at once with what it reads then
  (drivers/virtio/virtio_mem.c, virtio_mem_run_wq: -EAGAIN, ``goto retry``),
  so a NACK that lasts makes the guest spin;
- ``Response.BUSY``: the host cannot do it now; Linux retries on its retry
  timer (50 s, doubling up to 300 s); ``Device.notify_config_change()``
  makes it look again at once.

Never ERROR, which makes Linux mark the device broken (rule 5 of
docs/robustness.md).  An answer outside these, and an exception, is a bug
of the policy: the request is answered BUSY, the traceback logged and the
hook error counted.  While a policy is installed every PLUG and UNPLUG goes
through Python (the C request path serves only STATE); docs/api.md gives
what that costs per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from vfiouser_vmem.vmem._spec import Request, RequestType, Response

if TYPE_CHECKING:
    from vfiouser_vmem.vmem._model import VirtioMemDevice

__all__ = ["PlugPolicy", "allowed_answers"]


class PlugPolicy(Protocol):
    def decide(self, device: VirtioMemDevice, request: Request) -> Response:
        """ACK, NACK (PLUG only) or BUSY for a request the rules accept.
        ``device`` is the model: read it (``requested_size``, ``plugged_size``,
        ``bitmap``), do not change it."""


def allowed_answers(kind: int) -> tuple[Response, ...]:
    """What a policy may answer to a request of ``kind``."""
    if kind == RequestType.PLUG:
        return (Response.ACK, Response.NACK, Response.BUSY)
    return (Response.ACK, Response.BUSY)
