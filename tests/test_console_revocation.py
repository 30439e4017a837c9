"""Console revocation end to end: the real gateway app (fake driver) issues tokens and revokes them,
a real websockify redeems them with console.token_plugin.RedisTokens, and real QEMUs serve VNC
(the VMs the fake driver "runs" have their VNC target pointed at them). Covers tokens refused after
logout, cross-VM use, replay and expiry, live sessions ended by a stop, a destroy, a logout and the
maximum duration, and a Redis outage that refuses new connections but lets live ones go on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis

from console import redis_keys
from console.rfb import RFBClient, RFBClosed
from console.sessions import END_GRACE, SessionWatcher
from console.sessions import Session as ConsoleSession
from console.token_plugin import RedisTokens
from drivers.fake import FakeDriver
from gateway.config import RATE_LIMIT_DEFAULTS, Settings
from gateway.engine import console_grants
from gateway.web.app import create_app
from tests.conftest import VM, Session, truncate_all
from tests.fixtures.websockify import (
    WebsockifyServer,
    free_port,
    start_websockify,
    stop_websockify,
)
from tests.test_console_proxy import (
    Vm,
    issue,
    publish,
    start_vm,
    stop_vm,
    url_for,
    wait_for_log,
    wait_until_shown,
    ws_upgrade,
)
from tests.test_ratelimit import mark_verified

qemu = pytest.mark.qemu

# Not the shared test database 15 (every test anywhere flushes it as it starts): live sessions here
# last seconds, and a flush by another test run would look like a revocation that never happened.
REDIS_DB = 13
CLOSE_TIMEOUT = 15.0
MakeServer = Callable[..., Awaitable[Any]]


@pytest.fixture
def redis_test_db() -> int:
    return REDIS_DB



@pytest.fixture(scope="module")
def vm_a() -> Iterator[Vm]:
    vm = start_vm("vg-rev-a")
    yield vm
    stop_vm(vm)


@pytest.fixture(scope="module")
def vm_b() -> Iterator[Vm]:
    vm = start_vm("vg-rev-b")
    yield vm
    stop_vm(vm)


@pytest.fixture
async def make_server(aiohttp_server: Any, app_settings: Settings, database_url: str) -> MakeServer:
    """Factory: a gateway on the fake driver, rate limits out of the way, ``changes`` applied to its settings."""

    async def make(**changes: Any) -> Any:
        loose: dict[str, tuple[int, int] | None] = {name: None for name in RATE_LIMIT_DEFAULTS}
        settings = dataclasses.replace(app_settings, rate_limits=loose, **changes)
        server = await aiohttp_server(create_app(settings, driver=FakeDriver()))
        truncate_all(database_url)
        return server

    return make


OwnerOfA = Callable[..., Awaitable[tuple[Session, str]]]


@pytest.fixture
def owner_of_a(make_server: MakeServer, sessions: Any, database_url: str, redis_flush: redis.Redis,
               vm_a: Vm) -> OwnerOfA:
    """Factory: a gateway (``changes`` to its settings), a verified user, and their running VM on ``vm_a``'s screen."""

    async def make(**changes: Any) -> tuple[Session, str]:
        server = await make_server(**changes)
        alice = await user(server, sessions, database_url)
        return alice, await running_vm(alice, redis_flush, vm_a)

    return make


async def user(server: Any, sessions: Any, database_url: str) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login()
    assert session.user is not None
    mark_verified(database_url, session.user["id"])
    return session


async def running_vm(session: Session, r: redis.Redis, qemu_vm: Vm) -> str:
    """Create a VM through the API (the fake driver "runs" it) whose console is ``qemu_vm``'s screen."""
    status, body = await session.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, body
    vm_id: str = body["vm_id"]
    r.set(redis_keys.vnc_target_key(vm_id), json.dumps({"unix_socket": qemu_vm.vnc_socket}))
    return vm_id


async def console_token(session: Session, vm_id: str) -> str:
    status, grant = await session.request("GET", f"/api/vms/{vm_id}/console")
    assert status == 200, grant
    token: str = grant["token"]
    return token


async def open_console(session: Session, vm_id: str, ws: WebsockifyServer) -> RFBClient:
    return await RFBClient.connect_ws(url_for(ws, await console_token(session, vm_id)))


async def still_live(client: RFBClient) -> None:
    """The session still relays: a full-screen request is answered."""
    await client.request_update()
    await client.wait_for_update(10)


async def wait_closed(client: RFBClient, limit: float = CLOSE_TIMEOUT) -> str:
    """Keep the session busy until websockify closes it; return how it closed."""
    async with asyncio.timeout(limit):
        while True:
            try:
                await client.request_update(incremental=True)
                await client.wait_for_update(0.5)
            except TimeoutError:
                continue
            except RFBClosed as exc:
                return str(exc)
            except aiohttp.ClientConnectionResetError:  # writing while the close arrives; the reader says how
                await asyncio.sleep(0.1)


# ---- tokens refused at websockify ------------------------------------------------------------------

@qemu
async def test_token_issued_before_logout_is_refused_after_it(
    owner_of_a: OwnerOfA, websockify_server: WebsockifyServer, redis_flush: redis.Redis, vm_a: Vm,
) -> None:
    alice, vm_id = await owner_of_a()
    async with await open_console(alice, vm_id, websockify_server) as client:  # tokens work until then
        assert client.name == vm_a.vnc_name
    tokens = [await console_token(alice, vm_id) for _ in range(2)]
    assert (await alice.request("POST", "/api/auth/logout"))[0] == 200
    for token in tokens:
        assert not redis_flush.exists(redis_keys.token_key(redis_keys.hash_token(token)))
        assert await ws_upgrade(url_for(websockify_server, token)) == b""
    assert not redis_flush.exists(redis_keys.user_tokens_key(alice.user["id"] if alice.user else ""))
    await wait_for_log(websockify_server, rf"console token {re.escape(repr(redis_keys.mask(tokens[1])))} refused")


async def test_token_read_during_a_logout_is_refused(
    redis_test_url: str, redis_flush: redis.Redis, caplog: pytest.LogCaptureFixture,
) -> None:
    """A logout that lands between the redemption's read of the token and its checks (so the
    logout's delete found nothing to delete) still refuses it: the user's generation moved on."""
    client = aioredis.from_url(redis_test_url, decode_responses=True)
    try:
        redis_flush.set(redis_keys.vnc_target_key("vm-1"), json.dumps({"unix_socket": "/s"}))
        grant = await console_grants.issue_token(client, "vm-1", "user-1", 60, "ws://x/vnc")
        plugin = RedisTokens(redis_test_url)
        assert plugin.lookup(grant.token) == ["unix_socket", "/s"]  # as issued, fine

        grant = await console_grants.issue_token(client, "vm-1", "user-1", 60, "ws://x/vnc")
        redis_flush.set(redis_keys.user_generation_key("user-1"), "moved-on")  # what revoke_user sets
        with caplog.at_level(logging.INFO, logger="vmgate.console.tokens"):
            assert plugin.lookup(grant.token) is None
        assert "user user-1 logged out after it was issued" in caplog.text

        # A token issued after the logout carries the new generation and works.
        grant = await console_grants.issue_token(client, "vm-1", "user-1", 60, "ws://x/vnc")
        assert plugin.lookup(grant.token) == ["unix_socket", "/s"]
    finally:
        await client.aclose()


async def test_revoke_user_leaves_other_users_tokens(redis_test_url: str, redis_flush: redis.Redis) -> None:
    client = aioredis.from_url(redis_test_url, decode_responses=True)
    try:
        redis_flush.set(redis_keys.vnc_target_key("vm-1"), json.dumps({"unix_socket": "/s"}))
        mine = await console_grants.issue_token(client, "vm-1", "user-1", 60, "ws://x/vnc")
        theirs = await console_grants.issue_token(client, "vm-1", "user-2", 60, "ws://x/vnc")
        await console_grants.revoke_user(client, "user-1")
        plugin = RedisTokens(redis_test_url)
        assert plugin.lookup(mine.token) is None
        assert plugin.lookup(theirs.token) == ["unix_socket", "/s"]
    finally:
        await client.aclose()


@qemu
async def test_token_reaches_its_own_vm_once(
    make_server: MakeServer, sessions: Any, database_url: str, websockify_server: WebsockifyServer,
    redis_flush: redis.Redis, vm_a: Vm, vm_b: Vm,
) -> None:
    server = await make_server()
    alice = await user(server, sessions, database_url)
    vm_1 = await running_vm(alice, redis_flush, vm_a)
    vm_2 = await running_vm(alice, redis_flush, vm_b)
    # Nothing in the request but the token chooses the VM.
    token = await console_token(alice, vm_1)
    async with await RFBClient.connect_ws(f"{url_for(websockify_server, token)}&vm_id={vm_2}") as client:
        assert client.name == vm_a.vnc_name
    assert await ws_upgrade(url_for(websockify_server, token)) == b""  # replayed
    # A token of a VM that then stops does not fall through to the other VM.
    token = await console_token(alice, vm_1)
    assert (await alice.request("POST", f"/api/vms/{vm_1}/stop?wait=60"))[0] == 200
    assert await ws_upgrade(f"{url_for(websockify_server, token)}&vm_id={vm_2}") == b""
    async with await open_console(alice, vm_2, websockify_server) as client:
        assert client.name == vm_b.vnc_name


@qemu
async def test_expired_token_is_refused(
    owner_of_a: OwnerOfA, websockify_server: WebsockifyServer, redis_flush: redis.Redis, vm_a: Vm,
) -> None:
    alice, vm_id = await owner_of_a(console_token_ttl=1)
    token = await console_token(alice, vm_id)
    await asyncio.sleep(1.3)
    assert await ws_upgrade(url_for(websockify_server, token)) == b""


# ---- live sessions ended ---------------------------------------------------------------------------

@qemu
@pytest.mark.parametrize(("method", "suffix"), [("POST", "/stop"), ("DELETE", "")], ids=["stop", "destroy"])
async def test_live_session_ends_when_its_vm_stops(
    method: str, suffix: str, make_server: MakeServer, sessions: Any, database_url: str,
    websockify_server: WebsockifyServer, redis_flush: redis.Redis, vm_a: Vm, vm_b: Vm,
) -> None:
    server = await make_server()
    alice = await user(server, sessions, database_url)
    vm_id = await running_vm(alice, redis_flush, vm_a)
    other = await running_vm(alice, redis_flush, vm_b)
    async with (await open_console(alice, vm_id, websockify_server) as client,
                await open_console(alice, other, websockify_server) as bystander):
        await wait_until_shown(client)
        assert (await alice.request(method, f"/api/vms/{vm_id}{suffix}?wait=60"))[0] == 200
        started = time.monotonic()
        assert await wait_closed(client) == f"the WebSocket closed (code {redis_keys.CLOSE_REVOKED})"
        assert time.monotonic() - started < 5
        await still_live(bystander)  # the user's console of another VM goes on
    # The fake driver never touched QEMU: websockify ended the session, not a closing VNC socket.
    assert vm_a.process.poll() is None
    await wait_for_log(websockify_server, rf"console session of vm {vm_id}, user \S+ ended: VM stopped")


@qemu
async def test_live_session_ends_when_its_user_logs_out(
    make_server: MakeServer, sessions: Any, database_url: str, websockify_server: WebsockifyServer,
    redis_flush: redis.Redis, vm_a: Vm, vm_b: Vm,
) -> None:
    server = await make_server()
    alice = await user(server, sessions, database_url)
    bob = await user(server, sessions, database_url)
    vm_alice = await running_vm(alice, redis_flush, vm_a)
    vm_bob = await running_vm(bob, redis_flush, vm_b)
    async with (await open_console(alice, vm_alice, websockify_server) as client,
                await open_console(bob, vm_bob, websockify_server) as bobs):
        await wait_until_shown(client)
        assert (await alice.request("POST", "/api/auth/logout"))[0] == 200
        assert await wait_closed(client) == f"the WebSocket closed (code {redis_keys.CLOSE_REVOKED})"
        await still_live(bobs)
    await wait_for_log(websockify_server, rf"console session of vm {vm_alice}, user \S+ ended: logged out")


@qemu
async def test_live_session_opened_with_an_api_token_ends_when_the_token_is_revoked(
    owner_of_a: OwnerOfA, websockify_server: WebsockifyServer, redis_flush: redis.Redis, vm_a: Vm,
) -> None:
    alice, vm_id = await owner_of_a()
    status, made = await alice.request("POST", "/api/me/tokens", json={"name": "ci"})
    assert status == 201, made
    bearer = {"Authorization": f"Bearer {made['token']}"}
    status, grant = await alice.request("GET", f"/api/vms/{vm_id}/console", headers=bearer)
    assert status == 200, grant
    status, spare = await alice.request("GET", f"/api/vms/{vm_id}/console", headers=bearer)  # not redeemed yet
    assert status == 200, spare
    async with (await RFBClient.connect_ws(url_for(websockify_server, grant["token"])) as with_token,
                await open_console(alice, vm_id, websockify_server) as with_cookie):
        await wait_until_shown(with_token)
        status, _ = await alice.request("DELETE", f"/api/me/tokens/{made['id']}")
        assert status == 200
        assert await wait_closed(with_token) == f"the WebSocket closed (code {redis_keys.CLOSE_REVOKED})"
        await still_live(with_cookie)  # the browser session's console is not the token's
    await wait_for_log(websockify_server, rf"console session of vm {vm_id}, user \S+ ended: API token revoked")
    # A console token the revoked API token got earlier opens nothing either.
    assert await ws_upgrade(url_for(websockify_server, spare["token"])) == b""
    await wait_for_log(websockify_server, "the API token it was issued to is revoked")


@qemu
async def test_one_user_holds_at_most_consoles_per_user_sessions(
    make_server: MakeServer, sessions: Any, database_url: str, websockify_server: WebsockifyServer,
    redis_flush: redis.Redis, vm_a: Vm, vm_b: Vm,
) -> None:
    server = await make_server(consoles_per_user=2)
    alice = await user(server, sessions, database_url)
    bob = await user(server, sessions, database_url)
    vm_alice = await running_vm(alice, redis_flush, vm_a)
    vm_bob = await running_vm(bob, redis_flush, vm_b)
    early = await console_token(alice, vm_alice)  # issued while she had room, redeemed when she has none
    async with (await open_console(alice, vm_alice, websockify_server) as first,
                await open_console(alice, vm_alice, websockify_server) as second):
        await wait_until_shown(first)
        status, body = await alice.request("GET", f"/api/vms/{vm_alice}/console")
        assert status == 429, body
        assert body["error"]["code"] == "too_many_consoles"
        assert body["error"]["details"] == {"open": 2, "limit": 2}
        # The gateway's answer is a courtesy; websockify holds the cap for a token issued earlier.
        assert await ws_upgrade(url_for(websockify_server, early)) == b""
        await wait_for_log(websockify_server, "has 2 consoles open already")
        # Another user is not affected by hers.
        async with await open_console(bob, vm_bob, websockify_server) as bobs:
            await still_live(bobs)
        await still_live(second)
    # Closed sessions give their places back as their processes end, without waiting for a lease.
    assert alice.user is not None
    for _ in range(100):
        if redis_flush.zcard(redis_keys.user_sessions_key(alice.user["id"])) == 0:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("closed console sessions still hold their places after 10 s")
    async with await open_console(alice, vm_alice, websockify_server) as again:
        await still_live(again)


@qemu
async def test_live_session_ends_at_its_maximum_duration(
    owner_of_a: OwnerOfA, websockify_server: WebsockifyServer, redis_flush: redis.Redis, vm_a: Vm,
) -> None:
    alice, vm_id = await owner_of_a(console_max_session=2)
    started = time.monotonic()
    async with await open_console(alice, vm_id, websockify_server) as client:
        assert await wait_closed(client) == f"the WebSocket closed (code {redis_keys.CLOSE_TIME_LIMIT})"
    assert 2 <= time.monotonic() - started < 2 + CLOSE_TIMEOUT
    await wait_for_log(websockify_server, "ended: time limit reached")


# ---- Redis going away ------------------------------------------------------------------------------

class RedisServer:
    """A private redis-server on a free port (the shared one must not be stopped)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or pytest.fail("redis-server is not on PATH")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=1) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail("the private redis-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@qemu
async def test_redis_outage_refuses_new_sessions_and_keeps_live_ones(
    private_redis: RedisServer, vm_a: Vm, tmp_path: Path,
) -> None:
    ws = start_websockify(private_redis.url, tmp_path / "websockify.log")
    try:
        with redis.Redis.from_url(private_redis.url, decode_responses=True) as r:
            publish(r, vm_a)
            token = issue(r, vm_a.vm_id)
        async with await RFBClient.connect_ws(url_for(ws, token)) as client:
            await wait_until_shown(client)
            private_redis.stop()
            await wait_for_log(ws, r"cannot watch for revocation \(ConnectionError\); it goes on")
            await still_live(client)
            assert await ws_upgrade(url_for(ws, redis_keys.new_token())) == b""  # new connections are refused
            await wait_for_log(ws, "refused: Redis unavailable")
            assert ws.process.poll() is None

            # Redis is back (empty: it kept nothing, so the VM's target is published again), and a
            # logout happened while the session was not listening: it finds the new generation and ends.
            private_redis.start()
            with redis.Redis.from_url(private_redis.url, decode_responses=True) as r:
                publish(r, vm_a)
                r.set(redis_keys.user_generation_key("u-1"), "revoked-while-away")
            assert await wait_closed(client, 20) == f"the WebSocket closed (code {redis_keys.CLOSE_REVOKED})"
            await wait_for_log(ws, "user u-1 ended: logged out")

        with redis.Redis.from_url(private_redis.url, decode_responses=True) as r:
            publish(r, vm_a)
            r.delete(redis_keys.user_generation_key("u-1"))
            token = issue(r, vm_a.vm_id)
        async with await RFBClient.connect_ws(url_for(ws, token)) as client:  # and new sessions work again
            assert client.name == vm_a.vnc_name
    finally:
        assert stop_websockify(ws) == 0


async def test_a_client_that_reads_nothing_is_cut_off_all_the_same(
    websockify_server: WebsockifyServer, redis_flush: redis.Redis,
) -> None:
    """A session whose client reads nothing, while its "VNC server" floods it, still ends: cleanly if
    the close frame fits in what is left of the socket's buffer, else when END_GRACE runs out."""
    target_closed = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(b"\0" * 65536)
                await writer.drain()
        except OSError:
            pass
        finally:
            target_closed.set()
            writer.close()

    server = await asyncio.start_server(flood, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        redis_flush.set(redis_keys.vnc_target_key("vm-flood"), json.dumps({"host": "127.0.0.1", "port": port}))
        token = issue(redis_flush, "vm-flood")
        reader, writer = await asyncio.open_connection("127.0.0.1", websockify_server.port)
        writer.write(f"GET /vnc?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await writer.drain()
        await wait_for_log(websockify_server, "connecting to: 127.0.0.1")
        await asyncio.sleep(1)  # the buffers fill up
        redis_flush.set(redis_keys.user_generation_key("u-1"), "logged-out")  # what revoke_user does
        redis_flush.publish(redis_keys.user_end_channel("u-1"), "logged out")
        started = time.monotonic()
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await target_closed.wait()
            with contextlib.suppress(ConnectionResetError):
                while await reader.read(1 << 20):  # only now read what was sent, up to the end
                    pass
        assert time.monotonic() - started < END_GRACE + 3
        assert "Traceback" not in websockify_server.log_text()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def _stuck_session(url: str, target: str) -> None:
    """In a child process (as websockify runs each connection): watch a session whose main thread
    never gets back to the relay loop, so only the last resort can end it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # not pytest's handlers
    assert SessionWatcher(url, ConsoleSession("vm-stuck", "user-stuck", 3600, target, None)).start()
    time.sleep(60)


def test_a_session_that_cannot_close_cleanly_ends_its_process(
    redis_test_url: str, redis_flush: redis.Redis, capfd: pytest.CaptureFixture[str],
) -> None:
    target = json.dumps({"unix_socket": "/s"})
    redis_flush.set(redis_keys.vnc_target_key("vm-stuck"), target)
    child = multiprocessing.get_context("fork").Process(target=_stuck_session, args=(redis_test_url, target))
    child.start()
    try:
        deadline = time.monotonic() + 10
        while redis_flush.pubsub_numsub(redis_keys.vm_end_channel("vm-stuck"))[0][1] == 0:  # subscribed yet?
            assert time.monotonic() < deadline, "the watcher never subscribed"
            time.sleep(0.05)
        started = time.monotonic()
        redis_flush.publish(redis_keys.vm_end_channel("vm-stuck"), "vm stopped")
        child.join(END_GRACE + 5)
        assert child.exitcode == 1
        assert END_GRACE <= time.monotonic() - started < END_GRACE + 3
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    err = capfd.readouterr().err
    assert "console session of vm vm-stuck, user user-stuck ended: VM stopped" in err
    assert "console session of vm vm-stuck did not close within 5.0s; ending its process" in err
