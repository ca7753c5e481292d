"""The human monitor on a UNIX socket, as QEMU's ``-mon chardev=ID,mode=readline``
on a socket chardev behaves (docs/monitor.md).

On connect: the banner ``QEMU 11.1.0 monitor - type 'help' for more
information\\r\\n`` (monitor/hmp.c, monitor_event; the version is the QEMU
release whose QMP we mimic, as in QMP's greeting) and the prompt
``(qemu) ``.  Input goes through QEMU's line editor (util/readline.c),
byte by byte, with its echo: before each byte's redraw the cursor goes back
over what was shown (``ESC [ D`` each), then the whole line and ``ESC [ K``;
then ``ESC [ C``/``ESC [ D`` to where the cursor is.  Enter (``\\r`` or
``\\n``, each) echoes ``\\r\\n``, runs the line and shows the prompt again.
The editor's keys: ^A ^E ^D ^W, backspace (8, 127), ESC [ A/B (history,
64 lines), C/D, 1~ 3~ 4~, ESC O F/H; other bytes below 32 are ignored, the
rest (bytes past 127 too) are inserted, up to 4095 (READLINE_CMD_BUF_SIZE;
QEMU drops the rest as we do).  Tab completes nothing here.  Output's
``\\n`` is sent as ``\\r\\n`` (monitor_puts).

A client that closes its sending side still gets the output of what it
sent; then the server closes.  Clients: up to ``max_clients`` at once (the
QMP limit; QEMU's chardev takes one at a time), the one idle the longest is
closed to make room.  Output waits in a bounded queue (control/_connection);
a client that does not read stops being read, and never blocks the trio
thread.
"""

from __future__ import annotations

import logging

import trio

from vfiouser_vmem.control._connection import DEFAULT_MAX_QUEUED_MESSAGES, Client, ConnectionServer
from vfiouser_vmem.control._hmp import HumanMonitor

__all__ = ["DEFAULT_MAX_MONITOR_CLIENTS", "MonitorServer", "Readline", "banner"]

log = logging.getLogger("vfiouser_vmem.monitor")

DEFAULT_MAX_MONITOR_CLIENTS = 64
#: util/readline.h.
READLINE_CMD_BUF_SIZE = 4095
READLINE_MAX_CMDS = 64
PROMPT = "(qemu) "
_READ_SIZE = 4096
#: Output is handed to the socket in pieces of about this size (a long line's
#: echo grows with the square of its length).
_FLUSH_BYTES = 65536

_NORM, _ESC, _CSI, _SS3 = range(4)


def banner(qemu_version: tuple[int, int, int]) -> str:
    major, minor, micro = qemu_version
    return f"QEMU {major}.{minor}.{micro} monitor - type 'help' for more information\n"


class Readline:
    """util/readline.c's state for one connection.  ``feed(ch)`` takes one
    byte (0-255) and returns the echo (``\\n`` line ends) and the line
    entered, if this byte ended one."""

    def __init__(self) -> None:
        self.buf: list[str] = []
        self.index = 0
        self.last_buf = ""
        self.last_index = 0
        self.esc_state = _NORM
        self.esc_param = 0
        self.history: list[str] = []
        self.hist_entry = -1

    def show_prompt(self) -> str:
        self.last_index = 0
        self.last_buf = ""
        self.esc_state = _NORM
        return PROMPT

    def _insert(self, ch: str) -> None:
        if self.index < READLINE_CMD_BUF_SIZE:
            self.buf.insert(self.index, ch)
            self.index += 1

    def _delete(self) -> None:
        if self.index < len(self.buf):
            del self.buf[self.index]

    def _backword(self) -> None:
        if self.index == 0 or self.index > len(self.buf):
            return
        start = self.index - 1
        while start > 0 and self.buf[start].isspace():
            start -= 1
        while start > 0:
            if self.buf[start] in " \t\n\v\f\r":
                start += 1
                break
            start -= 1
        if start < self.index:
            del self.buf[start:self.index]
            self.index = start

    def _set_line(self, text: str) -> None:
        self.buf = list(text)
        self.index = len(self.buf)

    def _up(self) -> None:
        if self.hist_entry == 0:
            return
        if self.hist_entry == -1:
            self.hist_entry = len(self.history)
        self.hist_entry -= 1
        if self.hist_entry >= 0:
            self._set_line(self.history[self.hist_entry])

    def _down(self) -> None:
        if self.hist_entry == -1:
            return
        if self.hist_entry < READLINE_MAX_CMDS - 1 and self.hist_entry + 1 < len(self.history):
            self.hist_entry += 1
            self._set_line(self.history[self.hist_entry])
        else:
            self.hist_entry = -1
            self._set_line("")

    def _hist_add(self, line: str) -> None:
        if not line:
            return
        if line in self.history:
            self.history.remove(line)
        elif len(self.history) >= READLINE_MAX_CMDS:
            del self.history[0]
        self.history.append(line)
        self.hist_entry = -1

    def _update(self) -> str:
        out = []
        line = "".join(self.buf)
        if line != self.last_buf:
            out.append("\x1b[D" * self.last_index)
            out.append(line)
            out.append("\x1b[K")
            self.last_buf = line
            self.last_index = len(line)
        if self.index != self.last_index:
            delta = self.index - self.last_index
            out.append("\x1b[C" * delta if delta > 0 else "\x1b[D" * -delta)
            self.last_index = self.index
        return "".join(out)

    def feed(self, ch: int) -> tuple[str, str | None]:
        entered = None
        state = self.esc_state
        if state == _NORM:
            if ch == 1:
                self.index = 0
            elif ch == 4:
                self._delete()
            elif ch == 5:
                self.index = len(self.buf)
            elif ch in (10, 13):
                entered = "".join(self.buf)
                self._hist_add(entered)
                self.buf = []
                self.index = 0
                self.last_index = 0
                self.last_buf = ""
                return "\n", entered  # the caller runs it, then show_prompt()
            elif ch == 23:
                self._backword()
            elif ch == 27:
                self.esc_state = _ESC
            elif ch in (8, 127):
                if self.index > 0:
                    self.index -= 1
                    self._delete()
            elif ch == 155:
                self.esc_state = _CSI
            elif ch >= 32:
                self._insert(chr(ch))
        elif state == _ESC:
            if ch == ord("["):
                self.esc_state, self.esc_param = _CSI, 0
            elif ch == ord("O"):
                self.esc_state, self.esc_param = _SS3, 0
            else:
                self.esc_state = _NORM
        elif state == _CSI:
            c = chr(ch)
            if c in "AF":
                self._up()
            elif c in "BE":
                self._down()
            elif c == "D":
                self.index = max(0, self.index - 1)
            elif c == "C":
                self.index = min(len(self.buf), self.index + 1)
            elif c.isdigit() and c.isascii():
                self.esc_param = self.esc_param * 10 + int(c)
                return self._update(), None
            elif c == "~":
                if self.esc_param == 1:
                    self.index = 0
                elif self.esc_param == 3:
                    self._delete()
                elif self.esc_param == 4:
                    self.index = len(self.buf)
            self.esc_state = _NORM
        else:  # _SS3
            if ch == ord("F"):
                self.index = len(self.buf)
            elif ch == ord("H"):
                self.index = 0
            self.esc_state = _NORM
        return self._update(), entered


def _wire(text: str) -> bytes:
    # monitor_puts: "\n" goes out as "\r\n"; our text is bytes as latin-1
    # (what came in, byte for byte).
    return text.replace("\n", "\r\n").encode("latin-1", errors="replace")


class MonitorServer(ConnectionServer):
    """The HMP on a UNIX socket; run it with :meth:`serve` (listening and
    the connections: ConnectionServer)."""

    kind = "monitor"
    log = log

    def __init__(self, monitor: HumanMonitor, *, qemu_version: tuple[int, int, int],
                 max_clients: int = DEFAULT_MAX_MONITOR_CLIENTS,
                 max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be >= 1")
        super().__init__(max_clients=max_clients, max_queued_messages=max_queued_messages)
        self.monitor = monitor
        self.qemu_version = qemu_version

    def _client_connected(self, client: Client) -> None:
        # No capabilities negotiation: a monitor client is in command mode at once.
        client.command_mode = True

    def _evict(self) -> None:
        victim = min(self._connections, key=lambda c: (c.last_input, c.number))
        log.warning("monitor: %d clients connected, the limit: disconnecting client %d (idle %.1f s) "
                    "to serve a new one", len(self._connections), victim.number,
                    trio.current_time() - victim.last_input)
        self._connections.discard(victim)
        victim.broken()

    async def _session(self, client: Client) -> None:
        readline = Readline()
        await client.send(_wire(banner(self.qemu_version) + readline.show_prompt()))
        await self._read_loop(client, readline)

    async def _read_loop(self, client: Client, readline: Readline) -> None:
        while data := await client.receive(_READ_SIZE):
            out: list[str] = []
            size = 0
            for ch in data:
                echo, line = readline.feed(ch)
                out.append(echo)
                size += len(echo)
                if line is not None:
                    try:
                        result = self.monitor.run(line)
                    except Exception as exc:  # a bug: never the connection's end
                        log.exception("monitor client %d: command failed", client.number)
                        result = f"Error: Internal error: {exc}\n"
                    out.append(result + readline.show_prompt())
                    size += len(result)
                    await trio.lowlevel.checkpoint()  # many lines in one read: let the devices run between them
                if size >= _FLUSH_BYTES:
                    await client.send(_wire("".join(out)))
                    out, size = [], 0
            if out:
                await client.send(_wire("".join(out)))
