"""The lifecycle engine in one process, on real Postgres and Redis with the fake driver: the
asynchronous API (202, ?wait=), server-sent events, the restart policy, the durable queue's
re-delivery, the collector, several engines on one database, and Redis going away.

What needs real QEMU and real process deaths (SIGKILL of the gateway at each step of a create,
kill -9 of QEMU, a Redis restart during a burst, the soak) is in tests/test_lifecycle_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg2
import pytest
import redis
from yarl import URL

from console import redis_keys
from drivers.base import VncTarget
from drivers.fake import FakeDriver
from gateway.config import Settings
from gateway.engine import publish as publish_module
from gateway.engine.publish import publish, watching
from gateway.engine.queue import WorkQueue
from gateway.web.app import create_app
from gateway.web.appkeys import engine_key, redis_key
from gateway.web.vms import poll_row
from tests.conftest import VM, Session, assert_envelope, fake_gateway, truncate_all
from tests.fixtures.redis_server import RedisServer
from tests.test_api_tokens import sql

Poll = Callable[[], Awaitable[bool]]
REDIS_DB = 11  # its own database: other test runs flushing db 15 must not take the queue away mid-test


@pytest.fixture
def redis_test_db() -> int:
    return REDIS_DB


async def eventually(check: Poll, timeout: float = 20.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


async def vm_state(session: Session, vm_id: str) -> dict[str, Any]:
    status, vm = await session.request("GET", f"/api/vms/{vm_id}")
    assert status == 200, vm
    return vm


async def wait_state(session: Session, vm_id: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
    async def reached() -> bool:
        return (await vm_state(session, vm_id))["state"] == state

    await eventually(reached, timeout, f"VM {vm_id} reaching {state}")
    return await vm_state(session, vm_id)


async def read_events(session: Session, path: str, count: int, headers: dict[str, str] | None = None,
                      timeout: float = 20.0) -> list[dict[str, Any]]:
    """Read ``count`` server-sent ``state`` events from ``path``; returns their data (with the SSE id)."""
    found: list[dict[str, Any]] = []
    async with session.http.get(session.base_url + path, headers=headers or {},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if event.get("event") == "state":
                    found.append({**json.loads(event["data"]), "sse_id": int(event["id"])})
                    if len(found) >= count:
                        return found
                event = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            event[name] = value
    return found


@pytest.fixture
def fake_driver() -> FakeDriver:
    return FakeDriver(boot_delay=0.3)  # long enough to see provisioning and starting go by


async def running_and_stopped(session: Session) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two VMs of the session's user: one running, one created and then stopped."""
    status, running = await session.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201
    status, stopped = await session.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201
    assert (await session.request("POST", f"/api/vms/{stopped['vm_id']}/stop?wait=20"))[0] == 200
    return running, stopped


async def user(server: Any, sessions: Any) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login()
    return session


# ---- the asynchronous API and its events -----------------------------------------------------------

async def test_create_answers_at_once_and_events_follow_it(server: Any, sessions: Any) -> None:
    alice = await user(server, sessions)
    async with alice.http.post(alice.base_url + "/api/vms", json=VM,
                               headers={"X-CSRF-Token": alice.csrf_token or ""}) as resp:
        assert resp.status == 202
        vm = await resp.json()
        assert resp.headers["Location"] == f"/api/vms/{vm['vm_id']}"
    assert vm["state"] == "provisioning" and vm["desired_state"] == "running"
    vm_id = vm["vm_id"]
    events = await read_events(alice, f"/api/vms/{vm_id}/events", 3)
    # The first event is the state at connect time; then each change, in order, up to running.
    states = [e["state"] for e in events]
    assert states[-1] == "running" or "running" not in states
    seen = states
    if "running" not in seen:
        more = await read_events(alice, f"/api/vms/{vm_id}/events", 1,
                                 headers={"Last-Event-ID": str(events[-1]["sse_id"])})
        seen = states + [e["state"] for e in more]
    assert seen[-1] == "running", seen
    assert all(e["vm_id"] == vm_id and e["desired_state"] == "running" for e in events)
    ids = [e["sse_id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # Last-Event-ID 0 replays the whole history from Postgres, in order.
    replay = await read_events(alice, f"/api/vms/{vm_id}/events", 3, headers={"Last-Event-ID": "0"})
    assert [e["state"] for e in replay] == ["provisioning", "starting", "running"]
    history = (await vm_state(alice, vm_id))["history"]
    assert [h["to"] for h in history] == ["provisioning", "starting", "running"]


async def test_user_event_stream_sees_every_vm_of_the_user_only(server: Any, sessions: Any) -> None:
    alice, bob = await user(server, sessions), await user(server, sessions)
    status, running = await alice.request("POST", "/api/vms?wait=30", json=VM)
    assert status == 201, running
    reader = asyncio.create_task(read_events(alice, "/api/me/events", 3))
    await asyncio.sleep(0.5)
    assert (await bob.request("POST", "/api/vms", json=VM))[0] == 202
    status, stopping = await alice.request("POST", f"/api/vms/{running['vm_id']}/stop")
    assert status == 202 and stopping["state"] == "stopping"
    events = await reader
    assert {e["vm_id"] for e in events} == {running["vm_id"]}
    assert [e["state"] for e in events] == ["running", "stopping", "stopped"]


async def test_events_need_the_owner(server: Any, sessions: Any) -> None:
    alice, bob = await user(server, sessions), await user(server, sessions)
    status, vm = await alice.request("POST", "/api/vms", json=VM)
    assert status == 202
    assert_envelope(*await bob.request("GET", f"/api/vms/{vm['vm_id']}/events"), 404, "not_found")
    anonymous: Session = sessions(server)
    assert_envelope(*await anonymous.request("GET", "/api/me/events"), 401, "not_authenticated")


@pytest.mark.parametrize("wait", ["abc", "-1", "121", "nan"])
async def test_wait_is_validated(server: Any, sessions: Any, wait: str) -> None:
    alice = await user(server, sessions)
    error = assert_envelope(*await alice.request("POST", f"/api/vms?wait={wait}", json=VM), 422, "validation_failed")
    assert error["details"]["field"] == "wait"
    assert (await alice.request("GET", "/api/me/vms"))[1]["vms"] == []


async def test_actions_answer_202_and_settle(server: Any, sessions: Any) -> None:
    alice = await user(server, sessions)
    status, vm = await alice.request("POST", "/api/vms", json=VM)
    assert status == 202
    vm_id = vm["vm_id"]
    # A stop before the VM runs is a conflict only while it is provisioning.
    await wait_state(alice, vm_id, "running")
    status, body = await alice.request("POST", f"/api/vms/{vm_id}/stop")
    assert status == 202 and body["state"] == "stopping"
    assert_envelope(*await alice.request("POST", f"/api/vms/{vm_id}/stop"), 409, "invalid_state")
    await wait_state(alice, vm_id, "stopped")
    status, body = await alice.request("POST", f"/api/vms/{vm_id}/start?wait=20")
    assert status == 200 and body["state"] == "running"
    status, body = await alice.request("DELETE", f"/api/vms/{vm_id}")
    assert status == 202 and body["state"] == "destroying"
    await wait_state(alice, vm_id, "destroyed")
    assert vm_id not in server.driver.vms


async def test_a_waiting_request_reads_again_when_this_process_publishes(server: Any) -> None:
    """A request waiting for a VM (``?wait``, a console that resumes it) reads the VM's row again as soon as
    the engine in the same process publishes a change of that VM (publish.watching), not at its next poll:
    here the poll is an hour. Another VM's change does not wake it."""
    app = server.app
    reads: list[int] = []

    async def fetch(_cur: Any) -> dict[str, int]:
        reads.append(1)
        return {"n": len(reads)}

    def change(vm_id: str) -> dict[str, Any]:
        return {"id": vm_id, "user_id": str(uuid.uuid4()), "state": "running", "desired_state": "running"}

    vm_id = str(uuid.uuid4())
    with watching(vm_id) as changed:
        waiter = asyncio.create_task(poll_row(app, fetch, lambda row: row["n"] >= 2, 3600, 3600, changed))
        await asyncio.sleep(0.1)
        await publish(app[redis_key], change(str(uuid.uuid4())))
        await asyncio.sleep(0.1)
        assert len(reads) == 1 and not waiter.done()
        await publish(app[redis_key], change(vm_id))
        assert (await asyncio.wait_for(waiter, 10)) == {"n": 2}
    assert vm_id not in publish_module._watchers  # nothing left behind once the request stopped waiting


async def test_destroy_during_provisioning_leaves_nothing(server: Any, sessions: Any, app_settings: Settings) -> None:
    server.driver.boot_delay = 1.5
    alice = await user(server, sessions)
    status, vm = await alice.request("POST", "/api/vms", json=VM)
    assert status == 202
    status, body = await alice.request("DELETE", f"/api/vms/{vm['vm_id']}?wait=20")
    assert status == 200 and body["state"] == "destroyed", body
    assert vm["vm_id"] not in server.driver.vms
    assert not list(Path(app_settings.vms_root).glob(f"users/*/{vm['vm_id']}*"))
    me = (await alice.request("GET", "/api/me"))[1]
    assert me["usage"]["vms"] == 0


# ---- crashes and the restart policy ----------------------------------------------------------------

@pytest.fixture
def restart_settings(app_settings: Settings) -> Settings:
    return dataclasses.replace(app_settings, restart_attempts=2, restart_interval=600, restart_delay=0)


@pytest.fixture
async def restart_server(aiohttp_server: Any, restart_settings: Settings, database_url: str) -> Any:
    return await fake_gateway(aiohttp_server, restart_settings, database_url)


async def test_a_crashed_vm_is_restarted_then_given_up_on(restart_server: Any, sessions: Any) -> None:
    alice = await user(restart_server, sessions)
    driver: FakeDriver = restart_server.driver
    status, vm = await alice.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201
    vm_id = vm["vm_id"]
    pids = [driver.vms[vm_id].pid]
    for attempt in (1, 2):
        driver.crash(vm_id, returncode=1)

        async def restarted() -> bool:
            return driver.vms[vm_id].pid not in (None, *pids) and (await vm_state(alice, vm_id))["state"] == "running"

        await eventually(restarted, what=f"restart {attempt}")
        pids.append(driver.vms[vm_id].pid)
        history = (await vm_state(alice, vm_id))["history"]
        assert any(h["to"] == "starting" and f"restart {attempt} of 2" in (h["reason"] or "") for h in history)
    driver.write_serial(vm_id, "kernel panic: the last words\n")
    driver.crash(vm_id, returncode=1)
    failed = await wait_state(alice, vm_id, "error")
    assert "gave up after 2 restart(s)" in failed["error"] and "kernel panic: the last words" in failed["error"]
    assert failed["desired_state"] == "stopped"
    # The disk is kept and still counts; the user can start it again (the crash count starts over).
    me = (await alice.request("GET", "/api/me"))[1]
    assert me["usage"]["vms"] == 1
    status, body = await alice.request("POST", f"/api/vms/{vm_id}/start?wait=20")
    assert status == 200 and body["state"] == "running"


async def test_a_guest_that_powers_off_is_stopped_not_restarted(restart_server: Any, sessions: Any) -> None:
    alice = await user(restart_server, sessions)
    status, vm = await alice.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201
    restart_server.driver.crash(vm["vm_id"], returncode=0)  # QEMU exits 0 when the guest powers off
    stopped = await wait_state(alice, vm["vm_id"], "stopped")
    assert stopped["desired_state"] == "stopped" and stopped["error"] == "the guest powered off"


async def test_a_failed_start_keeps_the_vm_stopped_with_its_disk(server: Any, sessions: Any,
                                                                 app_settings: Settings) -> None:
    alice = await user(server, sessions)
    status, vm = await alice.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201
    assert (await alice.request("POST", f"/api/vms/{vm['vm_id']}/stop?wait=20"))[0] == 200
    server.driver.fail_next_start = "no room on this host"
    error = assert_envelope(*await alice.request("POST", f"/api/vms/{vm['vm_id']}/start?wait=20"), 503,
                            "start_failed")
    assert "no room on this host" in error["message"]
    after = await vm_state(alice, vm["vm_id"])
    assert after["state"] == "stopped" and after["desired_state"] == "stopped"
    assert list(Path(app_settings.vms_root).glob(f"users/*/{vm['vm_id']}.qcow2"))


# ---- the queue -------------------------------------------------------------------------------------

async def test_a_job_a_worker_never_finished_is_redelivered(redis_test_url: str, redis_flush: redis.Redis) -> None:
    client = redis.asyncio.from_url(redis_test_url, decode_responses=True)
    try:
        queue = WorkQueue(client, claim_idle=1.0, stream="vmgate:test-work")
        await queue.ensure_group()
        vm_id = str(uuid.uuid4())
        await queue.put(vm_id, "create")
        first = await queue.take("dies", block_ms=100)
        assert first is not None and first.vm_id == vm_id and first.deliveries == 1
        # The dead worker's job is not handed out while it could still be alive ...
        assert await queue.take("survivor", block_ms=100) is None
        stats = await queue.stats()
        assert stats["depth"] == 1 and stats["pending"] == 1 and stats["oldest_age_seconds"] is not None
        # ... but is once it has been idle for claim_idle.
        await asyncio.sleep(1.2)
        again = await queue.take("survivor", block_ms=100)
        assert again is not None and again.id == first.id and again.deliveries == 2
        # A live worker keeps its job: touching resets the idle time.
        await asyncio.sleep(0.7)
        await queue.touch("survivor", again)
        await asyncio.sleep(0.7)
        assert await queue.take("third", block_ms=100) is None
        await queue.done(again)
        assert (await queue.stats())["depth"] == 0 and (await queue.stats())["pending"] == 0
        # With once=True (the reconciler), a VM already queued is not queued twice.
        assert await queue.put(vm_id, "reconcile", once=True) is not None
        assert await queue.put(vm_id, "reconcile", once=True) is None
        # After Redis lost the stream and its group, the queue starts over instead of failing.
        await client.delete("vmgate:test-work")
        assert await queue.take("survivor", block_ms=100) is None
        assert await queue.put(vm_id, "create") is not None
        assert (await queue.take("survivor", block_ms=100)) is not None
    finally:
        await client.aclose()


async def test_admin_sees_the_queue(server: Any, sessions: Any, database_url: str) -> None:
    admin = await user(server, sessions)
    sql(database_url, "UPDATE users SET role = 'admin' WHERE id = %s", admin.user["id"] if admin.user else "")
    alice = await user(server, sessions)
    assert_envelope(*await alice.request("GET", "/api/admin/queue"), 404)
    status, body = await admin.request("GET", "/api/admin/queue")
    assert status == 200, body
    assert {"depth", "pending", "oldest_age_seconds", "consumers", "vms_in_transition"} <= set(body)
    assert body["depth"] >= 0 and body["workers_per_gateway"] == 2
    status, metrics = await admin.request("GET", "/metrics")
    assert status == 200 and "vmgate_queue_depth" in metrics and "vmgate_queue_oldest_age_seconds" in metrics


# ---- several gateways on one database --------------------------------------------------------------

async def test_two_gateways_start_each_vm_once(aiohttp_server: Any, app_settings: Settings, database_url: str,
                                               sessions: Any) -> None:
    driver = FakeDriver(boot_delay=0.2)  # one host, two gateway processes driving it
    one = await aiohttp_server(create_app(app_settings, driver=driver))
    truncate_all(database_url)
    two = await aiohttp_server(create_app(app_settings, driver=driver))
    alice = await user(one, sessions)
    other: Session = sessions(two)
    other.http.cookie_jar.update_cookies(alice.http.cookie_jar.filter_cookies(URL(alice.base_url)))
    other.csrf_token = alice.csrf_token
    answers = await asyncio.gather(
        *(s.request("POST", "/api/vms", json={**VM, "memory_mb": 128}) for s in (alice, other, alice)))
    made = [body["vm_id"] for status, body in answers if status == 202]
    assert len(made) == 3
    for vm_id in made:
        await wait_state(alice, vm_id, "running")
    # Each engine's reconciler ran passes meanwhile; still each VM started once.
    await asyncio.sleep(1.5)
    starts = [call for call in driver.calls if call[0] == "start"]
    assert sorted(vm for _, vm in starts) == sorted(made), starts
    running = sql(database_url, "SELECT vm_id, count(*) FROM vm_events WHERE to_state = 'running' GROUP BY vm_id")
    assert {str(r[0]): r[1] for r in running} == dict.fromkeys(made, 1)


# ---- the collector ---------------------------------------------------------------------------------

async def test_collector_removes_orphans_and_leaves_live_vms(aiohttp_server: Any, app_settings: Settings,
                                                             database_url: str, sessions: Any,
                                                             redis_flush: redis.Redis) -> None:
    settings = dataclasses.replace(app_settings, orphan_grace=60, transition_timeout=10)
    srv = await fake_gateway(aiohttp_server, settings, database_url)
    driver: FakeDriver = srv.driver
    alice = await user(srv, sessions)
    live, stopped = await running_and_stopped(alice)
    live_pid = driver.vms[live["vm_id"]].pid
    users_dir = Path(settings.vms_root) / "users" / str(uuid.uuid4())
    users_dir.mkdir(parents=True)
    old, young = users_dir / f"{uuid.uuid4()}.qcow2", users_dir / f"{uuid.uuid4()}.qcow2"
    for path in (old, young):
        path.write_bytes(b"QFI\xfb")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    orphan_vm = str(uuid.uuid4())
    job = sql(database_url, "SELECT jobspec FROM vms WHERE id = %s", live["vm_id"])[0][0]
    job = json.loads(json.dumps(job).replace(live["vm_id"], orphan_vm))
    await driver.start(orphan_vm, job)
    # Console leftovers: a VNC target of a VM that is gone and a revocation set naming an expired token.
    gone = str(uuid.uuid4())
    redis_flush.set(redis_keys.vnc_target_key(gone), json.dumps(VncTarget(unix_socket="/x").to_json()))
    redis_flush.sadd(redis_keys.vm_tokens_key(live["vm_id"]), "f" * 64)
    # A VM stuck in provisioning for an hour with no worker on it: its create failed, nothing of it stays.
    stuck = sql(database_url, "SELECT id FROM vms WHERE id = %s", stopped["vm_id"])[0][0]
    sql(database_url, "UPDATE vms SET state = 'starting', desired_state = 'running',"
        " updated_at = now() - interval '1 hour' WHERE id = %s", stuck)

    report = await srv.app[engine_key].collect_once()
    assert report["overlays"] == [str(old)]
    assert report["processes"] == [orphan_vm]
    assert redis_keys.vnc_target_key(gone) in report["console_records"]
    assert any(r.startswith(redis_keys.vm_tokens_key(live["vm_id"])) for r in report["console_records"])
    assert report["stuck"] == [f"{stuck} (starting)"]
    assert not old.exists() and young.exists()  # too young to be sure nothing is creating it
    assert orphan_vm not in driver.vms
    assert driver.vms[live["vm_id"]].pid == live_pid
    assert list(Path(settings.vms_root).glob(f"users/*/{live['vm_id']}.qcow2"))
    assert list(Path(settings.vms_root).glob(f"users/*/{stopped['vm_id']}.qcow2"))  # a stuck start keeps its disk
    after = await vm_state(alice, stopped["vm_id"])
    assert after["state"] == "stopped" and "starting for more than" in after["error"]
    assert (await vm_state(alice, live["vm_id"]))["state"] == "running"


# ---- Redis away ------------------------------------------------------------------------------------

async def test_with_redis_down_reads_work_and_writes_say_503(aiohttp_server: Any, app_settings: Settings,
                                                             database_url: str, sessions: Any,
                                                             private_redis: RedisServer) -> None:
    srv = await fake_gateway(aiohttp_server, dataclasses.replace(app_settings, redis_url=private_redis.url),
                             database_url)
    alice = await user(srv, sessions)
    status, vm = await alice.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201
    private_redis.stop()
    assert (await alice.request("GET", "/api/me/vms"))[0] == 200
    assert (await alice.request("GET", f"/api/vms/{vm['vm_id']}"))[0] == 200
    assert (await alice.request("GET", "/api/me"))[0] == 200
    assert_envelope(*await alice.request("POST", "/api/vms", json=VM), 503)
    assert_envelope(*await alice.request("GET", f"/api/vms/{vm['vm_id']}/events"), 503, "events_unavailable")
    assert_envelope(*await alice.request("GET", f"/api/vms/{vm['vm_id']}/console"), 503)
    assert len((await alice.request("GET", "/api/me/vms"))[1]["vms"]) == 1  # the refused create left no row
    private_redis.start()  # empty: the queue, the console target and the rate-limit windows are gone
    status, second = await alice.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201, second

    # The lost console target of the running VM is published again by the reconciler.
    async def console_back() -> bool:
        return (await alice.request("GET", f"/api/vms/{vm['vm_id']}/console"))[0] == 200

    await eventually(console_back, what="the console of the running VM after Redis came back")


# ---- drivers that say when something changed -------------------------------------------------------

class WatchedFakeDriver(FakeDriver):
    """A fake driver that, like the Nomad driver's blocking query, answers ``wait_for_change`` when told."""

    def __init__(self) -> None:
        super().__init__()
        self.index = 1
        self.changed = asyncio.Event()

    def bump(self) -> None:
        self.index += 1
        self.changed.set()

    async def wait_for_change(self, index: int, wait: float) -> int | None:
        if index == self.index:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), wait)
        return self.index


async def test_a_driver_change_is_reconciled_at_once(aiohttp_server: Any, restart_settings: Settings,
                                                     database_url: str, sessions: Any) -> None:
    settings = dataclasses.replace(restart_settings, reconcile_interval=3600.0)  # no periodic pass in this test
    srv = await fake_gateway(aiohttp_server, settings, database_url, WatchedFakeDriver())
    driver: WatchedFakeDriver = srv.driver
    alice = await user(srv, sessions)
    status, vm = await alice.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201
    pid = driver.vms[vm["vm_id"]].pid
    driver.crash(vm["vm_id"], returncode=1)
    driver.bump()  # what a Nomad blocking query returning with a new index means

    async def restarted() -> bool:
        current = driver.vms[vm["vm_id"]].pid
        return current not in (None, pid) and (await vm_state(alice, vm["vm_id"]))["state"] == "running"

    await eventually(restarted, 10, "a restart started by the driver's change notification")
    assert srv.app[engine_key].watch_wakeups >= 1


# ---- Postgres away ---------------------------------------------------------------------------------

@contextlib.contextmanager
def database_away(database_url: str) -> Iterator[None]:
    """Take the test database away from everyone: refuse new connections, end the open ones (done from
    the cluster's `postgres` database, since a database cannot refuse the connection doing it)."""
    name = urlsplit(database_url).path.lstrip("/")
    conn = psycopg2.connect(urlunsplit(urlsplit(database_url)._replace(path="/postgres")))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            with conn.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        conn.close()


async def test_with_postgres_down_no_vm_is_touched_blindly(restart_server: Any, sessions: Any,
                                                          database_url: str) -> None:
    alice = await user(restart_server, sessions)
    driver: FakeDriver = restart_server.driver
    running, stopped = await running_and_stopped(alice)
    pid = driver.vms[running["vm_id"]].pid
    with database_away(database_url):
        calls = len(driver.calls)
        assert_envelope(*await alice.request("GET", "/api/me/vms"), 503, "postgres_unavailable")
        assert_envelope(*await alice.request("POST", f"/api/vms/{stopped['vm_id']}/start"), 503,
                        "postgres_unavailable")
        assert_envelope(*await alice.request("POST", "/api/vms", json=VM), 503, "postgres_unavailable")
        driver.crash(running["vm_id"], returncode=1)  # QEMU dies while the database is away
        await asyncio.sleep(3)  # six reconciler passes would have come and gone
        # Nothing was started, stopped or destroyed without the rows: the engine only read the driver.
        assert [call for call in driver.calls[calls:] if call[0] != "status"] == []
    # Postgres back: the crash is handled by the restart policy, the stopped VM stays stopped.

    async def restarted() -> bool:
        current = driver.vms[running["vm_id"]].pid
        return current not in (None, pid) and (await vm_state(alice, running["vm_id"]))["state"] == "running"

    await eventually(restarted, 30, "the restart once Postgres is back")
    assert (await vm_state(alice, stopped["vm_id"]))["state"] == "stopped"
    assert driver.vms[stopped["vm_id"]].pid is None


# ---- suspend and snapshots on a driver that cannot save memory (as Nomad) ------------------------------

async def stopped_disk_snapshot_round_trip(s: Session, vm_id: str, wait: int = 60) -> dict[str, Any]:
    """Stop the VM, snapshot its disk, restore that (it stays stopped), start it again; returns the snapshot."""
    status, vm = await s.request("POST", f"/api/vms/{vm_id}/stop?wait={wait}")
    assert status == 200 and vm["state"] == "stopped", vm
    status, snap = await s.request("POST", f"/api/vms/{vm_id}/snapshots?wait={wait}", json={"name": "disk"})
    assert status == 201 and snap["memory"] is False and snap["memory_bytes"] == 0, snap
    status, vm = await s.request("POST", f"/api/vms/{vm_id}/snapshots/{snap['snapshot_id']}/restore?wait={wait}")
    assert status == 200 and vm["state"] == "stopped", vm
    status, vm = await s.request("POST", f"/api/vms/{vm_id}/start?wait={wait}")
    assert status == 200 and vm["state"] == "running", vm
    return dict(snap)


async def test_a_driver_without_memory_state_never_suspends_and_snapshots_stopped_disks(
        aiohttp_server: Any, app_settings: Settings, database_url: str, sessions: Any) -> None:
    settings = dataclasses.replace(app_settings, idle_suspend_after=1)
    srv = await fake_gateway(aiohttp_server, settings, database_url, FakeDriver())
    assert not srv.driver.saves_memory
    s = await user(srv, sessions)
    status, vm = await s.request("POST", "/api/vms?wait=20", json=VM)
    assert status == 201, vm
    vm_id = vm["vm_id"]

    status, body = await s.request("POST", f"/api/vms/{vm_id}/suspend")
    assert_envelope(status, body, 409, "not_supported")
    status, body = await s.request("POST", f"/api/vms/{vm_id}/snapshots", json={"name": "live"})
    assert_envelope(status, body, 409, "not_supported")
    assert sql(database_url, "SELECT count(*) FROM snapshots") == [(0,)]
    # Idle well past IDLE_SUSPEND_AFTER (the list is not a request on the VM): it keeps running.
    await asyncio.sleep(3)
    status, listing = await s.request("GET", "/api/me/vms")
    assert [v["state"] for v in listing["vms"]] == ["running"]

    # Stopped, its disk can be snapshotted (qemu-img on the overlay: no driver needed), restored, deleted.
    snap = await stopped_disk_snapshot_round_trip(s, vm_id)
    # Not while it runs: the request is taken, and done once the VM is stopped.
    status, gone = await s.request("DELETE", f"/api/vms/{vm_id}/snapshots/{snap['snapshot_id']}?wait=2")
    assert status == 202 and gone["state"] == "deleting", gone
    status, vm = await s.request("POST", f"/api/vms/{vm_id}/stop?wait=20")
    assert status == 200, vm

    async def deleted() -> bool:
        return sql(database_url, "SELECT state FROM snapshots") == [("deleted",)]

    await eventually(deleted, what="the snapshot's deletion once the VM stopped")
    # A VM on its way somewhere (this one boots for a second) cannot be snapshotted.
    srv.driver.boot_delay = 1.0
    status, vm = await s.request("POST", f"/api/vms/{vm_id}/start")
    assert status == 202, vm
    status, body = await s.request("POST", f"/api/vms/{vm_id}/snapshots", json={"name": "x"})
    assert_envelope(status, body, 409, "invalid_state")
    assert sql(database_url, "SELECT count(*) FROM snapshots WHERE name = 'x'") == [(0,)]
