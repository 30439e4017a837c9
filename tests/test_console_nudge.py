"""The console proxy's nudge (console/nudge.py): after a key or pointer event it sends QEMU an extended key
event releasing key code 0, which sets QEMU's display refresh timer back to 30 ms and reaches no guest.

The stream follower and the socket are checked on their own (a socketpair stands in for QEMU's socket: what
is looked at is the bytes the proxy writes), then through a real websockify to real QEMUs that trace both
the extended key events they receive (``vnc_key_event_ext``) and the keys they hand the guest
(``ps2_keyboard_event``)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import Iterator

import pytest
import redis

from console.nudge import NUDGE, ClientStream, NudgingSocket
from console.rfb import RFBClient
from jobspecs.vnc_password import SECRET_ID, new_password
from tests.fixtures.websockify import WebsockifyServer
from tests.test_console_proxy import (
    QCODE,
    Vm,
    eventually,
    issue,
    key_events,
    publish,
    start_vm,
    stop_vm,
    url_for,
    wait_until_shown,
)
from tests.test_console_vnc_auth import free_display, publish_tcp

HANDSHAKE = b"RFB 003.008\n" + bytes([1]) + bytes([1])  # version, security None, ClientInit (shared)
ENCODINGS = struct.pack(">BxHii", 2, 2, 0, -223)  # SetEncodings: raw, DesktopSize
UPDATE = struct.pack(">BBHHHH", 3, 1, 0, 0, 720, 400)
FULL_UPDATE = struct.pack(">BBHHHH", 3, 0, 0, 0, 720, 400)
KEY_DOWN = struct.pack(">BBxxI", 4, 1, ord("x"))
POINTER = struct.pack(">BBHH", 5, 0, 10, 10)


def key_after_handshake() -> ClientStream:
    stream = ClientStream()
    assert stream.feed(HANDSHAKE + ENCODINGS + UPDATE) is False
    assert stream.between_messages
    return stream


def test_the_stream_finds_input_messages_whole() -> None:
    stream = key_after_handshake()
    assert stream.feed(KEY_DOWN[:3]) is False
    assert not stream.between_messages  # half a key event: no place for the nudge
    assert stream.feed(KEY_DOWN[3:]) is True
    assert stream.between_messages
    assert stream.feed(POINTER + UPDATE) is True
    assert stream.feed(UPDATE) is False  # an incremental update request: what noVNC always has outstanding
    assert stream.feed(FULL_UPDATE) is True  # the whole screen (a new connection, a resize): nudged after too


@pytest.mark.parametrize("message", [
    struct.pack(">Bxxx", 0) + bytes(16),  # SetPixelFormat
    struct.pack(">BxxxI", 6, 5) + b"hello",  # ClientCutText
    struct.pack(">Bxxxi", 6, -6) + bytes(6),  # ClientCutText, extended clipboard (negative length)
    struct.pack(">BxHHBx", 251, 720, 400, 2) + bytes(32),  # SetDesktopSize, two screens
    struct.pack(">BBHII", 255, 0, 1, 0, 30),  # QEMU extended key event
    struct.pack(">BBH", 255, 1, 0),  # QEMU audio: enable
    struct.pack(">BBHBBI", 255, 1, 2, 0, 2, 44100),  # QEMU audio: set format
    struct.pack(">BxBB", 250, 1, 2),  # XVP
], ids=["pixel-format", "cut-text", "cut-text-extended", "desktop-size", "ext-key", "audio", "audio-format",
        "xvp"])
def test_the_stream_knows_the_length_of_every_message_qemu_takes(message: bytes) -> None:
    stream = key_after_handshake()
    assert stream.feed(message) is (message[:2] == b"\xff\x00")  # only the extended key event is input
    assert stream.between_messages
    assert stream.feed(KEY_DOWN) is True  # still in step: the next message is read as one


def test_a_long_paste_is_counted_across_sends() -> None:
    stream = key_after_handshake()
    text = b"y" * 100_000
    paste = struct.pack(">BxxxI", 6, len(text)) + text
    assert stream.feed(paste[:5000]) is False
    for start in range(5000, len(paste) - 10, 4096):
        stream.feed(paste[start:min(start + 4096, len(paste) - 10)])
        assert not stream.between_messages  # still inside the paste
    assert stream.feed(paste[len(paste) - 10:] + KEY_DOWN) is True  # its end and a key in one send
    assert stream.between_messages


def test_many_messages_in_one_send() -> None:
    stream = key_after_handshake()
    assert stream.feed(POINTER * 50_000 + UPDATE[:3]) is True
    assert not stream.between_messages
    assert stream.feed(UPDATE[3:]) is False and stream.between_messages


def test_the_stream_follows_vnc_authentication() -> None:
    stream = ClientStream()
    assert stream.feed(b"RFB 003.008\n" + bytes([2]) + bytes(16) + bytes([1])) is False
    assert stream.feed(POINTER) is True


@pytest.mark.parametrize("start", [
    b"RFB 003.003\n",  # 3.3: the server picks the security type, and the client's next bytes are not known
    b"RFB 003.008\n" + bytes([19]),  # VeNCrypt
    HANDSHAKE + bytes([7, 0, 0, 0]),  # a message type QEMU does not take either
], ids=["rfb-3.3", "vencrypt", "unknown-message"])
def test_what_the_stream_does_not_know_ends_the_nudging(start: bytes) -> None:
    stream = ClientStream()
    stream.feed(start)
    assert stream.lost and not stream.between_messages
    assert stream.feed(KEY_DOWN) is False


@pytest.fixture
def pair() -> Iterator[tuple[NudgingSocket, socket.socket]]:
    """A NudgingSocket that nudges once per input (no window), and QEMU's end of its socket."""
    proxy_side, qemu_side = socket.socketpair()
    qemu_side.settimeout(5)
    nudging = NudgingSocket(proxy_side, window=0)
    yield nudging, qemu_side
    nudging.stop()
    proxy_side.close()
    qemu_side.close()


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "the proxy's side closed"
        data += chunk
    return data


def nothing_more(sock: socket.socket, wait: float = 0.3) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(64) == b""
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)


def read_until_quiet(sock: socket.socket, quiet: float) -> bytes:
    """Everything that comes until nothing has come for ``quiet`` seconds."""
    data = b""
    sock.settimeout(quiet)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        pass
    finally:
        sock.settimeout(5)
    return data


def test_a_nudge_follows_input_and_nothing_else(pair: tuple[NudgingSocket, socket.socket]) -> None:
    nudging, qemu_side = pair
    nudging.sendall(HANDSHAKE + ENCODINGS + UPDATE)
    assert read_exactly(qemu_side, len(HANDSHAKE + ENCODINGS + UPDATE)) == HANDSHAKE + ENCODINGS + UPDATE
    assert nothing_more(qemu_side)  # no input yet: no nudge
    assert nudging.send(KEY_DOWN) == len(KEY_DOWN)
    assert read_exactly(qemu_side, len(KEY_DOWN + NUDGE)) == KEY_DOWN + NUDGE
    assert nothing_more(qemu_side)  # one nudge per input, not a stream of them
    assert nudging.nudges == 1


def test_nudges_go_on_for_a_window_after_the_last_input() -> None:
    proxy_side, qemu_side = socket.socketpair()
    qemu_side.settimeout(5)
    nudging = NudgingSocket(proxy_side, delay=0.01, every=0.02, window=0.2)
    try:
        nudging.sendall(HANDSHAKE + KEY_DOWN)
        assert read_exactly(qemu_side, len(HANDSHAKE + KEY_DOWN)) == HANDSHAKE + KEY_DOWN
        after = read_until_quiet(qemu_side, 0.5)
        assert after == nudging.nudges * NUDGE  # only nudges, and then they stop
        assert 3 <= nudging.nudges <= 10  # at 0.01, 0.03, ... 0.19 s after the key, none after 0.2 s
    finally:
        nudging.stop()
        proxy_side.close()
        qemu_side.close()


def test_a_nudge_never_splits_a_message(pair: tuple[NudgingSocket, socket.socket]) -> None:
    nudging, qemu_side = pair
    nudging.sendall(HANDSHAKE + KEY_DOWN + UPDATE[:4])  # the nudge falls due while the update is half sent
    assert read_exactly(qemu_side, len(HANDSHAKE + KEY_DOWN) + 4) == HANDSHAKE + KEY_DOWN + UPDATE[:4]
    assert nothing_more(qemu_side)
    nudging.sendall(UPDATE[4:])
    assert read_exactly(qemu_side, len(UPDATE) - 4 + len(NUDGE)) == UPDATE[4:] + NUDGE


def test_a_qemu_that_reads_nothing_does_not_hold_the_nudging_thread() -> None:
    """QEMU's socket full (QEMU hung): a nudge that falls due is skipped, not waited for while holding the
    lock the relay's sends take, and the connection's process can still end (stop() joins the thread)."""
    proxy_side, qemu_side = socket.socketpair()  # a blocking socket, as websockify's to QEMU
    nudging = NudgingSocket(proxy_side, delay=0.05, every=0.005, window=0.5)
    try:
        nudging.sendall(HANDSHAKE + KEY_DOWN)
        with contextlib.suppress(BlockingIOError):
            while True:  # whole messages only, so the stream stays between two of them
                proxy_side.send(POINTER, socket.MSG_DONTWAIT)
        time.sleep(0.3)  # nudges fall due against the full socket, again and again
        assert nudging._cond.acquire(timeout=1.0)  # the relay could take the lock for its next send
        nudging._cond.release()
    finally:
        nudging.stop()
        stuck = nudging._thread.is_alive()
        proxy_side.close()
        qemu_side.close()
    assert not stuck, "the nudging thread was still in a send when its connection ended"


def test_a_lost_stream_passes_unchanged(pair: tuple[NudgingSocket, socket.socket]) -> None:
    nudging, qemu_side = pair
    odd = HANDSHAKE + bytes([7, 1, 2, 3]) + KEY_DOWN
    nudging.sendall(odd)
    assert read_exactly(qemu_side, len(odd)) == odd
    assert nothing_more(qemu_side) and nudging.nudges == 0


# -- through websockify, to QEMU -------------------------------------------------------------------


def nudges_received(vm: Vm, offset: int) -> int:
    """Releases of key code 0 QEMU's VNC server took since ``offset`` of its trace log."""
    text = vm.trace_log.read_text(errors="replace")[offset:]
    return len(re.findall(r"vnc_key_event_ext down 0, sym 0x0, keycode 0x0 ", text))


async def type_and_check(vm: Vm, url: str) -> None:
    offset = len(vm.trace_log.read_text(errors="replace"))
    async with await RFBClient.connect_ws(url) as client:
        await wait_until_shown(client)
        await client.type_text("a")
        await eventually(lambda: nudges_received(vm, offset) or None)
        # QEMU hands the guest VNC's keys one after the other with its key delay (-vnc key-delay-ms, 10 ms by
        # default): the release of "a" may show after the nudge's trace, and so would anything of the nudge's.
        await eventually(lambda: len(key_events(vm, offset)) >= 2 or None)
        await asyncio.sleep(0.5)
    # The guest got the key and nothing from the nudge; and QEMU said nothing of it (a warning per nudge
    # would fill the local driver's stderr.log as someone types).
    assert [(q, d) for q, d, _ in key_events(vm, offset)] == [(QCODE["a"], 1), (QCODE["a"], 0)]
    assert "scancode" not in (vm.root / "console.out").read_text(errors="replace")


@pytest.mark.qemu
async def test_qemu_takes_the_nudge_and_the_guest_sees_no_key(
        websockify_server: WebsockifyServer, redis_flush: redis.Redis) -> None:
    vm = start_vm("vg-nudge", extra=["-trace", "vnc_key_event_ext"])
    try:
        publish(redis_flush, vm)
        await type_and_check(vm, url_for(websockify_server, issue(redis_flush, vm.vm_id)))
    finally:
        stop_vm(vm)


@pytest.mark.qemu
async def test_the_nudge_also_comes_after_vnc_authentication(
        websockify_server: WebsockifyServer, redis_flush: redis.Redis) -> None:
    """A fleet VM's console: the proxy did the handshake with the password (console/proxy.py)."""
    password, display = new_password(), free_display()
    vm = start_vm("vg-nudge-locked", (f"127.0.0.1:{display},password-secret={SECRET_ID}", 5900 + display),
                  ["-object", f"secret,id={SECRET_ID},data={password}", "-trace", "vnc_key_event_ext"])
    try:
        publish_tcp(redis_flush, vm.vm_id, 5900 + display, password)
        await type_and_check(vm, url_for(websockify_server, issue(redis_flush, vm.vm_id)))
    finally:
        stop_vm(vm)
