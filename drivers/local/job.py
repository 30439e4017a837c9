"""Job checking: whether a rendered Nomad job is one the local driver runs, and QEMU's command line for it.

Pure functions of the job and a task directory (nothing here touches a file or a process). ``build_task``
reads the job the way Nomad's qemu task driver (hashicorp/nomad drivers/qemu/driver.go) does, interpolates
``${NOMAD_TASK_DIR}`` and the few other runtime variables the local driver knows, and checks every argument
it lets through (unix sockets in the task directory, VNC on loopback only, one saved state to restore...).
The fake driver checks jobs with the same code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.base import DriverError, JobInvalid, VncTarget
from jobspecs import memory as memory_args
from jobspecs.devices import NETDEVS, NETWORKS

SUN_PATH_MAX = 108  # bytes in sockaddr_un.sun_path, the terminating NUL included
VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MEMORY_MB = (128, 4_000_000)  # Nomad's bounds
# What Nomad's qemu driver accepts for drive_interface.
DRIVE_INTERFACES = ("ide", "scsi", "sd", "mtd", "floppy", "pflash", "virtio", "none")
CONFIG_KEYS = frozenset({"image_path", "emulator", "machine_type", "drive_interface", "accelerator",
                         "graceful_shutdown", "guest_agent", "args", "port_map"})
MONITOR_SOCKET = "qm.sock"  # Nomad's names for its monitor and guest agent sockets
GUEST_AGENT_SOCKET = "qa.sock"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# -loadvm TAG: an internal snapshot of the VM's own disk (a user's snapshot, s-<uuid>).
SNAPSHOT_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_INTERP_RE = re.compile(r"\$\{([^}]*)\}")
# -incoming "exec:cat PATH": QEMU runs it with /bin/sh, so PATH may hold nothing the shell interprets.
_INCOMING_RE = re.compile(r"^exec:cat (/[A-Za-z0-9/._-]+)$")
# -fw_cfg may only hand the guest a string (file= would copy any file QEMU can read into the guest).
_FW_CFG_RE = re.compile(r"^name=opt/[A-Za-z0-9/._-]+,string=[^,]*$")
# -smbios may only add one OEM string (type 11: the kernel command line the boot loader reads, images/lib.sh);
# file= would load any file QEMU can read as the guest's SMBIOS tables. QEMU reads ",," as a comma.
_SMBIOS_RE = re.compile(r"^type=11,value=(?:[^,]|,,)*$")
_OPTION_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:+-]+$")


@dataclass(frozen=True)
class QemuTask:
    """A job's qemu task, checked and interpolated for one task directory."""

    argv: tuple[str, ...]
    image_path: str
    qmp_socket: Path
    sockets: tuple[Path, ...]  # every unix socket QEMU creates in the task directory
    vnc: VncTarget | None
    graceful_shutdown: bool
    env: dict[str, str] = field(default_factory=dict)
    incoming: str | None = None  # the state file a warm start restores (-incoming "exec:cat PATH")
    vdagent: bool = False  # job Meta.clipboard: plug the desktop clipboard in once it runs (drivers/local/vdagent.py)
    network: str = "none"  # job Meta.network: "outbound" runs QEMU in a network namespace (drivers/local/network.py)
    # The VM's RAM in a file (jobspecs/memory.py): a template's, mapped copy-on-write (``memory_shared`` False:
    # the driver hands QEMU a sealed copy, drivers/local/memimage.py), or its own, written through (a template
    # boot: the file is in the task directory).
    memory_file: str | None = None
    memory_shared: bool = False
    # -serial unix:${NOMAD_TASK_DIR}/wake.sock: the guest's ttyS1, which the driver pokes after a restore
    # (jobspecs/devices.py); None for a job without it.
    wake_socket: Path | None = None


def check_vm_id(vm_id: str) -> None:
    """Raise JobInvalid unless ``vm_id`` is a usable VM id (it names a directory and a job)."""
    if not isinstance(vm_id, str) or not VM_ID_RE.fullmatch(vm_id):
        raise JobInvalid(f"invalid VM id {vm_id!r}: 1-64 of A-Z a-z 0-9 _ - starting with a letter or digit")


def _task_of(vm_id: str, job: Any) -> dict[str, Any]:
    if not isinstance(job, dict):
        raise JobInvalid("the job must be a Nomad API Job object")
    if job.get("ID") != f"vm-{vm_id}":
        raise JobInvalid(f"job ID {job.get('ID')!r} does not belong to VM {vm_id!r} (expected 'vm-{vm_id}')")
    groups = job.get("TaskGroups")
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise JobInvalid("the job must have exactly one task group")
    if groups[0].get("Count", 1) != 1:
        raise JobInvalid("the task group's Count must be 1: one VM is one QEMU")
    tasks = groups[0].get("Tasks")
    if not isinstance(tasks, list) or len(tasks) != 1 or not isinstance(tasks[0], dict):
        raise JobInvalid("the task group must have exactly one task")
    task: dict[str, Any] = tasks[0]
    if task.get("Driver") != "qemu":
        raise JobInvalid(f"task driver {task.get('Driver')!r} is not 'qemu'")
    return task


def _interpolate(value: str, env: dict[str, str], where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise JobInvalid(f"{where}: unknown interpolation ${{{name}}}; the local driver knows "
                             + ", ".join(f"${{{key}}}" for key in env))
        return env[name]

    return _INTERP_RE.sub(replace, value)


def _option(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get(key) or default
    if not isinstance(value, str) or not _OPTION_VALUE_RE.fullmatch(value):
        raise JobInvalid(f"config.{key} {value!r} is not a plain QEMU option value")
    return value


def _socket_in(value: str, task_dir: Path, flag: str) -> Path:
    """The path of a ``unix:PATH[,opts]`` argument, which must lie directly in the task directory."""
    path = Path(os.path.normpath(value[len("unix:"):].split(",", 1)[0]))
    if path.parent != task_dir:
        raise JobInvalid(f"{flag} {value!r}: unix sockets must be in the task directory "
                         "(use ${NOMAD_TASK_DIR}/NAME.sock)")
    return path


def _vnc_target(value: str, task_dir: Path) -> tuple[VncTarget | None, Path | None]:
    if value.startswith("unix:"):
        path = _socket_in(value, task_dir, "-vnc")
        return VncTarget(unix_socket=str(path)), path
    display = value.split(",", 1)[0]
    if display == "none":
        return None, None
    host, sep, number = display.rpartition(":")
    host = host.strip("[]")
    if not sep or not number.isdigit():
        raise JobInvalid(f"-vnc {value!r}: expected unix:PATH or HOST:DISPLAY")
    if host not in LOOPBACK:
        raise JobInvalid(f"-vnc {value!r}: VNC may listen on loopback or a unix socket only")
    return VncTarget(host=host, port=5900 + int(number)), None


def _memory_backend(extra: list[str], memory: int, task_dir: Path) -> tuple[str | None, bool]:
    """The RAM file a job's args name (jobspecs/memory.py) and whether QEMU writes through to it; (None,
    False) for plain ``-m`` memory. Only that one backend, sized as the job's memory, and only a warm layer's
    file (copy-on-write; the driver checks its manifest at start) or one in the task directory (written
    through)."""
    objects = [extra[i + 1] for i in range(len(extra) - 1) if extra[i] == memory_args.OBJECT
               and extra[i + 1].startswith("memory-backend")]
    machines = [extra[i + 1] for i in range(len(extra) - 1) if extra[i] == memory_args.MACHINE]
    if not objects and not machines:
        return None, False
    match = memory_args.BACKEND_RE.fullmatch(objects[0]) if len(objects) == 1 else None
    if match is None or machines != [memory_args.MACHINE_BACKEND]:
        raise JobInvalid("the only memory backend is -object memory-backend-file,id=pc.ram,size=<MB>M,"
                         "mem-path=<path>,share=on|off with -machine memory-backend=pc.ram")
    if int(match["mb"]) != memory:
        raise JobInvalid(f"the memory backend is {match['mb']} MiB, the job's memory {memory} MiB")
    path = os.path.normpath(match["path"].replace("${NOMAD_TASK_DIR}", str(task_dir)))
    shared = match["share"] == "on"
    if shared and not _is_under(path, str(task_dir)):
        raise JobInvalid("memory written through (share=on) goes to a file in the task directory only")
    if not shared and os.path.basename(path) != memory_args.RAM_FILE:
        raise JobInvalid(f"a template's memory is a warm layer's {memory_args.RAM_FILE!r} file, not {path}")
    return path, shared


def _is_under(path: str, parent: str) -> bool:
    parent = os.path.normpath(parent)
    return os.path.commonpath([path, parent]) == parent


def build_task(vm_id: str, job: dict[str, Any], task_dir: Path, qemu_path: str = "qemu-system-x86_64", *,
               image_paths: Iterable[str | Path] | None = None,
               args_allowlist: Iterable[str] | None = None) -> QemuTask:
    """Check ``job`` and build QEMU's command line for it the way Nomad's qemu driver does.

    Pure: touches no file. Raises ``JobInvalid`` for anything the job gets wrong and
    ``DriverError`` when a socket path would be too long for this task directory.
    ``image_paths`` and ``args_allowlist`` work like the Nomad client's qemu plugin options.
    """
    check_vm_id(vm_id)
    task = _task_of(vm_id, job)
    config = task.get("Config")
    if not isinstance(config, dict):
        raise JobInvalid("the task has no Config")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise JobInvalid(f"unknown qemu config keys: {', '.join(unknown)}")
    if config.get("port_map"):
        raise JobInvalid("port_map needs Nomad's networking; the local driver has none")
    resources = task.get("Resources") or {}
    memory = resources.get("MemoryMB") if isinstance(resources, dict) else None
    if not isinstance(memory, int) or isinstance(memory, bool) or not MEMORY_MB[0] <= memory <= MEMORY_MB[1]:
        raise JobInvalid(f"Resources.MemoryMB must be {MEMORY_MB[0]}..{MEMORY_MB[1]}, got {memory!r}")
    for key in ("graceful_shutdown", "guest_agent"):
        if not isinstance(config.get(key, False), bool):
            raise JobInvalid(f"config.{key} must be true or false")
    args = config.get("args", [])
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise JobInvalid("config.args must be a list of strings")

    task_dir = Path(os.path.normpath(task_dir))
    if "," in str(task_dir):
        raise DriverError(f"the task directory {task_dir} contains a comma, which QEMU options cannot hold")
    env = {
        "NOMAD_TASK_DIR": str(task_dir),
        "NOMAD_ALLOC_DIR": str(task_dir),
        "NOMAD_ALLOC_ID": vm_id,
        "NOMAD_JOB_NAME": str(job.get("Name") or job["ID"]),
        "NOMAD_TASK_NAME": str(task.get("Name") or "qemu"),
    }

    image_path = config.get("image_path")
    if not isinstance(image_path, str) or not image_path:
        raise JobInvalid("config.image_path must be set")
    image_path = _interpolate(image_path, env, "config.image_path")
    image_path = os.path.normpath(os.path.join(task_dir, image_path))  # relative paths: to the task dir
    if "," in image_path or any(ord(c) < 0x20 for c in image_path):
        raise JobInvalid(f"config.image_path {image_path!r} must not contain commas or control characters")
    if image_paths is not None and not _is_under(image_path, str(task_dir)) \
            and not any(_is_under(image_path, str(allowed)) for allowed in image_paths):
        raise JobInvalid(f"config.image_path {image_path} is not in the allowed image paths")

    emulator = config.get("emulator")
    if emulator and f"qemu-system-{str(emulator).removeprefix('qemu-system-')}" != os.path.basename(qemu_path):
        raise JobInvalid(f"config.emulator {emulator!r}: this driver runs {os.path.basename(qemu_path)} only")
    machine_type = _option(config, "machine_type", "pc")
    accelerator = _option(config, "accelerator", "tcg")
    drive_interface = _option(config, "drive_interface", "ide")
    if drive_interface not in DRIVE_INTERFACES:
        raise JobInvalid(f"config.drive_interface {drive_interface!r} is not one of {', '.join(DRIVE_INTERFACES)}")

    argv = [
        qemu_path,
        "-machine", f"type={machine_type},accel={accelerator}",
        "-name", os.path.basename(image_path),
        "-m", f"{memory}M",
        "-drive", f"file={image_path},if={drive_interface},id=image0",
        "-nographic",
    ]
    sockets: list[Path] = []
    if config.get("graceful_shutdown"):
        monitor = task_dir / MONITOR_SOCKET
        sockets.append(monitor)
        argv += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    if config.get("guest_agent"):
        agent = task_dir / GUEST_AGENT_SOCKET
        sockets.append(agent)
        argv += ["-chardev", f"socket,path={agent},server=on,wait=off,id=qga0",
                 "-device", "virtio-serial",
                 "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]

    extra = [_interpolate(arg, env, f"config.args[{i}]") for i, arg in enumerate(args)]
    if args_allowlist is not None:
        allowed = set(args_allowlist)
        for arg in extra:
            if arg.strip().startswith("-") and arg not in allowed:
                raise JobInvalid(f"{arg!r} is not in args_allowlist")
    qmp_socket: Path | None = None
    wake_socket: Path | None = None
    vnc: VncTarget | None = None
    incoming: str | None = None
    memory_file, memory_shared = _memory_backend(extra, memory, task_dir)
    for flag, value in zip(extra, [*extra[1:], ""], strict=True):
        if flag == "-incoming":
            match = _INCOMING_RE.fullmatch(value)
            if not match or incoming is not None:
                raise JobInvalid(f"-incoming {value!r}: the local driver restores only a saved state file, "
                                 "once: exec:cat /ABSOLUTE/PATH")
            incoming = os.path.normpath(match[1])
        elif flag == "-loadvm" and (not SNAPSHOT_TAG_RE.fullmatch(value) or extra.count("-loadvm") > 1):
            raise JobInvalid(f"-loadvm {value!r}: one snapshot tag, 1-64 of A-Z a-z 0-9 _ . -")
        elif flag == "-fw_cfg" and not _FW_CFG_RE.fullmatch(value):
            raise JobInvalid(f"-fw_cfg {value!r}: only name=opt/...,string=VALUE is allowed")
        elif flag == "-netdev" and (value not in NETDEVS.values() or extra.count("-netdev") > 1):
            raise JobInvalid(f"-netdev {value!r}: the local driver connects one NIC to its tap or to nothing: "
                             + " or ".join(NETDEVS.values()))
        elif flag == "-net" or (flag == "-nic" and value != "none"):
            raise JobInvalid(f"{flag} {value!r}: no user-mode or default network (the guest would reach the "
                             "host's loopback); use -netdev")
        elif flag == "-smbios" and (not _SMBIOS_RE.fullmatch(value) or extra.count("-smbios") > 1):
            raise JobInvalid(f"-smbios {value!r}: only one type=11,value=KERNEL-COMMAND-LINE is allowed")
        elif flag == "-set" and value != "drive.image0.file.auto-read-only=off":
            raise JobInvalid(f"-set {value!r}: only drive.image0.file.auto-read-only=off is allowed")
        if flag == "-qmp":
            if not value.startswith("unix:") or "server" not in value:
                raise JobInvalid(f"-qmp {value!r}: the local driver needs a unix socket server "
                                 "(unix:${NOMAD_TASK_DIR}/qmp.sock,server=on,wait=off)")
            qmp_socket = _socket_in(value, task_dir, "-qmp")
            sockets.append(qmp_socket)
        elif flag == "-serial" and value != "stdio":
            if not value.startswith("unix:") or "server" not in value or wake_socket is not None:
                raise JobInvalid(f"-serial {value!r}: the local driver takes stdio and one unix socket server in "
                                 "the task directory (unix:${NOMAD_TASK_DIR}/wake.sock,server=on,wait=off)")
            wake_socket = _socket_in(value, task_dir, "-serial")
            sockets.append(wake_socket)
        elif flag == "-vnc":
            vnc, vnc_socket = _vnc_target(value, task_dir)
            if vnc_socket is not None:
                sockets.append(vnc_socket)
    network = (job.get("Meta") or {}).get("network", "none")
    if network not in NETWORKS:
        raise JobInvalid(f"Meta.network {network!r}: expected one of {', '.join(NETWORKS)}")
    if (NETDEVS["outbound"] in extra) != (network == "outbound"):
        raise JobInvalid("Meta.network says outbound exactly when -netdev is the tap: "
                         f"-netdev {NETDEVS['outbound']}")
    if qmp_socket is None:
        raise JobInvalid("the local driver needs a QMP socket: add -qmp unix:${NOMAD_TASK_DIR}/qmp.sock,"
                         "server=on,wait=off to config.args")
    argv += extra
    if accelerator == "kvm":
        argv.append("-enable-kvm")

    for path in sockets:
        if len(os.fsencode(str(path))) >= SUN_PATH_MAX:
            raise DriverError(f"unix socket path {path} is {len(os.fsencode(str(path)))} bytes; it must be "
                              f"under {SUN_PATH_MAX}: use a shorter VMS_ROOT")
    return QemuTask(argv=tuple(argv), image_path=image_path, qmp_socket=qmp_socket, sockets=tuple(sockets),
                    vnc=vnc, graceful_shutdown=bool(config.get("graceful_shutdown")), env=env, incoming=incoming,
                    vdagent=(job.get("Meta") or {}).get("clipboard") == "vdagent", network=network,
                    memory_file=memory_file, memory_shared=memory_shared, wake_socket=wake_socket)
