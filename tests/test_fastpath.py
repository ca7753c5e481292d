"""The C request path (csrc/vmem_queue.c) against Python's (virtqueue.py +
device.py): same guest-visible answers, same device state, same discards.

A guest is simulated in a bytearray: descriptor table, avail and used rings
and request buffers, reached by the transport through GuestMemory as the
server's DMA mappings are.  Each scenario runs with ``transport.serve_in_c``
and without, and everything the guest or the host can observe is compared.
The C side runs in two modes: "c", the C path called by process_queue after
the vfio-user message; and "notify", the C path called inside the notify
write (``vmem_serve_on_notify``, as csrc/ffi_vfu.py calls it while the
server keeps it armed), then ``serve_kicks`` as DeviceServer.serve_requests
does.
"""

from __future__ import annotations

import random
import struct

import pytest

from vfiouser_vmem._blocks import ffi as blocks_ffi, lib as blocks_lib
from vfiouser_vmem.vmem import MIB, DiscardFailed, HostMemory, RequestServed, RequestType, Response, VirtioMemDevice
from vfiouser_vmem.virtio._pci import (
    PCI_MSIX_FLAGS_ENABLE,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VirtioPciTransport,
)

BS = 2 * MIB
REGION = 64 * BS
BAR_ADDR = 0x40_0000_0000
RAM_IOVA = 0x1_0000_0000
RAM_BYTES = 1 << 20
QSIZE = 64
DESC, AVAIL, USED, BUFS = 0x0000, 0x1000, 0x2000, 0x4000
MSIX_CAP = 0x40
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

PLUG, UNPLUG, UNPLUG_ALL, STATE = (int(t) for t in RequestType)


class DiscardQueueModel(HostMemory):
    """The server's contract (server.py, discard.py) in miniature: discards
    are queued; a PLUG claims its range out of the queue; while ``refusing``,
    discards raise DiscardFailed and UNPLUG is answered BUSY."""

    def __init__(self) -> None:
        self.queued: set[int] = set()  # block offsets (bytes)
        self.calls: list[tuple[str, int, int]] = []
        self.refusing = False

    def discard(self, offset: int, length: int) -> None:
        if self.refusing:
            raise DiscardFailed("injected")
        self.calls.append(("discard", offset, length))
        self.queued.update(range(offset, offset + length, BS))

    def claim(self, offset: int, length: int) -> None:
        self.queued.difference_update(range(offset, offset + length, BS))

    def claim_due(self) -> bool:
        return bool(self.queued)

    def discard_refused(self) -> bool:
        return self.refusing


class Guest:
    """A driver writing chains into simulated guest RAM, and the device
    (transport + model) serving them through GuestMemory."""

    def __init__(self, *, in_c: bool, requested: int = REGION, split_ram: bool = False, mode: str = "c") -> None:
        self.mode = mode if in_c else "python"
        self.ram = bytearray(RAM_BYTES)
        self.discards = DiscardQueueModel()
        self.device = VirtioMemDevice(
            region_size_bytes=REGION, block_size_bytes=BS, requested_size_bytes=requested,
            host_memory=self.discards,
        )
        self.sizes: list[int] = []
        self.device.size_listeners.append(self.sizes.append)
        cfg = bytearray(256)
        struct.pack_into("<II", cfg, 0x10 + 4 * 2, BAR_ADDR & 0xFFFFFFFF | 0xC, BAR_ADDR >> 32)
        struct.pack_into("<H", cfg, MSIX_CAP + 2, PCI_MSIX_FLAGS_ENABLE)
        self.interrupts: list[int] = []
        self.transport = VirtioPciTransport(
            self.device, config_space=lambda: memoryview(cfg), trigger=self.interrupts.append,
            msix_cap_offset=MSIX_CAP,
        )
        self.transport.serve_in_c = in_c
        self.observed: list[tuple[int, int]] = []
        self.device.observers.subscribe(lambda e: self.observed.append((e.request.type, int(e.response))),
                                        RequestServed)
        self.c_served = 0
        c_served = self.device.c_requests_served

        def count(served, n):
            self.c_served += n
            c_served(served, n)

        self.device.c_requests_served = count
        view = memoryview(self.ram)
        if split_ram:
            # Two adjacent mappings: chains may straddle them (Python's path).
            half = RAM_BYTES // 2
            self.transport.memory.add(RAM_IOVA, half, view[:half])
            self.transport.memory.add(RAM_IOVA + half, half, view[half:])
        else:
            self.transport.memory.add(RAM_IOVA, RAM_BYTES, view)
        q = self.transport.queue
        q.size, q.enabled, q.msix_vector = QSIZE, True, 1
        q.desc_addr, q.driver_addr, q.device_addr = RAM_IOVA + DESC, RAM_IOVA + AVAIL, RAM_IOVA + USED
        self.transport.status = VIRTIO_CONFIG_S_DRIVER_OK
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0
        self.next_buf = 0
        self.armed = False
        self.in_notify = 0  # requests served inside a notify write
        self.need_python = blocks_ffi.new("int *")
        self.messages()

    def messages(self) -> None:
        """vfio-user messages went through Python (the set-up, a DMA map, a
        queue register): the binding disarmed the notify serve, and the
        server armed it again afterwards (DeviceServer.update_notify_serve)."""
        if self.mode == "notify":
            self.armed = self.transport.arm_c_paths()[0]

    def _desc(self, addr: int, length: int, flags: int) -> int:
        i = self.next_desc
        self.next_desc = (i + 1) % QSIZE
        struct.pack_into("<QIHH", self.ram, DESC + 16 * i, addr, length, flags, (i + 1) % QSIZE)
        return i

    def _buf(self, length: int) -> int:
        if self.next_buf + length > RAM_BYTES - BUFS:
            self.next_buf = 0
        off = BUFS + self.next_buf
        self.next_buf += (length + 15) & ~15
        return off

    def post(self, parts: list[tuple[bytes | int, int]]) -> None:
        """One chain: (request bytes, flags) for readable parts, (length,
        flags | F_WRITE) for writable ones; F_NEXT is added as needed."""
        head = None
        for n, (data, flags) in enumerate(parts):
            length = data if isinstance(data, int) else len(data)
            off = self._buf(max(length, 1))
            if not isinstance(data, int):
                self.ram[off:off + length] = data
            else:
                self.ram[off:off + length] = b"\xee" * length  # stale bytes the device must overwrite
            i = self._desc(RAM_IOVA + off, length, flags | (F_NEXT if n < len(parts) - 1 else 0))
            head = i if head is None else head
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)

    def request(self, type_: int, addr: int, nb_blocks: int, *, layout: str = "plain") -> None:
        req = struct.pack("<H6xQH6x", type_, addr, nb_blocks)
        if layout == "plain":
            self.post([(req, 0), (10, F_WRITE)])
        elif layout == "split":  # request and response each in two descriptors
            self.post([(req[:5], 0), (req[5:], 0), (3, F_WRITE), (7, F_WRITE)])
        elif layout == "short_request":
            self.post([(req[:20], 0), (10, F_WRITE)])
        elif layout == "short_response":
            self.post([(req, 0), (8, F_WRITE)])
        elif layout == "indirect":
            self.post([(req, F_INDIRECT), (10, F_WRITE)])
        elif layout == "read_after_write":
            self.post([(10, F_WRITE), (req, 0)])
        elif layout == "long_response":
            self.post([(req, 0), (64, F_WRITE)])
        else:
            raise AssertionError(layout)

    def serve(self) -> int:
        """The driver's notify, then the server after the message."""
        t = self.transport
        if self.mode != "notify":
            t.kick_pending = True
            return t.process_queue()
        kicked = True
        if self.armed:
            # What vmem_region_fast_notify does with an armed serve.
            self.armed = False
            vector = blocks_lib.vmem_serve_on_notify(blocks_ffi.cast("void *", t.handler.native.notify_arg_address),
                                                     self.need_python)
            if vector >= 0:
                self.interrupts.append(vector)
            kicked = bool(self.need_python[0])
            self.in_notify += t.handler.native.notify_state.nr_served
        answered = t.serve_kicks(kicked)
        self.messages()
        return answered

    def refuse_discards(self, refusing: bool) -> None:
        """The discard worker's failure (or recovery): the server re-arms
        (DiscardQueue.on_failure_change)."""
        if refusing != self.discards.refusing:
            self.discards.refusing = refusing
            self.messages()

    def snapshot(self) -> dict:
        t, d = self.transport, self.device
        return {
            "ram": bytes(self.ram),
            "used_idx": t.queue.used_idx,
            "last_avail_idx": t.queue.last_avail_idx,
            "bitmap": [d.bitmap.range_state(i, 1) for i in range(d.bitmap.nb_blocks)],
            "plugged_size": d.plugged_size,
            "usable_region_size": d.usable_region_size,
            "requested_size": d.requested_size,
            "discard_calls": list(self.discards.calls),
            "queued": sorted(self.discards.queued),
            "sizes": list(self.sizes),
            "interrupts": list(self.interrupts),
            "observed": list(self.observed),
            "broken": t.broken_reason,
            "status": t.status,
        }


C_MODE = {"mode": "c"}


@pytest.fixture(autouse=True, params=["c", "notify"])
def c_mode(request: pytest.FixtureRequest) -> str:
    C_MODE["mode"] = request.param
    return request.param


def both(**kwargs) -> tuple[Guest, Guest]:
    return Guest(in_c=True, mode=C_MODE["mode"], **kwargs), Guest(in_c=False, **kwargs)


def same(c: Guest, py: Guest) -> None:
    a, b = c.snapshot(), py.snapshot()
    for key in a:
        assert a[key] == b[key], f"{key} differs between the C and the Python path"


def used(guest: Guest) -> list[tuple[int, int]]:
    """(head, bytes written) of each new used element."""
    out = []
    while guest.used_seen != guest.transport.queue.used_idx:
        head, written = struct.unpack_from("<II", guest.ram, USED + 4 + 8 * (guest.used_seen % QSIZE))
        out.append((head, written))
        guest.used_seen = (guest.used_seen + 1) & 0xFFFF
    return out


def test_accepted_requests_are_served_in_c_with_the_same_answers():
    c, py = both()
    for g in (c, py):
        g.request(PLUG, BAR_ADDR, 4)
        g.request(STATE, BAR_ADDR, 4)
        g.request(STATE, BAR_ADDR + 2 * BS, 4)  # mixed
        g.request(UNPLUG, BAR_ADDR + BS, 1)
        g.request(STATE, BAR_ADDR + 8 * BS, 2)
        assert g.serve() == 5
    same(c, py)
    assert c.c_served == 5 and py.c_served == 0
    assert c.in_notify == (5 if c.mode == "notify" else 0)
    assert c.observed == [(PLUG, 0), (STATE, 0), (STATE, 0), (UNPLUG, 0), (STATE, 0)]
    assert c.device.plugged_size == 3 * BS
    assert c.discards.calls == [("discard", BS, BS)]
    assert c.interrupts == [1]  # one interrupt for the batch
    assert c.sizes == [3 * BS]  # one size event, after it
    assert [w for _, w in used(c)] == [10] * 5


def test_refusals_and_nack_go_to_python_and_the_rest_stays_in_c():
    c, py = both(requested=4 * BS)
    for g in (c, py):
        g.request(PLUG, BAR_ADDR, 2)
        g.request(PLUG, BAR_ADDR, 1)  # already plugged: ERROR
        g.request(PLUG, BAR_ADDR + 2 * BS, 4)  # above requested: NACK
        g.request(PLUG, BAR_ADDR + BS // 2, 1)  # misaligned: ERROR
        g.request(UNPLUG, BAR_ADDR + 8 * BS, 1)  # not plugged: ERROR
        g.request(PLUG, BAR_ADDR + 2 * BS, 2)
        g.request(UNPLUG_ALL, 0, 0)
        g.request(STATE, BAR_ADDR, 4)
        g.serve()
    same(c, py)
    assert [code for _, code in c.observed] == [
        Response.ACK, Response.ERROR, Response.NACK, Response.ERROR, Response.ERROR, Response.ACK, Response.ACK,
        Response.ACK,
    ]
    assert c.c_served == 3  # the two ACKed PLUGs and the STATE after UNPLUG_ALL


def test_a_plug_after_an_unplug_of_the_same_range_in_one_batch_claims_its_discard():
    """The C path answers the UNPLUG; the PLUG of the same blocks right
    behind it must not be plugged before Python queued that discard, or the
    hole would be punched into plugged memory."""
    c, py = both()
    for g in (c, py):
        g.request(PLUG, BAR_ADDR, 2)
        g.serve()
        g.request(UNPLUG, BAR_ADDR, 2)
        g.request(PLUG, BAR_ADDR, 2)
        g.serve()
    same(c, py)
    assert c.discards.calls == [("discard", 0, 2 * BS)]
    assert c.discards.queued == set()  # claimed back by the PLUG
    assert c.device.plugged_size == 2 * BS
    assert c.c_served == 2  # the first PLUG and the UNPLUG; the second PLUG went to Python


def test_unplug_while_discards_are_refused_is_busy_from_python():
    c, py = both()
    for g in (c, py):
        g.request(PLUG, BAR_ADDR, 2)
        g.serve()
        g.refuse_discards(True)
        g.request(UNPLUG, BAR_ADDR, 1)
        g.serve()
    same(c, py)
    assert c.observed[-1] == (UNPLUG, Response.BUSY)
    assert c.c_served == 1


@pytest.mark.parametrize(
    "layout, served_in_c",
    [("split", 1), ("long_response", 1), ("short_request", 0), ("short_response", 0), ("indirect", 0),
     ("read_after_write", 0)],
)
def test_chain_layouts(layout, served_in_c):
    """Requests and responses spread over descriptors are served in C; the
    chains that break the rules go to Python, which stops the queue with the
    same reason either way."""
    c, py = both()
    for g in (c, py):
        g.request(PLUG, BAR_ADDR, 1, layout=layout)
        g.request(STATE, BAR_ADDR, 1)
        g.serve()
    same(c, py)
    assert c.c_served == served_in_c + (1 if served_in_c else 0)
    if not served_in_c:
        assert c.transport.broken_reason


def test_chains_straddling_two_mappings_are_served_in_python_alike():
    c, py = both(split_ram=True)
    for g in (c, py):
        # Buffers right at the boundary of the two mappings.
        g.next_buf = RAM_BYTES // 2 - BUFS - 8
        g.request(PLUG, BAR_ADDR, 1)
        g.request(PLUG, BAR_ADDR + BS, 1)
        g.serve()
    same(c, py)
    assert c.device.plugged_size == 2 * BS
    assert c.c_served == 1  # the second chain lies in one mapping


def _unmap_ram(g: Guest) -> None:
    g.request(PLUG, BAR_ADDR, 1)
    g.transport.memory.remove(RAM_IOVA, RAM_BYTES)
    g.transport.memory.add(RAM_IOVA, RAM_BYTES, None, "shared memory missing")
    g.messages()


def _avail_too_far_ahead(g: Guest) -> None:
    struct.pack_into("<H", g.ram, AVAIL + 2, QSIZE + 1)


def _descriptors_wrap_past_2_64(g: Guest) -> None:
    # Guest memory at address 0 as well: descriptor 2 of a table at
    # 2^64 - 32 would be there if the address wrapped.
    low = bytearray(4096)
    # A well-formed PLUG there: the C path would serve it if it wrapped.
    struct.pack_into("<QIHH", low, 0, RAM_IOVA + BUFS, 24, F_NEXT, 3)
    struct.pack_into("<QIHH", low, 16, RAM_IOVA + BUFS + 32, 10, F_WRITE, 0)
    g.ram[BUFS:BUFS + 24] = struct.pack("<H6xQH6x", PLUG, BAR_ADDR, 1)
    g.low_ram = low
    g.transport.memory.add(0, len(low), memoryview(low))
    g.transport.queue.desc_addr = (1 << 64) - 32
    struct.pack_into("<H", g.ram, AVAIL + 4, 2)
    g.avail_idx = 1
    struct.pack_into("<H", g.ram, AVAIL + 2, 1)
    g.messages()


@pytest.mark.parametrize("breakage, why", [(_unmap_ram, "shared memory missing"), (_avail_too_far_ahead, "ahead"),
                                           (_descriptors_wrap_past_2_64, "0x10000000000000000 is not in any DMA mapping")])
def test_broken_rings_stop_the_queue_alike(breakage, why):
    c, py = both()
    for g in (c, py):
        breakage(g)
        g.serve()
    same(c, py)
    assert why in c.transport.broken_reason


def test_no_interrupt_flag_is_honoured_after_the_c_path():
    c, py = both()
    for g in (c, py):
        struct.pack_into("<H", g.ram, AVAIL, 1)  # VRING_AVAIL_F_NO_INTERRUPT
        g.request(PLUG, BAR_ADDR, 1)
        g.serve()
        struct.pack_into("<H", g.ram, AVAIL, 0)
        g.request(PLUG, BAR_ADDR + BS, 1)
        g.serve()
    same(c, py)
    assert c.interrupts == [1] and c.c_served == 2


def test_a_full_batch_is_served_in_several_calls():
    """More requests than the served[] array holds (VMEM_SERVE_FULL)."""
    c, py = both()
    native = c.transport.handler.native
    native._served = blocks_ffi.new("struct vmem_served[]", 2)
    native.notify_state.max_served = 2  # the first two of served[]
    for g in (c, py):
        # Exactly as many as fit: the notify write stops for Python, which
        # finds the queue empty and still owes the guest the interrupt.
        g.request(PLUG, BAR_ADDR + 10 * BS, 1)
        g.request(PLUG, BAR_ADDR + 11 * BS, 1)
        assert g.serve() == 2
        for i in range(7):
            g.request(PLUG, BAR_ADDR + i * BS, 1)
        assert g.serve() == 7
    same(c, py)
    assert c.c_served == 9
    assert c.interrupts == [1, 1]
    assert c.in_notify == (4 if c.mode == "notify" else 0)


@pytest.mark.parametrize("seed", range(12))
def test_random_request_streams_agree(seed):
    rng = random.Random(seed)
    c, py = both(requested=rng.choice([8, 32, 64]) * BS, split_ram=seed % 3 == 0)
    layouts = ["plain"] * 12 + ["split", "long_response", "short_response", "indirect"]
    for _batch in range(60):
        refusing = rng.random() < 0.15
        drained = rng.random() < 0.7  # the discard worker caught up
        no_interrupt = int(rng.random() < 0.2)
        requested = rng.randrange(0, REGION // BS + 1) * BS if rng.random() < 0.1 else None
        n = rng.randrange(1, 9)
        ops = []
        for _ in range(n):
            kind = rng.choices([PLUG, UNPLUG, STATE, UNPLUG_ALL, 7], weights=[10, 8, 4, 1, 0.3])[0]
            block = rng.randrange(0, 72)
            addr = BAR_ADDR + block * BS + (rng.choice([0, 4096]) if rng.random() < 0.05 else 0)
            if rng.random() < 0.03:
                addr = rng.choice([0, (1 << 64) - BS, BAR_ADDR - BS])
            nb = rng.choice([0, 1, 1, 2, 3, 8]) if rng.random() > 0.01 else 0xFFFF
            layout = rng.choice(layouts) if rng.random() < 0.05 else "plain"
            ops.append((kind, addr, nb, layout))
        for g in (c, py):
            g.refuse_discards(refusing)
            struct.pack_into("<H", g.ram, AVAIL, no_interrupt)  # VRING_AVAIL_F_NO_INTERRUPT or 0
            if drained:
                g.discards.queued.clear()
            if requested is not None:
                g.device.set_requested_size(requested)
            for kind, addr, nb, layout in ops:
                g.request(kind, addr, nb, layout=layout)
            g.serve()
            if g.transport.broken_reason:
                # The driver resets the device (virtio spec 2.1.2) and sets
                # the queue up again.
                g.transport.virtio_reset()
                q = g.transport.queue
                q.size, q.enabled, q.msix_vector = QSIZE, True, 1
                q.desc_addr, q.driver_addr, q.device_addr = RAM_IOVA + DESC, RAM_IOVA + AVAIL, RAM_IOVA + USED
                g.transport.status = VIRTIO_CONFIG_S_DRIVER_OK
                g.avail_idx = 0
                struct.pack_into("<HH", g.ram, AVAIL, 0, 0)
                struct.pack_into("<HH", g.ram, USED, 0, 0)
                g.messages()
        same(c, py)
    acks = sum(1 for _, code in c.observed if code == Response.ACK)
    assert c.c_served > 0.5 * acks, "the C path served too little to be tested"
    if c.mode == "notify":
        assert c.in_notify > 0.1 * acks, "too little was served inside the notify write to be tested"
    assert 0 < len(c.interrupts) < 60, "interrupts were always or never suppressed: untested"


def test_a_system_reset_drops_requests_served_in_a_notify_but_not_booked():
    """The connection broke in the vfu_run_ctx that served them: the reset
    unplugs and discards everything, and the next client's first message
    must not book them (a discard, a size event, an owed interrupt)."""
    g = Guest(in_c=True, mode="notify")
    g.request(PLUG, BAR_ADDR, 2)
    g.serve()
    g.request(UNPLUG, BAR_ADDR, 1)
    vector = blocks_lib.vmem_serve_on_notify(blocks_ffi.cast("void *", g.transport.handler.native.notify_arg_address),
                                             g.need_python)
    assert vector == 1 and g.transport.handler.native.notify_state.nr_served == 1
    g.transport.system_reset()
    assert g.transport.handler.native.notify_state.nr_served == 0
    assert g.transport.take_notify_served() == 0
    assert g.device.plugged_size == 0
