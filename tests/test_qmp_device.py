"""QEMU's own QMP client library (qemu.qmp's QMPClient) against the real
server: a real DeviceServer with a guest played by the protocol-level test
client, resized, queried, watched and fed bad commands over QMP."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import trio

from test_protocol import BAR_ADDR, BLOCK, TIMEOUT, Vmem, vmem, vmem_factory  # noqa: F401 (fixtures)
from virtio_driver import ACK

from vfiouser_vmem.control._qmp import QmpServer
from vfiouser_vmem.server import ControlledVmem

MiB = 1 << 20


async def test_qemu_qmp_client_resizes_a_real_device_with_a_guest_attached(vmem: Vmem) -> None:  # noqa: F811
    from qemu.qmp import ExecuteError, QMPClient

    d, server = vmem.driver, vmem.server
    path = os.path.join(vmem.factory.sock_dir, "qmp")
    qmp_server = QmpServer({server.config.id: ControlledVmem(server)}, event_interval_s=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(qmp_server.serve, path)
        dev = server.config.id

        async def session() -> list[dict[str, Any]]:
            qmp = QMPClient("vfiouser-vmem-test")
            await qmp.connect(path)
            try:
                assert await qmp.execute("qom-set", {"path": dev, "property": "requested-size",
                                                     "value": 512 * MiB}) == {}
                assert await qmp.execute("qom-get", {"path": dev, "property": "requested-size"}) == 512 * MiB
                info = await qmp.execute("query-memory-devices")
                assert info[0]["type"] == "virtio-mem"
                assert info[0]["data"]["memaddr"] == BAR_ADDR and info[0]["data"]["size"] == 0
                # Every error class, each refused with a precise description.
                refusals = [
                    ("qom-set", {"path": dev, "property": "requested-size", "value": 3 * MiB}, "GenericError",
                     "'requested-size' has to be multiples of 'block-size'"),
                    ("qom-set", {"path": dev, "property": "requested-size", "value": "1G"}, "GenericError",
                     "expects uint64"),
                    ("qom-set", {"path": dev, "property": "size", "value": 0}, "GenericError", "is not writable"),
                    ("qom-get", {"path": dev, "property": "nope"}, "GenericError", "not found"),
                    ("qom-get", {"path": "nodev", "property": "size"}, "DeviceNotFound", "nodev"),
                    ("qom-get", {"path": dev}, "GenericError", "property"),
                    ("no-such-command", None, "CommandNotFound", "no-such-command"),
                ]
                for command, args, error_class, text in refusals:
                    with pytest.raises(ExecuteError) as err:
                        await qmp.execute(command, args)
                    assert err.value.error_class == error_class, (command, args)
                    assert text in str(err.value), (command, args, str(err.value))
                assert await qmp.execute("qom-get", {"path": dev, "property": "requested-size"}) == 512 * MiB

                received = []
                with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as listener:
                    # The guest plugs 512 MiB in 8 requests of 64 MiB.
                    for i in range(8):
                        assert trio.from_thread.run(d.plug, BAR_ADDR + i * 32 * BLOCK, 32) == ACK
                    while True:
                        event = await asyncio.wait_for(listener.get(), TIMEOUT)
                        received.append(dict(event))
                        if event["data"]["size"] == 512 * MiB:
                            break
                assert await qmp.execute("qom-get", {"path": dev, "property": "size"}) == 512 * MiB
                summary = await qmp.execute("query-memory-size-summary")
                assert summary == {"base-memory": 0, "plugged-memory": 512 * MiB}
                return received
            finally:
                await qmp.disconnect()

        with trio.fail_after(60):
            events = await trio.to_thread.run_sync(lambda: asyncio.run(session()))
        nursery.cancel_scope.cancel()
    sizes = [e["data"]["size"] for e in events]
    # Rate-limited like QEMU (one per interval per device): the first change
    # at once, the final size always, not one event per request.
    assert sizes[0] == 64 * MiB and sizes[-1] == 512 * MiB
    assert len(sizes) < 8
    assert events[-1]["data"] == {"id": dev, "size": 512 * MiB,
                                  "qom-path": f"/machine/peripheral/{dev}/virtio-backend"}
