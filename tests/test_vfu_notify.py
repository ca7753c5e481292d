"""The notify fast path: guest writes to the virtio notify register are
answered in C (csrc/ffi_vfu.py ``vmem_region_fast_notify``), counted, and
taken by ``DeviceServer.serve_requests()`` through ``VfuContext.take_kicks()``;
every other BAR0 access still reaches Python.

The real server is driven over a real vfio-user socket with the fixtures and
helpers of test_protocol.py (its synchronisation rules apply: the reply to
a request sent after a kick means the kick was processed).  Whether an
access reached Python is seen by a spy on the transport's ``bar0_access``.
The C callback's window logic is also called directly, on a context without
a client, so that every boundary case is checked exactly.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from typing import Iterator

import pytest
import trio

from test_protocol import BAR_ADDR, BLOCK, TIMEOUT, Vmem, vmem, vmem_factory  # noqa: F401 (fixtures)
from vfio_user_client import BAR0, VfioUserError
from virtio_driver import ACK, BUSY, COMMON_NUMQ, ERROR, COMMON_STATUS, PLUG, PLUGGED, RESPONSE_SIZE, STATE, request, response
from vfiouser_vmem.virtio import _pci as vp
from vfiouser_vmem._vfu import ffi, lib
from vfiouser_vmem.server import ControlledVmem
from vfiouser_vmem.vfio_user._context import IrqType, PciType, Region, RegionFlag, ResetType, VfuContext

NOTIFY = vp.NOTIFY_OFFSET
NOTIFY_LEN = vp.NOTIFY_OFF_MULTIPLIER * vp.NUM_QUEUES
assert NOTIFY_LEN == 4  # the cases below are written for one 4-byte window


# ---------------------------------------------------------------------------
# helpers


class Bar0Spy:
    """Wraps ``transport.bar0_access``: records (offset, length, is_write)
    of every BAR0 access that reached Python, and delegates."""

    def __init__(self, v: Vmem) -> None:
        self.calls: list[tuple[int, int, bool]] = []
        self._real = v.server.transport.bar0_access

    def __call__(self, offset: int, buf: memoryview, is_write: bool) -> None:
        self.calls.append((offset, len(buf), is_write))
        self._real(offset, buf, is_write)


@pytest.fixture
def spy(vmem: Vmem, monkeypatch: pytest.MonkeyPatch) -> Bar0Spy:  # noqa: F811
    # DeviceServer._bar0_access looks the transport's method up on each call.
    s = Bar0Spy(vmem)
    monkeypatch.setattr(vmem.server.transport, "bar0_access", s)
    return s


def post_plug(v: Vmem, block: int) -> tuple[int, int]:
    """One PLUG of one block, published but not kicked: (head, response address)."""
    d = v.driver
    head, resp_addr = d.prepare(request(PLUG, BAR_ADDR + block * BLOCK, 1))
    d.publish()
    return head, resp_addr


async def assert_served(v: Vmem, head: int, resp_addr: int) -> None:
    assert await v.driver.wait_used(1, timeout=TIMEOUT) == [(head, RESPONSE_SIZE)]
    assert response(v.driver.ram.read(resp_addr, RESPONSE_SIZE))[0] == ACK


async def assert_not_served(v: Vmem, used_before: int) -> None:
    await v.sync()  # the write and any queue work it caused are done
    assert v.driver.used_idx() == used_before
    assert not v.server.transport.kick_pending


# ---------------------------------------------------------------------------
# over a real vfio-user socket


@pytest.mark.parametrize("offset, size", [(NOTIFY, 2), (NOTIFY, 1), (NOTIFY, 4), (NOTIFY + 2, 2), (NOTIFY + 3, 1)])
async def test_notify_write_is_answered_in_c_and_the_request_served(
        vmem: Vmem, spy: Bar0Spy, offset: int, size: int) -> None:  # noqa: F811
    head, resp_addr = post_plug(vmem, 0)
    with trio.fail_after(TIMEOUT):
        await vmem.client.bar_write(BAR0, offset, (0).to_bytes(size, "little"))
    await assert_served(vmem, head, resp_addr)
    assert spy.calls == [], "the notify write reached Python"
    # serve_requests() took the kick, and processing cleared it.
    assert vmem.server.ctx.take_kicks() == 0
    assert not vmem.server.transport.kick_pending
    assert vmem.server.model.bitmap.range_state(0, 1) == PLUGGED


async def test_the_drivers_own_kicks_take_the_fast_path(vmem: Vmem, spy: Bar0Spy) -> None:  # noqa: F811
    """The test driver's usual requests (kick at notify_off * multiplier)."""
    assert await vmem.driver.plug(BAR_ADDR, 2) == ACK
    assert await vmem.driver.state(BAR_ADDR, 2) == (ACK, PLUGGED)
    responses = await vmem.driver.submit_many([request(STATE, BAR_ADDR, 1)] * 3)
    assert [response(r) for r in responses] == [(ACK, PLUGGED)] * 3
    assert spy.calls == [], "a notify write reached Python"
    # A status read, for comparison, does reach it.
    await vmem.sync()
    assert spy.calls == [(COMMON_STATUS, 1, False)]


async def test_reads_and_other_bar0_registers_still_reach_python(vmem: Vmem, spy: Bar0Spy) -> None:  # noqa: F811
    c = vmem.client
    # A read of the notify register: answered by Python, with zeros.
    assert await c.bar_read(BAR0, NOTIFY, 2) == b"\0\0"
    assert spy.calls == [(NOTIFY, 2, False)]
    # Common config.
    assert await c.bar_read_int(BAR0, COMMON_NUMQ, 2) == vp.NUM_QUEUES
    assert spy.calls[-1] == (COMMON_NUMQ, 2, False)
    # Writes just outside the window are no notify: Python refuses them
    # (no register there) and nothing is kicked.
    used_before = vmem.driver.used_idx()
    post_plug(vmem, 0)
    for offset, size in ((NOTIFY - 2, 2), (NOTIFY + NOTIFY_LEN, 2), (0x3800, 4)):
        with pytest.raises(VfioUserError) as exc:
            await c.bar_write(BAR0, offset, bytes(size))
        assert exc.value.errno == errno.EINVAL
        assert spy.calls[-1] == (offset, size, True)
        await vmem.assert_alive()
    await assert_not_served(vmem, used_before)
    assert vmem.server.ctx.take_kicks() == 0
    # The server carries on: a real kick serves the PLUG posted above.
    await vmem.driver.kick()
    assert len(await vmem.driver.wait_used(1)) == 1
    assert vmem.server.model.plugged_size == BLOCK


async def test_notify_write_of_odd_size_goes_to_python_and_kicks(vmem: Vmem, spy: Bar0Spy) -> None:  # noqa: F811
    """3 bytes inside the window: not the fast path's, Python kicks as before."""
    head, resp_addr = post_plug(vmem, 0)
    await vmem.client.bar_write(BAR0, NOTIFY, b"\0\0\0")
    await assert_served(vmem, head, resp_addr)
    assert spy.calls == [(NOTIFY, 3, True)]


@pytest.mark.parametrize("offset, size", [(NOTIFY, 8), (NOTIFY + 2, 4), (NOTIFY + 3, 2), (NOTIFY - 1, 2)])
async def test_notify_write_straddling_the_window_is_refused_by_python(
        vmem: Vmem, spy: Bar0Spy, offset: int, size: int) -> None:  # noqa: F811
    used_before = vmem.driver.used_idx()
    post_plug(vmem, 0)
    with pytest.raises(VfioUserError) as exc:
        await vmem.client.bar_write(BAR0, offset, bytes(size))
    assert exc.value.errno == errno.EINVAL
    assert spy.calls == [(offset, size, True)]
    await assert_not_served(vmem, used_before)
    await vmem.assert_alive()
    await vmem.driver.kick()
    assert len(await vmem.driver.wait_used(1)) == 1


async def test_kick_while_requests_are_held_stays_pending(vmem: Vmem, spy: Bar0Spy) -> None:  # noqa: F811
    controlled = ControlledVmem(vmem.server)
    controlled.qom_set("x-hold-requests", True)
    used_before = vmem.driver.used_idx()
    head, resp_addr = post_plug(vmem, 0)
    assert controlled.qom_get("x-requests-pending") is False
    await vmem.driver.kick()
    await vmem.sync()
    assert controlled.qom_get("x-requests-pending") is True
    assert vmem.driver.used_idx() == used_before
    # Another message batch (no kick) does not lose it.
    await vmem.sync()
    assert controlled.qom_get("x-requests-pending") is True
    controlled.qom_set("x-hold-requests", False)
    await assert_served(vmem, head, resp_addr)
    assert controlled.qom_get("x-requests-pending") is False
    assert not [c for c in spy.calls if c[0] >= NOTIFY]


# ---------------------------------------------------------------------------
# VfuContext on its own (no client): the C callback called directly


@pytest.fixture
def sock_path() -> Iterator[str]:
    sock_dir = tempfile.mkdtemp(prefix="vmem-", dir="/tmp")  # socket paths < 107 bytes
    try:
        yield os.path.join(sock_dir, "ctx.sock")
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []
        self.refuse = False

    def __call__(self, offset: int, buf: memoryview, is_write: bool) -> None:
        self.calls.append((offset, len(buf), is_write))
        if self.refuse:
            raise ValueError("refused by the test")
        if not is_write:
            buf[:] = b"\xab" * len(buf)


@pytest.fixture
def ctx(sock_path: str) -> Iterator[VfuContext]:
    with VfuContext(sock_path) as c:
        c.pci_init(PciType.CONVENTIONAL)
        yield c


def fast_notify_ctx(ctx: VfuContext, window: tuple[int, int] = (NOTIFY, NOTIFY_LEN)) -> Recorder:
    rec = Recorder()
    ctx.setup_region(Region.BAR0, vp.BAR0_SIZE, rec, RegionFlag.RW | RegionFlag.MEM, fast_notify=window)
    return rec


def c_access(ctx: VfuContext, offset: int, count: int, is_write: bool) -> tuple[int, bytes]:
    """What libvfio-user does for a BAR0 access: call the region callback."""
    buf = ffi.new("char[]", max(count, 1))
    ret = lib.vmem_region_fast_notify(ctx._ctx, buf, count, offset, is_write)
    return ret, ffi.buffer(buf, count)[:]


@pytest.mark.parametrize(
    "offset, count, is_write, fast",
    [
        (NOTIFY, 1, True, True),
        (NOTIFY, 2, True, True),
        (NOTIFY, 4, True, True),
        (NOTIFY + 2, 2, True, True),
        (NOTIFY + 3, 1, True, True),
        (NOTIFY, 4, False, False),  # reads: Python
        (NOTIFY, 3, True, False),  # odd size
        (NOTIFY, 8, True, False),  # larger than the window
        (NOTIFY, 0, True, False),  # empty
        (NOTIFY + 1, 4, True, False),  # straddles the end
        (NOTIFY + 3, 2, True, False),
        (NOTIFY + 4, 1, True, False),  # just after
        (NOTIFY - 1, 1, True, False),  # just before
        (NOTIFY - 2, 4, True, False),  # straddles the start
        (0, 4, True, False),  # common config
        (-1, 1, True, False),  # an offset above 2**63 as loff_t
    ],
)
def test_c_callback_window(ctx: VfuContext, offset: int, count: int, is_write: bool, fast: bool) -> None:
    rec = fast_notify_ctx(ctx)
    ret, data = c_access(ctx, offset, count, is_write)
    assert ret == count
    if fast:
        assert rec.calls == []
        assert ctx.take_kicks() == 1
    else:
        assert rec.calls == [(offset, count, is_write)]
        assert ctx.take_kicks() == 0
        if not is_write:
            assert data == b"\xab" * count


def test_refused_access_is_refused_through_the_c_callback(ctx: VfuContext) -> None:
    rec = fast_notify_ctx(ctx)
    rec.refuse = True
    ret, _ = c_access(ctx, NOTIFY + 2, 4, True)
    assert ret == -1 and ffi.errno == errno.EINVAL
    assert rec.calls == [(NOTIFY + 2, 4, True)]
    assert ctx.take_kicks() == 0


def test_take_kicks_counts_and_resets(ctx: VfuContext) -> None:
    fast_notify_ctx(ctx)
    assert ctx.take_kicks() == 0
    for _ in range(5):
        assert c_access(ctx, NOTIFY, 2, True)[0] == 2
    c_access(ctx, NOTIFY, 2, False)  # a read is no kick
    assert ctx.take_kicks() == 5
    assert ctx.take_kicks() == 0
    c_access(ctx, NOTIFY + 3, 1, True)
    assert ctx.take_kicks() == 1
    assert ctx.take_kicks() == 0


def test_a_reset_drops_the_kicks_counted_before_it(ctx: VfuContext) -> None:
    fast_notify_ctx(ctx)
    seen: list[ResetType] = []
    ctx.on_reset = seen.append
    c_access(ctx, NOTIFY, 2, True)
    c_access(ctx, NOTIFY, 2, True)
    assert lib.vfu_py_reset(ctx._ctx, lib.VFU_RESET_DEVICE) == 0
    assert seen == [ResetType.DEVICE]
    c_access(ctx, NOTIFY, 2, True)  # after the reset: kept
    assert ctx.take_kicks() == 1


def test_without_fast_notify_notify_writes_reach_python(ctx: VfuContext) -> None:
    rec = Recorder()
    ctx.setup_region(Region.BAR0, vp.BAR0_SIZE, rec, RegionFlag.RW | RegionFlag.MEM)
    # The C callback is not the region's; the window is empty: nothing is fast.
    ret, _ = c_access(ctx, NOTIFY, 2, True)
    assert ret == 2 and rec.calls == [(NOTIFY, 2, True)]
    assert ctx.take_kicks() == 0


@pytest.mark.parametrize(
    "window",
    [
        (NOTIFY, 0),  # empty
        (NOTIFY, -4),
        (-4, 4),
        (vp.BAR0_SIZE, 4),  # beyond the region
        (vp.BAR0_SIZE - 2, 4),  # straddles its end
        (0, vp.BAR0_SIZE + 1),
    ],
)
def test_bad_fast_notify_windows_are_refused(ctx: VfuContext, window: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="fast_notify window"):
        fast_notify_ctx(ctx, window)
    # Nothing was recorded: a good window is still accepted afterwards.
    fast_notify_ctx(ctx)
    assert c_access(ctx, NOTIFY, 2, True)[0] == 2 and ctx.take_kicks() == 1


def test_the_whole_region_may_be_the_window(ctx: VfuContext) -> None:
    rec = fast_notify_ctx(ctx, (0, vp.BAR0_SIZE))
    assert c_access(ctx, vp.BAR0_SIZE - 4, 4, True)[0] == 4
    assert c_access(ctx, vp.BAR0_SIZE - 2, 4, True)[0] == 4  # beyond the region: Python
    assert ctx.take_kicks() == 1 and rec.calls == [(vp.BAR0_SIZE - 2, 4, True)]


def test_fast_notify_on_another_region_is_refused(ctx: VfuContext) -> None:
    with pytest.raises(ValueError, match="BAR0 only"):
        ctx.setup_region(Region.BAR1, vp.BAR1_SIZE, Recorder(), RegionFlag.RW | RegionFlag.MEM, fast_notify=(0, 4))


def test_a_second_fast_notify_window_is_refused(ctx: VfuContext) -> None:
    fast_notify_ctx(ctx)
    with pytest.raises(ValueError, match="already set up on BAR0"):
        fast_notify_ctx(ctx, (0, 4))
    # The first window is unchanged.
    assert c_access(ctx, NOTIFY, 4, True)[0] == 4 and ctx.take_kicks() == 1
    assert c_access(ctx, 0, 4, True)[0] == 4 and ctx.take_kicks() == 0


def test_a_region_declared_again_without_the_window_forgets_it(ctx: VfuContext) -> None:
    fast_notify_ctx(ctx)
    rec = Recorder()
    ctx.setup_region(Region.BAR0, vp.BAR0_SIZE, rec, RegionFlag.RW | RegionFlag.MEM)
    assert c_access(ctx, NOTIFY, 2, True)[0] == 2
    assert rec.calls == [(NOTIFY, 2, True)] and ctx.take_kicks() == 0
    fast_notify_ctx(ctx)  # and it may have one again


def test_fast_notify_needs_an_access_callback(ctx: VfuContext) -> None:
    with pytest.raises(ValueError, match="access callback"):
        ctx.setup_region(Region.BAR0, vp.BAR0_SIZE, None, RegionFlag.RW | RegionFlag.MEM,
                         fast_notify=(NOTIFY, NOTIFY_LEN))


async def test_the_device_server_uses_the_fast_path(vmem: Vmem) -> None:  # noqa: F811
    private = vmem.server.ctx._private
    assert (private.notify_region, private.notify_offset, private.notify_length) == (Region.BAR0, NOTIFY, NOTIFY_LEN)


# ---------------------------------------------------------------------------
# The notify serve: the device's C request path called inside the write
# (VfuContext.set_notify_serve; csrc/vmem_queue.h vmem_serve_on_notify).


class ServeSpy:
    """A C-callable notify serve (a cffi callback): records its calls and
    returns what the test says."""

    def __init__(self, vector: int = -1, need_python: bool = False) -> None:
        self.calls = 0
        self.vector = vector
        self.need_python = need_python

        def serve(arg, need_python_out):
            self.calls += 1
            need_python_out[0] = int(self.need_python)
            return self.vector

        self._cb = ffi.callback("vmem_notify_serve_fn", serve)
        self.address = int(ffi.cast("uintptr_t", self._cb))


def serve_ctx(ctx: VfuContext, serve: ServeSpy) -> Recorder:
    rec = fast_notify_ctx(ctx)
    ctx.set_notify_serve(serve.address, 0)
    return rec


def test_an_armed_notify_is_served_once_and_not_counted(ctx: VfuContext) -> None:
    serve = ServeSpy()
    rec = serve_ctx(ctx, serve)
    assert not ctx.notify_armed  # set_notify_serve leaves it disarmed
    c_access(ctx, NOTIFY, 2, True)
    assert serve.calls == 0 and ctx.take_kicks() == 1
    ctx.notify_armed = True
    assert ctx.notify_armed
    assert c_access(ctx, NOTIFY, 2, True)[0] == 2
    assert serve.calls == 1 and ctx.take_kicks() == 0
    # One call per arming: the next notify is a kick again.
    assert not ctx.notify_armed
    c_access(ctx, NOTIFY, 2, True)
    assert serve.calls == 1 and ctx.take_kicks() == 1
    assert rec.calls == []


def test_a_notify_serve_that_needs_python_also_counts_a_kick(ctx: VfuContext) -> None:
    serve = ServeSpy(need_python=True)
    serve_ctx(ctx, serve)
    ctx.notify_armed = True
    c_access(ctx, NOTIFY + 3, 1, True)
    assert serve.calls == 1 and ctx.take_kicks() == 1


def test_a_vector_that_cannot_be_triggered_is_reported_once(ctx: VfuContext) -> None:
    """Without a client no eventfd exists: vfu_irq_trigger fails in C, and
    the error waits for the server to log it."""
    serve = ServeSpy(vector=1)
    serve_ctx(ctx, serve)
    ctx.setup_irqs(IrqType.MSIX, 2)
    ctx.realize()  # allocates the eventfd table (lib/irq.c), all -1
    assert ctx.take_notify_irq_error() is None
    ctx.notify_armed = True
    assert c_access(ctx, NOTIFY, 2, True)[0] == 2  # the write is still answered
    assert serve.calls == 1 and ctx.take_kicks() == 0
    vector, err = ctx.take_notify_irq_error()
    assert vector == 1 and err != 0
    assert ctx.take_notify_irq_error() is None


def _dma_info(iova: int, length: int):
    info = ffi.new("vfu_dma_info_t *")
    info.iova.iov_base = ffi.cast("void *", iova)
    info.iova.iov_len = length
    return info


@pytest.mark.parametrize("python_callback", ["region access", "other region", "reset", "dma map", "dma unmap"])
def test_every_python_callback_disarms_the_notify_serve(ctx: VfuContext, python_callback: str) -> None:
    """Python may change what the serve relies on (the queue, the BAR, the
    mappings); the device re-arms it after looking."""
    serve = ServeSpy()
    serve_ctx(ctx, serve)
    ctx.setup_region(Region.BAR1, 0x1000, Recorder(), RegionFlag.RW | RegionFlag.MEM)
    ctx.notify_armed = True
    buf = ffi.new("char[]", 4)
    if python_callback == "region access":
        c_access(ctx, 0, 4, True)  # common config, through the C callback
    elif python_callback == "other region":
        assert lib.vfu_py_region1(ctx._ctx, buf, 4, 0, False) == 4
    elif python_callback == "reset":
        assert lib.vfu_py_reset(ctx._ctx, lib.VFU_RESET_DEVICE) == 0
    elif python_callback == "dma map":
        lib.vfu_py_dma_register(ctx._ctx, _dma_info(0x1000_0000, 0x1000))
    else:
        lib.vfu_py_dma_unregister(ctx._ctx, _dma_info(0x1000_0000, 0x1000))
    assert not ctx.notify_armed
    c_access(ctx, NOTIFY, 2, True)
    assert serve.calls == 0 and ctx.take_kicks() == 1


def test_notify_serve_needs_a_window_and_a_function(ctx: VfuContext) -> None:
    with pytest.raises(ValueError, match="fast_notify window"):
        ctx.set_notify_serve(ServeSpy().address, 0)
    fast_notify_ctx(ctx)
    ctx.notify_armed = True  # no function yet: stays disarmed
    assert not ctx.notify_armed
    c_access(ctx, NOTIFY, 2, True)
    assert ctx.take_kicks() == 1


def test_declaring_the_region_again_without_the_window_drops_the_serve(ctx: VfuContext) -> None:
    serve = ServeSpy()
    serve_ctx(ctx, serve)
    ctx.notify_armed = True
    rec = Recorder()
    ctx.setup_region(Region.BAR0, vp.BAR0_SIZE, rec, RegionFlag.RW | RegionFlag.MEM)
    assert not ctx.notify_armed
    ctx.notify_armed = True
    assert not ctx.notify_armed
    with pytest.raises(ValueError, match="fast_notify window"):
        ctx.set_notify_serve(serve.address, 0)


# -- the device server: requests answered inside the notify write --------------


class TriggerSpy:
    """Wraps the transport's Python-side MSI-X trigger."""

    def __init__(self, v: Vmem) -> None:
        self.vectors: list[int] = []
        self._real = v.server.transport.trigger

    def __call__(self, vector: int) -> None:
        self.vectors.append(vector)
        self._real(vector)


@pytest.fixture
def served_in_notify(vmem: Vmem, monkeypatch: pytest.MonkeyPatch) -> list[int]:  # noqa: F811
    """How many requests each vfio-user message's notify write served."""
    counts: list[int] = []
    real = vmem.server.transport.take_notify_served

    def spy() -> int:
        n = real()
        if n:
            counts.append(n)
        return n

    monkeypatch.setattr(vmem.server.transport, "take_notify_served", spy)
    return counts


async def test_requests_are_answered_inside_the_notify_write(
        vmem: Vmem, spy: Bar0Spy, served_in_notify: list[int], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    trigger = TriggerSpy(vmem)
    monkeypatch.setattr(vmem.server.transport, "trigger", trigger)
    d = vmem.driver
    assert await d.plug(BAR_ADDR, 2) == ACK
    responses = await d.submit_many([request(STATE, BAR_ADDR, 2), request(PLUG, BAR_ADDR + 4 * BLOCK, 1)])
    assert [response(r) for r in responses] == [(ACK, PLUGGED), (ACK, 0)]
    assert served_in_notify == [1, 2]
    # The interrupts were raised in C (the driver waited on the eventfd).
    assert trigger.vectors == []
    assert spy.calls == []
    assert vmem.server.model.plugged_size == 3 * BLOCK
    assert vmem.server.transport.isr & 1


async def test_a_refusal_in_the_batch_is_answered_by_python_with_one_interrupt(
        vmem: Vmem, served_in_notify: list[int], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    trigger = TriggerSpy(vmem)
    monkeypatch.setattr(vmem.server.transport, "trigger", trigger)
    d = vmem.driver
    responses = await d.submit_many([
        request(PLUG, BAR_ADDR, 1),
        request(PLUG, BAR_ADDR + BLOCK // 2, 1),  # misaligned: ERROR, from Python
        request(PLUG, BAR_ADDR + BLOCK, 1),
    ])
    assert [response(r)[0] for r in responses] == [ACK, ERROR, ACK]
    assert served_in_notify == [1]  # then the notify stopped for Python
    assert trigger.vectors == [1]  # Python's one interrupt answers all three
    assert vmem.server.model.plugged_size == 2 * BLOCK


async def test_a_discard_failure_between_two_notifies_makes_the_next_unplug_busy(
        vmem: Vmem, served_in_notify: list[int]) -> None:  # noqa: F811
    """The failure comes from the discard worker, with no vfio-user message
    in between: the server disarms the C answer to UNPLUG right then
    (DiscardQueue.on_failure_change), or it would be ACKed."""
    d, server = vmem.driver, vmem.server
    server.discards.retry_initial_s = 3600
    assert await d.plug(BAR_ADDR, 2) == ACK
    server.fail_discards = 1000
    assert await d.unplug(BAR_ADDR, 1) == ACK
    assert server.ctx.notify_armed
    with trio.fail_after(TIMEOUT):
        while server.discards.failure is None:
            await trio.sleep(0.001)  # the worker thread's failure
    assert await d.unplug(BAR_ADDR + BLOCK, 1) == BUSY
    assert server.model.plugged_size == BLOCK
    assert served_in_notify == [1, 1]  # the PLUG and the first UNPLUG
