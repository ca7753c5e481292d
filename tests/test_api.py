"""The public API for device experiments: plug policies, observers, open_server.

The model-level tests drive ``VirtioMemDevice`` alone; the transport-level
ones use test_fastpath's simulated guest to show that the C request path
honours an installed policy; the server-level ones start a real device on a
vfio-user socket in-process (``open_server``) and talk to it with the
project's protocol client.
"""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
import trio
from test_fastpath import BAR_ADDR, BS, PLUG, STATE, UNPLUG, Guest

import vfiouser_vmem
from vfiouser_vmem import (
    DeviceConfig,
    PluggedSizeChanged,
    PlugPolicy,
    Request,
    RequestedSizeChanged,
    RequestServed,
    RequestType,
    Response,
    VirtioMemDevice,
    open_server,
)
from vfiouser_vmem.vmem import unpack_response

MIB = 1 << 20
BASE = 0x10_0000_0000


class Answer:
    """A policy that answers ``answer`` and remembers what it was asked."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.asked: list[tuple[int, int, int]] = []

    def decide(self, device: VirtioMemDevice, request: Request) -> Response:
        self.asked.append((request.type, request.addr, request.nb_blocks))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer  # type: ignore[return-value]


def model(policy: PlugPolicy | None = None, requested: int = 64 * MIB) -> VirtioMemDevice:
    dev = VirtioMemDevice(region_size_bytes=256 * MIB, block_size_bytes=2 * MIB, requested_size_bytes=requested,
                          policy=policy, name="exp0")
    dev.addr = BASE
    return dev


def ask(dev: VirtioMemDevice, kind: int, block: int = 0, n: int = 1) -> Response:
    return Response(unpack_response(dev.handle_request(Request(kind, BASE + block * 2 * MIB, n).pack()))[0])


def test_the_public_api_is_exported_with_all() -> None:
    for name in vfiouser_vmem.__all__:
        assert hasattr(vfiouser_vmem, name), name
    assert {"open_server", "DeviceConfig", "PlugPolicy", "MemoryBackend", "VmemError", "RequestServed"} \
        <= set(vfiouser_vmem.__all__)


@pytest.mark.parametrize("answer", [Response.NACK, Response.BUSY])
def test_a_policy_refuses_a_plug_before_the_bitmap_changes(answer: Response) -> None:
    policy = Answer(answer)
    dev = model(policy)
    assert ask(dev, RequestType.PLUG, 3, 2) == answer
    assert policy.asked == [(RequestType.PLUG, BASE + 3 * 2 * MIB, 2)]
    assert dev.plugged_size == 0 and dev.bitmap.count_plugged() == 0
    policy.answer = Response.ACK
    assert ask(dev, RequestType.PLUG, 3, 2) == Response.ACK
    assert dev.plugged_size == 4 * MIB


def test_a_policy_is_asked_only_about_requests_the_rules_accept() -> None:
    policy = Answer(Response.ACK)
    dev = model(policy, requested=2 * MIB)
    assert ask(dev, RequestType.PLUG, 0, 2) == Response.NACK  # more than requested: the rules' NACK
    assert ask(dev, RequestType.UNPLUG, 0, 1) == Response.ERROR  # not plugged
    assert ask(dev, RequestType.STATE, 0, 1) == Response.ACK
    assert policy.asked == []
    assert ask(dev, RequestType.PLUG, 0, 1) == Response.ACK
    assert ask(dev, RequestType.UNPLUG, 0, 1) == Response.ACK
    assert ask(dev, RequestType.UNPLUG_ALL) == Response.ACK
    assert [kind for kind, _, _ in policy.asked] == [RequestType.PLUG, RequestType.UNPLUG, RequestType.UNPLUG_ALL]


def test_a_policy_that_keeps_unplugs_busy_keeps_the_memory_plugged() -> None:
    dev = model()
    assert ask(dev, RequestType.PLUG, 0, 2) == Response.ACK
    dev.policy = Answer(Response.BUSY)
    assert ask(dev, RequestType.UNPLUG, 0, 1) == Response.BUSY
    assert ask(dev, RequestType.UNPLUG_ALL) == Response.BUSY
    assert dev.plugged_size == 4 * MIB


@pytest.mark.parametrize("bad", [RuntimeError("policy bug"), Response.ERROR, "ACK", None])
def test_a_policy_exception_or_a_bad_answer_is_busy_logged_and_counted(
        bad: object, caplog: pytest.LogCaptureFixture) -> None:
    dev = model(Answer(bad))
    with caplog.at_level(logging.ERROR, logger="vfiouser_vmem.events"):
        assert ask(dev, RequestType.PLUG) == Response.BUSY
    assert dev.plugged_size == 0
    assert dev.hook_errors["policy"] == 1
    (record,) = [r for r in caplog.records if r.name == "vfiouser_vmem.events"]
    assert record.exc_info is not None and "exp0: policy raised" in record.getMessage()


def test_nack_is_not_an_answer_to_an_unplug() -> None:
    # Linux reads NACK only on PLUG ("more than requested"); on UNPLUG the
    # spec has ACK, BUSY and ERROR, so a policy's NACK there is its bug.
    dev = model()
    assert ask(dev, RequestType.PLUG) == Response.ACK
    dev.policy = Answer(Response.NACK)
    assert ask(dev, RequestType.UNPLUG) == Response.BUSY
    assert dev.hook_errors["policy"] == 1 and dev.plugged_size == 2 * MIB


def test_observers_hear_resizes_and_sizes_and_a_failing_one_is_counted() -> None:
    dev = model(requested=0)
    seen: list[object] = []
    dev.observers.subscribe(seen.append, RequestedSizeChanged, PluggedSizeChanged)

    def broken(event: object) -> None:
        raise ValueError("observer bug")

    unsubscribe = dev.observers.subscribe(broken)
    dev.set_requested_size(8 * MIB)
    assert ask(dev, RequestType.PLUG, 0, 2) == Response.ACK
    assert seen == [RequestedSizeChanged("exp0", 0, 8 * MIB), PluggedSizeChanged("exp0", 4 * MIB)]
    assert dev.hook_errors["observer"] == 2
    unsubscribe()
    dev.set_requested_size(0)
    assert dev.hook_errors["observer"] == 2 and len(seen) == 3


@pytest.mark.parametrize("mode", ["c", "notify"])
def test_the_c_request_path_hands_plugs_and_unplugs_to_an_installed_policy(mode: str) -> None:
    g = Guest(in_c=True, mode=mode)
    policy = Answer(Response.ACK)
    g.device.policy = policy
    g.messages()  # the server re-arms the C paths when a policy is installed (DeviceServer.set_policy)
    g.request(PLUG, BAR_ADDR, 2)
    g.request(STATE, BAR_ADDR, 2)
    g.request(UNPLUG, BAR_ADDR, 1)
    assert g.serve() == 3
    assert [kind for kind, _, _ in policy.asked] == [PLUG, UNPLUG]
    assert g.observed == [(PLUG, Response.ACK), (STATE, Response.ACK), (UNPLUG, Response.ACK)]
    # Only STATE stayed in C (its answer does not depend on the policy).
    assert g.c_served == 1
    g.device.policy = None
    g.messages()
    g.request(UNPLUG, BAR_ADDR + BS, 1)  # (a PLUG would go to Python: a discard is queued)
    g.serve()
    assert len(policy.asked) == 2 and g.c_served == 2
    assert g.device.plugged_size == 0


async def test_open_server_runs_a_device_that_a_client_plugs_and_the_program_observes() -> None:
    from vfio_user_client import VfioUserClient
    from virtio_driver import VirtioMemDriver

    bar_addr = 0x10_0000_0000
    tmp = tempfile.mkdtemp(prefix="vmem-api-")
    sock = os.path.join(tmp, "exp0.sock")
    refusals = Answer(Response.NACK)
    served: list[RequestServed] = []
    try:
        config = DeviceConfig(socket=sock, size_bytes=256 * MIB, id="exp0", policy=refusals)
        async with open_server([config]) as server:
            device = server.devices["exp0"]
            device.subscribe(served.append, RequestServed)
            device.resize(8 * MIB)
            assert device.requested_size == 8 * MIB
            with trio.fail_after(30):
                client = await VfioUserClient.connect(sock)
                driver = VirtioMemDriver(client, bar_addr=bar_addr)
                try:
                    await driver.initialize()
                    assert device.connected
                    assert await driver.plug(bar_addr, 1) == Response.NACK
                    driver.config_irq.fire_count()  # (the resize's interrupt)
                    generation = device.model.requested_size, (await driver.read_config())
                    device.notify_config_change()  # nothing changes, but the guest is told to look
                    assert await driver.config_irq.wait() == 1
                    assert (device.requested_size, await driver.read_config()) == generation
                    device.policy = None
                    assert await driver.plug(bar_addr, 1) == Response.ACK
                    await device.wait_for_plugged_size(2 * MIB)
                finally:
                    driver.close()
                    client.close()
            assert [(e.type, e.response) for e in served] == [(RequestType.PLUG, Response.NACK),
                                                             (RequestType.PLUG, Response.ACK)]
            assert [e.path for e in served] == ["python", "c"]
            assert refusals.asked == [(RequestType.PLUG, bar_addr, 1)]
        assert not os.path.exists(sock)
    finally:
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
