"""A second look at the screen shortly after each key or pointer event (docs/CONSOLE.md, "How fast a key shows").

QEMU's VNC server finds a guest's drawing on its display refresh timer. While the screen stands still it
stretches that timer (30 ms, plus 50 ms per quiet tick, up to 3 s), and any client message of type 4 or
above (a key, the pointer, ...) sets it back to 30 ms counted from the last tick: after a pause that tick
runs at once, before the guest has echoed the key, and finding nothing it stretches the timer to 80 ms. The
echo showed 80 ms after the key.

A client that has just connected waits the same way: QEMU's first tick comes while the client is still
in its handshake, sends nothing and stretches the timer, and the request for the whole screen that follows
(type 3, which does not set the timer back) was answered 80 ms later.

So this proxy sends QEMU one more message ``NUDGE_DELAY`` after the client's last input (a key, the
pointer, or a request for the whole screen, which noVNC sends when it connects and after a resize): QEMU's
extended key event (type 255, 0) releasing key code 0. Key code 0 is no key, and QEMU drops the release of
a key that is not down before the guest sees anything (ui/kbd-state.c). (A plain KeyEvent of an unmapped
keysym would do the same, but QEMU 7.2 prints "no scancode found for keysym" on its stderr each time, which
the local driver keeps as the VM's stderr.log: it would grow with every key typed. The extended event
skips the keymap as long as QEMU has no -k layout, which no VM job gives it.) But it is a message of
type 4 or above, so the timer is set back again and its next tick
comes 30 ms after the one that found nothing, when the echo is on the screen. It sends it again every
``NUDGE_EVERY`` until ``NUDGE_WINDOW`` after the last input, for what a guest draws later (a command's
output, a slower desktop): for that long the timer stays at 30 ms, as a second display that asks for 30 ms
held it for every VM all the time before. tests/test_console_nudge.py checks both sides: the message is
sent, and the guest gets no key from it.

A message can only go in between two of the client's, so ``ClientStream`` follows the client's side of
RFB (RFC 6143, and QEMU's own messages) from the first byte. Anything it does not know (another security
type, a message type QEMU does not take either) ends the nudging for that connection; the bytes still pass.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

NUDGE_DELAY = 0.015  # seconds after the client's last input; shorter than QEMU's 30 ms base interval
NUDGE_EVERY = 0.03  # then again at QEMU's base interval (a slower guest's drawing, a command's output) ...
NUDGE_WINDOW = 0.3  # ... until this long after the last input
RETRY = 0.002  # seconds, when the nudge is due in the middle of a message
NUDGE = struct.pack(">BBHII", 255, 0, 0, 0, 0)  # QEMU extended key event: released, keysym 0, key code 0

# Client message types QEMU's VNC server takes (ui/vnc.c protocol_client_msg) and their fixed lengths;
# None: the length is in the message.
SET_PIXEL_FORMAT, SET_ENCODINGS, UPDATE_REQUEST, KEY, POINTER, CUT_TEXT = 0, 2, 3, 4, 5, 6
XVP, SET_DESKTOP_SIZE, QEMU = 250, 251, 255
FIXED = {SET_PIXEL_FORMAT: 20, UPDATE_REQUEST: 10, KEY: 8, POINTER: 6, XVP: 4}
INPUT = (KEY, POINTER)
QEMU_EXT_KEY, QEMU_AUDIO = 0, 1
HEAD = 16  # bytes of a message kept until it is whole: the longest handshake step, the longest it takes to tell


def message_length(head: bytes) -> int | None:
    """The whole length of the client message that ``head`` starts, once ``head`` holds enough of it to
    tell; 0 when it does not yet. None for a message this module does not know."""
    kind = head[0]
    if kind in FIXED:
        return FIXED[kind]
    if kind == SET_ENCODINGS:
        return 4 + 4 * struct.unpack(">H", head[2:4])[0] if len(head) >= 4 else 0
    if kind == CUT_TEXT:  # a negative length is the extended clipboard's: the same number of bytes
        return 8 + abs(struct.unpack(">i", head[4:8])[0]) if len(head) >= 8 else 0
    if kind == SET_DESKTOP_SIZE:
        return 8 + 16 * head[6] if len(head) >= 7 else 0
    if kind == QEMU:
        if len(head) < 2:
            return 0
        if head[1] == QEMU_EXT_KEY:
            return 12
        if head[1] == QEMU_AUDIO:  # enable, disable: 4; set format: 10
            return (10 if struct.unpack(">H", head[2:4])[0] == 2 else 4) if len(head) >= 4 else 0
    return None


class ClientStream:
    """The client's side of one RFB connection, fed as it is sent: where its messages begin and end. It
    keeps at most a message's first ``HEAD`` bytes: the rest of a long one (a paste) is only counted."""

    def __init__(self) -> None:
        self._buffer = b""  # the start of a message not yet whole (short ones whole)
        self._skip = 0  # bytes of a long message still to come, counted, not kept
        self._state = "version"  # ... "messages"; "lost": something this does not know came, no more nudges

    @property
    def lost(self) -> bool:
        return self._state == "lost"

    @property
    def between_messages(self) -> bool:
        """True when everything fed so far ends with a whole message (a place for one more)."""
        return self._state == "messages" and not self._buffer and not self._skip

    def feed(self, data: bytes) -> bool:
        """Take bytes the client sent; True when they end at least one message to nudge after: a key, the
        pointer, or a request for the whole screen (a new connection's first, a resize's)."""
        if self.lost:
            return False
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        buffer, start, saw_input = self._buffer + data, 0, False
        while start < len(buffer):
            length = self._next_length(buffer[start:start + HEAD])
            if length is None:
                self._state = "lost"
                break
            if length == 0 or len(buffer) - start < length:
                if length > HEAD:  # a long message's head: count the rest instead of keeping it
                    self._skip = length - (len(buffer) - start)
                    start = len(buffer)
                break
            unit = buffer[start:start + min(length, HEAD)]
            if self._state == "messages":
                saw_input |= (unit[0] in INPUT or (unit[0] == QEMU and unit[1] == QEMU_EXT_KEY)
                              or (unit[0] == UPDATE_REQUEST and unit[1] == 0))
            self._advance(unit)
            start += length
        self._buffer = b"" if self.lost else buffer[start:]
        return saw_input

    def _next_length(self, head: bytes) -> int | None:
        if self._state == "version":  # "RFB 003.008\n"; 3.3 lets the server pick the security: not followed
            return 12
        if self._state in ("security", "init"):
            return 1
        if self._state == "auth":  # VNC authentication's DES response
            return 16
        return message_length(head)

    def _advance(self, unit: bytes) -> None:
        if self._state == "version":
            self._state = "security" if unit in (b"RFB 003.007\n", b"RFB 003.008\n") else "lost"
        elif self._state == "security":
            self._state = {1: "init", 2: "auth"}.get(unit[0], "lost")
        elif self._state == "auth":
            self._state = "init"
        elif self._state == "init":
            self._state = "messages"


class NudgingSocket:
    """The proxy's socket to QEMU: what the client sends goes through as it is; ``delay`` after a key or
    pointer event, and then every ``every`` until ``window`` after the last one, ``NUDGE`` goes too, each
    time the stream is between two messages. Everything else (recv, fileno for select, close) is the
    socket's own."""

    def __init__(self, sock: socket.socket, delay: float = NUDGE_DELAY, every: float = NUDGE_EVERY,
                 window: float = NUDGE_WINDOW) -> None:
        self._sock = sock
        self._delay, self._every, self._window = delay, every, window
        self._stream = ClientStream()
        self._cond = threading.Condition()
        self._last_input = 0.0
        self._due: float | None = None
        self._closed = False
        self.nudges = 0
        self._thread = threading.Thread(target=self._run, name="vnc-nudge", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def send(self, data: bytes) -> int:
        with self._cond:
            sent = self._sock.send(data)
            self._took(data[:sent])
            return sent

    def sendall(self, data: bytes) -> None:
        with self._cond:
            self._sock.sendall(data)
            self._took(data)

    def _took(self, data: bytes) -> None:
        if self._stream.feed(data):
            self._last_input = time.monotonic()
            self._due = self._last_input + self._delay
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._due is None:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if now < self._due:
                    self._cond.wait(self._due - now)
                    continue
                if not self._stream.between_messages:  # a message half sent: once it is through
                    self._due = None if self._stream.lost else now + RETRY
                    continue
                try:  # never wait on QEMU here: this holds the lock the relaying thread's sends take
                    sent = self._sock.send(NUDGE, socket.MSG_DONTWAIT)
                    if sent < len(NUDGE):  # the socket's buffer all but full: finish it before anything else
                        self._sock.sendall(NUDGE[sent:])
                    self.nudges += 1
                except BlockingIOError:  # full: nothing went, the stream is as it was; this one is skipped
                    pass
                except OSError:
                    return
                self._due = now + self._every if now + self._every <= self._last_input + self._window else None
