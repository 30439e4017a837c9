"""A minimal asynchronous RFB 3.8 (VNC) client for the tests and the bench.

No Python library speaks RFB over a WebSocket, which is what websockify (and so the browser's
noVNC) offers, so vmgate carries this small client. It lives in ``console/`` because the bench
uses it at run time, and ``bench/`` imports nothing from ``tests/``. It talks either to a WebSocket
URL (through websockify; one binary message carries any number of RFB bytes, with no relation to
message boundaries) or to a raw stream (QEMU's VNC unix socket or a TCP host and port).

What it does: the 3.8 handshake with security type None (vmgate's VNC servers listen on a unix
socket and have no password, or websockify answers a fleet VM's password: console/proxy.py), a
shared ClientInit, ServerInit, a 32-bit true-colour pixel format, the Raw and DesktopSize encodings,
full and incremental update requests, key events.
A background task reads server messages as they come and applies every FramebufferUpdate to
``framebuffer``, so a timed-out wait never leaves the byte stream half-parsed.

websockify 0.13 needs no WebSocket subprotocol (it answers ``binary`` only for old clients
that ask for it), so none is sent unless the caller passes ``protocols``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence
from typing import Protocol

import aiohttp

ENCODING_RAW = 0
ENCODING_DESKTOP_SIZE = -223

SECURITY_NONE = 1

# X keysyms of the keys type_text needs beyond printable ASCII (whose keysym is its code point).
XK_BACKSPACE = 0xFF08
XK_TAB = 0xFF09
XK_RETURN = 0xFF0D
XK_ESCAPE = 0xFF1B
XK_SHIFT_L = 0xFFE1

# Characters typed with Shift held on a US keyboard. QEMU (without the QEMU extended key event,
# which this client does not ask for) turns a keysym into a scancode through its en-us keymap and
# never presses Shift for the client: a bare '|' reaches the guest as '\\', and a bare 'A' makes
# QEMU toggle the guest's Caps Lock around an unshifted 'a' (its lock-key sync). Holding Shift gives
# the guest exactly what a person typing would. tests/test_console_proxy.py checks both.
SHIFTED = frozenset('ABCDEFGHIJKLMNOPQRSTUVWXYZ~!@#$%^&*()_+{}|:"<>?')

_SPECIAL_KEYSYMS = {"\n": XK_RETURN, "\r": XK_RETURN, "\t": XK_TAB, "\b": XK_BACKSPACE, "\x1b": XK_ESCAPE}

# 32 bits per pixel, depth 24, little-endian, true colour, 8 bits a channel: bytes B, G, R, pad.
_PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
_BPP = 4


class RFBError(Exception):
    """The server broke the protocol, refused the handshake, or the connection failed."""


class RFBClosed(RFBError):
    """The connection closed."""


class _Transport(Protocol):
    async def recv(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class _StreamTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def recv(self) -> bytes:
        data = await self._reader.read(65536)
        if not data:
            raise RFBClosed("the server closed the connection")
        return data

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class _WebSocketTransport:
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self.ws = ws

    async def recv(self) -> bytes:
        msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            raise RFBClosed(f"the WebSocket closed (code {self.ws.close_code})")
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise RFBClosed(f"the WebSocket failed: {self.ws.exception()!r}")
        raise RFBError(f"unexpected WebSocket message of type {msg.type!r}")

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self) -> None:
        try:
            await self.ws.close()
        finally:
            await self._session.close()


class RFBClient:
    """One RFB session. Build it with ``connect_ws``, ``connect_unix``, ``connect_socket`` or ``connect_tcp``."""

    def __init__(self, transport: _Transport) -> None:
        self._transport = transport
        self._buf = bytearray()
        self._reader_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._error: Exception | None = None
        self._request_mark = 0
        self.width = 0
        self.height = 0
        self.name = ""
        self.framebuffer = bytearray()
        #: Number of FramebufferUpdate messages applied so far.
        self.update_count = 0
        self.resize_count = 0
        self.bell_count = 0
        self.cut_text: list[bytes] = []

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    async def connect_ws(
        cls,
        url: str,
        *,
        handshake_timeout: float = 10.0,
        protocols: Sequence[str] = (),
        origin: str | None = None,
    ) -> RFBClient:
        """Open a WebSocket to ``url`` and run the RFB handshake through it.

        A refused WebSocket handshake raises aiohttp's own exception unchanged (the tests assert
        exactly what websockify does); an RFB failure raises ``RFBError``.
        """
        session = aiohttp.ClientSession()
        try:
            headers = {"Origin": origin} if origin else None
            async with asyncio.timeout(handshake_timeout):
                ws = await session.ws_connect(
                    url,
                    protocols=tuple(protocols),
                    headers=headers,
                    timeout=aiohttp.ClientWSTimeout(ws_close=handshake_timeout),
                    max_msg_size=0,
                    autoping=True,
                )
        except BaseException:
            await session.close()
            raise
        return await cls._start(_WebSocketTransport(session, ws), handshake_timeout)

    @classmethod
    async def connect_unix(cls, path: str, *, handshake_timeout: float = 10.0) -> RFBClient:
        """Connect straight to a VNC server's unix socket (QEMU's ``-vnc unix:PATH``)."""
        async with asyncio.timeout(handshake_timeout):
            reader, writer = await asyncio.open_unix_connection(path)
        return await cls._start(_StreamTransport(reader, writer), handshake_timeout)

    @classmethod
    async def connect_socket(cls, sock: socket.socket, *, handshake_timeout: float = 10.0) -> RFBClient:
        """Connect over a stream socket that is already connected (one end of a socketpair, say)."""
        async with asyncio.timeout(handshake_timeout):
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        return await cls._start(_StreamTransport(reader, writer), handshake_timeout)

    @classmethod
    async def connect_tcp(cls, host: str, port: int, *, handshake_timeout: float = 10.0) -> RFBClient:
        """Connect straight to a VNC server's TCP port."""
        async with asyncio.timeout(handshake_timeout):
            reader, writer = await asyncio.open_connection(host, port)
        return await cls._start(_StreamTransport(reader, writer), handshake_timeout)

    @classmethod
    async def _start(cls, transport: _Transport, handshake_timeout: float) -> RFBClient:
        client = cls(transport)
        try:
            async with asyncio.timeout(handshake_timeout):
                await client._handshake()
        except BaseException:
            await transport.close()
            raise
        return client

    async def __aenter__(self) -> RFBClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- protocol ---------------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += await self._transport.recv()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def _read_reason(self) -> str:
        (length,) = struct.unpack(">I", await self._read(4))
        return (await self._read(length)).decode("utf-8", "replace")

    async def _handshake(self) -> None:
        version = await self._read(12)
        if not version.startswith(b"RFB ") or not version.endswith(b"\n"):
            raise RFBError(f"not an RFB server: {version!r}")
        major, minor = (int(part) for part in version[4:11].split(b"."))
        if (major, minor) < (3, 8):
            raise RFBError(f"server speaks RFB {major}.{minor}; this client needs 3.8")
        await self._transport.send(b"RFB 003.008\n")

        (count,) = await self._read(1)
        if count == 0:
            raise RFBError(f"server refused the connection: {await self._read_reason()}")
        types = await self._read(count)
        if SECURITY_NONE not in types:
            raise RFBError(f"server offers security types {list(types)}, not None (1)")
        await self._transport.send(bytes([SECURITY_NONE]))
        (result,) = struct.unpack(">I", await self._read(4))
        if result != 0:
            raise RFBError(f"security handshake failed: {await self._read_reason()}")

        await self._transport.send(b"\x01")  # ClientInit: shared session
        self.width, self.height = struct.unpack(">HH", await self._read(4))
        await self._read(16)  # the server's pixel format; ours replaces it below
        (name_len,) = struct.unpack(">I", await self._read(4))
        self.name = (await self._read(name_len)).decode("utf-8", "replace")
        self.framebuffer = bytearray(self.width * self.height * _BPP)

        await self._transport.send(b"\x00\x00\x00\x00" + _PIXEL_FORMAT)
        encodings = (ENCODING_RAW, ENCODING_DESKTOP_SIZE)
        await self._transport.send(
            struct.pack(">BxH", 2, len(encodings)) + struct.pack(f">{len(encodings)}i", *encodings)
        )
        self._reader_task = asyncio.create_task(self._read_loop(), name="rfb-reader")

    async def _read_loop(self) -> None:
        try:
            while True:
                (msg_type,) = await self._read(1)
                if msg_type == 0:
                    await self._read_framebuffer_update()
                elif msg_type == 1:  # SetColourMapEntries: unused with a true-colour format
                    _first, count = struct.unpack(">xHH", await self._read(5))
                    await self._read(6 * count)
                elif msg_type == 2:  # Bell
                    self.bell_count += 1
                elif msg_type == 3:  # ServerCutText
                    (length,) = struct.unpack(">3xI", await self._read(7))
                    self.cut_text.append(await self._read(length))
                else:
                    raise RFBError(f"unknown server message type {msg_type}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to whoever waits next
            self._error = exc
            async with self._changed:
                self._changed.notify_all()

    async def _read_framebuffer_update(self) -> None:
        (rects,) = struct.unpack(">xH", await self._read(3))
        for _ in range(rects):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self._read(12))
            if encoding == ENCODING_RAW:
                self._apply_raw(x, y, w, h, await self._read(w * h * _BPP))
            elif encoding == ENCODING_DESKTOP_SIZE:
                self.width, self.height = w, h
                self.framebuffer = bytearray(w * h * _BPP)
                self.resize_count += 1
            else:
                raise RFBError(f"server sent encoding {encoding}, which was not asked for")
        async with self._changed:
            self.update_count += 1
            self._changed.notify_all()

    def _apply_raw(self, x: int, y: int, w: int, h: int, data: bytes) -> None:
        if x + w > self.width or y + h > self.height:
            raise RFBError(f"rectangle {w}x{h}+{x}+{y} outside the {self.width}x{self.height} screen")
        row = w * _BPP
        stride = self.width * _BPP
        for i in range(h):
            start = (y + i) * stride + x * _BPP
            self.framebuffer[start : start + row] = data[i * row : (i + 1) * row]

    # -- requests ---------------------------------------------------------------------------

    async def request_update(self, incremental: bool = False) -> int:
        """Ask for the whole screen (``incremental``: only what changed); return the update count
        at the time of asking, which ``wait_for_update`` waits past by default."""
        self._check()
        self._request_mark = self.update_count
        await self._transport.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))
        return self._request_mark

    async def wait_for_update(self, timeout: float = 10.0, *, since: int | None = None) -> int:
        """Wait until a FramebufferUpdate has been applied after the last ``request_update``
        (or after update number ``since``); return the new update count.

        Raises ``TimeoutError`` if none arrives in time, ``RFBError`` if the connection broke."""
        mark = self._request_mark if since is None else since

        def ready() -> bool:
            return self.update_count > mark or self._error is not None

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(ready)
        if self.update_count <= mark:
            self._check()
        return self.update_count

    async def key_event(self, keysym: int, down: bool) -> None:
        """Send one KeyEvent."""
        self._check()
        await self._transport.send(struct.pack(">BBxxI", 4, int(down), keysym))

    async def key(self, keysym: int) -> None:
        """Press and release one key."""
        await self.key_event(keysym, True)
        await self.key_event(keysym, False)

    async def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        """Send one PointerEvent (``buttons`` is the mask: 1 left, 2 middle, 4 right)."""
        self._check()
        await self._transport.send(struct.pack(">BBHH", 5, buttons, x, y))

    async def type_text(self, text: str) -> None:
        """Type ASCII text as a US keyboard would, holding Shift where that keyboard needs it."""
        for char in text:
            if char in _SPECIAL_KEYSYMS:
                await self.key(_SPECIAL_KEYSYMS[char])
            elif " " <= char <= "~":
                if char in SHIFTED:
                    await self.key_event(XK_SHIFT_L, True)
                    await self.key(ord(char))
                    await self.key_event(XK_SHIFT_L, False)
                else:
                    await self.key(ord(char))
            else:
                raise ValueError(f"type_text types ASCII only, not {char!r}")

    def _check(self) -> None:
        if self._error is not None:
            if isinstance(self._error, RFBError):
                raise self._error
            raise RFBClosed(f"the connection broke: {self._error!r}") from self._error

    # -- the picture --------------------------------------------------------------------------

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        """Return the (red, green, blue) of one pixel."""
        i = (y * self.width + x) * _BPP
        b, g, r = self.framebuffer[i : i + 3]
        return r, g, b

    def is_blank(self) -> bool:
        """True when every pixel has the same colour (the padding byte is ignored)."""
        if not self.framebuffer:
            return True
        # Every pixel is one colour exactly when each channel is constant across the screen.
        for channel in range(3):
            plane = self.framebuffer[channel::_BPP]
            if plane.count(plane[0]) != len(plane):
                return False
        return True

    def snapshot(self) -> bytes:
        """Return a copy of the framebuffer (rows of B, G, R, pad bytes)."""
        return bytes(self.framebuffer)

    async def close(self) -> None:
        """Stop reading and close the connection."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        await self._transport.close()
