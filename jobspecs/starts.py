"""How a VM's job starts: cold from its disk, or from saved memory. ``render_job`` renders a VM's job; these
derive its other starts from it (the lifecycle engine picks one per start):

- ``is_warm``: the job restores its template's warm memory state (``-incoming``), its first start only;
- ``cold_job``: the same job booting from the VM's own disk (every later start);
- ``loadvm_job``: started from a qcow2 internal snapshot of its disk, memory included (``-loadvm``);
- ``resume_job``: started from the memory state a suspend saved next to its overlay (``-incoming``).

A start from saved memory allows no restart by a scheduler: a restarted task would restore the same memory
over a disk that has moved on since (docs/LIFECYCLE.md, docs/SNAPSHOTS.md).
"""

from __future__ import annotations

import json
import re
from typing import Any

from jobspecs import memory, sandbox
from jobspecs.devices import NETDEVS, netdev
from jobspecs.fleet import fleet_network, vnc_arg
from jobspecs.render import LOADVM, SNAPSHOT_TAG_RE, WARM_ARGS, JobSettings, JobSpecError, policies
from jobspecs.sandbox import INCOMING


def is_warm(job: dict[str, Any]) -> bool:
    """True when the job's start restores a saved memory state (``-incoming`` in its args)."""
    try:
        return INCOMING in job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    except (KeyError, IndexError, TypeError):
        return False


def cold_job(job: dict[str, Any], settings: JobSettings) -> dict[str, Any]:
    """A copy of ``job`` that boots from the VM's disk: no ``-incoming``, the installation's restart
    and reschedule blocks. Any other job is returned as a copy, unchanged."""
    copy: dict[str, Any] = json.loads(json.dumps(job))
    if not is_warm(copy):
        return copy
    group = copy["TaskGroups"][0]
    config = group["Tasks"][0]["Config"]
    args = config["args"]
    at = args.index(INCOMING)
    # Booting from its disk, the VM's RAM is its own again (no template memory under it).
    config["args"] = sandbox.fit(memory.without_backend(args[:at] + args[at + 2:]))
    group["RestartPolicy"], group["ReschedulePolicy"] = policies(settings, warm=False)
    copy.get("Meta", {}).pop("start", None)
    return copy


def with_network(job: dict[str, Any], network: str) -> dict[str, Any]:
    """A copy of ``job`` whose NIC is on ``network`` (jobspecs/devices.py): the same device, another backend, so a
    VM keeps its saved states across the change. A job made before VMs had a NIC cannot change."""
    if network not in NETDEVS:
        raise JobSpecError("network", f"must be one of {', '.join(NETDEVS)}, got {network!r}")
    copy: dict[str, Any] = json.loads(json.dumps(job))
    group = copy["TaskGroups"][0]
    args = group["Tasks"][0]["Config"]["args"]
    if "-netdev" not in args:
        raise JobSpecError("network", "this VM was made without a network card")
    fleet = bool(group.get("Networks"))  # a fleet job: its group's network and VNC follow (jobspecs/fleet.py)
    args[args.index("-netdev") + 1] = netdev(network, "nomad" if fleet else "local")
    if fleet:
        group["Networks"] = [fleet_network(network)]
        args[args.index("-vnc") + 1] = vnc_arg("nomad", network)
    copy.setdefault("Meta", {})["network"] = network
    return copy


def loadvm_job(job: dict[str, Any], tag: str, settings: JobSettings) -> dict[str, Any]:
    """The cold form of ``job`` started from the qcow2 internal snapshot ``tag`` of its own disk: QEMU
    loads that snapshot's disk and memory (``-loadvm``) and runs on from the moment it was taken. How a
    suspended VM resumes and a memory snapshot is restored; the snapshot lives in the VM's overlay, so
    the job needs nothing else (docs/SNAPSHOTS.md)."""
    if not isinstance(tag, str) or not SNAPSHOT_TAG_RE.fullmatch(tag):
        raise JobSpecError("snapshot", f"must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit, "
                                       f"got {tag!r}")
    copy = cold_job(job, settings)
    config = copy["TaskGroups"][0]["Tasks"][0]["Config"]
    config["args"] = [*config["args"], LOADVM, tag]
    # As for a warm start: a scheduler restarting the task itself would load the snapshot again over a
    # disk that has moved on since.
    group = copy["TaskGroups"][0]
    group["RestartPolicy"], group["ReschedulePolicy"] = policies(settings, warm=True)
    copy.setdefault("Meta", {})["start"] = "loadvm"
    return copy


_STATE_PATH_RE = re.compile(r"^/[A-Za-z0-9/._-]+$")


def resume_job(job: dict[str, Any], state: str, settings: JobSettings) -> dict[str, Any]:
    """The cold form of ``job`` started from the memory state a suspend saved to the file ``state`` (next to
    the VM's overlay): QEMU restores it (``-incoming``) and the guest runs on from the moment it was paused,
    on the disk as it was then. As for a warm start: read-write from the start, and no restart by a
    scheduler (docs/LIFECYCLE.md, "Suspend and resume")."""
    if not isinstance(state, str) or not _STATE_PATH_RE.fullmatch(state) or "/../" in state:
        raise JobSpecError("state", f"must be an absolute path of A-Z a-z 0-9 / . _ -, got {state!r}")
    copy = cold_job(job, settings)
    config = copy["TaskGroups"][0]["Tasks"][0]["Config"]
    args = config["args"]
    has_set = any(tuple(args[i:i + 2]) == WARM_ARGS for i in range(len(args) - 1))
    config["args"] = sandbox.fit([*args, *(() if has_set else WARM_ARGS), INCOMING, f"exec:cat {state}"])
    group = copy["TaskGroups"][0]
    group["RestartPolicy"], group["ReschedulePolicy"] = policies(settings, warm=True)
    copy.setdefault("Meta", {})["start"] = "resume"
    return copy
