"""Warm templates on the embedded default (docs/IMAGES.md "Warm templates"): a VM created from the
`tiny` template's warm layer restores the saved memory state instead of booting, becomes a machine of
its own (name, machine id, RNG, clock: checked in the guest), and boots cold from its own disk on
every later start; a template with warm disabled, or a size the state was not saved for, boots cold.

Needs the real tiny image and its warm layer (`make images`)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DriverError
from drivers.local.memimage import MemoryImages
from gateway.config import Settings
from gateway.engine.templates import Templates
from gateway.web.app import create_app
from gateway.web.appkeys import driver_key, templates_key
from jobspecs import DEFAULT_CATALOG, is_warm, load_catalog, memory, sandbox
from jobspecs.manifest import sha256_of
from tests.conftest import Session, truncate_all
from tests.fixtures.qemu import type_text
from tests.test_e2e import READY, VM, local_gateway, wait_for_serial
from tests.test_jobspecs import _check_hcl_matches_json

pytestmark = pytest.mark.qemu
__all__ = ["local_gateway"]  # the fixture, imported for the tests below

CLONED = "vmgate-tiny: clone of a warm template is now "
# What only a boot prints on the serial console: the firmware, then the kernel's first lines.
BOOT_MARKERS = ("SeaBIOS", "iPXE", "Booting from ROM", "Linux version")
FILES_RE = re.compile(r"FILES (\S+) (\d+) (\S+) (\d+) END")
ID_RE = re.compile(r"ID (\S+) ([0-9a-f]{32}) ([0-9a-f]{32}) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")


@pytest.fixture(autouse=True)
def _warm_layer(tiny_images_dir: Path) -> None:
    template = load_catalog(DEFAULT_CATALOG, tiny_images_dir)["tiny"]
    if template.warm_image() is None:
        pytest.fail(f"the tiny template has no warm layer in {template.warm_root}; run `make images`")


async def create(s: Session, name: str, **sizes: Any) -> tuple[str, float]:
    began = time.monotonic()
    status, vm = await s.request("POST", "/api/vms?wait=90", json={**VM, "name": name, **sizes})
    assert status == 201 and vm["state"] == "running", vm
    return vm["vm_id"], time.monotonic() - began


async def task_job(server: Any, vm_id: str) -> dict[str, Any]:
    job: dict[str, Any] = json.loads((server.app[driver_key].task_dir(vm_id) / "job.json").read_text())
    return job


async def stored_job(s: Session, vm_id: str) -> dict[str, Any]:
    status, body = await s.request("GET", f"/api/vms/{vm_id}/jobspec")
    assert status == 200, body
    job: dict[str, Any] = body["Job"]
    return job


def backing_of(overlay: Path) -> str:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    return str(info.get("backing-filename"))


async def identity(server: Any, s: Session, vm_id: str) -> tuple[str, str, str, dt.datetime, dt.datetime]:
    """Ask the guest (typed on tty1, answered on ttyS0): hostname, machine id, 16 random bytes, clock."""
    qmp_socket = server.app[driver_key].task_dir(vm_id) / "qmp.sock"
    await type_text(qmp_socket, 'echo ID $(hostname) $(cat /etc/machine-id) '
                                '$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n") $(date -u -Iseconds)'
                                ' >/dev/ttyS0\n')
    host_now = dt.datetime.now(dt.UTC)
    serial = await wait_for_serial(s, vm_id, "ID ", timeout=60)
    match = ID_RE.search(serial)
    assert match, serial[-1500:]
    guest_now = dt.datetime.fromisoformat(match[4]).replace(tzinfo=dt.UTC)
    return match[1], match[2], match[3], guest_now, host_now


WAKE_RE = re.compile(r"WAKE 1: uart:(\S+) port:\S+ irq:\d+ tx:\d+ rx:(\d+).* HELD (\d+)")


async def wake_port(server: Any, s: Session, vm_id: str) -> tuple[str, int, int]:
    """Ask the guest about its ttyS1, the port the driver pokes after a restore (jobspecs/devices.py): the UART
    behind it, the bytes it received, and how many processes hold it as fd 3 (vmgate-clone-watch)."""
    qmp_socket = server.app[driver_key].task_dir(vm_id) / "qmp.sock"
    await type_text(qmp_socket, "echo WAKE $(sed -n 3p /proc/tty/driver/serial) "
                                "HELD $(ls -l /proc/*/fd/3 2>/dev/null | grep -c ttyS1) >/dev/ttyS0\n")
    serial = await wait_for_serial(s, vm_id, "HELD ", timeout=60)
    match = WAKE_RE.search(serial)
    assert match, serial[-1500:]
    return match[1], int(match[2]), int(match[3])


def overlay_of(settings: Settings, s: Session, vm_id: str) -> Path:
    return settings.vms_root / "users" / str(s.user["id"] if s.user else "") / f"{vm_id}.qcow2"


async def test_two_warm_clones_are_distinct_machines(local_gateway: Any, sessions: Any,
                                                     app_settings: Settings) -> None:
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    template = local_gateway.app[templates_key].get("tiny")
    warm = template.warm_image()
    first, first_s = await create(s, "clone-a")
    second, second_s = await create(s, "clone-b")
    results = {}
    for vm_id, name, took in ((first, "clone-a", first_s), (second, "clone-b", second_s)):
        ready = await wait_for_serial(s, vm_id, READY, timeout=30)
        print(f"warm create of {name}: running {took:.2f} s after POST")
        # Restored, not booted: the serial log starts with the clone's own lines, no firmware or kernel.
        assert f"{CLONED}{name}" in ready
        assert not [marker for marker in BOOT_MARKERS if marker in ready], ready[-1500:]
        # The overlay sits on the warm layer; the job QEMU ran restored its state; the stored job no longer does.
        assert backing_of(overlay_of(app_settings, s, vm_id)) == str(warm.disk)
        assert is_warm(await task_job(local_gateway, vm_id))
        assert not is_warm(await stored_job(s, vm_id))
        await wait_for_serial(s, vm_id, "~ # ", timeout=30)  # a fresh shell prompt on ttyS0 after the ready line
        results[name] = await identity(local_gateway, s, vm_id)
        # Its files say so too (written with shell builtins, identity.sh): /etc/hostname, and one 127.0.1.1
        # line in /etc/hosts, with the new name, the base's localhost lines kept.
        await type_text(local_gateway.app[driver_key].task_dir(vm_id) / "qmp.sock",
                        "echo FILES $(cat /etc/hostname) $(grep -c 127.0.1.1 /etc/hosts) "
                        "$(grep 127.0.1.1 /etc/hosts | cut -f2) $(grep -c localhost /etc/hosts) END >/dev/ttyS0\n")
        files = FILES_RE.search(await wait_for_serial(s, vm_id, "FILES ", timeout=60))
        assert files and files.groups() == (name, "1", name, "2"), files
        # The clone was told to look by a line on its ttyS1 from the driver, where its watcher waits (an idle
        # VM is not woken five times a second to look by itself).
        uart, received, holders = await wake_port(local_gateway, s, vm_id)
        assert uart == "16550A" and received >= 1 and holders == 1, (uart, received, holders)
    a, b = results["clone-a"], results["clone-b"]
    assert (a[0], b[0]) == ("clone-a", "clone-b")
    assert a[1] != b[1], "both clones kept one machine id"
    assert a[2] != b[2], "both clones read the same random bytes"
    for name, (_, _, _, guest_now, host_now) in results.items():
        # The guest's clock was set from the RTC after the restore (the state is minutes or days old).
        assert abs((guest_now - host_now).total_seconds()) < 10, (name, guest_now, host_now)
    for vm_id in (first, second):
        assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200


async def test_a_warm_vm_boots_cold_from_its_own_disk_after_a_stop(local_gateway: Any, sessions: Any) -> None:
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    vm_id, took = await create(s, "warm-restart")
    print(f"warm create: running {took:.2f} s after POST")
    await wait_for_serial(s, vm_id, f"{CLONED}warm-restart")
    await wait_for_serial(s, vm_id, READY)
    qmp_socket = local_gateway.app[driver_key].task_dir(vm_id) / "qmp.sock"
    await type_text(qmp_socket, "echo kept-across-restart > /root/marker; sync; echo marker-written >/dev/ttyS0\n")
    await wait_for_serial(s, vm_id, "marker-written", timeout=60)
    _, machine_id, _, _, _ = await identity(local_gateway, s, vm_id)

    status, stopped = await s.request("POST", f"/api/vms/{vm_id}/stop?wait=60")
    assert status == 200 and stopped["state"] == "stopped", stopped
    before = len((await s.request("GET", f"/api/vms/{vm_id}/logs"))[1]["serial"])
    began = time.monotonic()
    status, running = await s.request("POST", f"/api/vms/{vm_id}/start?wait=60")
    assert status == 200 and running["state"] == "running", running
    # No -incoming: a cold boot (firmware, kernel, rcS) of the VM's own overlay.
    assert not is_warm(await task_job(local_gateway, vm_id))
    serial = await wait_for_serial(s, vm_id, READY, count=2)
    print(f"cold start after the stop: ready {time.monotonic() - began:.2f} s after POST")
    assert "SeaBIOS" in serial[before:] and CLONED not in serial[before:]
    await type_text(qmp_socket, "echo found-$(cat /root/marker) >/dev/ttyS0\n")
    await wait_for_serial(s, vm_id, "found-kept-across-restart", timeout=60)
    name, machine_id_after, _, _, _ = await identity(local_gateway, s, vm_id)
    # The name from the VM's job and the machine id the clone wrote to its disk, both kept.
    assert name == "warm-restart" and machine_id_after == machine_id
    assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200


async def test_a_template_with_warm_disabled_boots_cold(local_gateway: Any, sessions: Any,
                                                        app_settings: Settings) -> None:
    catalog: Templates = local_gateway.app[templates_key]
    tiny = catalog.templates["tiny"]
    catalog.templates["tiny"] = dataclasses.replace(tiny, warm=False)
    try:
        s: Session = sessions(local_gateway)
        await s.signup_and_login()
        vm_id, took = await create(s, "cold-one")
        serial = await wait_for_serial(s, vm_id, READY)
        print(f"cold create: running {took:.2f} s after POST")
        assert "SeaBIOS" in serial and CLONED not in serial
        assert not is_warm(await task_job(local_gateway, vm_id))
        assert backing_of(overlay_of(app_settings, s, vm_id)) == str(tiny.disk)
        name, machine_id, _, guest_now, host_now = await identity(local_gateway, s, vm_id)
        assert name == "cold-one" and len(machine_id) == 32
        assert abs((guest_now - host_now).total_seconds()) < 10
        assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200
    finally:
        catalog.templates["tiny"] = tiny


def test_only_the_saved_sizes_start_warm(tiny_images_dir: Path, app_settings: Settings) -> None:
    """Memory, vCPUs and disk size are part of the saved state: any other size renders a cold job."""
    catalog = Templates(tiny_images_dir)
    template = catalog.get("tiny")
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir)
    vm = {"id": "f0f0f0f0-0000-4000-8000-000000000000", "name": "sized", "overlay_path": "/srv/x.qcow2",
          "cpu": 1, "memory_mb": 256, "disk_gb": 1}
    warm_job = catalog.render(template, vm, owner="1", settings=settings)
    assert is_warm(warm_job) and catalog.overlay_base(template, warm_job) != template.disk
    for change in ({"memory_mb": 512}, {"cpu": 2}, {"disk_gb": 2}):
        job = catalog.render(template, {**vm, **change}, owner="1", settings=settings)
        assert not is_warm(job), change
        assert catalog.overlay_base(template, job) == template.disk
    args = warm_job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    warm = template.warm_image()
    assert warm is not None and warm.ram is not None  # a layer made for this host keeps its RAM in a file
    # On this host the clone maps the template's RAM copy-on-write (jobspecs/memory.py), then restores.
    assert args[-8:] == ["-set", "drive.image0.file.auto-read-only=off",
                         *memory.backend_args(256, str(warm.ram), share=False),
                         "-incoming", f"exec:cat {warm.state}"]
    # A fleet cannot start from this layer (its state leaves the RAM out): a fleet job of it boots cold.
    fleet = catalog.render(template, vm, owner="1", settings=dataclasses.replace(settings, driver="nomad"))
    assert not is_warm(fleet) and catalog.overlay_base(template, fleet) == template.disk
    assert warm_job["Meta"]["start"] == "warm"
    assert warm_job["TaskGroups"][0]["RestartPolicy"]["Attempts"] == 0
    assert warm_job["TaskGroups"][0]["ReschedulePolicy"]["Attempts"] == 0
    _check_hcl_matches_json(warm_job)
    cold = catalog.cold(warm_job, settings)
    assert not is_warm(cold) and catalog.overlay_base(template, cold) == catalog.overlay_base(template, warm_job)
    cold_args = cold["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    # The cold job keeps -set (every job opens its disk read-write for good: a suspend needs it), and its
    # sandbox denies spawning again: only the restore through exec:cat needed it (jobspecs/sandbox.py).
    assert cold_args == sandbox.fit(memory.without_backend(args[:-2])) and "start" not in cold["Meta"]
    assert not any(a.startswith("memory-backend") for a in cold_args)  # booting, its RAM is its own
    assert "spawn=allow" in args[args.index("-sandbox") + 1]
    assert "spawn=deny" in cold_args[cold_args.index("-sandbox") + 1]
    assert cold["TaskGroups"][0]["RestartPolicy"]["Attempts"] == settings.restart_attempts
    _check_hcl_matches_json(cold)




def memfd_mapping(pid: int) -> dict[str, int]:
    """The kB figures (Rss, Shared_Clean, Private_Dirty, …) of the QEMU's mapping of its template RAM copy."""
    figures: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = "/memfd:vmgate-ram" in line
        elif inside and fields[0].endswith(":") and len(fields) == 3 and fields[2] == "kB":
            figures[fields[0][:-1]] = figures.get(fields[0][:-1], 0) + int(fields[1])
    return figures


async def test_warm_clones_share_the_template_memory_copy_on_write(local_gateway: Any, sessions: Any) -> None:
    """Issue 17: both clones map the one sealed copy of the template's RAM; what one writes is its own; the
    copy and the layer's file stay as they were, and nobody can write the copy."""
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    driver = local_gateway.app[driver_key]
    warm = local_gateway.app[templates_key].get("tiny").warm_image()
    assert warm is not None and warm.ram is not None
    first, _ = await create(s, "cow-a")
    second, _ = await create(s, "cow-b")
    for vm_id in (first, second):
        await wait_for_serial(s, vm_id, "~ # ", timeout=30)
    pids = [(await driver.status(vm_id)).pid for vm_id in (first, second)]
    assert all(pids)
    mappings = [memfd_mapping(pid) for pid in pids]
    # Each maps it, and pages of it are in both at once (Shared_Clean counts pages mapped by more than one).
    # Each maps it, and pages of it are in both at once ("Shared_": mapped by more than one process; a
    # memfd's pages count as dirty), so each is charged only part of them (Pss < Rss).
    assert all(m.get("Shared_Clean", 0) + m.get("Shared_Dirty", 0) > 1024 and m["Pss"] < m["Rss"]
               for m in mappings), mappings

    # Clone A fills 16 MiB of its memory (a tmpfs file) with a pattern and keeps a shell variable.
    await type_text(driver.task_dir(first) / "qmp.sock",
                    "X=written-by-a; head -c 16777216 /dev/urandom > /dev/shm/a; echo filled-$X > /dev/ttyS0\n")
    await wait_for_serial(s, first, "filled-written-by-a", timeout=60)
    after = memfd_mapping(pids[0])
    assert after.get("Private_Dirty", 0) > mappings[0].get("Private_Dirty", 0), (mappings[0], after)
    # Clone B sees none of it.
    await type_text(driver.task_dir(second) / "qmp.sock", "echo b-sees-[$X]-$(ls /dev/shm) > /dev/ttyS0\n")
    serial = await wait_for_serial(s, second, "b-sees-[", timeout=60)
    assert "b-sees-[]-" in serial and "written-by-a" not in serial.split("b-sees-[")[-1]

    # The shared copy is byte for byte the layer's file, which its manifest still vouches for.
    fds = list(driver._memory._fds.values())
    assert len(fds) == 1
    manifest = json.loads((warm.directory / "manifest.json").read_text())
    assert sha256_of(Path(f"/proc/self/fd/{fds[0]}")) == manifest["files"]["ram"]["sha256"] == sha256_of(warm.ram)
    # And it cannot be written, by QEMU or by root: it is sealed.
    with pytest.raises(PermissionError):
        os.pwrite(fds[0], b"\0", 0)
    for vm_id in (first, second):
        assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200


async def test_the_gateway_checks_and_copies_the_template_memory_before_the_first_clone(
        aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path, database_url: str) -> None:
    """The first clone does not wait for the sealed copy of its template's RAM (the desktop's 471 MB took
    about 1 s): with WARM_MEMORY_AHEAD (the default) the gateway has the local driver make the copies of
    every current warm layer when it starts, and again after `make images`."""
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local", warm_memory_ahead=True)
    server = await aiohttp_server(create_app(settings))
    truncate_all(database_url)
    driver, catalog = server.app[driver_key], server.app[templates_key]
    wanted = {os.path.realpath(warm.ram) for template in catalog.templates.values()
              if template.is_built() and (warm := template.warm_image()) is not None and warm.ram is not None}
    assert os.path.realpath(str(catalog.get("tiny").warm_image().ram)) in wanted
    for _ in range(600):  # the keeper copies in the background as the gateway starts
        if {key[0] for key in driver._memory._fds} == wanted:
            break
        await asyncio.sleep(0.1)
    assert {key[0] for key in driver._memory._fds} == wanted  # and no VM was created
    # The files were checked against their manifests ahead too: the first VM hashes nothing.
    warm = catalog.get("tiny").warm_image()
    assert {warm.ram, warm.state, warm.disk, catalog.get("tiny").disk} <= set(catalog._verifier._verified)


def test_memory_images_keep_only_the_current_layers(tmp_path: Path) -> None:
    files = []
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ram").write_bytes(name.encode() * 4096)
        files.append(str(tmp_path / name / "ram"))
    images = MemoryImages()
    images.keep([files[0]])
    assert len(images._fds) == 1
    fd = images.descriptor(files[0])
    assert list(images._fds.values()) == [fd]  # the copy made ahead, not a second one
    images.keep([files[1]])  # make images replaced the layer
    assert [key[0] for key in images._fds] == [os.path.realpath(files[1])]
    assert os.pread(images.descriptor(files[1]), 3, 0) == b"new"
    images.close()
    with pytest.raises(DriverError):
        images.keep([files[1]])
