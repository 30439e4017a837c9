"""A cgroup per VM on this host: what its QEMU may take of the host's CPU, memory, tasks and disk I/O.

The limits follow the VM's sizes (its ``-smp`` and ``-m``):

- **CPU**: its vCPUs and a quarter of a core for QEMU's own threads, per 100 ms period (v2 ``cpu.max``,
  v1 ``cpu.cfs_quota_us``): a busy guest gets no more of the host than it was sized for.
- **memory**: guest memory plus ``QEMU_OVERHEAD_MB`` for QEMU itself and TCG's translation cache
  (v2 ``memory.max`` with no swap, v1 ``memory.limit_in_bytes``). QEMU past it is killed by the kernel.
- **tasks**: ``MAX_TASKS`` threads (v2 and v1 ``pids.max``; the per-VM uid's RLIMIT_NPROC says the same).
- **disk I/O** (v2 only): ``IO_BPS`` bytes and ``IO_IOPS`` operations a second, read and write each, on the
  device that holds the VM's disk (``io.max``). cgroup v1 throttles direct I/O only, and QEMU writes
  through the page cache: there a VM's I/O is not limited.

Where: with cgroup v2 (``/sys/fs/cgroup/cgroup.controllers``), ``/sys/fs/cgroup/vmgate/<name>``, the
controllers enabled on the way down (the root and ``vmgate`` hold no process of their own); with v1, one
``vmgate/<name>`` per controller hierarchy under the gateway's own cgroup there. ``<name>`` is the VM id
after a digest of the VM root, so two installations on one host (or two test runs) never share one.
``cgroups.json`` in the task directory lists the directories, so whoever destroys the VM removes them.

Only a driver running as root places QEMUs (with a uid of their own: confine.py). Where the cgroup file
system cannot be written (a container without delegation), the VM runs without these limits and the
driver's health says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
from pathlib import Path

from jobspecs.memory import QEMU_OVERHEAD_MB

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PARENT = "vmgate"
PERIOD_US = 100_000
QEMU_SHARE = 0.25  # of a core, for QEMU's main loop and I/O threads beside the vCPU threads
MAX_TASKS = 256
IO_BPS = 200 << 20
IO_IOPS = 4000
V1_CONTROLLERS = ("cpu", "memory", "pids")
V2_CONTROLLERS = ("cpu", "memory", "pids", "io")
RECORD = "cgroups.json"


class CgroupError(Exception):
    """The cgroup file system cannot be written here; the message says why."""


def _write(path: Path, value: str) -> None:
    with path.open("w") as handle:
        handle.write(value)


def sizes_of(argv: list[str]) -> tuple[int, int]:
    """The (vCPUs, memory MiB) a QEMU command line asks for (-smp N, -m NM); 1 and 128 if it does not say."""
    cpus, memory = 1, 128
    for flag, value in itertools.pairwise(argv):
        if flag == "-smp" and (match := re.match(r"(?:cpus=)?(\d+)", value)):
            cpus = int(match[1])
        elif flag == "-m" and (match := re.fullmatch(r"(\d+)M?", value)):
            memory = int(match[1])
    return cpus, memory


def name_of(tasks_root: Path, vm_id: str) -> str:
    return f"{hashlib.sha256(str(tasks_root).encode()).hexdigest()[:8]}-{vm_id}"


def version() -> int | None:
    """2 (unified), 1 (a hierarchy per controller, with cpu, memory and pids) or None (neither usable)."""
    if (ROOT / "cgroup.controllers").is_file():
        return 2
    if all((ROOT / c / "cgroup.procs").is_file() for c in V1_CONTROLLERS):
        return 1
    return None


def _own_v1(controller: str) -> str:
    """This process's cgroup in the v1 hierarchy of ``controller`` (from /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path.lstrip("/")
    return ""


def _device_of(disk: str) -> str | None:
    """``major:minor`` of the block device holding ``disk``, if it is one (not tmpfs, not overlayfs)."""
    try:
        dev = os.stat(disk).st_dev
    except OSError:
        return None
    number = f"{os.major(dev)}:{os.minor(dev)}"
    return number if os.major(dev) and Path(f"/sys/dev/block/{number}").exists() else None


def _setup_v2(name: str, cpus: int, memory_mb: int, disk: str | None) -> list[Path]:
    wanted = " ".join(f"+{c}" for c in V2_CONTROLLERS if c in (ROOT / "cgroup.controllers").read_text().split())
    parent = ROOT / PARENT
    parent.mkdir(exist_ok=True)
    for where in (ROOT, parent):
        _write(where / "cgroup.subtree_control", wanted)
    group = parent / name
    group.mkdir(exist_ok=True)
    _write(group / "cpu.max", f"{int((cpus + QEMU_SHARE) * PERIOD_US)} {PERIOD_US}")
    _write(group / "memory.max", str((memory_mb + QEMU_OVERHEAD_MB) << 20))
    with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to turn off
        _write(group / "memory.swap.max", "0")
    _write(group / "pids.max", str(MAX_TASKS))
    device = _device_of(disk) if disk else None
    if device and (group / "io.max").exists():
        _write(group / "io.max", f"{device} rbps={IO_BPS} wbps={IO_BPS} riops={IO_IOPS} wiops={IO_IOPS}")
    return [group]


def _setup_v1(name: str, cpus: int, memory_mb: int) -> list[Path]:
    groups = []
    for controller in V1_CONTROLLERS:
        base = ROOT / controller / _own_v1(controller) / PARENT
        base.mkdir(parents=True, exist_ok=True)
        group = base / name
        group.mkdir(exist_ok=True)
        groups.append(group)
    cpu, memory, pids = groups
    _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
    _write(cpu / "cpu.cfs_quota_us", str(int((cpus + QEMU_SHARE) * PERIOD_US)))
    _write(memory / "memory.limit_in_bytes", str((memory_mb + QEMU_OVERHEAD_MB) << 20))
    _write(pids / "pids.max", str(MAX_TASKS))
    return groups


def place(pid: int, argv: list[str], task_dir: Path, disk: str | None) -> list[Path]:
    """Put the QEMU ``pid`` (of the VM whose task directory is ``task_dir``) in its cgroup(s), limited by the
    sizes ``argv`` asks for; returns the directories. Raises CgroupError if cgroups cannot be used here."""
    cpus, memory_mb = sizes_of(argv)
    name = name_of(task_dir.parent, task_dir.name)
    try:
        level = version()
        if level is None:
            raise CgroupError(f"no usable cgroup file system at {ROOT}")
        groups = _setup_v2(name, cpus, memory_mb, disk) if level == 2 else _setup_v1(name, cpus, memory_mb)
        (task_dir / RECORD).write_text(json.dumps([str(g) for g in groups]) + "\n")
        for group in groups:
            _write(group / "cgroup.procs", str(pid))
    except OSError as exc:
        raise CgroupError(f"cannot place QEMU in a cgroup: {exc.strerror or exc} ({exc.filename or ROOT})") from exc
    return groups


def remove(task_dir: Path) -> None:
    """Remove the VM's cgroup directories (its QEMU is gone). Idempotent; one still busy is left and logged."""
    try:
        groups = json.loads((task_dir / RECORD).read_text())
    except (OSError, ValueError):
        return
    for group in groups:
        try:
            os.rmdir(group)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove cgroup %s: %s", group, exc.strerror or exc)
