"""End to end on the embedded default: sign up, create a real `tiny` VM through the API, open its
console through a real websockify with an RFB client over WebSocket, type into the guest, see the
screen change and the command run; then delete it and find no process, overlay, task dir or token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from console import redis_keys
from console.rfb import RFBClient
from drivers.local.taskdir import SERIAL_LOG_LIMIT, tail
from gateway.config import Settings
from gateway.web.app import create_app
from gateway.web.appkeys import driver_key
from tests.conftest import Session, truncate_all

pytestmark = pytest.mark.qemu

VM = {"template": "tiny", "cpu": 1, "memory_mb": 256, "disk_gb": 1, "userdata": None}
READY = "vmgate-tiny: ready"


async def wait_for_serial(session: Session, vm_id: str, needle: str, timeout: float = 90.0, count: int = 1) -> str:
    """Poll the logs endpoint until ``needle`` appears ``count`` times (the log spans every boot)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        status, body = await session.request("GET", f"/api/vms/{vm_id}/logs")
        assert status == 200, body
        text = body["serial"]
        if text.count(needle) >= count:
            return text
        await asyncio.sleep(0.5)
    raise AssertionError(f"{needle!r} never appeared on the serial console; last output:\n{text[-2000:]}")


async def wait_for_screen(rfb: RFBClient, predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await rfb.request_update(incremental=True)
        try:
            await rfb.wait_for_update(timeout=1.0)
        except TimeoutError:
            pass
        if predicate():
            return
    raise AssertionError("the screen never reached the expected state")


@contextlib.asynccontextmanager
async def open_console(session: Session, vm_id: str) -> AsyncIterator[RFBClient]:
    """Ask the API for a console token and connect an RFB client through websockify; first frame read."""
    status, grant = await session.request("GET", f"/api/vms/{vm_id}/console")
    assert status == 200, grant
    async with await RFBClient.connect_ws(grant["url"]) as rfb:
        await rfb.request_update(incremental=False)
        await rfb.wait_for_update(timeout=15)
        yield rfb


@pytest.fixture
async def local_gateway(aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path, websockify_server: Any,
                        database_url: str) -> Any:
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local",
                                   vnc_public_url=websockify_server.ws_url)
    server = await aiohttp_server(create_app(settings))
    truncate_all(database_url)
    return server


async def test_signup_create_console_type_destroy(local_gateway: Any, sessions: Any, app_settings: Settings,
                                                  redis_flush: redis.Redis) -> None:
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    status, vm = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, vm
    assert vm["state"] == "running"
    vm_id = vm["vm_id"]
    driver = local_gateway.app[driver_key]
    pid = (await driver.status(vm_id)).pid
    assert pid and Path(f"/proc/{pid}").exists()

    await wait_for_serial(s, vm_id, READY)

    status, grant = await s.request("GET", f"/api/vms/{vm_id}/console")
    assert status == 200, grant
    async with await RFBClient.connect_ws(grant["url"]) as rfb:
        await rfb.request_update(incremental=False)
        await rfb.wait_for_update(timeout=15)
        await wait_for_screen(rfb, lambda: not rfb.is_blank())
        before = rfb.snapshot()
        # Typed on tty1 (the VGA console); tee copies the answer to the serial port as proof it ran.
        await rfb.type_text("uname -a | tee /dev/ttyS0\n")
        await wait_for_screen(rfb, lambda: rfb.snapshot() != before)
    serial = await wait_for_serial(s, vm_id, "Linux ")
    assert "cloud-amd64" in serial

    # The token was for one connection only.
    with pytest.raises(Exception):  # noqa: B017 - the refusal's shape is pinned in test_console_proxy.py
        async with await RFBClient.connect_ws(grant["url"], handshake_timeout=5):
            pass

    overlay = app_settings.vms_root / "users" / str(s.user["id"] if s.user else "") / f"{vm_id}.qcow2"
    assert overlay.is_file()
    status, gone = await s.request("DELETE", f"/api/vms/{vm_id}?wait=60")
    assert status == 200 and gone["state"] == "destroyed"
    assert not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/cmdline").read_text()
    assert not overlay.exists()
    assert not (app_settings.vms_root / "tasks" / vm_id).exists()
    # The request answers when the worker publishes "destroyed"; the worker then acknowledges its job, which
    # deletes the queue's mark for the VM (gateway/engine/queue.py, done): a moment, not the mark's TTL.
    deadline = time.monotonic() + 5
    while True:
        left = [k for k in redis_flush.scan_iter("vmgate:*") if vm_id in k]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert left == []
    status, me = await s.request("GET", "/api/me")
    assert me["usage"] == {"vms": 0, "vcpus": 0, "memory_mb": 0, "disk_gb": 0, "storage_bytes": 0}


async def test_stop_start_keeps_disk_and_console_follows(local_gateway: Any, sessions: Any,
                                                         redis_flush: redis.Redis) -> None:
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    status, vm = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, vm
    vm_id = vm["vm_id"]
    await wait_for_serial(s, vm_id, READY)
    async with open_console(s, vm_id) as rfb:
        # QEMU paces queued keystrokes: keep the console open until the guest confirms on ttyS0.
        await rfb.type_text("echo kept-across-restart > /root/marker; sync; echo marker-written > /dev/console\n")
        await wait_for_serial(s, vm_id, "marker-written")

    started = time.monotonic()
    status, stopped = await s.request("POST", f"/api/vms/{vm_id}/stop?wait=60")
    assert status == 200 and stopped["state"] == "stopped", stopped
    # ACPI power-off, not the hard-stop fallback: well inside STOP_TIMEOUT.
    assert time.monotonic() - started < 15
    assert redis_flush.get(redis_keys.vnc_target_key(vm_id)) is None
    assert (await s.request("GET", f"/api/vms/{vm_id}/console"))[0] == 409

    status, running = await s.request("POST", f"/api/vms/{vm_id}/start?wait=60")
    assert status == 200 and running["state"] == "running", running
    target = json.loads(redis_flush.get(redis_keys.vnc_target_key(vm_id)) or "{}")
    assert target.get("unix_socket", "").endswith("vnc.sock")
    await wait_for_serial(s, vm_id, READY, count=2)
    async with open_console(s, vm_id) as rfb:
        await rfb.type_text("cat /root/marker > /dev/console\n")
        # The echo typed before the restart went to tty1 only; on ttyS0 the text comes from the disk.
        await wait_for_serial(s, vm_id, "kept-across-restart")
    assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200


async def test_userdata_runs_once_and_its_output_reaches_the_logs(local_gateway: Any, sessions: Any) -> None:
    """The user data given at create time reaches the guest (fw_cfg, base64), runs once at first boot, and
    its output is on the serial console; commas and ${...} in it are the script's, nobody else's (issue 13)."""
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    script = 'x=41; echo "userdata ran: $((x + 1)), with, commas and ${x}"\n'
    status, vm = await s.request("POST", "/api/vms?wait=60", json={**VM, "userdata": script})
    assert status == 201, vm
    vm_id = vm["vm_id"]
    status, job = await s.request("GET", f"/api/vms/{vm_id}/jobspec")
    args = job["Job"]["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    assert any(a.startswith("name=opt/vmgate/userdata,string=") for a in args) and "-incoming" not in args
    text = await wait_for_serial(s, vm_id, "vmgate-tiny: user data exit 0")
    assert "userdata ran: 42, with, commas and 41" in text
    assert (await s.request("POST", f"/api/vms/{vm_id}/stop?wait=60"))[0] == 200
    assert (await s.request("POST", f"/api/vms/{vm_id}/start?wait=60"))[0] == 200
    text = await wait_for_serial(s, vm_id, "vmgate-tiny: user data already ran")
    assert text.count("userdata ran: 42") == 1
    assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200


async def test_a_guest_flooding_its_serial_port_fills_no_disk(local_gateway: Any, sessions: Any) -> None:
    """``yes > /dev/ttyS0`` in a guest: serial.log stays near SERIAL_LOG_LIMIT while the VM runs, and
    what the guest wrote last is still there to read (issue 13)."""
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    lines = 400_000  # of 31 bytes: 12 MiB
    script = f"yes vmgate-serial-flood-0123456789 | head -n {lines} >/dev/ttyS0; echo flood-done >/dev/ttyS0\n"
    status, vm = await s.request("POST", "/api/vms?wait=60", json={**VM, "userdata": script})
    assert status == 201, vm
    vm_id = vm["vm_id"]
    log = Path((await local_gateway.app[driver_key].status(vm_id)).details["task_dir"]) / "serial.log"
    biggest = 0
    deadline = time.monotonic() + 240
    while b"flood-done" not in tail(log, 4096):
        assert time.monotonic() < deadline, f"the flood did not finish; serial.log is {log.stat().st_size} bytes"
        biggest = max(biggest, log.stat().st_size, log.stat().st_blocks * 512)
        await asyncio.sleep(0.2)
    text = await wait_for_serial(s, vm_id, "vmgate-tiny: user data exit 0")
    st = log.stat()
    # The guest wrote 12 MiB; the file never held more than the limit and what came in between two trims.
    assert biggest < SERIAL_LOG_LIMIT + (4 << 20), biggest
    assert st.st_size < SERIAL_LOG_LIMIT + (4 << 20) and st.st_blocks * 512 < SERIAL_LOG_LIMIT + (4 << 20)
    assert "vmgate-serial-flood-0123456789\nflood-done" in text.replace("\r\n", "\n")
    assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200
