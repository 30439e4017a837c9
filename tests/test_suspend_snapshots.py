"""Idle suspend and users' snapshots on the embedded default, with real QEMU (docs/LIFECYCLE.md "Suspend
and resume", docs/SNAPSHOTS.md).

What a user would check: a VM left alone is suspended (QEMU gone, its memory saved in its own disk);
opening its console brings it back where it was, shell variables (memory) and files (disk) intact; an
open console keeps it awake; a snapshot taken while it runs brings back memory and disk, one taken while
it is stopped the disk; quota, retention and bad input answer as documented and leave nothing behind.
The guest is driven by typing on its keyboard over QMP (no API request, so no activity) and answers on
its serial console."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from gateway.config import Settings
from gateway.engine.storage import state_path
from gateway.web.app import create_app
from gateway.web.appkeys import driver_key, engine_key
from tests.conftest import VM, Session, assert_envelope, truncate_all
from tests.fixtures.qemu import type_text
from tests.test_e2e import READY, open_console, wait_for_screen, wait_for_serial

pytestmark = pytest.mark.qemu

IDLE = 3  # IDLE_SUSPEND_AFTER of the gateway under test


@pytest.fixture
def redis_test_db() -> int:
    """A Redis database of this module's own (its tests rely on live state for a minute at a time)."""
    return 14


@pytest.fixture
async def gateway(aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path, websockify_server: Any,
                  database_url: str) -> Any:
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local",
                                   vnc_public_url=websockify_server.ws_url, idle_suspend_after=IDLE,
                                   snapshot_quota=3, snapshot_keep=2, snapshot_max_age=0)
    server = await aiohttp_server(create_app(settings))
    truncate_all(database_url)
    return server


def snapshots_in(overlay: Path) -> dict[str, int]:
    """The overlay's internal snapshots (tag: bytes of memory), read beside a running QEMU (-U)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    return {s["name"]: int(s.get("vm-state-size") or 0) for s in info.get("snapshots") or []}


def overlay_of(database_url: str, vm_id: str) -> Path:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT overlay_path FROM vms WHERE id = %s", (vm_id,))
        return Path(cur.fetchone()[0])


async def state_quietly(s: Session, vm_id: str) -> dict[str, Any]:
    """The VM as the dashboard's list shows it: a request that is not on the VM, so not its use."""
    status, body = await s.request("GET", "/api/me/vms")
    assert status == 200, body
    return next(vm for vm in body["vms"] if vm["vm_id"] == vm_id)


async def wait_quietly(s: Session, vm_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        vm = await state_quietly(s, vm_id)
        if vm["state"] == state:
            return vm
        assert time.monotonic() < deadline, f"VM never became {state}: {vm}"
        await asyncio.sleep(0.2)


async def guest(server: Any, s: Session, vm_id: str, command: str, answer: str, count: int = 1) -> str:
    """Type ``command`` on the guest's console; return the first line of serial output starting with ``answer``
    (its ``count``-th occurrence)."""
    # Typed on tty1: right after a cold boot's ready line (printed on ttyS0) tty1's shell may not read yet and
    # the keys are lost, so the command is typed again when no answer came (each command may run twice).
    for attempt in range(4):
        await type_text(server.app[driver_key].task_dir(vm_id) / "qmp.sock", command + "\n")
        try:
            serial = await wait_for_serial(s, vm_id, answer, count=count, timeout=15 if attempt < 3 else 60)
            break
        except AssertionError:
            if attempt == 3:
                raise
    lines = [line[line.index(answer):].strip() for line in serial.replace("\r", "").splitlines() if answer in line]
    return lines[count - 1]


async def ready_count(s: Session, vm_id: str) -> int:
    """How many times the guest said it is ready on its serial console (once per boot)."""
    code, body = await s.request("GET", f"/api/vms/{vm_id}/logs")
    assert code == 200, body
    return int(body["serial"].count(READY))


async def create(s: Session) -> str:
    status, vm = await s.request("POST", "/api/vms?wait=90", json=VM)
    assert status == 201, vm
    return str(vm["vm_id"])


async def test_idle_vm_is_suspended_and_its_console_resumes_it_intact(gateway: Any, sessions: Any,
                                                                      database_url: str) -> None:
    s: Session = sessions(gateway)
    await s.signup_and_login()
    vm_id = await create(s)
    driver = gateway.app[driver_key]
    # A shell variable lives in memory only; /mark is on the disk.
    first = await guest(gateway, s, vm_id, 'M=$RANDOM$RANDOM; echo $M > /mark; sync; echo "M1 $M" >/dev/ttyS0', "M1 ")
    mark = first.split()[1]

    vm = await wait_quietly(s, vm_id, "suspended", timeout=IDLE + 30)
    assert vm["suspended_at"] is not None
    status = await driver.status(vm_id)
    assert status.state == "stopped" and status.details.get("how") == "suspend", status
    saved = state_path(overlay_of(database_url, vm_id))
    assert saved.stat().st_size > 10 << 20  # the guest's memory, beside its disk
    code, body = await s.request("GET", f"/api/vms/{vm_id}")
    assert any(h["to"] == "suspending" and (h["reason"] or "").startswith("idle for ") and
               h["reason"].endswith(f"(suspends after {IDLE} s)") for h in body["history"]), body["history"]
    # Suspended is the VM's state everywhere: the VM, the list and the metrics.
    assert code == 200 and body["state"] == "suspended"
    deadline = time.monotonic() + 10
    while 'vmgate_vms{state="suspended"} 1.0' not in await (await s.http.get(gateway.make_url("/metrics"))).text():
        assert time.monotonic() < deadline, "the metrics never counted the suspended VM"
        await asyncio.sleep(0.3)

    # Opening the console resumes it; the token comes once it runs.
    began = time.monotonic()
    async with open_console(s, vm_id) as rfb:
        resumed_in = time.monotonic() - began
        await wait_for_screen(rfb, lambda: not rfb.is_blank())
        assert (await state_quietly(s, vm_id))["state"] == "running"
        answer = await guest(gateway, s, vm_id, 'echo "M2 $M $(cat /mark)" >/dev/ttyS0', "M2 ")
        assert answer == f"M2 {mark} {mark}", answer
        # An open console is use: well past IDLE it still runs.
        await asyncio.sleep(IDLE + 3)
        assert (await state_quietly(s, vm_id))["state"] == "running"
    assert resumed_in < 30
    # The saved memory is deleted once the VM runs on from it: the disk has moved on since.
    assert not saved.exists()


def set_storage_quota(database_url: str, user_id: str, gb: int | None) -> None:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET quota_storage_gb = %s WHERE id = %s", (gb, user_id))
    conn.close()


async def test_suspend_start_stop_and_destroy_of_a_suspended_vm(gateway: Any, sessions: Any,
                                                                database_url: str) -> None:
    s: Session = sessions(gateway)
    await s.signup_and_login()
    vm_id = await create(s)
    n1 = (await guest(gateway, s, vm_id, 'N=$RANDOM$RANDOM; echo "N1 $N" >/dev/ttyS0', "N1 ")).split()[1]
    # A suspend that would take the user past their storage quota is refused, and nothing happens.
    set_storage_quota(database_url, s.user["id"], 0)  # type: ignore[index]
    code, body = await s.request("POST", f"/api/vms/{vm_id}/suspend?wait=60")
    assert_envelope(code, body, 403, "quota_exceeded")
    assert body["error"]["details"]["exceeded"]["storage_bytes"]["requested"] == VM["memory_mb"] << 20
    assert (await s.request("GET", f"/api/vms/{vm_id}"))[1]["state"] == "running"
    set_storage_quota(database_url, s.user["id"], None)  # type: ignore[index]
    # Suspended on request (not idle yet): 200 once the memory is saved.
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/suspend?wait=60")
    assert code == 200 and vm["state"] == "suspended", vm
    code, body = await s.request("POST", f"/api/vms/{vm_id}/suspend")
    assert_envelope(code, body, 409, "invalid_state")
    # Start resumes it: the same shell, not a boot.
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/start?wait=60")
    assert code == 200 and vm["state"] == "running", vm
    n2 = await guest(gateway, s, vm_id, 'echo "N2 $N" >/dev/ttyS0', "N2 ")
    assert n2 == f"N2 {n1}", (n1, n2)
    code, body = await s.request("GET", f"/api/vms/{vm_id}/logs")
    assert "Linux version" not in body["serial"]  # never booted: a warm clone, suspended and resumed

    # Stop of a suspended VM: its memory is loaded and the guest powers off as any other VM does.
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/suspend?wait=60")
    assert code == 200 and vm["state"] == "suspended", vm
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/stop?wait=90")
    assert code == 200 and vm["state"] == "stopped", vm
    assert vm["suspended_at"] is None
    serial = (await s.request("GET", f"/api/vms/{vm_id}/logs"))[1]["serial"]
    assert "reboot: Power down" in serial
    assert not state_path(overlay_of(database_url, vm_id)).exists()

    # Destroy of a suspended VM leaves nothing.
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/start?wait=90")
    assert code == 200 and vm["state"] == "running", vm
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/suspend?wait=60")
    assert code == 200 and vm["state"] == "suspended", vm
    overlay = overlay_of(database_url, vm_id)
    assert state_path(overlay).exists()
    code, vm = await s.request("DELETE", f"/api/vms/{vm_id}?wait=60")
    assert code == 200 and vm["state"] == "destroyed", vm
    assert not overlay.exists() and not state_path(overlay).exists()
    assert (await gateway.app[driver_key].status(vm_id)).state == "missing"


async def test_snapshots_of_a_running_and_a_stopped_vm(gateway: Any, sessions: Any, database_url: str) -> None:
    s: Session = sessions(gateway)
    await s.signup_and_login()
    vm_id = await create(s)
    overlay = overlay_of(database_url, vm_id)
    await guest(gateway, s, vm_id, 'X=one; echo one > /mark; sync; echo "X1 $X" >/dev/ttyS0', "X1 ")
    stored = (await s.request("GET", "/api/me"))[1]["usage"]["storage_bytes"]
    assert 0 < stored == overlay.stat().st_blocks * 512  # measured: the overlay's allocated blocks

    code, snap = await s.request("POST", f"/api/vms/{vm_id}/snapshots?wait=60", json={"name": "before change"})
    assert code == 201, snap
    assert snap["state"] == "ready" and snap["memory"] is True and snap["memory_bytes"] > 10 << 20, snap
    # The memory it saved is in the overlay now, and counts against the storage quota.
    assert (await s.request("GET", "/api/me"))[1]["usage"]["storage_bytes"] >= stored + snap["memory_bytes"]
    assert f"s-{snap['snapshot_id']}" in snapshots_in(overlay)
    code, listing = await s.request("GET", f"/api/vms/{vm_id}/snapshots")
    assert code == 200 and [x["name"] for x in listing["snapshots"]] == ["before change"], listing
    assert listing["quota"] == {"snapshots": 3, "used": 1}
    assert listing["retention"] == {"keep": 2, "max_age_seconds": 0}

    # The VM ran on; change memory and disk, then go back.
    await guest(gateway, s, vm_id, 'X=two; echo two > /mark; sync; echo "X2 $X" >/dev/ttyS0', "X2 ")
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/snapshots/{snap['snapshot_id']}/restore?wait=60")
    assert code == 200 and vm["state"] == "running", vm
    answer = await guest(gateway, s, vm_id, 'echo "X3 $X $(cat /mark)" >/dev/ttyS0', "X3 ")
    assert answer == "X3 one one", answer

    # Stopped: a disk-only snapshot; restoring it puts the disk back and the VM stays stopped.
    await guest(gateway, s, vm_id, 'echo three > /mark; sync; echo "X4 done" >/dev/ttyS0', "X4 ")
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/stop?wait=90")
    assert code == 200 and vm["state"] == "stopped", vm
    code, disk = await s.request("POST", f"/api/vms/{vm_id}/snapshots?wait=60", json={"name": "disk-three"})
    assert code == 201 and disk["memory"] is False and disk["memory_bytes"] == 0, disk
    boots = await ready_count(s, vm_id)
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/start?wait=90")
    assert code == 200, vm
    await wait_for_serial(s, vm_id, READY, timeout=90, count=boots + 1)
    await guest(gateway, s, vm_id, 'echo four > /mark; sync; echo "X5 $(cat /mark)" >/dev/ttyS0', "X5 ")
    # Restoring the disk-only snapshot of a running VM: thrown away, disk back, booted from it.
    boots = await ready_count(s, vm_id)
    code, vm = await s.request("POST", f"/api/vms/{vm_id}/snapshots/{disk['snapshot_id']}/restore?wait=90")
    assert code == 200 and vm["state"] == "running", vm
    await wait_for_serial(s, vm_id, READY, timeout=90, count=boots + 1)
    answer = await guest(gateway, s, vm_id, 'echo "X6 $(cat /mark)" >/dev/ttyS0', "X6 ")
    assert answer == "X6 three", answer

    # Delete: gone from the list and from the disk; the quota is free again.
    code, gone = await s.request("DELETE", f"/api/vms/{vm_id}/snapshots/{snap['snapshot_id']}?wait=30")
    assert code == 200 and gone["state"] == "deleted" and gone["deleted_by"] == "user", gone
    assert f"s-{snap['snapshot_id']}" not in snapshots_in(overlay)
    code, listing = await s.request("GET", f"/api/vms/{vm_id}/snapshots")
    assert [x["name"] for x in listing["snapshots"]] == ["disk-three"] and listing["quota"]["used"] == 1
    code, body = await s.request("POST", f"/api/vms/{vm_id}/snapshots/{snap['snapshot_id']}/restore")
    assert_envelope(code, body, 404, "not_found")


async def test_snapshot_quota_retention_and_bad_input(gateway: Any, sessions: Any, database_url: str) -> None:
    s: Session = sessions(gateway)
    await s.signup_and_login()
    vm_id = await create(s)
    overlay = overlay_of(database_url, vm_id)
    base = f"/api/vms/{vm_id}/snapshots"

    for body, field in (({}, "name"), ({"name": ""}, "name"), ({"name": "a/b"}, "name"), ({"name": "x" * 65}, "name"),
                        ({"name": 5}, "name"), ({"name": "ok", "extra": 1}, "extra"), ({"name": " lead"}, "name")):
        code, answer = await s.request("POST", base, json=body)
        assert assert_envelope(code, answer, 422, "validation_failed")["details"]["field"] == field, (body, answer)
    code, answer = await s.request("POST", base, data=b"{not json", headers={"Content-Type": "application/json"})
    assert_envelope(code, answer, 400, "invalid_json")
    code, answer = await s.request("POST", f"{base}?wait=abc", json={"name": "w"})
    assert_envelope(code, answer, 422, "validation_failed")
    for sid in ("nope", "00000000-0000-0000-0000-000000000000"):
        for method, path in (("GET", f"{base}/{sid}"), ("DELETE", f"{base}/{sid}"), ("POST", f"{base}/{sid}/restore")):
            code, answer = await s.request(method, path)
            assert_envelope(code, answer, 404, "not_found")

    made = []
    for name in ("one", "two", "three"):
        code, snap = await s.request("POST", f"{base}?wait=60", json={"name": name})
        assert code == 201, snap
        made.append(snap)
        if name == "one":
            code, answer = await s.request("POST", base, json={"name": "one"})
            assert_envelope(code, answer, 409, "name_taken")
    # Retention keeps the newest 2 per VM: the oldest goes, and with it its share of the quota.
    deadline = time.monotonic() + 30
    while True:
        code, listing = await s.request("GET", base)
        if [x["name"] for x in listing["snapshots"]] == ["two", "three"]:
            break
        assert time.monotonic() < deadline, listing
        await asyncio.sleep(0.3)
    code, first = await s.request("GET", f"{base}/{made[0]['snapshot_id']}")
    assert_envelope(code, first, 404, "not_found")
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT state, deleted_by FROM snapshots WHERE id = %s", (made[0]["snapshot_id"],))
        assert cur.fetchone() == ("deleted", "retention: keep 2")
    assert set(snapshots_in(overlay)) == {f"s-{x['snapshot_id']}" for x in made[1:]}

    # Quota (3): another VM's snapshots count too.
    other = await create(s)
    code, snap = await s.request("POST", f"/api/vms/{other}/snapshots?wait=60", json={"name": "o1"})
    assert code == 201, snap
    code, answer = await s.request("POST", f"/api/vms/{other}/snapshots", json={"name": "o2"})
    assert assert_envelope(code, answer, 403, "quota_exceeded")["details"]["exceeded"]["snapshots"] == {
        "quota": 3, "used": 3, "requested": 1}
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM snapshots WHERE name = 'o2'")
        assert cur.fetchone() == (0,)

    # Expiry: a snapshot older than SNAPSHOT_MAX_AGE is deleted by the collector.
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("UPDATE snapshots SET created_at = now() - interval '40 days' WHERE id = %s",
                    (made[1]["snapshot_id"],))
    engine = gateway.app[engine_key]
    engine.settings = dataclasses.replace(engine.settings, snapshot_max_age=30 * 86400)
    expired = await engine.apply_retention()
    assert expired == [made[1]["snapshot_id"]]
    deadline = time.monotonic() + 30
    while f"s-{made[1]['snapshot_id']}" in snapshots_in(overlay):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.3)

    # Someone else's VM and snapshots do not exist for this user.
    stranger: Session = sessions(gateway)
    await stranger.signup_and_login()
    for method, path, body in (("GET", base, None), ("POST", base, {"name": "mine"}),
                               ("DELETE", f"{base}/{made[2]['snapshot_id']}", None),
                               ("POST", f"{base}/{made[2]['snapshot_id']}/restore", None)):
        code, answer = await stranger.request(method, path, json=body)
        assert_envelope(code, answer, 404, "not_found")
    anonymous: Session = sessions(gateway)
    code, answer = await anonymous.request("GET", base)
    assert_envelope(code, answer, 401)

    # A destroyed VM's snapshots go with its disk.
    code, vm = await s.request("DELETE", f"/api/vms/{vm_id}?wait=60")
    assert code == 200, vm
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT state, deleted_by FROM snapshots WHERE vm_id = %s AND state <> 'deleted'", (vm_id,))
        assert cur.fetchall() == []
    code, listing = await s.request("GET", f"/api/vms/{other}/snapshots")
    assert listing["quota"]["used"] == 1
