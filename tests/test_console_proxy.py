"""The console path end to end: a token in Redis → websockify with console.token_plugin.RedisTokens
→ a real QEMU's VNC unix socket, spoken to with the RFB client in console/rfb.py.

The QEMUs have no disk and no NIC: they show SeaBIOS's text screen ("No bootable device."), which
is enough to prove pixels flow. Each runs with ``-name`` so its VNC server calls itself
``QEMU (<name>)`` in ServerInit, which tells the tests which VM a connection reached, and traces
``ps2_keyboard_event`` so the tests can see the keys QEMU hands the guest.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis
from qemu.qmp import QMPClient

from console import redis_keys
from console.rfb import RFBClient
from console.token_plugin import RedisTokens, mask_tokens
from tests.fixtures.websockify import (
    WebsockifyServer,
    free_port,
    start_websockify,
    stop_websockify,
)

qemu = pytest.mark.qemu  # on every test that boots QEMU; the plugin's own tests run without it

T = TypeVar("T")

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
SCREEN_TIMEOUT = 30.0

# QKeyCode numbers (qapi/ui.json order) that ps2_keyboard_event traces.
QCODE = {"shift": 1, "ret": 35, "a": 36, "backslash": 48, "dot": 57, "caps_lock": 61}


# -- VMs ---------------------------------------------------------------------------------------


@dataclass
class Vm:
    vm_id: str
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def vnc_socket(self) -> str:
        return str(self.root / "vnc.sock")

    @property
    def qmp_socket(self) -> str:
        return str(self.root / "qmp.sock")

    @property
    def trace_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def vnc_name(self) -> str:
        return f"QEMU ({self.vm_id})"


def start_vm(vm_id: str, tcp_vnc: tuple[str, int] | None = None, extra: Sequence[str] = ()) -> Vm:
    """Boot a diskless QEMU with VNC on a unix socket (or ``tcp_vnc``: a -vnc value and the port it listens
    on) and ``extra`` args; return once VNC accepts connections."""
    # Short path: a unix socket's path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="vg", dir="/tmp"))
    cmd = [
        QEMU,
        "-machine", "type=pc,accel=tcg",
        "-m", "64M",
        "-name", vm_id,
        "-nographic",
        "-nic",
        "none",
        "-vnc", tcp_vnc[0] if tcp_vnc else f"unix:{root}/vnc.sock",
        "-qmp", f"unix:{root}/qmp.sock,server=on,wait=off",
        "-trace", "ps2_keyboard_event",
        "-D", str(root / "qemu.log"),
        *extra,
    ]  # fmt: skip
    with (root / "console.out").open("wb") as out:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    vm = Vm(vm_id, root, process)
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            output = (root / "console.out").read_text(errors="replace")
            stop_vm(vm)
            pytest.fail(f"QEMU exited with {process.returncode}: {output}")
        try:
            if tcp_vnc:
                socket.create_connection(("127.0.0.1", tcp_vnc[1]), timeout=1).close()
                return vm
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(vm.vnc_socket)
            return vm
        except OSError:
            if time.monotonic() > deadline:
                stop_vm(vm)
                pytest.fail("QEMU's VNC socket (or port) did not open within 20s")
            time.sleep(0.05)


def stop_vm(vm: Vm) -> None:
    if vm.process.poll() is None:
        vm.process.terminate()
        try:
            vm.process.wait(10)
        except subprocess.TimeoutExpired:
            vm.process.kill()
            vm.process.wait()
    shutil.rmtree(vm.root, ignore_errors=True)


@pytest.fixture(scope="module")
def vm_a() -> Iterator[Vm]:
    vm = start_vm("vg-a")
    yield vm
    stop_vm(vm)


@pytest.fixture(scope="module")
def vm_b() -> Iterator[Vm]:
    vm = start_vm("vg-b")
    yield vm
    stop_vm(vm)


# -- the gateway's side, as little as the tests need ---------------------------------------------


def publish(r: redis.Redis, vm: Vm) -> None:
    """What the gateway does while a VM runs: say where its VNC listens."""
    r.set(redis_keys.vnc_target_key(vm.vm_id), json.dumps({"unix_socket": vm.vnc_socket}))


def issue(r: redis.Redis, vm_id: str, *, ttl: int = 60, expires_at: float | None = None) -> str:
    """Issue a console token the way gateway/engine/console_grants.py does."""
    token = redis_keys.new_token()
    digest = redis_keys.hash_token(token)
    record = {"vm_id": vm_id, "user_id": "u-1", "expires_at": time.time() + ttl if expires_at is None else expires_at}
    with r.pipeline(transaction=True) as pipe:
        pipe.set(redis_keys.token_key(digest), json.dumps(record), ex=ttl)
        pipe.sadd(redis_keys.vm_tokens_key(vm_id), digest)
        pipe.expire(redis_keys.vm_tokens_key(vm_id), ttl + 5)
        pipe.execute()
    return token


def revoke(r: redis.Redis, vm_id: str) -> None:
    """Revoke a VM's tokens: delete every token key in its set, then the set."""
    for digest in r.smembers(redis_keys.vm_tokens_key(vm_id)):
        r.delete(redis_keys.token_key(digest if isinstance(digest, str) else digest.decode()))
    r.delete(redis_keys.vm_tokens_key(vm_id))


@pytest.fixture
def targets(redis_flush: redis.Redis, vm_a: Vm, vm_b: Vm) -> redis.Redis:
    """A flushed test Redis in which both VMs are running."""
    publish(redis_flush, vm_a)
    publish(redis_flush, vm_b)
    return redis_flush


# -- helpers --------------------------------------------------------------------------------------


def url_for(server: WebsockifyServer, token: str) -> str:
    return f"{server.ws_url}?token={token}"


async def ws_upgrade(url: str, origin: str | None = None) -> bytes:
    """Send one WebSocket upgrade request over a plain socket; return every byte the server sends
    back until it closes or ends its response headers.

    aiohttp retries a GET once when the server disconnects, and a browser does not, so the precise
    refusal checks send exactly one request this way.
    """
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if origin:
            request += f"Origin: {origin}\r\n"
        writer.write((request + "\r\n").encode())
        await writer.drain()
        received = b""
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in received:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                received += chunk
        return received
    finally:
        writer.close()
        await writer.wait_closed()


async def eventually(check: Callable[[], T | None], limit: float = 10.0) -> T:
    """Poll ``check`` (it reads files another process writes) until it returns something truthy."""
    async with asyncio.timeout(limit):
        while True:
            if result := check():
                return result
            await asyncio.sleep(0.05)


async def wait_for_log(server: WebsockifyServer, pattern: str) -> str:
    """Wait until websockify's log matches ``pattern``; return the log."""

    def matching_log() -> str | None:
        text = server.log_text()
        return text if re.search(pattern, text) else None

    return await eventually(matching_log, 5.0)


async def wait_for_key_events(vm: Vm, offset: int, count: int) -> list[tuple[int, int, int]]:
    """Wait until QEMU has traced ``count`` key events since ``offset``; return them all."""

    def enough() -> list[tuple[int, int, int]] | None:
        events = key_events(vm, offset)
        return events if len(events) >= count else None

    return await eventually(enough)


async def wait_until_shown(client: RFBClient, size: tuple[int, int] | None = None) -> None:
    """Ask for the whole screen until it is not one flat colour (and, if given, has ``size``):
    QEMU shows its own "not initialized" screen, in another mode, until the guest's BIOS runs."""
    async with asyncio.timeout(SCREEN_TIMEOUT):
        while True:
            await client.request_update()
            await client.wait_for_update(SCREEN_TIMEOUT)
            if not client.is_blank() and size in (None, (client.width, client.height)):
                return
            await asyncio.sleep(0.2)


def assert_no_whole_token(server: WebsockifyServer, *tokens: str) -> None:
    log = server.log_text()
    for token in tokens:
        assert token not in log, "a whole console token reached websockify's log"


def key_events(vm: Vm, offset: int = 0) -> list[tuple[int, int, int]]:
    """(qcode, down, held modifiers) of every key QEMU has handed the guest since ``offset``."""
    text = vm.trace_log.read_text(errors="replace")[offset:]
    pattern = r"ps2_keyboard_event .*? qcode (\d+) down (\d) modifier 0x[0-9a-f]+ modifiers (0x[0-9a-f]+)"
    return [(int(q), int(d), int(m, 16)) for q, d, m in re.findall(pattern, text)]


# -- (a) a good token ----------------------------------------------------------------------------


@qemu
async def test_valid_token_shows_the_vm_screen(
    websockify_server: WebsockifyServer, targets: redis.Redis, vm_a: Vm
) -> None:
    token = issue(targets, vm_a.vm_id)
    async with await RFBClient.connect_ws(url_for(websockify_server, token)) as client:
        assert client.name == vm_a.vnc_name
        await wait_until_shown(client, (720, 400))  # SeaBIOS's VGA text mode

        # A second request gets a second update.
        before = await client.request_update()
        assert await client.wait_for_update(10) > before
        assert not client.is_blank()

    # Redeemed: the record and its entry in the VM's set are gone.
    digest = redis_keys.hash_token(token)
    assert not targets.exists(redis_keys.token_key(digest))
    assert not targets.sismember(redis_keys.vm_tokens_key(vm_a.vm_id), digest)
    log = await wait_for_log(websockify_server, "connecting to unix socket")
    assert f"console token {redis_keys.mask(token)!r} redeemed: vm {vm_a.vm_id}" in log
    assert f"token={redis_keys.mask(token)}" in log
    assert_no_whole_token(websockify_server, token)


@qemu
async def test_binary_subprotocol_is_accepted(
    websockify_server: WebsockifyServer, targets: redis.Redis, vm_a: Vm
) -> None:
    """websockify 0.13 needs no subprotocol; it still answers old clients that ask for 'binary'."""
    token = issue(targets, vm_a.vm_id)
    async with await RFBClient.connect_ws(url_for(websockify_server, token), protocols=["binary"]) as client:
        assert client.name == vm_a.vnc_name


@qemu
async def test_incremental_update_follows_a_screen_change(
    websockify_server: WebsockifyServer, redis_flush: redis.Redis
) -> None:
    vm = start_vm("vg-reset")
    try:
        publish(redis_flush, vm)
        token = issue(redis_flush, vm.vm_id)
        async with await RFBClient.connect_ws(url_for(websockify_server, token)) as client:
            await wait_until_shown(client)
            shown = client.snapshot()
            qmp = QMPClient("vmgate-test")
            await qmp.connect(vm.qmp_socket)
            try:
                await qmp.execute("system_reset")
            finally:
                await qmp.disconnect()
            # Only what changed comes back; the picture must differ from the one before the reset.
            async with asyncio.timeout(SCREEN_TIMEOUT):
                while client.snapshot() == shown:
                    await client.request_update(incremental=True)
                    await client.wait_for_update(SCREEN_TIMEOUT)
    finally:
        stop_vm(vm)


@qemu
async def test_typed_keys_reach_the_guest_with_shift(
    websockify_server: WebsockifyServer, targets: redis.Redis, vm_a: Vm
) -> None:
    token = issue(targets, vm_a.vm_id)
    offset = len(vm_a.trace_log.read_text(errors="replace"))
    async with await RFBClient.connect_ws(url_for(websockify_server, token)) as client:
        await client.type_text("aA|>\n")
        shift, a, bar, gt = QCODE["shift"], QCODE["a"], QCODE["backslash"], QCODE["dot"]
        expected = [
            (a, 1), (a, 0),
            (shift, 1), (a, 1), (a, 0), (shift, 0),
            (shift, 1), (bar, 1), (bar, 0), (shift, 0),
            (shift, 1), (gt, 1), (gt, 0), (shift, 0),
            (QCODE["ret"], 1), (QCODE["ret"], 0),
        ]  # fmt: skip
        events = await wait_for_key_events(vm_a, offset, len(expected))
    assert [(q, d) for q, d, _ in events] == expected
    # 'a' went down with no modifier held; A, | and > with Shift (modifier bit 0x2) held.
    assert events[0][2] == 0
    assert all(events[i][2] & 0x2 for i in (3, 7, 11))


@qemu
async def test_qemu_does_not_shift_symbols_by_itself(vm_a: Vm) -> None:
    """Why type_text holds Shift: a bare '|' keysym reaches the guest as '\\' and a bare 'A' makes
    QEMU toggle the guest's Caps Lock (its lock-key sync) around an unshifted 'a'."""
    offset = len(vm_a.trace_log.read_text(errors="replace"))
    async with await RFBClient.connect_unix(vm_a.vnc_socket) as client:
        await client.key(ord("|"))
        await client.key(ord("A"))
        await client.key(ord("a"))  # toggles Caps Lock back, leaving the guest as it was
        events = await wait_for_key_events(vm_a, offset, 10)
    pressed = [q for q, d, _ in events if d]
    assert pressed[0] == QCODE["backslash"]
    assert QCODE["shift"] not in pressed
    assert pressed[1:] == [QCODE["caps_lock"], QCODE["a"], QCODE["caps_lock"], QCODE["a"]]


# -- (b) refusals --------------------------------------------------------------------------------


Prepare = Callable[[redis.Redis, Vm, WebsockifyServer], Awaitable[str]]


async def _forged(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    return redis_keys.new_token()  # the right shape, never issued


async def _malformed(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    return "not-a-token"


async def _too_long(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    return issue(r, vm.vm_id) + "A"


async def _expired_by_redis(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    token = issue(r, vm.vm_id, ttl=1)
    await asyncio.sleep(1.3)
    return token


async def _expired_by_record(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    return issue(r, vm.vm_id, ttl=60, expires_at=time.time() - 1)


async def _replayed(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    token = issue(r, vm.vm_id)
    async with await RFBClient.connect_ws(url_for(server, token)) as client:
        assert client.name == vm.vnc_name
    return token


async def _vm_destroyed(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    token = issue(r, vm.vm_id)
    r.delete(redis_keys.vnc_target_key(vm.vm_id))
    return token


async def _revoked(r: redis.Redis, vm: Vm, server: WebsockifyServer) -> str:
    token = issue(r, vm.vm_id)
    revoke(r, vm.vm_id)
    return token


REFUSALS: dict[str, tuple[Prepare, str]] = {
    "forged": (_forged, "not issued, expired, revoked or already used"),
    "malformed": (_malformed, "malformed"),
    "too-long": (_too_long, "malformed"),
    "expired-ttl": (_expired_by_redis, "not issued, expired, revoked or already used"),
    "expired-at": (_expired_by_record, "expired"),
    "replayed": (_replayed, "not issued, expired, revoked or already used"),
    "vm-destroyed": (_vm_destroyed, "has no VNC target"),
    "revoked": (_revoked, "not issued, expired, revoked or already used"),
}


@qemu
@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_token_gets_no_http_response(
    case: str, websockify_server: WebsockifyServer, targets: redis.Redis, vm_a: Vm
) -> None:
    """websockify refuses before it answers the upgrade: the TCP connection closes with not one
    byte of HTTP (a browser's WebSocket fires 'error' then 'close' with code 1006)."""
    prepare, reason = REFUSALS[case]
    token = await prepare(targets, vm_a, websockify_server)
    assert await ws_upgrade(url_for(websockify_server, token)) == b""
    masked = re.escape(repr(redis_keys.mask(token)))
    log = await wait_for_log(websockify_server, rf"console token {masked} refused: .*{re.escape(reason)}")
    assert f"Token {redis_keys.mask(token)!r} refused" in log
    assert_no_whole_token(websockify_server, token)


async def test_refusal_as_an_aiohttp_client_sees_it(
    websockify_server: WebsockifyServer, redis_flush: redis.Redis
) -> None:
    """aiohttp's ws_connect raises ServerDisconnectedError (after one silent retry of the GET)."""
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await RFBClient.connect_ws(url_for(websockify_server, redis_keys.new_token()))
    assert await ws_upgrade(websockify_server.ws_url) == b""
    await wait_for_log(websockify_server, "Token not present")


@qemu
async def test_good_upgrade_answers_101(websockify_server: WebsockifyServer, targets: redis.Redis, vm_a: Vm) -> None:
    """The contrast to the refusals: the same raw request with an issued token is switched."""
    response = await ws_upgrade(url_for(websockify_server, issue(targets, vm_a.vm_id)))
    assert response.startswith(b"HTTP/1.1 101 ")


# -- (c) one VM per token -----------------------------------------------------------------------


@qemu
async def test_token_reaches_only_its_own_vm(
    websockify_server: WebsockifyServer, targets: redis.Redis, vm_a: Vm, vm_b: Vm
) -> None:
    for vm in (vm_a, vm_b):
        token = issue(targets, vm.vm_id)
        async with await RFBClient.connect_ws(url_for(websockify_server, token)) as client:
            assert client.name == vm.vnc_name

    # Nothing else in the request names the target: only the token's vm_id does.
    token = issue(targets, vm_a.vm_id)
    url = f"{url_for(websockify_server, token)}&vm_id={vm_b.vm_id}&target={vm_b.vnc_socket}"
    async with await RFBClient.connect_ws(url) as client:
        assert client.name == vm_a.vnc_name

    # A's token does not fall through to B when A has no target.
    token = issue(targets, vm_a.vm_id)
    targets.delete(redis_keys.vnc_target_key(vm_a.vm_id))
    assert await ws_upgrade(url_for(websockify_server, token)) == b""

    # Revoking A leaves B's tokens alone.
    publish(targets, vm_a)
    token_a, token_b = issue(targets, vm_a.vm_id), issue(targets, vm_b.vm_id)
    revoke(targets, vm_a.vm_id)
    assert await ws_upgrade(url_for(websockify_server, token_a)) == b""
    async with await RFBClient.connect_ws(url_for(websockify_server, token_b)) as client:
        assert client.name == vm_b.vnc_name


# -- Origin check (websockify's own ExpectOrigin auth plugin) -----------------------------------


@qemu
async def test_expect_origin_refuses_a_foreign_page(
    redis_test_url: str, targets: redis.Redis, vm_a: Vm, tmp_path: Path
) -> None:
    """With --auth-plugin ExpectOrigin a foreign Origin gets HTTP 403. websockify checks it after
    the token lookup, so the refused token is spent as well."""
    origin = "http://127.0.0.1:8080"
    server = start_websockify(
        redis_test_url, tmp_path / "websockify.log", ["--auth-plugin", "ExpectOrigin", "--auth-source", origin]
    )
    try:
        token = issue(targets, vm_a.vm_id)
        response = await ws_upgrade(url_for(server, token), origin="http://evil.example")
        assert response.startswith(b"HTTP/1.1 403 Invalid Origin")
        assert not targets.exists(redis_keys.token_key(redis_keys.hash_token(token)))
        assert await ws_upgrade(url_for(server, token), origin=origin) == b""

        token = issue(targets, vm_a.vm_id)
        async with await RFBClient.connect_ws(url_for(server, token), origin=origin) as client:
            assert client.name == vm_a.vnc_name
    finally:
        assert stop_websockify(server) == 0


# -- the plugin on its own (no websockify, no QEMU) ---------------------------------------------


def test_lookup_returns_the_unix_socket_pair(redis_test_url: str, redis_flush: redis.Redis) -> None:
    redis_flush.set(redis_keys.vnc_target_key("vm-1"), json.dumps({"unix_socket": "/run/vg/vnc.sock"}))
    plugin = RedisTokens(redis_test_url)
    assert plugin.lookup(issue(redis_flush, "vm-1")) == ["unix_socket", "/run/vg/vnc.sock"]


def test_lookup_returns_host_and_port(redis_test_url: str, redis_flush: redis.Redis) -> None:
    redis_flush.set(redis_keys.vnc_target_key("vm-1"), json.dumps({"host": "127.0.0.1", "port": 5901}))
    plugin = RedisTokens(redis_test_url)
    token = issue(redis_flush, "vm-1")
    assert plugin.lookup(token) == ("127.0.0.1", 5901)
    assert plugin.lookup(token) is None


def test_lookup_reads_the_url_from_the_environment(
    redis_test_url: str, redis_flush: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VG_TEST_REDIS_URL", redis_test_url)
    redis_flush.set(redis_keys.vnc_target_key("vm-1"), json.dumps({"unix_socket": "/s"}))
    assert RedisTokens("env:VG_TEST_REDIS_URL").lookup(issue(redis_flush, "vm-1")) == ["unix_socket", "/s"]
    monkeypatch.delenv("VG_TEST_REDIS_URL")
    with pytest.raises(ValueError, match="VG_TEST_REDIS_URL"):
        RedisTokens("env:VG_TEST_REDIS_URL")
    with pytest.raises(ValueError, match="--token-source"):
        RedisTokens(None)


@pytest.mark.parametrize(
    ("record", "target", "reason"),
    [
        ("{not json", {"unix_socket": "/s"}, "not JSON"),
        (json.dumps(["vm-1"]), {"unix_socket": "/s"}, "not a JSON object"),
        (json.dumps({"user_id": "u"}), {"unix_socket": "/s"}, "no vm_id"),
        (json.dumps({"vm_id": "vm-1", "expires_at": "soon"}), {"unix_socket": "/s"}, "no finite numeric"),
        ('{"vm_id": "vm-1", "expires_at": NaN}', {"unix_socket": "/s"}, "no finite numeric"),
        (None, {"unix_socket": "relative/vnc.sock"}, "bad unix_socket"),
        (None, {"host": "127.0.0.1", "port": "5901"}, "bad port"),
        (None, {"host": "127.0.0.1", "port": 0}, "bad port"),
        (None, {"port": 5901}, "neither unix_socket nor host"),
        (None, "[1, 2]", "not a JSON object"),
    ],
)
def test_lookup_refuses_bad_records(
    redis_test_url: str,
    redis_flush: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    record: str | None,
    target: object,
    reason: str,
) -> None:
    token = issue(redis_flush, "vm-1")
    if record is not None:
        redis_flush.set(redis_keys.token_key(redis_keys.hash_token(token)), record)
    redis_flush.set(redis_keys.vnc_target_key("vm-1"), target if isinstance(target, str) else json.dumps(target))
    with caplog.at_level(logging.INFO, logger="vmgate.console.tokens"):
        assert RedisTokens(redis_test_url).lookup(token) is None
    assert reason in caplog.text
    assert token not in caplog.text
    # Spent all the same: a bad record is never tried twice.
    assert not redis_flush.exists(redis_keys.token_key(redis_keys.hash_token(token)))


def test_lookup_refuses_a_token_whose_revocation_is_under_way(
    redis_test_url: str, redis_flush: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Revocation deletes the VM's set; a token key it has not reached yet is still refused."""
    redis_flush.set(redis_keys.vnc_target_key("vm-1"), json.dumps({"unix_socket": "/s"}))
    token = issue(redis_flush, "vm-1")
    redis_flush.delete(redis_keys.vm_tokens_key("vm-1"))
    with caplog.at_level(logging.INFO, logger="vmgate.console.tokens"):
        assert RedisTokens(redis_test_url).lookup(token) is None
    assert "revoked" in caplog.text


def test_lookup_refuses_a_token_with_a_trailing_newline(
    redis_test_url: str, redis_flush: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_flush.set(redis_keys.vnc_target_key("vm-1"), json.dumps({"unix_socket": "/s"}))
    token = issue(redis_flush, "vm-1")
    with caplog.at_level(logging.INFO, logger="vmgate.console.tokens"):
        assert RedisTokens(redis_test_url).lookup(token + "\n") is None
    assert "malformed" in caplog.text
    assert redis_flush.exists(redis_keys.token_key(redis_keys.hash_token(token)))


def test_lookup_refuses_when_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    plugin = RedisTokens(f"redis://127.0.0.1:{free_port()}/15")
    token = redis_keys.new_token()
    with caplog.at_level(logging.INFO, logger="vmgate.console.tokens"):
        assert plugin.lookup(token) is None
    assert "Redis unavailable (ConnectionError)" in caplog.text
    assert token not in caplog.text


def test_websockify_log_lines_are_masked() -> None:
    token = redis_keys.new_token()
    assert mask_tokens(f"127.0.0.1: Token '{token}' not found") == f"127.0.0.1: Token '{token[:4]}…' refused"
    line = f"127.0.0.1: Path: '/vnc?token={token}&x=1'"
    assert mask_tokens(line) == f"127.0.0.1: Path: '/vnc?token={token[:4]}…&x=1'"
    assert mask_tokens("Token 'a\nb' not found") == "Token 'a\\nb…' refused"
