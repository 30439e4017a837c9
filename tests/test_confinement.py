"""Each VM's QEMU confined on this host (issue 13, item 4): its own uid and gid, a seccomp filter that denies
spawning, privilege changes, obsolete calls and resource control, a thread cap, a cgroup with CPU, memory and task
limits from its sizes, and no default devices. Two real
QEMUs boot the tiny image; a shell running as the first VM's uid (what a guest that broke out of its QEMU would
be) tries to reach the second, and cannot.

The per-VM uid needs a driver running as root (it is then the default): as another user these tests skip."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.local import LocalDriver, cgroups
from drivers.local.confine import MAX_TASKS, UID_BASE, UID_SPAN
from tests.fixtures.qemu import wait_for_serial

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(os.geteuid() != 0, reason="QEMU drops to a uid of its own only under a root driver")]

Render = Callable[..., dict[str, Any]]
MakeOverlay = Callable[..., Path]

# Run as the uid of VM A: for each attempt on VM B (and one on A itself, which must work), print the outcome.
PROBE = r"""
try() { if eval "$2" >/dev/null 2>&1; then echo "$1=ok"; else echo "$1=denied"; fi; }
try signal_self   'kill -0 "$SELF"'
try signal_other  'kill -0 "$OTHER"'
try stop_other    'kill -STOP "$OTHER"'
try mem_other     'head -c1 "/proc/$OTHER/mem"'
try environ_other 'head -c1 "/proc/$OTHER/environ"'
try fds_other     'ls "/proc/$OTHER/fd/"'
try taskdir_other 'ls "$OTHER_DIR"'
try serial_other  'head -c1 "$OTHER_DIR/serial.log"'
try overlay_other 'head -c1 "$OTHER_DISK"'
try overlay_own   'head -c1 "$OWN_DISK"'
"""


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def cgroup_dirs(pid: int) -> list[Path]:
    """The cgroup directories of ``pid`` that the driver made (under a ``vmgate`` parent), v1 or v2."""
    found = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if f"/{cgroups.PARENT}/" in path:  # v2 ("0::/vmgate/...") or a v1 hierarchy ("4:memory:/.../vmgate/...")
            mount = cgroups.ROOT / controllers.split(",")[0] if controllers else cgroups.ROOT
            found.append(mount / path.lstrip("/"))
    return found


def read_limits(dirs: list[Path]) -> dict[str, int]:
    """The CPU quota (per period), memory and task limits of a VM's cgroup(s), v1 or v2."""
    files = {p.name: p for d in dirs for p in d.iterdir()}
    if "cpu.max" in files:  # v2
        return {"cpu": int(files["cpu.max"].read_text().split()[0]), "memory": int(files["memory.max"].read_text()),
                "pids": int(files["pids.max"].read_text())}
    return {"cpu": int(files["cpu.cfs_quota_us"].read_text()),
            "memory": int(files["memory.limit_in_bytes"].read_text()), "pids": int(files["pids.max"].read_text())}


def max_processes(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max processes"):
            return line.split()[2]
    raise AssertionError("no Max processes line")


async def test_each_vm_is_its_own_user_and_cannot_reach_another(local_driver: LocalDriver,
                                                                make_overlay: MakeOverlay, render_tiny: Render,
                                                                vms_root: Path) -> None:
    driver = local_driver
    disks = {}
    pids = {}
    for name in ("conf-a", "conf-b"):
        disks[name] = make_overlay(name)
        os.chmod(disks[name], 0o600)  # as the gateway creates them (gateway/engine/storage.py)
        pids[name] = (await driver.start(name, render_tiny(name, disks[name]))).pid
    await wait_for_serial(driver, "conf-a", "vmgate-tiny: ready")
    await wait_for_serial(driver, "conf-b", "vmgate-tiny: ready")  # both guests booted under all of it

    uids = {}
    for name, pid in pids.items():
        status = proc_status(pid)
        real, effective, saved, fs = (int(v) for v in status["Uid"].split())
        assert real == effective == saved == fs and UID_BASE <= real < UID_BASE + UID_SPAN, status["Uid"]
        assert status["Gid"].split() == [str(real)] * 4 and status["Groups"] == str(real)  # no other group
        assert status["Seccomp"] == "2"  # a filter is installed
        assert status["CapEff"] == "0000000000000000"
        assert max_processes(pid) == str(MAX_TASKS)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        sandbox = argv[argv.index(b"-sandbox") + 1].decode()
        # Dropping root happens after the filter is in place, so the driver lets that through; nothing else.
        assert sandbox == "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
        assert b"-nodefaults" in argv
        uids[name] = real
    assert uids["conf-a"] != uids["conf-b"]

    env = {"PATH": "/usr/bin:/bin", "SELF": str(pids["conf-a"]), "OTHER": str(pids["conf-b"]),
           "OTHER_DIR": str(driver.task_dir("conf-b")), "OTHER_DISK": str(disks["conf-b"]),
           "OWN_DISK": str(disks["conf-a"])}
    probe = await asyncio.to_thread(subprocess.run, ["/bin/sh", "-c", PROBE], env=env, user=uids["conf-a"],
                                    group=uids["conf-a"], extra_groups=[uids["conf-a"]], capture_output=True, text=True,
                                    timeout=30, check=True, cwd="/")
    outcome = dict(line.split("=") for line in probe.stdout.split())
    assert outcome == {
        "signal_self": "ok",  # the probe does run as A's QEMU: it may signal itself
        "signal_other": "denied", "stop_other": "denied", "mem_other": "denied", "environ_other": "denied",
        "fds_other": "denied", "taskdir_other": "denied", "serial_other": "denied", "overlay_other": "denied",
        # Not even its own disk by name: QEMU reaches its files only through what it opened as root.
        "overlay_own": "denied",
    }, probe.stderr
    assert proc_status(pids["conf-b"])["State"][0] in "RS"  # B runs on, never stopped

    # Its cgroup(s): CPU, memory and tasks bounded by its sizes (tiny: 1 vCPU, 256 MiB).
    groups = {name: cgroup_dirs(pid) for name, pid in pids.items()}
    for name, dirs in groups.items():
        assert dirs and all(d.name == cgroups.name_of(vms_root / "tasks", name) for d in dirs), dirs
        limits = read_limits(dirs)
        assert limits["cpu"] == int(1.25 * cgroups.PERIOD_US)
        assert limits["memory"] == (256 + cgroups.QEMU_OVERHEAD_MB) << 20
        assert limits["pids"] == cgroups.MAX_TASKS
    assert groups["conf-a"] != groups["conf-b"]

    # Destroyed, a VM gives its uid back; a VM keeps its uid across its own restarts.
    await driver.stop("conf-a", 0)
    pid_again = (await driver.start("conf-a", render_tiny("conf-a", disks["conf-a"]))).pid
    assert int(proc_status(pid_again)["Uid"].split()[0]) == uids["conf-a"]
    await driver.destroy("conf-a")
    await driver.destroy("conf-b")
    assert sorted(p.name for p in (vms_root / "tasks" / ".uids").iterdir()) == []
    assert not [d for dirs in groups.values() for d in dirs if d.exists()]  # and its cgroups
