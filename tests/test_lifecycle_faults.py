"""The lifecycle engine under real faults (issue 4): the gateway runs as a real process
(tests/fixtures/gateway_process.py) on real Postgres, Redis and QEMU (the tiny image), and the tests
SIGKILL it at the engine's crash points (gateway/faults.py), kill -9 it while VMs run, kill -9 QEMU,
restart Redis during a burst of creates, plant orphans for the collector, and finally run a soak of
200 operations with random faults. After each, what Postgres says, what runs on the host and what
lies under VMS_ROOT must agree exactly.

Nothing here measures time: every wait polls for a state with a generous deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import psycopg2
import psycopg2.extras
import pytest
import redis

from console import redis_keys
from drivers.local import LocalDriver, network
from gateway.config import RATE_LIMIT_DEFAULTS
from gateway.engine.queue import STREAM
from gateway.states import TRANSITIONAL as TRANSITIONAL_STATES
from jobspecs import Template
from tests.conftest import Session, assert_envelope, declared
from tests.fixtures.qemu import qmp, type_text
from tests.test_e2e import READY, open_console, wait_for_serial

if TYPE_CHECKING:  # the fixture modules are loaded as plugins (conftest.py), before assertion rewriting
    from tests.fixtures.gateway_process import GatewayFactory, GatewayProcess
    from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.qemu

# Not the shared test database 15, which every test anywhere flushes as it starts: these tests keep
# live state (the queue, console targets) in Redis for minutes.
REDIS_DB = 12
TINY = {"template": "tiny", "cpu": 1, "memory_mb": 128, "disk_gb": 1}
SETTLE = 120.0  # deadline, seconds, for anything to converge (2 cores under TCG, other tests running)
TRANSITIONAL = TRANSITIONAL_STATES
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError)

T = TypeVar("T")


@pytest.fixture
def redis_test_db() -> int:
    return REDIS_DB


# ---- what the host, the files and the database say ---------------------------------------------------

def _is_zombie(pid: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")


def qemu_by_vm(vms_root: Path) -> dict[str, list[int]]:
    """Live QEMU processes whose command line points into a task dir under ``vms_root``, by VM id."""
    marker = os.fsencode(str(vms_root / "tasks")) + b"/"
    found: dict[str, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu-system" not in os.path.basename(argv[0]) or _is_zombie(entry.name):
            continue
        for arg in argv:
            at = arg.find(marker)
            if at >= 0:
                found[arg[at + len(marker):].split(b"/", 1)[0].decode()].append(int(entry.name))
                break
    return dict(found)


def overlays(vms_root: Path) -> dict[str, Path]:
    """Overlay files (and leftovers of interrupted creates) under VMS_ROOT/users, by VM id."""
    users = vms_root / "users"
    return {p.name.split(".", 1)[0]: p for p in [*users.glob("*/*.qcow2"), *users.glob("*/*.part")]}


def task_dirs(vms_root: Path) -> set[str]:
    tasks = vms_root / "tasks"
    return {p.name for p in tasks.iterdir() if p.is_dir() and not p.name.startswith(".")} if tasks.is_dir() else set()


def lock_files(vms_root: Path) -> set[str]:
    return {p.name.removesuffix(".lock") for p in (vms_root / "tasks" / ".locks").glob("*.lock")}


def pid_of(vms_root: Path, vm_id: str) -> int | None:
    try:
        return int((vms_root / "tasks" / vm_id / "qemu.pid").read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists() and not _is_zombie(str(pid))


def query(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with contextlib.closing(psycopg2.connect(database_url)) as conn, \
            conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(sql, params)
        rows = [dict(r) for r in cur.fetchall()]
        conn.commit()
        return rows


def vm_rows(database_url: str) -> dict[str, dict[str, Any]]:
    rows = query(database_url, "SELECT id::text AS id, user_id::text AS user_id, name, state, desired_state,"
                               " error_reason, overlay_path FROM vms")
    return {r["id"]: r for r in rows}


def vm_row(database_url: str, vm_id: str) -> dict[str, Any]:
    return vm_rows(database_url)[vm_id]


def row_in(database_url: str, vm_id: str, *states: str) -> dict[str, Any] | None:
    """The VM's row if it is in one of ``states``."""
    row = vm_row(database_url, vm_id)
    return row if row["state"] in states else None


def transitions_to(database_url: str, vm_id: str, state: str) -> int:
    rows = query(database_url, "SELECT count(*) AS n FROM vm_events WHERE vm_id = %s AND to_state = %s",
                 (vm_id, state))
    return int(rows[0]["n"])


def assert_each_ran_once(database_url: str, vms_root: Path, vm_ids: list[str]) -> None:
    """Every one of ``vm_ids`` has exactly one QEMU on the host and reached `running` exactly once."""
    assert sorted(qemu_by_vm(vms_root)) == sorted(vm_ids)
    for vm_id in vm_ids:
        assert transitions_to(database_url, vm_id, "running") == 1


def queue_idle(client: redis.Redis) -> bool:
    """Nothing queued and nothing taken but unfinished (finished jobs are deleted from the stream)."""
    return int(client.xlen(STREAM)) == 0


def holds_disk(row: dict[str, Any]) -> bool:
    return row["state"] != "destroyed" and not (row["state"] == "error" and row["desired_state"] == "destroyed")


def disagreements(database_url: str, vms_root: Path, client: redis.Redis | None = None) -> list[str]:
    """Every way the rows, the QEMU processes, the files under VMS_ROOT (and the console targets in
    Redis) disagree; empty when they agree exactly."""
    rows = vm_rows(database_url)
    procs = qemu_by_vm(vms_root)
    files = overlays(vms_root)
    dirs = task_dirs(vms_root)
    problems = []
    running = {vm_id for vm_id, r in rows.items() if r["state"] == "running"}
    with_disk = {vm_id for vm_id, r in rows.items() if holds_disk(r)}
    destroyed = {vm_id for vm_id, r in rows.items() if not holds_disk(r)}
    if busy := {vm_id: r["state"] for vm_id, r in rows.items() if r["state"] in TRANSITIONAL}:
        problems.append(f"VMs in a transitional state: {busy}")
    if running != set(procs):
        extra = {v: rows.get(v, {}).get("state") for v in set(procs) - running}
        problems.append(f"running rows without QEMU: {sorted(running - set(procs))}; "
                        f"QEMU without a running row: {extra}")
    if several := {vm_id: pids for vm_id, pids in procs.items() if len(pids) != 1}:
        problems.append(f"VMs with more than one QEMU: {several}")
    for vm_id in running & set(procs):
        if pid_of(vms_root, vm_id) not in procs[vm_id]:
            problems.append(f"VM {vm_id}: qemu.pid {pid_of(vms_root, vm_id)} is not its QEMU {procs[vm_id]}")
    if set(files) != with_disk:
        problems.append(f"rows holding a disk without an overlay: {sorted(with_disk - set(files))}; overlays of no "
                        f"such row: { {v: rows.get(v, {}).get('state') for v in set(files) - with_disk} }")
    if part := [str(p) for p in files.values() if p.name.endswith(".part")]:
        problems.append(f"leftovers of interrupted creates: {part}")
    if stray := dirs - with_disk:
        problems.append(f"task dirs of destroyed or unknown VMs: { {v: rows.get(v, {}).get('state') for v in stray} }")
    if stray_locks := lock_files(vms_root) & destroyed:
        problems.append(f"lock files of destroyed VMs: {sorted(stray_locks)}")
    # Network namespaces (drivers/local/network.py) live exactly as long as their VM's QEMU.
    spaces = {vm_id: json.loads((vms_root / "tasks" / vm_id / network.STATE).read_text())["netns"]
              for vm_id in dirs if (vms_root / "tasks" / vm_id / network.STATE).is_file()}
    if gone := {vm_id: name for vm_id, name in spaces.items() if vm_id not in running}:
        problems.append(f"network namespaces of VMs that are not running: {gone}")
    if strays := set(network.leftovers()["netns"]) - set(spaces.values()):
        problems.append(f"network namespaces of no VM: {sorted(strays)}")
    if lone := set(network.leftovers()["links"]) - set(network.leftovers()["netns"]):
        problems.append(f"host links without their namespace: {sorted(lone)}")
    if client is not None:
        targets = {key.rsplit(":", 1)[-1] for key in client.scan_iter(redis_keys.vnc_target_key("*"))}
        if targets != running:
            problems.append(f"console targets {sorted(targets)} != running VMs {sorted(running)}")
    return problems


async def eventually(check: Callable[[], T | None], what: str, timeout: float = SETTLE, interval: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout:g} s (last: {last!r})")
        await asyncio.sleep(interval)


async def converged(database_url: str, vms_root: Path, client: redis.Redis, timeout: float = SETTLE) -> None:
    """Wait until the queue is idle and rows, processes, files and console targets agree; else fail with
    the disagreements."""
    last: list[str] = []

    def check() -> bool:
        nonlocal last
        last = disagreements(database_url, vms_root, client)
        return not last and queue_idle(client)

    try:
        await eventually(check, "converged", timeout=timeout)
    except AssertionError:
        raise AssertionError("rows, QEMU processes, files and console targets disagree:\n  "
                             + "\n  ".join(last or ["(they agree, but the queue is not empty)"])) from None


async def logged_in(gw: GatewayProcess) -> Session:
    session = Session(gw.base_url, outbox=gw.outbox)
    await session.signup_and_login()
    return session


async def api_vm(session: Session, vm_id: str) -> dict[str, Any]:
    status, body = await session.request("GET", f"/api/vms/{vm_id}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def usage(session: Session) -> dict[str, int]:
    status, body = await session.request("GET", "/api/me")
    assert status == 200, body
    return declared(body["usage"])


# ---- 1. a worker killed in the middle of a create ---------------------------------------------------

@pytest.mark.parametrize("point", ["create.admitted", "create.overlay", "create.started"])
async def test_worker_killed_mid_create_ends_running_once(point: str, gateway_processes: GatewayFactory,
                                                          vms_root: Path, database_url: str,
                                                          redis_flush: redis.Redis) -> None:
    gw = gateway_processes()
    await asyncio.to_thread(gw.start, VMGATE_CRASH_AT=point)
    session = await logged_in(gw)
    try:
        with contextlib.suppress(*CONNECTION_ERRORS):  # the worker may kill the process before it answers
            status, body = await session.request("POST", "/api/vms", json=TINY)
            assert status == 202, body
        assert await asyncio.to_thread(gw.wait_exit) == -signal.SIGKILL
        rows = vm_rows(database_url)
        assert len(rows) == 1, rows
        vm_id, row = next(iter(rows.items()))
        # The process died where it was told to.
        expected = {"create.admitted": ("provisioning", False, False), "create.overlay": ("provisioning", True, False),
                    "create.started": ("starting", True, True)}[point]
        assert (row["state"], vm_id in overlays(vms_root), vm_id in qemu_by_vm(vms_root)) == expected, row
        pid_before = pid_of(vms_root, vm_id)

        await asyncio.to_thread(gw.start)
        await eventually(lambda: vm_row(database_url, vm_id)["state"] == "running", f"VM {vm_id} running")
        await converged(database_url, vms_root, redis_flush)

        assert transitions_to(database_url, vm_id, "running") == 1
        assert [p.name for p in (vms_root / "users").glob("*/*")] == [f"{vm_id}.qcow2"]
        procs = qemu_by_vm(vms_root)
        assert list(procs) == [vm_id] and len(procs[vm_id]) == 1, procs
        if point == "create.started":
            assert procs[vm_id] == [pid_before], "the QEMU started before the crash was not adopted"
        assert (await api_vm(session, vm_id))["state"] == "running"
        assert await usage(session) == {"vms": 1, "vcpus": 1, "memory_mb": 128, "disk_gb": 1}
    finally:
        await session.close()


async def test_gateway_killed_while_qemu_boots_ends_running_once(gateway_processes: GatewayFactory, vms_root: Path,
                                                                  database_url: str, redis_flush: redis.Redis) -> None:
    """Between create.overlay and create.started: SIGKILL the gateway as soon as QEMU's pid file exists,
    while QEMU is still coming up (no crash point there: the test watches the task dir)."""
    gw = gateway_processes()
    await asyncio.to_thread(gw.start)
    session = await logged_in(gw)
    try:
        status, vm = await session.request("POST", "/api/vms", json=TINY)
        assert status == 202, vm
        vm_id = vm["vm_id"]
        pid_file = vms_root / "tasks" / vm_id / "qemu.pid"
        await eventually(pid_file.exists, "QEMU spawned", interval=0.002)
        assert await asyncio.to_thread(gw.kill) == -signal.SIGKILL
        assert vm_row(database_url, vm_id)["state"] == "starting"

        await asyncio.to_thread(gw.start)
        row = await eventually(lambda: row_in(database_url, vm_id, "running", "error"), f"VM {vm_id} settled")
        assert row["state"] == "running", row
        await converged(database_url, vms_root, redis_flush)
        assert transitions_to(database_url, vm_id, "running") == 1
        assert list(qemu_by_vm(vms_root)) == [vm_id] and list(overlays(vms_root)) == [vm_id]
        assert await usage(session) == {"vms": 1, "vcpus": 1, "memory_mb": 128, "disk_gb": 1}
    finally:
        await session.close()

# ---- 2. kill -9 the gateway while 5 VMs run ---------------------------------------------------------

async def test_gateway_kill9_keeps_running_vms_and_consoles(gateway_processes: GatewayFactory, vms_root: Path,
                                                            database_url: str, redis_flush: redis.Redis,
                                                            websockify_server: Any) -> None:
    gw = gateway_processes(VNC_PUBLIC_URL=websockify_server.ws_url)
    await asyncio.to_thread(gw.start)
    session = await logged_in(gw)
    try:
        answers = await asyncio.gather(*(session.request("POST", "/api/vms?wait=90", json=TINY) for _ in range(5)))
        assert [status for status, _ in answers] == [201] * 5, answers
        vm_ids = sorted(body["vm_id"] for _, body in answers)
        await converged(database_url, vms_root, redis_flush)
        pids = {vm_id: pid_of(vms_root, vm_id) for vm_id in vm_ids}
        assert qemu_by_vm(vms_root) == {vm_id: [pid] for vm_id, pid in pids.items()}

        assert await asyncio.to_thread(gw.kill) == -signal.SIGKILL
        assert all(alive(pid) for pid in pids.values()), "QEMU must outlive the gateway"
        await asyncio.to_thread(gw.start)
        await converged(database_url, vms_root, redis_flush)

        assert qemu_by_vm(vms_root) == {vm_id: [pid] for vm_id, pid in pids.items()}, "a VM was restarted"
        assert {vm_id: pid_of(vms_root, vm_id) for vm_id in vm_ids} == pids
        for vm_id in vm_ids:
            vm = await api_vm(session, vm_id)
            assert vm["state"] == "running", vm
            assert [h["to"] for h in vm["history"]].count("running") == 1, vm["history"]
            async with open_console(session, vm_id) as rfb:  # a framebuffer update came through websockify
                assert rfb.framebuffer is not None
    finally:
        await session.close()


async def test_two_gateways_share_the_work_and_survive_one_dying(gateway_processes: GatewayFactory, vms_root: Path,
                                                                  database_url: str, redis_flush: redis.Redis) -> None:
    """Two gateways on one database, Redis and VMS_ROOT: creates through both, one SIGKILLed while they
    are under way; the other finishes everything, each VM once (the per-VM advisory locks)."""
    first, second = gateway_processes(), gateway_processes()
    await asyncio.gather(asyncio.to_thread(first.start), asyncio.to_thread(second.start))
    sessions = [await logged_in(first), await logged_in(second)]
    try:
        answers = await asyncio.gather(*(s.request("POST", "/api/vms", json=TINY) for s in sessions for _ in range(3)))
        assert [status for status, _ in answers] == [202] * 6, answers
        vm_ids = sorted(body["vm_id"] for _, body in answers)
        await eventually(lambda: any(r["state"] != "provisioning" for r in vm_rows(database_url).values()),
                         "a create under way", interval=0.02)
        assert await asyncio.to_thread(first.kill) == -signal.SIGKILL

        await converged(database_url, vms_root, redis_flush)
        rows = vm_rows(database_url)
        assert sorted(rows) == vm_ids
        assert {vm_id: (r["state"], r["error_reason"]) for vm_id, r in rows.items()} == \
            dict.fromkeys(vm_ids, ("running", None))
        assert_each_ran_once(database_url, vms_root, vm_ids)
    finally:
        for session in sessions:
            await session.close()

# ---- 3. kill -9 QEMU: the restart policy, and a stop cut short by a crash ----------------------------

async def test_qemu_killed_is_restarted_per_policy_then_error(gateway_processes: GatewayFactory, vms_root: Path,
                                                              database_url: str, redis_flush: redis.Redis) -> None:
    gw = gateway_processes(RESTART_ATTEMPTS="2", RESTART_DELAY="1", RESTART_INTERVAL="600")
    await asyncio.to_thread(gw.start)
    session = await logged_in(gw)
    try:
        status, vm = await session.request("POST", "/api/vms?wait=60", json=TINY)
        assert status == 201, vm
        vm_id = vm["vm_id"]
        await wait_for_serial(session, vm_id, READY)  # the serial log has lines for the error reason
        pid = pid_of(vms_root, vm_id)
        assert alive(pid)
        for attempt in (1, 2):
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            old = pid

            def restarted(old: int = old) -> int | None:
                new = pid_of(vms_root, vm_id)
                state = vm_row(database_url, vm_id)["state"]
                return new if state == "running" and new != old and alive(new) else None

            pid = await eventually(restarted, f"VM {vm_id} restarted after crash {attempt}")
            assert qemu_by_vm(vms_root) == {vm_id: [pid]}
            history = (await api_vm(session, vm_id))["history"]
            assert f"restart {attempt} of 2" in (history[-2]["reason"] or ""), history[-2:]
            assert transitions_to(database_url, vm_id, "running") == attempt + 1

        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        row = await eventually(lambda: row_in(database_url, vm_id, "error"), f"VM {vm_id} in error after crash 3")
        reason = row["error_reason"] or ""
        assert "gave up after 2 restart(s)" in reason, reason
        assert "Last serial output:" in reason, reason
        status, logs = await session.request("GET", f"/api/vms/{vm_id}/logs")
        assert status == 200, logs
        last_line = [line.strip() for line in logs["serial"].replace("\r", "").splitlines() if line.strip()][-1]
        assert last_line in reason, (last_line, reason)
        assert row["desired_state"] == "stopped"
        assert transitions_to(database_url, vm_id, "running") == 3
        await converged(database_url, vms_root, redis_flush)
        assert qemu_by_vm(vms_root) == {}
        assert vm_id in overlays(vms_root), "a VM that crashed keeps its disk"
        assert (await usage(session))["vms"] == 1
        # The user may start it again: the crash history starts over.
        status, body = await session.request("POST", f"/api/vms/{vm_id}/start?wait=60")
        assert status == 200 and body["state"] == "running", body
    finally:
        await session.close()


async def test_stop_cut_short_by_a_gateway_crash_ends_stopped(gateway_processes: GatewayFactory, vms_root: Path,
                                                              database_url: str, redis_flush: redis.Redis) -> None:
    gw = gateway_processes()
    await asyncio.to_thread(gw.start, VMGATE_CRASH_AT="stop.requested")
    session = await logged_in(gw)
    try:
        status, vm = await session.request("POST", "/api/vms?wait=60", json=TINY)
        assert status == 201, vm
        vm_id = vm["vm_id"]
        pid = pid_of(vms_root, vm_id)
        with contextlib.suppress(*CONNECTION_ERRORS):
            status, body = await session.request("POST", f"/api/vms/{vm_id}/stop")
            assert status == 202, body
        assert await asyncio.to_thread(gw.wait_exit) == -signal.SIGKILL
        assert vm_row(database_url, vm_id)["state"] == "stopping"
        assert alive(pid), "the crash point is before the driver's stop"

        await asyncio.to_thread(gw.start)
        await eventually(lambda: vm_row(database_url, vm_id)["state"] == "stopped", f"VM {vm_id} stopped")
        await converged(database_url, vms_root, redis_flush)
        assert not alive(pid) and qemu_by_vm(vms_root) == {}
        assert vm_id in overlays(vms_root)
        row = vm_row(database_url, vm_id)
        assert row["desired_state"] == "stopped" and row["error_reason"] is None, row
        assert transitions_to(database_url, vm_id, "stopped") == 1
        exit_info = json.loads((vms_root / "tasks" / vm_id / "exit.json").read_text())
        assert exit_info["how"] in ("acpi", "quit", "sigterm", "sigkill"), exit_info
    finally:
        await session.close()



@pytest.mark.parametrize("point", ["suspend.saved", "resume.started"])
async def test_gateway_killed_mid_suspend_or_resume_loses_no_memory(point: str, gateway_processes: GatewayFactory,
                                                                    vms_root: Path, database_url: str,
                                                                    redis_flush: redis.Redis) -> None:
    """SIGKILL right after the memory was saved (QEMU gone, the row still suspending), or right after QEMU
    was started from it (the row still resuming): the next gateway finishes the step, and the guest's
    memory (a shell variable) is there afterwards."""
    gw = gateway_processes()
    await asyncio.to_thread(gw.start, VMGATE_CRASH_AT=point)
    session = await logged_in(gw)
    try:
        status, vm = await session.request("POST", "/api/vms?wait=60", json=TINY)
        assert status == 201, vm
        vm_id = vm["vm_id"]
        await wait_for_serial(session, vm_id, READY)
        await type_text(vms_root / "tasks" / vm_id / "qmp.sock", 'K=$RANDOM$RANDOM; echo "K1 $K" >/dev/ttyS0\n')
        serial = await wait_for_serial(session, vm_id, "K1 ")
        marker = serial[serial.index("K1 "):].split()[1]
        with contextlib.suppress(*CONNECTION_ERRORS):
            status, body = await session.request("POST", f"/api/vms/{vm_id}/suspend?wait=60")
            assert status == 200 if point == "resume.started" else status == 202, body
        if point == "resume.started":
            with contextlib.suppress(*CONNECTION_ERRORS):
                await session.request("POST", f"/api/vms/{vm_id}/start")
        assert await asyncio.to_thread(gw.wait_exit) == -signal.SIGKILL
        row = vm_row(database_url, vm_id)
        if point == "suspend.saved":
            assert row["state"] == "suspending" and qemu_by_vm(vms_root) == {}, row
        else:
            assert row["state"] == "resuming" and len(qemu_by_vm(vms_root).get(vm_id, [])) == 1, row
        pids = qemu_by_vm(vms_root).get(vm_id)

        await asyncio.to_thread(gw.start)
        want = "suspended" if point == "suspend.saved" else "running"
        await eventually(lambda: vm_row(database_url, vm_id)["state"] == want, f"VM {vm_id} {want}")
        if point == "resume.started":
            assert qemu_by_vm(vms_root).get(vm_id) == pids  # the QEMU started from the saved state, adopted
        else:
            status, vm = await session.request("POST", f"/api/vms/{vm_id}/start?wait=60")
            assert status == 200, vm
        await converged(database_url, vms_root, redis_flush)
        await type_text(vms_root / "tasks" / vm_id / "qmp.sock", 'echo "K2 $K" >/dev/ttyS0\n')
        serial = await wait_for_serial(session, vm_id, "K2 ")
        assert serial[serial.index("K2 "):].split()[1] == marker
        assert transitions_to(database_url, vm_id, "suspended") == 1
        assert "Linux version" not in serial[serial.index("K1 "):]  # resumed, never booted again
    finally:
        await session.close()


@pytest.mark.parametrize("adopted", [
    pytest.param(False, id="started-by-this-gateway"),
    pytest.param(True, id="adopted-after-kill9"),
])
async def test_guest_power_off_ends_stopped_not_restarted(adopted: bool, gateway_processes: GatewayFactory,
                                                          vms_root: Path, database_url: str,
                                                          redis_flush: redis.Redis) -> None:
    """The guest powers itself off (ACPI power button pressed from outside vmgate): the VM is stopped, not
    treated as a crash, whether the gateway started its QEMU or adopted it after a kill -9."""
    gw = gateway_processes()
    await asyncio.to_thread(gw.start)
    session = await logged_in(gw)
    try:
        status, vm = await session.request("POST", "/api/vms?wait=60", json=TINY)
        assert status == 201, vm
        vm_id = vm["vm_id"]
        await wait_for_serial(session, vm_id, READY)  # acpid listens
        if adopted:
            assert await asyncio.to_thread(gw.kill) == -signal.SIGKILL
            await asyncio.to_thread(gw.start)
            await converged(database_url, vms_root, redis_flush)
        await qmp(vms_root / "tasks" / vm_id / "qmp.sock", "system_powerdown")

        def settled() -> dict[str, Any] | None:  # stopped, in error, or restarted as if it had crashed
            if transitions_to(database_url, vm_id, "running") > 1:
                return vm_row(database_url, vm_id)
            return row_in(database_url, vm_id, "stopped", "error")

        row = await eventually(settled, "VM settled")
        assert (row["state"], row["desired_state"], row["error_reason"]) == \
            ("stopped", "stopped", "the guest powered off"), row
        assert transitions_to(database_url, vm_id, "running") == 1
        await converged(database_url, vms_root, redis_flush)
    finally:
        await session.close()

# ---- 4. Redis restarted during a burst of creates ----------------------------------------------------

@pytest.mark.parametrize("create_limit", [True, False], ids=["rate-limited", "not-rate-limited"])
async def test_redis_restart_during_create_burst(create_limit: bool, gateway_processes: GatewayFactory,
                                                 private_redis: RedisServer, vms_root: Path,
                                                 database_url: str) -> None:
    """With the vm_create_user rate limit (which fails closed) a create while Redis is away gets a 503;
    without it nothing in a create needs Redis: it is accepted and the reconciler queues it later."""
    limits = ",".join(f"{rule}=off" for rule in RATE_LIMIT_DEFAULTS if rule != "vm_create_user" or not create_limit)
    gw = gateway_processes(REDIS_URL=private_redis.url, RATE_LIMITS=limits)
    await asyncio.to_thread(gw.start)
    sessions = [await logged_in(gw) for _ in range(4)]
    accepted: dict[str, str] = {}  # name -> vm_id
    refused: list[str] = []
    try:
        async def create(session: Session, name: str, wait: int = 20) -> None:
            status, body = await session.request("POST", f"/api/vms?wait={wait}", json={**TINY, "name": name})
            if status in (201, 202):
                accepted[name] = body["vm_id"]
            else:
                assert_envelope(status, body, 503, "redis_unavailable")
                refused.append(name)

        async def client(index: int) -> None:
            for n in range(2):
                await create(sessions[index], f"burst-{index}-{n}")

        async def outage() -> None:
            await eventually(lambda: len(vm_rows(database_url)) >= 2, "two creates admitted", interval=0.05)
            await asyncio.to_thread(private_redis.stop)
            await create(sessions[0], "during-outage", wait=0)
            assert ("during-outage" in refused) == create_limit, (accepted, refused)
            await asyncio.sleep(1.0)  # keep it away while the burst goes on (not an assertion)
            await asyncio.to_thread(private_redis.start)

        await asyncio.gather(outage(), *(client(i) for i in range(4)))
        print(f"\naccepted {len(accepted)}, refused {len(refused)}")

        client_ = redis.Redis.from_url(private_redis.url, decode_responses=True)
        with client_:
            await eventually(lambda: not any(r["state"] in TRANSITIONAL for r in vm_rows(database_url).values()),
                             "no VM in a transitional state")
            await converged(database_url, vms_root, client_)
        rows = vm_rows(database_url)
        assert sorted(rows) == sorted(accepted.values()), "a VM was lost or duplicated"
        assert {r["name"] for r in rows.values()} == set(accepted)
        assert not set(refused) & {r["name"] for r in rows.values()}, "a refused create left a row"
        assert {vm_id: r["state"] for vm_id, r in rows.items()} == {vm_id: "running" for vm_id in rows}
        assert sorted(overlays(vms_root)) == sorted(rows)
        assert_each_ran_once(database_url, vms_root, list(rows))
    finally:
        for session in sessions:
            await session.close()


# ---- 5. the collector --------------------------------------------------------------------------------

async def test_collector_removes_orphans_and_spares_live_vms(gateway_processes: GatewayFactory, vms_root: Path,
                                                             database_url: str, redis_flush: redis.Redis,
                                                             render_tiny: Callable[..., dict[str, Any]],
                                                             make_overlay: Callable[..., Path],
                                                             tiny_template: Template) -> None:
    gw = gateway_processes(COLLECT_INTERVAL="1", ORPHAN_GRACE="0")
    await asyncio.to_thread(gw.start)
    session = await logged_in(gw)
    planter = LocalDriver(vms_root)
    try:
        status, live = await session.request("POST", "/api/vms?wait=60", json=TINY)
        assert status == 201, live
        live_id = live["vm_id"]
        status, stopped = await session.request("POST", "/api/vms?wait=60", json=TINY)
        assert status == 201, stopped
        stopped_id = stopped["vm_id"]
        status, body = await session.request("POST", f"/api/vms/{stopped_id}/stop?wait=60")
        assert status == 200 and body["state"] == "stopped", body
        await converged(database_url, vms_root, redis_flush)
        live_pid = pid_of(vms_root, live_id)
        live_overlay = overlays(vms_root)[live_id]
        live_target = redis_flush.get(redis_keys.vnc_target_key(live_id))
        assert live_target

        # An overlay without a VM, old enough (backdated besides ORPHAN_GRACE=0).
        stray_overlay = make_overlay(str(uuid.uuid4()))
        an_hour_ago = time.time() - 3600
        os.utime(stray_overlay, (an_hour_ago, an_hour_ago))
        # A QEMU without a VM. Its disk lies outside VMS_ROOT/users, where the collector could take it
        # before QEMU opened it.
        orphan_id = str(uuid.uuid4())
        orphan_disk = vms_root / "planted" / f"{orphan_id}.qcow2"
        orphan_disk.parent.mkdir()
        await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                                                 str(tiny_template.disk), "-F", "qcow2", str(orphan_disk), "1G"],
                                check=True)
        orphan = await planter.start(orphan_id, render_tiny(orphan_id, orphan_disk, memory_mb=128))
        assert alive(orphan.pid)
        # Console records of no running VM, and a token that expired but is still listed for the live VM.
        stale_targets = [redis_keys.vnc_target_key(str(uuid.uuid4())), redis_keys.vnc_target_key(stopped_id)]
        for key in stale_targets:
            redis_flush.set(key, json.dumps({"unix_socket": "/nonexistent/vnc.sock"}))
        redis_flush.sadd(redis_keys.vm_tokens_key(live_id), "0" * 64)

        def orphans_left() -> list[str]:
            left = [str(stray_overlay)] if stray_overlay.exists() else []
            left += [f"QEMU {orphan_id}"] if orphan_id in qemu_by_vm(vms_root) else []
            left += [f"task dir {orphan_id}"] if orphan_id in task_dirs(vms_root) else []
            left += [key for key in stale_targets if redis_flush.exists(key)]
            left += ["expired token"] if redis_flush.sismember(redis_keys.vm_tokens_key(live_id), "0" * 64) else []
            return left

        await eventually(lambda: not orphans_left(), "orphans collected")
        assert not alive(orphan.pid)
        # The live VM is untouched, and so is the stopped one's disk.
        assert pid_of(vms_root, live_id) == live_pid and alive(live_pid)
        assert qemu_by_vm(vms_root) == {live_id: [live_pid]}
        assert live_overlay.is_file() and overlays(vms_root)[live_id] == live_overlay
        assert stopped_id in overlays(vms_root) and stopped_id in task_dirs(vms_root)
        assert redis_flush.get(redis_keys.vnc_target_key(live_id)) == live_target
        rows = vm_rows(database_url)
        assert (rows[live_id]["state"], rows[stopped_id]["state"]) == ("running", "stopped")
        assert transitions_to(database_url, live_id, "running") == 1
        await converged(database_url, vms_root, redis_flush)
    finally:
        await planter.close()
        await session.close()


# ---- 6. the soak -------------------------------------------------------------------------------------

SOAK_OPS = 200
SOAK_CLIENTS = 4
SOAK_VMS_PER_CLIENT = 2
GATEWAY_KILLS_AT = (60, 130)  # operations done when the gateway is SIGKILLed and restarted
QEMU_KILL_EVERY = (4.0, 9.0)  # seconds between QEMU kills, at random in this range


@dataclass
class Soak:
    gw: GatewayProcess
    vms_root: Path
    rng: random.Random
    claimed: int = 0
    done: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    up: asyncio.Event = field(default_factory=asyncio.Event)
    over: asyncio.Event = field(default_factory=asyncio.Event)

    def claim(self) -> bool:
        if self.claimed >= SOAK_OPS:
            return False
        self.claimed += 1
        return True

    async def request(self, session: Session, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """The request, sent again after a connection error once the gateway is back (and after a 503 saying
        Postgres or Redis is away and nothing was changed, as a client would)."""
        for _ in range(40):
            await self.up.wait()
            try:
                status, body = await session.request(method, path, **kwargs)
            except CONNECTION_ERRORS:
                self.faults["client retries after connection errors"] += 1
                await asyncio.sleep(0.5)
                continue
            error = body.get("error") if isinstance(body, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            if status != 503 or code not in ("postgres_unavailable", "redis_unavailable"):
                return status, body
            self.faults[f"client retries after 503 {code}"] += 1
            await asyncio.sleep(0.5)
        raise AssertionError(f"{method} {path}: the gateway did not come back")


async def soak_client(soak: Soak, session: Session) -> None:
    while soak.claim():
        status, body = await soak.request(session, "GET", "/api/me/vms")
        assert status == 200, body
        vms = body["vms"]
        if not vms or (len(vms) < SOAK_VMS_PER_CLIENT and soak.rng.random() < 0.6):
            op, method, path, kwargs = "create", "POST", "/api/vms?wait=60", {"json": TINY}
        else:
            vm_id = soak.rng.choice(vms)["vm_id"]
            op = soak.rng.choices(["stop", "start", "destroy", "create"], weights=[4, 4, 2, 1])[0]
            method, path, kwargs = {
                "stop": ("POST", f"/api/vms/{vm_id}/stop?wait=60", {}),
                "start": ("POST", f"/api/vms/{vm_id}/start?wait=60", {}),
                "destroy": ("DELETE", f"/api/vms/{vm_id}?wait=60", {}),
                "create": ("POST", "/api/vms?wait=60", {"json": TINY}),
            }[op]
        status, body = await soak.request(session, method, path, **kwargs)
        # 403: a create over the quota (the soak's users may hold SOAK_VMS_PER_CLIENT VMs each).
        assert status in (200, 201, 202, 403, 409, 503), (op, status, body)
        if status >= 400:
            assert_envelope(status, body, status, "quota_exceeded" if status == 403 else None)
        soak.outcomes[f"{op} {status}" + (f" {body['error']['code']}" if status >= 400 else "")] += 1
        soak.done += 1


async def soak_faults(soak: Soak) -> None:
    kills = list(GATEWAY_KILLS_AT)
    next_qemu_kill = time.monotonic() + soak.rng.uniform(*QEMU_KILL_EVERY)
    while not soak.over.is_set():
        if kills and soak.done >= kills[0]:
            kills.pop(0)
            soak.up.clear()
            await asyncio.to_thread(soak.gw.kill)
            soak.faults["gateway SIGKILLed"] += 1
            await asyncio.to_thread(soak.gw.start)
            soak.up.set()
        if time.monotonic() >= next_qemu_kill:
            next_qemu_kill = time.monotonic() + soak.rng.uniform(*QEMU_KILL_EVERY)
            procs = qemu_by_vm(soak.vms_root)
            if procs:
                pid = soak.rng.choice(sorted(procs.values()))[0]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    soak.faults["QEMU SIGKILLed"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(soak.over.wait(), 0.2)


async def test_soak_with_random_faults(gateway_processes: GatewayFactory, vms_root: Path, database_url: str,
                                       redis_flush: redis.Redis) -> None:
    seed = int(os.environ.get("VMGATE_SOAK_SEED") or random.randrange(1 << 30))
    print(f"\nsoak seed {seed} (VMGATE_SOAK_SEED=seed replays the random choices; their timing differs)")
    # The collector runs, but ORPHAN_GRACE (120 s by default) outlasts the soak: it cannot tidy away files
    # or processes the engine itself left behind, so the check at the end sees them.
    gw = gateway_processes(QUOTA_MAX_VMS=str(SOAK_VMS_PER_CLIENT), STOP_TIMEOUT="3", RESTART_DELAY="0",
                           COLLECT_INTERVAL="2")
    await asyncio.to_thread(gw.start)
    soak = Soak(gw, vms_root, random.Random(seed))
    soak.up.set()
    sessions = [await logged_in(gw) for _ in range(SOAK_CLIENTS)]
    began = time.monotonic()
    try:
        faults = asyncio.create_task(soak_faults(soak))
        try:
            async with asyncio.TaskGroup() as clients:
                for session in sessions:
                    clients.create_task(soak_client(soak, session))
        finally:
            soak.over.set()
            await faults
        ran = time.monotonic() - began
        await converged(database_url, vms_root, redis_flush)
        rows = vm_rows(database_url)
        states = collections.Counter(r["state"] for r in rows.values())
        print(f"soak: {soak.done} operations in {ran:.0f} s (converged after {time.monotonic() - began:.0f} s)")
        for outcome, count in sorted(soak.outcomes.items()):
            print(f"  {outcome}: {count}")
        print(f"  faults: {dict(soak.faults)}")
        print(f"  VMs at the end: {dict(states)}")
        assert soak.done == SOAK_OPS
        assert soak.faults["gateway SIGKILLed"] == len(GATEWAY_KILLS_AT) and soak.faults["QEMU SIGKILLed"] >= 1
        for session in sessions:  # quota usage counts exactly the VMs that hold a disk
            assert session.user is not None
            held = [r for r in rows.values() if r["user_id"] == session.user["id"] and holds_disk(r)]
            assert (await usage(session))["vms"] == len(held) <= SOAK_VMS_PER_CLIENT
    finally:
        for session in sessions:
            await session.close()


