"""Confining a VM's QEMU on this host: its own uid and gid, the sandbox that fits its start, a thread cap.

**Its own identity.** When the driver runs as root, each VM's QEMU drops to a uid and gid of its own
(``-runas UID:GID``) once it has opened its files, instead of a ``nobody`` shared by every VM: two QEMUs
with the same uid could signal each other, ``ptrace`` each other, and read each other's memory through
``/proc/<pid>/mem``. The ids are numbers no account uses (``UID_BASE`` and up), so QEMU owns no file
on the host: it reaches its disk, sockets and logs only through what it opened as root, and another
VM's QEMU reaches none of them. A VM keeps its id for its life (``<tasks>/.uids/<uid>`` names the VM;
created with O_EXCL, so two VMs never share one; released when the VM is destroyed).

**Its sandbox.** The job's ``-sandbox`` (jobspecs/sandbox.py) denies spawning, privilege changes,
obsolete calls and resource control. This driver allows privilege changes back when it adds
``-runas`` (QEMU 7.2 drops root after installing the filter; denied, the drop itself is killed),
and denies spawning again when it turns ``-incoming "exec:cat STATE"`` into a descriptor.

**A thread cap.** ``RLIMIT_NPROC`` counts the tasks of a real uid; with a uid per VM it caps that VM's
QEMU at ``MAX_TASKS`` threads (it runs a few dozen at most), so a guest cannot make its QEMU exhaust the
host's pids.

**A cgroup** (drivers/local/cgroups.py): CPU, memory, tasks and (cgroup v2) disk I/O limits from the VM's
sizes. ``limit`` applies the thread cap and the cgroup to a QEMU just spawned; ``dispose`` removes what a
destroyed VM had on this host (its cgroup, its task directory, its uid).
"""

from __future__ import annotations

import itertools
import logging
import resource
import shutil
from pathlib import Path

from drivers.local import cgroups, network
from drivers.local.slots import claim, release
from drivers.local.taskdir import remove_tree

log = logging.getLogger(__name__)

UID_BASE = 1_500_000_000  # far above any account (and below 2^31, where some tools turn uids negative)
UID_SPAN = 1 << 24
MAX_TASKS = cgroups.MAX_TASKS  # threads of one VM's QEMU: its RLIMIT_NPROC, and pids.max of its cgroup
PER_VM = "per-vm"  # the driver's run_as when each VM gets its own uid
cgroup_problem: str | None = None  # why QEMUs run without cgroup limits here (None: they do not)


def uid_of(tasks_root: Path, vm_id: str) -> int:
    """The VM's own uid (= its gid): the one it has, else a free one, claimed for it."""
    return claim(tasks_root / ".uids", vm_id, UID_BASE, UID_SPAN)


def release_uid(tasks_root: Path, vm_id: str) -> None:
    """Give the destroyed VM's uid back. Idempotent."""
    release(tasks_root / ".uids", vm_id)


def identity(run_as: str | None, tasks_root: Path, vm_id: str) -> str | None:
    """What the VM's QEMU drops to (``-runas``): its own ``UID:GID`` when ``run_as`` is PER_VM."""
    if run_as != PER_VM:
        return run_as
    uid = uid_of(tasks_root, vm_id)
    return f"{uid}:{uid}"


def per_vm_uid(argv: list[str]) -> int | None:
    """The per-VM uid a QEMU command line drops to (``-runas UID:GID``), if it drops to one."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-runas" and value.partition(":")[0].isdigit():
            uid = int(value.partition(":")[0])
            return uid if UID_BASE <= uid < UID_BASE + UID_SPAN else None
    return None


def limit(pid: int, argv: list[str], task_dir: Path, disk: str | None) -> None:
    """Cap the threads of a QEMU that drops to a per-VM uid (set on the process before it drops root; the
    limit holds across the uid change) and place it in its cgroup. No-op for any other QEMU: a cap on a
    shared uid would cap every VM of that uid together, and only root places processes in cgroups."""
    if per_vm_uid(argv) is None:
        return
    try:
        resource.prlimit(pid, resource.RLIMIT_NPROC, (MAX_TASKS, MAX_TASKS))
        cgroups.place(pid, argv, task_dir, disk)
    except ProcessLookupError:
        return  # QEMU died at once: its start reports why
    except cgroups.CgroupError as exc:
        global cgroup_problem
        if cgroup_problem is None:
            log.warning("VMs run without cgroup limits: %s", exc)
        cgroup_problem = str(exc)


def dispose(task_dir: Path, *, strict: bool = True) -> None:
    """Remove what a VM whose QEMU is gone has on this host: its cgroups, network, task directory and uid.
    ``strict``: raise DriverError if the directory cannot be removed (else leave what is left)."""
    cgroups.remove(task_dir)
    network.down(task_dir)
    if strict:
        remove_tree(task_dir)
    else:
        shutil.rmtree(task_dir, ignore_errors=True)
    release_uid(task_dir.parent, task_dir.name)
