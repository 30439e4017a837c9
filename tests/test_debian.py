"""The debian-12 template end to end (issue 14), booted cold by the real local driver through the API: systemd
comes up, cloud-init takes the VM's name and its user data from fw_cfg and runs the script once, the root file
system is grown to the VM's disk, root logs in on the serial console, and a second boot runs nothing again.

`make test` builds the image first (`make images`); a run without it fails under VMGATE_TEST, else skips."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path
from typing import Any

import pytest

from console.rfb import RFBClient
from gateway.web.appkeys import settings_key
from jobspecs import DEFAULT_CATALOG, load_catalog
from tests.conftest import Session, assert_envelope, not_built
from tests.test_e2e import local_gateway, open_console, wait_for_screen, wait_for_serial

__all__ = ["local_gateway"]  # the fixture, imported for its use here

pytestmark = pytest.mark.qemu

READY = "vmgate-debian: ready"
BOOT = 240.0  # seconds to the ready line: a cold systemd boot under TCG takes 30-60 s on a busy 2-core host
VM = {"template": "debian-12", "cpu": 1, "memory_mb": 512, "disk_gb": 4}  # the base file system is 2 GiB


async def type_slowly(rfb: RFBClient, text: str) -> None:
    """Type ``text`` a few keys at a time: QEMU's PS/2 keyboard holds 16 bytes, and keys sent faster than a busy
    guest reads them are dropped (a clone is busy for a moment: new SSH keys, restarted gettys)."""
    for at in range(0, len(text), 6):
        await rfb.type_text(text[at:at + 6])
        await asyncio.sleep(0.1)


async def log_in_as_root(s: Session, vm_id: str, rfb: RFBClient) -> None:
    """Log in as root on tty1 (the VNC screen) and wait for the shell: what is typed before it runs is read
    by login, so a probe line goes again every 2 s until one of them reaches the serial console."""
    await wait_for_screen(rfb, lambda: not rfb.is_blank())
    await type_slowly(rfb, "root\n")
    for attempt in range(30):
        await type_slowly(rfb, f"echo shell-up-{attempt}-$((6*7)) > /dev/ttyS0\n")
        with contextlib.suppress(AssertionError):
            await wait_for_serial(s, vm_id, "-42", timeout=2)
            return
    raise AssertionError("no shell on tty1 after logging in as root")


@pytest.fixture
def debian_built(tiny_images_dir: Path) -> Path:
    image = tiny_images_dir / "debian-12"
    if not (image / "manifest.json").is_file():
        not_built(f"the debian-12 image is not built in {tiny_images_dir}; run `make images`")
    return image


async def test_debian_boots_runs_its_user_data_once_and_logs_in_root(local_gateway: Any, sessions: Any,
                                                                       debian_built: Path) -> None:
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    script = '#!/bin/sh\nx=41\necho "debian userdata ran: $((x + 1)) on $(hostname)" > /dev/ttyS0\n'
    status, vm = await s.request("POST", "/api/vms?wait=60", json={**VM, "name": "deb-one", "userdata": script})
    assert status == 201, vm
    vm_id = vm["vm_id"]
    text = await wait_for_serial(s, vm_id, READY, timeout=BOOT)
    # cloud-init ran the script once, with the VM's name (its hostname) already set.
    assert re.findall(r"debian userdata ran: 42 on (\S+)", text) == ["deb-one"], text[-3000:]
    await wait_for_serial(s, vm_id, "login:", timeout=60)

    # Root logs in on the console (tty1, the VNC screen) without a password; the disk is the VM's size.
    async with open_console(s, vm_id) as rfb:
        await log_in_as_root(s, vm_id, rfb)
        await type_slowly(rfb, "echo grown-$(df -BG --output=size / | tail -n 1 | tr -d ' G')-"
                            "$(systemctl is-system-running) > /dev/ttyS0\n")
        text = await wait_for_serial(s, vm_id, "grown-", timeout=60)
    size, state = re.findall(r"grown-(\d+)-(\w+)", text)[-1]
    assert int(size) >= 3, text[-2000:]  # cloud-init's resizefs grew / from 2 GiB to the 4 GB disk
    assert state in ("running", "degraded"), text[-2000:]

    # A second boot of the same disk: cloud-init knows the instance, the script does not run again.
    assert (await s.request("POST", f"/api/vms/{vm_id}/stop?wait=90"))[0] == 200
    assert (await s.request("POST", f"/api/vms/{vm_id}/start?wait=60"))[0] == 200
    text = await wait_for_serial(s, vm_id, READY, timeout=BOOT, count=2)
    assert text.count("debian userdata ran: 42") == 1, text[-3000:]
    assert (await s.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200


async def test_two_warm_debian_clones_are_machines_of_their_own(local_gateway: Any, sessions: Any,
                                                                  debian_built: Path) -> None:
    """Default-size VMs start from the warm layer (a saved memory state) and each becomes a machine of its own:
    its name, machine id, SSH host keys, random numbers and the current time (vmgate-clone)."""
    template = load_catalog(DEFAULT_CATALOG, debian_built.parent)["debian-12"]
    if template.warm_image() is None:
        not_built("debian-12 has no warm layer; run `make images`")
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    seen = {}
    for name in ("deb-a", "deb-b"):
        began = time.monotonic()
        status, vm = await s.request("POST", "/api/vms?wait=60", json={"template": "debian-12", "name": name})
        assert status == 201, vm
        vm_id = vm["vm_id"]
        text = await wait_for_serial(s, vm_id, READY, timeout=60)
        print(f"\n{name}: ready {time.monotonic() - began:.1f} s after the POST (warm)")
        assert f"vmgate-debian: clone of a warm template is now {name}" in text
        assert "Linux version" not in text and "login:" not in text.split("clone of a warm")[0]  # no boot
        async with open_console(s, vm_id) as rfb:
            await log_in_as_root(s, vm_id, rfb)
            await type_slowly(rfb, "echo id-$(hostname)-$(cat /etc/machine-id)-$(ssh-keygen -lf "
                                   "/etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2 | tr -dc A-Za-z0-9)-"
                                   "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n')-$(date +%s)-end > /dev/ttyS0\n")
            text = await wait_for_serial(s, vm_id, "-end", timeout=60)
        host, machine_id, key, random, clock = re.findall(r"id-([\w-]+?)-(\w{32})-(\w+)-(\w{32})-(\d+)-end",
                                                          text)[-1]
        assert host == name
        assert abs(int(clock) - time.time()) < 120  # the clock was set from the RTC, not the saved state's
        seen[name] = (machine_id, key, random)
    (id_a, key_a, random_a), (id_b, key_b, random_b) = seen.values()
    assert id_a != id_b and key_a != key_b and random_a != random_b


@pytest.mark.parametrize(("change", "field"), [({"memory_mb": 256}, "memory_mb"), ({"disk_gb": 1}, "disk_gb"),
                                               ({"cpu": 3}, "cpu"), ({"disk_gb": 21}, "disk_gb")])
async def test_debian_sizes_outside_its_limits_are_refused(local_gateway: Any, sessions: Any, debian_built: Path,
                                                           change: dict[str, Any], field: str) -> None:
    """debian-12's own limits (512-4096 MB, 2-20 GB, 1-2 vCPUs): a 422 naming the field, and no VM or overlay."""
    s: Session = sessions(local_gateway)
    await s.signup_and_login()
    error = assert_envelope(*await s.request("POST", "/api/vms?wait=60", json={**VM, **change}), 422,
                            "validation_failed")
    assert error["details"]["field"] == field
    assert (await s.request("GET", "/api/me/vms"))[1] == {"vms": []}
    settings = local_gateway.app[settings_key]
    assert not list(settings.vms_root.glob("users/*/*.qcow2"))
