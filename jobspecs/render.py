"""The VM job: one Nomad job per VM, rendered from typed variables.

Laid out like a Nomad pack: the variables are the fields of ``VMSpec`` (per VM) and ``JobSettings`` (per
installation), each with a type, a description and (where it has one) a default; ``variables()`` lists them.
``render_job`` is the one template; it returns the Nomad API ``Job`` object (what goes under ``"Job"`` in ``POST
/v1/jobs``) and ``jobspecs.hcl.to_hcl`` prints the same dict as HCL (also importable from here), so the JSON and the
HCL cannot disagree. Name helpers: ``job_name``, ``vm_id_of``.

The job (``vm-<id>``, type service):

    group "vm" (count 1, restart: 2 attempts in 30m, 15s apart, then fail; reschedule: 2 in 1h)
      task "qemu" (driver qemu, kill_timeout = STOP_TIMEOUT)
        config: image_path = the VM's overlay, accelerator, machine_type "pc",
                drive_interface "virtio", graceful_shutdown (ACPI power-off on stop), args:
                -smp N -kernel <image>/boot.bin (GRUB: boots the disk's /vmlinuz and /initrd.img with
                -smbios type=11,value=<cmdline> vmgate.hostname=<hostname> [vmgate.wake=ttyS1])
                -vnc unix:${NOMAD_TASK_DIR}/vnc.sock
                -qmp unix:${NOMAD_TASK_DIR}/qmp.sock,server=on,wait=off
                -sandbox on,obsolete=deny,... -nodefaults -vga std -serial stdio
                -serial unix:${NOMAD_TASK_DIR}/wake.sock,server=on,wait=off   (vmgate.wake: local only)
                -netdev tap|hubport,id=net0 -device virtio-net-pci,... -device virtio-rng-pci
                -fw_cfg name=opt/vmgate/hostname,string=<hostname>
                -set drive.image0.file.auto-read-only=off
                [-incoming "exec:cat <warm state>"]             (a warm job: the VM's first start only)
        resources: cpu = 1000 MHz per vCPU, memory = memory_mb

Warm jobs (``render_job(..., warm=WarmImage)``): the VM's overlay sits on the template's warm disk layer and its
first start restores the memory state saved with it (``-incoming``) instead of booting. Only that first start may
restore it: once the VM has run, its disk has moved on from the moment the state was saved, and the state restored
over it would corrupt it. ``cold_job`` is the same job without ``-incoming``; the lifecycle engine stores it before
the first start, so every later start (and any retry of the first) boots from the VM's own disk. A warm job's
restart and reschedule blocks allow no attempt, for the same reason: a scheduler that restarts the task itself
(Nomad) would restore again.

Two targets (``JobSettings.target``), one template:

- ``local`` (the local driver, one machine): VNC listens on a unix socket in the task directory; nothing on TCP.
- ``nomad`` (a fleet): the group also gets a ``network`` (a namespace of its own for an outbound VM) with a
  port ``vnc`` and a Consul ``service`` with a TCP check, and the task runs as ``task_user`` (jobspecs/fleet.py).
"""

from __future__ import annotations

import base64
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from jobspecs import memory, sandbox
from jobspecs.catalog import NOMAD_MEMORY_MB, SIZE_NAMES, Template, WarmImage
from jobspecs.devices import CLIPBOARD_META, NETWORKS, WAKE_CMDLINE, devices
from jobspecs.fleet import VNC_PORT_LABEL, VNC_SERVICE, fleet_parts, vnc_arg
from jobspecs.hcl import SECOND, to_hcl  # Nomad's API takes durations in nanoseconds (SECOND)

__all__ = ["FW_CFG_HOSTNAME", "VNC_PORT_LABEL", "VNC_SERVICE", "JobSettings", "JobSpecError", "VMSpec", "job_name",
           "qemu_args", "render_job", "to_hcl", "variables", "vm_id_of", "vnc_arg", "warm_fits"]
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

# Nomad's `cpu` is a share in MHz of the node's fingerprinted compute, not a core count. Under TCG
# one vCPU keeps about one host thread busy; 1000 MHz per vCPU lets a 2-core ~2 GHz node (~4000 MHz)
# place about four busy vCPUs, which matches what these machines can emulate usefully.
CPU_MHZ_PER_VCPU = 1000

TARGETS = ("local", "nomad")

# The guest (images/tiny/rootfs/lib/vmgate/identity.sh) takes its name from this fw_cfg entry; a clone
# restored from a warm template finds its own name there (its kernel command line is the template's).
FW_CFG_HOSTNAME = "opt/vmgate/hostname"
# User data goes to the guest as this fw_cfg entry, base64 inline: immune to QEMU's option syntax (commas) and to
# ${...} interpolation, well under Linux's 128 KiB per argument (images/tiny/rootfs/sbin/vmgate-userdata).
FW_CFG_USERDATA = "opt/vmgate/userdata"
MAX_USERDATA = 32 * 1024
LOADVM = "-loadvm"
# A qcow2 internal snapshot's tag as vmgate names them (a user's snapshot: s-<uuid>).
SNAPSHOT_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# With -drive's default auto-read-only, QEMU reopens the disk by path whenever its write access changes:
# read-write after an -incoming restore, read-only when a migration (a suspend) completes. Both fail once
# QEMU dropped root (the overlay's directory is root's alone). Nomad's qemu driver writes
# `-drive ...,id=image0` before the args, so -set can reach that drive's file node: opened read-write from
# the start and never reopened. Every job carries it, so that any VM can be suspended.
WARM_ARGS = ("-set", "drive.image0.file.auto-read-only=off")

GROUP_NAME = "vm"
TASK_NAME = "qemu"
JOB_PREFIX = "vm-"

# A crash-looping VM under TCG burns a core, so give up and let the reconciler mark it `error`:
# at most 2 restarts in 30 minutes on the same node, then at most 2 new placements an hour.
RESCHEDULE_POLICY = {
    "Attempts": 2,
    "Interval": HOUR,
    "Delay": 30 * SECOND,
    "DelayFunction": "exponential",
    "MaxDelay": 5 * MINUTE,
    "Unlimited": False,
}

# vm ids name directories and Nomad jobs: no '/', no spaces, no '..'; a UUID fits.
VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# RFC 1123 label: it lands on the kernel command line, so nothing that could add a parameter.
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
ACCELERATORS = ("tcg", "kvm")


class JobSpecError(ValueError):
    """A variable has a value the job cannot be rendered with; ``variable`` names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def _var(type_: str, description: str, default: Any = MISSING) -> Any:
    meta = {"type": type_, "description": description}
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class VMSpec:
    """The per-VM variables."""

    id: str = _var("string", "VM id (1-64 of A-Z a-z 0-9 _ -); the job is vm-<id>")
    owner: str = _var("string", "Id of the user who owns the VM (job meta `owner`)")
    template: str = _var("string", "Template name from images/catalog.json")
    cpu: int = _var("number", "vCPUs (-smp); Nomad cpu = this x 1000 MHz")
    memory_mb: int = _var("number", "Guest memory in MB (Nomad memory)")
    disk_gb: int = _var("number", "Size the overlay was created with, GB (task meta `disk_gb`)")
    overlay_path: str = _var("string", "Absolute path of the VM's qcow2 overlay (image_path)")
    hostname: str = _var("string", "Guest hostname (RFC 1123 label), passed as vmgate.hostname=")
    userdata: str = _var("string", "A script the guest runs once at first boot (fw_cfg opt/vmgate/userdata); "
                         f"empty for none, at most {MAX_USERDATA} bytes", "")
    network: str = _var("string", "outbound (NAT to the internet) or none (job meta `network`)", "none")

    @classmethod
    def for_template(cls, template: Template, *, id: str, owner: str, overlay_path: str | Path,
                     hostname: str | None = None, cpu: int | None = None, memory_mb: int | None = None,
                     disk_gb: int | None = None, network: str = "none") -> VMSpec:
        """A spec with the template's default sizes for whatever is not given; hostname defaults to vm-<id>."""
        return cls(
            id=id, owner=str(owner), template=template.name,
            cpu=template.defaults.cpu if cpu is None else cpu,
            memory_mb=template.defaults.memory_mb if memory_mb is None else memory_mb,
            disk_gb=template.defaults.disk_gb if disk_gb is None else disk_gb,
            overlay_path=str(overlay_path),
            hostname=hostname or f"{JOB_PREFIX}{id}"[:63].rstrip("-_").replace("_", "-"), network=network,
        )


@dataclass(frozen=True)
class JobSettings:
    """The per-installation variables (from Settings: NOMAD_DATACENTERS, NOMAD_NAMESPACE, ...)."""

    datacenters: tuple[str, ...] = _var("list(string)", "Datacenters the job may run in", ("dc1",))
    namespace: str = _var("string", "Nomad namespace of VM jobs", "default")
    accelerator: str = _var("string", "QEMU accelerator: tcg (works everywhere) or kvm", "tcg")
    stop_timeout: int = _var("number", "Seconds a guest gets to power off before a hard stop (kill_timeout)", 30)
    target: str = _var("string", "local (VNC on a unix socket) or nomad (VNC on a port, registered in Consul)",
                       "local")
    restart_attempts: int = _var("number", "Restarts of a crashed VM allowed within restart_interval", 2)
    restart_interval: int = _var("number", "Seconds of the window in which restart_attempts are counted", 1800)
    restart_delay: int = _var("number", "Seconds to wait before restarting a crashed VM", 15)
    restart_mode: str = _var("string", "fail (the VM goes to error) or delay (wait for the window to pass)", "fail")
    task_user: str = _var("string", "Account QEMU runs as on fleet nodes (task user); empty: Nomad's default", "vmgate")

    @classmethod
    def from_settings(cls, settings: Any) -> JobSettings:
        """Take the values from ``gateway.config.Settings``; the target follows VMGATE_DRIVER."""
        return cls(datacenters=tuple(settings.nomad_datacenters), namespace=settings.nomad_namespace,
                   accelerator=settings.qemu_accelerator, stop_timeout=settings.stop_timeout,
                   target="nomad" if settings.driver == "nomad" else "local",
                   restart_attempts=settings.restart_attempts, restart_interval=settings.restart_interval,
                   restart_delay=settings.restart_delay, restart_mode=settings.restart_mode,
                   task_user=settings.nomad_task_user)


def variables() -> dict[str, dict[str, Any]]:
    """Every variable of the VM job: ``{name: {"type", "description", "default"?}}`` (like variables.hcl)."""
    table: dict[str, dict[str, Any]] = {}
    for cls in (VMSpec, JobSettings):
        for f in fields(cls):
            entry = dict(f.metadata)
            if f.default is not MISSING:
                entry["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
            table[f.name] = entry
    return table


def job_name(vm_id: str) -> str:
    """The Nomad job ID (and name) of a VM: ``vm-<vm_id>``."""
    if not isinstance(vm_id, str) or not VM_ID_RE.fullmatch(vm_id):
        raise JobSpecError("id", f"must be 1-64 of A-Z a-z 0-9 _ - starting with a letter or digit, got {vm_id!r}")
    return JOB_PREFIX + vm_id


def vm_id_of(job_id: str) -> str | None:
    """The vm id of a job named by ``job_name``, or None for any other job."""
    if job_id.startswith(JOB_PREFIX) and VM_ID_RE.fullmatch(job_id[len(JOB_PREFIX):]):
        return job_id[len(JOB_PREFIX):]
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(vm: VMSpec, template: Template, settings: JobSettings) -> None:
    job_name(vm.id)
    if not isinstance(vm.owner, str) or not vm.owner or "\0" in vm.owner:
        raise JobSpecError("owner", "must be a non-empty string")
    if vm.template != template.name:
        raise JobSpecError("template", f"the spec names {vm.template!r} but the template is {template.name!r}")
    for size in SIZE_NAMES:
        value = getattr(vm, size)
        low, high = template.limits.bounds(size)
        if not _is_int(value):
            raise JobSpecError(size, f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise JobSpecError(size, f"{value} is outside {low}..{high}, the limits of template {template.name!r}")
    if not isinstance(vm.userdata, str) or "\0" in vm.userdata or len(vm.userdata.encode()) > MAX_USERDATA:
        raise JobSpecError("userdata", f"must be text of at most {MAX_USERDATA} bytes without NUL")
    if vm.network not in NETWORKS:
        raise JobSpecError("network", f"must be one of {', '.join(NETWORKS)}, got {vm.network!r}")
    if not NOMAD_MEMORY_MB[0] <= vm.memory_mb <= NOMAD_MEMORY_MB[1]:
        raise JobSpecError("memory_mb", f"Nomad's qemu driver needs {NOMAD_MEMORY_MB[0]}..{NOMAD_MEMORY_MB[1]} MB")
    if not isinstance(vm.hostname, str) or not HOSTNAME_RE.fullmatch(vm.hostname):
        raise JobSpecError("hostname", f"must be 1-63 of A-Z a-z 0-9 - (not starting or ending with -), "
                                       f"got {vm.hostname!r}")
    path = str(vm.overlay_path)
    if not path.startswith("/") or "," in path or any(ord(c) < 0x20 for c in path):
        # QEMU splits -drive options at commas; control characters have no business in a path.
        raise JobSpecError("overlay_path", f"must be an absolute path without commas or control characters, "
                                           f"got {path!r}")
    if not settings.datacenters or not all(isinstance(d, str) and d and not any(c.isspace() for c in d)
                                           for d in settings.datacenters):
        raise JobSpecError("datacenters", f"must be one or more names without spaces, got {settings.datacenters!r}")
    if not isinstance(settings.namespace, str) or not settings.namespace or " " in settings.namespace:
        raise JobSpecError("namespace", f"must be a name without spaces, got {settings.namespace!r}")
    if settings.accelerator not in ACCELERATORS:
        raise JobSpecError("accelerator", f"must be one of {', '.join(ACCELERATORS)}, got {settings.accelerator!r}")
    if not _is_int(settings.stop_timeout) or not 1 <= settings.stop_timeout <= 3600:
        raise JobSpecError("stop_timeout", f"must be whole seconds between 1 and 3600, got {settings.stop_timeout!r}")
    for name, lo, hi in (("restart_attempts", 0, 100), ("restart_interval", 1, 7 * 86400),
                         ("restart_delay", 0, 3600)):
        value = getattr(settings, name)
        if not _is_int(value) or not lo <= value <= hi:
            raise JobSpecError(name, f"must be a whole number between {lo} and {hi}, got {value!r}")
    if settings.restart_mode not in ("fail", "delay"):
        raise JobSpecError("restart_mode", f"must be fail or delay, got {settings.restart_mode!r}")
    if settings.target not in TARGETS:
        raise JobSpecError("target", f"must be one of {', '.join(TARGETS)}, got {settings.target!r}")


def kernel_cmdline(vm: VMSpec, template: Template, target: str = "local") -> str:
    """The guest kernel's command line: the template's, the VM's name, and on the local driver the wake port."""
    return (f"{template.cmdline} vmgate.hostname={vm.hostname}"
            + (f" {WAKE_CMDLINE}" if target == "local" else ""))  # jobspecs/devices.py


def qemu_args(vm: VMSpec, template: Template, target: str = "local") -> list[str]:
    """The task's ``args``: everything QEMU needs beyond what Nomad's qemu driver adds itself."""
    return [
        "-smp", str(vm.cpu),
        # GRUB, which boots the disk's own kernel with this command line (SMBIOS OEM string; images/lib.sh).
        # Not -kernel vmlinuz: QEMU holds a copy of that in every VM's memory, clones too (docs/IMAGES.md).
        "-kernel", str(template.boot),
        "-smbios", "type=11,value=" + kernel_cmdline(vm, template, target).replace(",", ",,"),
        # ${NOMAD_TASK_DIR} is interpolated by the driver at start (Nomad's runtime variables).
        "-vnc", vnc_arg(target, vm.network),
        "-qmp", "unix:${NOMAD_TASK_DIR}/qmp.sock,server=on,wait=off",
        "-sandbox", sandbox.value(),  # jobspecs/sandbox.py
        # These devices (jobspecs/devices.py), Nomad's own, and QEMU's user-mode network only in a fleet VM's
        # own namespace: elsewhere its guest would reach the host's loopback (Postgres, Redis, the gateway).
        *devices(template, vm.network, target),
        "-fw_cfg", f"name={FW_CFG_HOSTNAME},string={vm.hostname}",
        *(("-fw_cfg", f"name={FW_CFG_USERDATA},string={base64.b64encode(vm.userdata.encode()).decode()}")
          if vm.userdata else ()),
        *WARM_ARGS,
    ]


def warm_fits(vm: VMSpec, warm: WarmImage, settings: JobSettings) -> bool:
    """True when ``vm`` can start from ``warm``'s memory state (same template, sizes and accelerator)."""
    # A warm clone does not boot, and user data runs at boot: a VM with user data starts cold. A layer whose
    # state leaves its RAM in a file (jobspecs/memory.py) is for the local driver only.
    return (vm.template == warm.template and not vm.userdata
            and warm.fits(vm.cpu, vm.memory_mb, vm.disk_gb, settings.accelerator)
            and (warm.ram is None or settings.target == "local"))


def policies(settings: JobSettings, warm: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    restart = {"Attempts": 0 if warm else settings.restart_attempts, "Interval": settings.restart_interval * SECOND,
               "Delay": settings.restart_delay * SECOND, "Mode": "fail" if warm else settings.restart_mode}
    reschedule = dict(RESCHEDULE_POLICY)
    if warm:
        reschedule["Attempts"] = 0
    return restart, reschedule


def render_job(vm: VMSpec, template: Template, settings: JobSettings,
               warm: WarmImage | None = None) -> dict[str, Any]:
    """The Nomad API Job object for ``vm``; raises ``JobSpecError`` naming the first bad variable.

    With ``warm`` (which must fit: ``warm_fits``) the job's start restores the warm layer's memory
    state; the VM's overlay must then be created on ``warm.disk``, not on the template's base disk."""
    _check(vm, template, settings)
    if warm is not None and not warm_fits(vm, warm, settings):
        raise JobSpecError("warm", f"the warm layer {warm.id} of template {warm.template!r} was saved for "
                                   f"{warm.sizes} under {warm.accelerator}, not this VM's sizes")
    name = job_name(vm.id)
    job = _job(vm, template, settings, name)
    if warm is not None:
        task = job["TaskGroups"][0]["Tasks"][0]
        # On this host, the clone maps its template's RAM copy-on-write (jobspecs/memory.py); a fleet's
        # warm state holds the RAM itself.
        shared = memory.backend_args(vm.memory_mb, str(warm.ram), share=False) \
            if warm.ram is not None and settings.target == "local" else []
        task["Config"]["args"] = sandbox.fit([*task["Config"]["args"], *shared, sandbox.INCOMING,
                                              f"exec:cat {warm.state}"])
        job["TaskGroups"][0]["RestartPolicy"], job["TaskGroups"][0]["ReschedulePolicy"] = policies(settings, True)
        job["Meta"]["start"] = "warm"
        job["Meta"]["warm_layer"] = warm.id
    if settings.target == "nomad":
        group_extra, task_extra = fleet_parts(vm, name, settings.task_user, CPU_MHZ_PER_VCPU)
        group = job["TaskGroups"][0]
        group.update(group_extra)
        group["Tasks"][0].update(task_extra)
    return job


def _job(vm: VMSpec, template: Template, settings: JobSettings, name: str) -> dict[str, Any]:
    return {
        "ID": name,
        "Name": name,
        "Type": "service",
        "Namespace": settings.namespace,
        "Datacenters": list(settings.datacenters),
        "Meta": {"vm_id": vm.id, "owner": vm.owner, "template": template.name, "network": vm.network,
                 **(CLIPBOARD_META if template.desktop else {})},
        "TaskGroups": [
            {
                "Name": GROUP_NAME,
                "Count": 1,
                "RestartPolicy": policies(settings, warm=False)[0],
                "ReschedulePolicy": policies(settings, warm=False)[1],
                "Tasks": [
                    {
                        "Name": TASK_NAME,
                        "Driver": "qemu",
                        "Config": {
                            "image_path": str(vm.overlay_path),
                            "accelerator": settings.accelerator,
                            "machine_type": "pc", "drive_interface": "virtio",
                            "graceful_shutdown": True,
                            # The guest agent's socket (qa.sock in the task directory): file transfers.
                            **({"guest_agent": True} if template.agent else {}),
                            "args": qemu_args(vm, template, settings.target),
                        },
                        "Resources": {"CPU": vm.cpu * CPU_MHZ_PER_VCPU, "MemoryMB": vm.memory_mb},
                        "KillTimeout": settings.stop_timeout * SECOND,
                        "LogConfig": {"MaxFiles": 2, "MaxFileSizeMB": 1},  # the serial console: 2 MiB, rotated
                        "Meta": {"hostname": vm.hostname, "disk_gb": str(vm.disk_gb)},
                    }
                ],
            }
        ],
    }
