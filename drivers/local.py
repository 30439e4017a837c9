"""The embedded default driver: runs a VM's rendered Nomad job with QEMU on this host.

It reads the job the way Nomad's qemu task driver (hashicorp/nomad drivers/qemu/driver.go) does and
builds the same command line:

    <qemu> -machine type=<machine_type>,accel=<accelerator> -name <basename(image_path)>
           -m <MemoryMB>M -drive file=<image_path>,if=<drive_interface>,id=image0 -nographic
           [-monitor unix:<task dir>/qm.sock,server=on,wait=off]          (graceful_shutdown)
           [-chardev socket,path=<task dir>/qa.sock,... -device virtio-serial ...] (guest_agent)
           <args, with ${NOMAD_TASK_DIR} & co. interpolated> [-enable-kvm]
           [-runas nobody]                                              (this driver, when root)

Each VM has a task directory ``<vms_root>/tasks/<vm_id>/`` (mode 0700): ``job.json`` (the job it
runs), ``qemu.pid``, ``serial.log`` (QEMU's stdout: with -nographic the serial console), ``stderr.log``,
``exit.json`` (how it last stopped) and the unix sockets QEMU listens on (qmp.sock, vnc.sock, qm.sock).
QEMU runs in its own session, not as a child the gateway must keep: a new ``LocalDriver`` on the same
root re-adopts every VM whose ``qemu.pid`` names a live QEMU whose command line points into that
VM's task directory (so a recycled pid is never mistaken for the VM).

docs/DRIVERS.md describes the files, the stop sequence and how this maps to Nomad.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pwd
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from drivers.base import Driver, DriverError, JobInvalid, VMStatus, VncTarget

log = logging.getLogger(__name__)

SUN_PATH_MAX = 108  # bytes in sockaddr_un.sun_path, the terminating NUL included
SERIAL_LOG_KEEP = 1 << 20  # serial.log is cut to its last MiB whenever the VM starts
BOOT_TIMEOUT = 10.0  # seconds from exec until QMP says "running"
QMP_TIMEOUT = 5.0  # per QMP connect and per command
ACPI_REPEAT = 3.0  # seconds between ACPI power button presses while a guest shuts down
QUIT_TIMEOUT = 5.0  # after QMP quit or SIGTERM, before SIGKILL
KILL_TIMEOUT = 10.0  # after SIGKILL, before giving up
LOCK_TIMEOUT = 120.0  # waiting for another process working on the same VM
POLL = 0.05
RESTORE_POLL = 0.01  # while a restore (-incoming, -loadvm) runs: it takes about 0.1 s, so look more often
SAVE_TIMEOUT = 120.0  # savevm / loadvm / delvm of one VM (a few hundred ms for the tiny image under TCG)

VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MEMORY_MB = (128, 4_000_000)  # Nomad's bounds
# What Nomad's qemu driver accepts for drive_interface.
DRIVE_INTERFACES = ("ide", "scsi", "sd", "mtd", "floppy", "pflash", "virtio", "none")
CONFIG_KEYS = frozenset({"image_path", "emulator", "machine_type", "drive_interface", "accelerator",
                         "graceful_shutdown", "guest_agent", "args", "port_map"})
MONITOR_SOCKET = "qm.sock"  # Nomad's names for its monitor and guest agent sockets
GUEST_AGENT_SOCKET = "qa.sock"
RUNTIME_FILES = ("qemu.pid",)
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
POWERED_OFF = b"reboot: Power down"  # what Linux prints on the console as it powers the machine off

_INTERP_RE = re.compile(r"\$\{([^}]*)\}")
# -incoming "exec:cat PATH": QEMU runs it with /bin/sh, so PATH may hold nothing the shell interprets.
_INCOMING_RE = re.compile(r"^exec:cat (/[A-Za-z0-9/._-]+)$")
# -fw_cfg may only hand the guest a string (file= would copy any file QEMU can read into the guest).
# -loadvm TAG: an internal snapshot of the VM's own disk (a user's snapshot, s-<uuid>).
_SNAPSHOT_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FW_CFG_RE = re.compile(r"^name=opt/[A-Za-z0-9/._-]+,string=[^,]*$")
_OPTION_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:+-]+$")
_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")

QMP_ERRORS = (QMPError, OSError, EOFError, TimeoutError)


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


def check_vm_id(vm_id: str) -> None:
    """Raise JobInvalid unless ``vm_id`` is a usable VM id (it names a directory and a job)."""
    if not isinstance(vm_id, str) or not VM_ID_RE.match(vm_id):
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
    if not isinstance(value, str) or not _OPTION_VALUE_RE.match(value):
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
    vnc: VncTarget | None = None
    incoming: str | None = None
    for flag, value in zip(extra, [*extra[1:], ""], strict=True):
        if flag == "-incoming":
            match = _INCOMING_RE.match(value)
            if not match or incoming is not None:
                raise JobInvalid(f"-incoming {value!r}: the local driver restores only a saved state file, "
                                 "once: exec:cat /ABSOLUTE/PATH")
            incoming = os.path.normpath(match[1])
        elif flag == "-loadvm" and (not _SNAPSHOT_TAG_RE.match(value) or extra.count("-loadvm") > 1):
            raise JobInvalid(f"-loadvm {value!r}: one snapshot tag, 1-64 of A-Z a-z 0-9 _ . -")
        elif flag == "-fw_cfg" and not _FW_CFG_RE.match(value):
            raise JobInvalid(f"-fw_cfg {value!r}: only name=opt/...,string=VALUE is allowed")
        elif flag == "-set" and value != "drive.image0.file.auto-read-only=off":
            raise JobInvalid(f"-set {value!r}: only drive.image0.file.auto-read-only=off is allowed")
        if flag == "-qmp":
            if not value.startswith("unix:") or "server" not in value:
                raise JobInvalid(f"-qmp {value!r}: the local driver needs a unix socket server "
                                 "(unix:${NOMAD_TASK_DIR}/qmp.sock,server=on,wait=off)")
            qmp_socket = _socket_in(value, task_dir, "-qmp")
            sockets.append(qmp_socket)
        elif flag == "-vnc":
            vnc, vnc_socket = _vnc_target(value, task_dir)
            if vnc_socket is not None:
                sockets.append(vnc_socket)
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
                    vnc=vnc, graceful_shutdown=bool(config.get("graceful_shutdown")), env=env, incoming=incoming)


def _exit_message(returncode: int | None) -> str:
    if returncode is None:
        return "QEMU exited"
    if returncode == 0:
        return "QEMU exited normally (the guest powered off)"
    if returncode < 0:
        return f"QEMU was killed by {signal.Signals(-returncode).name}"
    return f"QEMU exited with code {returncode}"


def _tail(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read(max_bytes)
    except FileNotFoundError:
        return b""


def _stderr_tail(task_dir: Path, lines: int = 6) -> str:
    text = _tail(task_dir / "stderr.log", 4096).decode("utf-8", errors="replace").strip()
    return " | ".join(text.splitlines()[-lines:])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _cap_log(path: Path, keep: int) -> None:
    """Cut ``path`` to its last ``keep`` bytes, starting at a line boundary."""
    try:
        if path.stat().st_size <= keep:
            return
    except FileNotFoundError:
        return
    data = _tail(path, keep)
    newline = data.find(b"\n")
    if 0 <= newline < len(data) - 1:
        data = data[newline + 1:]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _remove_tree(path: Path) -> None:
    for _ in range(3):  # a file vanishing under rmtree (QEMU unlinking a socket) is fine: go again
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise DriverError(f"cannot remove {path}: {exc.strerror or exc}") from exc
        return
    if path.exists():
        raise DriverError(f"cannot remove {path}")


def _default_run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    return "nobody"


class LocalDriver(Driver):
    """Runs each VM's job as a QEMU process on this host; see the module docstring."""

    name = "local"
    saves_memory = True

    def __init__(self, vms_root: Path, qemu_binary: str = "qemu-system-x86_64", *,
                 image_paths: Iterable[str | Path] | None = None, args_allowlist: Iterable[str] | None = None,
                 run_as: str | None = "auto", boot_timeout: float = BOOT_TIMEOUT) -> None:
        """``image_paths``: where image_path may point (default: vms_root), like Nomad's ``image_paths``.
        ``args_allowlist``: flags the job's args may use (default: any), like Nomad's ``args_allowlist``.
        ``run_as``: user QEMU drops to after opening its files (``-runas``); "auto" is nobody when
        running as root and nothing otherwise; None never drops."""
        self.vms_root = Path(vms_root).absolute()
        self.tasks_root = self.vms_root / "tasks"
        self.qemu_binary = qemu_binary
        self.image_paths = tuple(str(p) for p in image_paths) if image_paths is not None else (str(self.vms_root),)
        self.args_allowlist = tuple(args_allowlist) if args_allowlist is not None else None
        self.run_as = _default_run_as() if run_as == "auto" else run_as
        self.boot_timeout = boot_timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy: set[str] = set()  # VMs a start/stop/destroy of this driver is working on
        self._watches: dict[int, tuple[int, asyncio.AbstractEventLoop]] = {}  # pid -> (pidfd, loop)
        self._exit_codes: dict[int, int] = {}  # children reaped, until someone reads the code
        self._children: dict[int, Path] = {}  # QEMUs this driver spawned and has not reaped: their task dirs
        self._version: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"LocalDriver({str(self.vms_root)!r}, {self.qemu_binary!r})"

    # ------------------------------------------------------------------ files and processes

    def task_dir(self, vm_id: str) -> Path:
        """The VM's task directory (``${NOMAD_TASK_DIR}``)."""
        check_vm_id(vm_id)
        return self.tasks_root / vm_id

    @staticmethod
    def _read_pid(task_dir: Path) -> int | None:
        try:
            return int((task_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _reap(self, pid: int) -> None:
        """Collect the exit status of ``pid`` if it is our child and has exited (no zombies)."""
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            self._children.pop(pid, None)
            return
        if done:
            self._children.pop(pid, None)
            self._exit_codes[pid] = os.waitstatus_to_exitcode(status)

    def _alive(self, pid: int, task_dir: Path) -> bool:
        """True if ``pid`` is a live QEMU whose command line points into ``task_dir`` (not a reused pid)."""
        self._reap(pid)
        if self._children.get(pid) == task_dir:
            # Our own child, not yet reaped: alive. (Its /proc cmdline can still be empty for a moment
            # after posix_spawn returns: the vfork parent wakes before exec has set up the arguments.)
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X", b"x"):
            # A thread group leader shows Z while its other threads are still exiting; QEMU still holds
            # its disk then. Only the command name is left to check (its cmdline is gone already).
            try:
                exiting = len(os.listdir(f"/proc/{pid}/task")) > 1
            except OSError:
                exiting = False
            if not exiting:
                self._reap(pid)
                return False
            comm = stat[stat.find(b"(") + 1:stat.rfind(b")")].decode(errors="replace")
            return comm.startswith("qemu-system") or comm == os.path.basename(self.qemu_binary)[:15]
        exe = os.path.basename(argv[0]).decode(errors="replace")
        marker = os.fsencode(str(task_dir)) + b"/"
        return ((exe.startswith("qemu-system-") or exe == os.path.basename(self.qemu_binary))
                and b"-name" in argv and any(marker in arg for arg in argv))

    def _find_qemu(self, task_dir: Path) -> int | None:
        """A live QEMU of this task dir that no pid file names: one whose starter died between spawning it
        and writing ``qemu.pid`` (a gateway killed at that instant). Found by its command line in /proc."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._alive(int(entry.name), task_dir):
                return int(entry.name)
        return None

    def _adopt(self, vm_id: str, task_dir: Path, pid: int) -> None:
        log.warning("VM %s: adopting QEMU pid %d, which no pid file named (its starter died)", vm_id, pid)
        _write_atomic(task_dir / "qemu.pid", f"{pid}\n")
        (task_dir / "exit.json").unlink(missing_ok=True)
        self._watch(vm_id, pid)

    def _record_gone(self, task_dir: Path, pid: int | None) -> dict[str, Any]:
        """Record a QEMU that ended while no driver watched it (its exit status is lost)."""
        if pid is None:
            return self._record_exit(task_dir, None, "gone", "QEMU did not start: what was starting it stopped first")
        tail = _stderr_tail(task_dir, 1)
        message = f"QEMU (pid {pid}) stopped while vmgate was not watching" + (f": {tail}" if tail else "")
        info = self._record_exit(task_dir, pid, "gone", message)
        self._powered_off_by_serial(task_dir, info)
        return info

    @staticmethod
    def _powered_off_by_serial(task_dir: Path, info: dict[str, Any]) -> None:
        """For a QEMU whose exit status is lost: if the guest's console ends with Linux powering the machine
        off, record status 0 (a power-off, not a crash) in ``info`` and exit.json."""
        if POWERED_OFF in _tail(task_dir / "serial.log", 512):
            info.update(returncode=0, message=f"QEMU (pid {info.get('pid')}) exited after the guest powered off "
                                              "(its serial console says so)")
            _write_atomic(task_dir / "exit.json", json.dumps(info) + "\n")

    def _load_task(self, vm_id: str, task_dir: Path) -> QemuTask | None:
        try:
            job = json.loads((task_dir / "job.json").read_text())
            return build_task(vm_id, job, task_dir, self.qemu_binary)
        except (OSError, ValueError, DriverError):
            return None

    def _remove_runtime(self, task_dir: Path, task: QemuTask | None) -> None:
        """Remove the pid file and every socket (QEMU cannot unlink them once it dropped to nobody)."""
        names = {"qmp.sock", "vnc.sock", MONITOR_SOCKET, GUEST_AGENT_SOCKET, *RUNTIME_FILES}
        paths = {task_dir / name for name in names} | set(task.sockets if task else ())
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @staticmethod
    def _read_exit(task_dir: Path) -> dict[str, Any]:
        try:
            data = json.loads((task_dir / "exit.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _record_exit(self, task_dir: Path, pid: int | None, how: str, message: str,
                     seconds: float | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {"how": how, "message": message, "pid": pid,
                                "returncode": self._exit_codes.pop(pid, None) if pid else None,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if seconds is not None:
            info["seconds"] = round(seconds, 2)
        _write_atomic(task_dir / "exit.json", json.dumps(info) + "\n")
        return info

    def _watch(self, vm_id: str, pid: int) -> None:
        """Notice the exit of ``pid`` at once (a pidfd in the event loop): reap it and record it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        current = self._watches.get(pid)
        if current is not None:
            if current[1] is loop:
                return
            self._unwatch(pid)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        loop.add_reader(fd, self._on_exit, vm_id, pid)
        self._watches[pid] = (fd, loop)

    def _unwatch(self, pid: int) -> None:
        entry = self._watches.pop(pid, None)
        if entry is None:
            return
        fd, loop = entry
        if not loop.is_closed():
            loop.remove_reader(fd)
        os.close(fd)

    def _on_exit(self, vm_id: str, pid: int) -> None:
        self._unwatch(pid)
        self._reap(pid)
        if vm_id in self._busy:
            return  # the start, stop or destroy under way records how it ended
        task_dir = self.tasks_root / vm_id
        if self._read_pid(task_dir) != pid:
            return
        code = self._exit_codes.get(pid)
        info = self._record_exit(task_dir, pid, "exited", _exit_message(code))
        if code is None:  # an adopted QEMU: not our child, its status is lost
            self._powered_off_by_serial(task_dir, info)
        self._remove_runtime(task_dir, self._load_task(vm_id, task_dir))
        log.info("VM %s: %s", vm_id, info["message"])

    async def _wait_gone(self, pid: int, task_dir: Path, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._alive(pid, task_dir):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL)
        return True

    @contextlib.asynccontextmanager
    async def _locked(self, vm_id: str, remove: bool = False) -> AsyncIterator[None]:
        """Serialise work on one VM, within this process and across processes (flock)."""
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            lock_dir = self.tasks_root / ".locks"
            lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = lock_dir / f"{vm_id}.lock"
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    if time.monotonic() >= deadline:
                        raise DriverError(f"VM {vm_id} is busy in another process") from None
                    await asyncio.sleep(POLL)
                    continue
                # A destroy may have unlinked the file we locked: then lock the new one.
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            try:
                yield
                if remove:
                    path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ QMP

    @staticmethod
    async def _qmp(socket_path: Path, command: str, arguments: dict[str, Any] | None = None,
                   timeout: float = QMP_TIMEOUT) -> Any:
        """One QMP command on a fresh connection (QEMU serves one QMP client at a time: never hold one)."""
        client = QMPClient("vmgate")
        try:
            await asyncio.wait_for(client.connect(str(socket_path)), timeout)
            return await asyncio.wait_for(client.execute(command, arguments), timeout)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), timeout)

    # ------------------------------------------------------------------ QEMU binary

    def _qemu_path(self) -> str:
        found = shutil.which(self.qemu_binary)
        if not found:
            raise DriverError(f"QEMU binary {self.qemu_binary!r} not found (QEMU_BINARY)")
        return os.path.realpath(found)

    @staticmethod
    async def _run(argv: list[str], timeout: float = 10.0) -> str:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode:
            raise DriverError(f"{argv[0]} {' '.join(argv[1:])} failed: {out.decode(errors='replace').strip()}")
        return out.decode(errors="replace")

    async def _qemu_version(self) -> tuple[int, int, int]:
        if self._version is None:
            out = await self._run([self._qemu_path(), "--version"])
            match = _VERSION_RE.search(out)
            if not match:
                raise DriverError(f"cannot read the QEMU version from {out.strip()!r}")
            self._version = (int(match[1]), int(match[2]), int(match[3] or 0))
        return self._version

    async def _run_as_args(self) -> list[str]:
        if not self.run_as:
            return []
        # QEMU 9.1 deprecated -runas for -run-with user=.
        if await self._qemu_version() >= (9, 1, 0):
            return ["-run-with", f"user={self.run_as}"]
        return ["-runas", self.run_as]

    # ------------------------------------------------------------------ the contract

    def _status(self, vm_id: str) -> VMStatus:
        task_dir = self.tasks_root / vm_id
        pid = self._read_pid(task_dir)
        if pid is not None and self._alive(pid, task_dir):
            self._watch(vm_id, pid)
            task = self._load_task(vm_id, task_dir)
            details: dict[str, Any] = {"task_dir": str(task_dir)}
            with contextlib.suppress(OSError):
                details["started_at_epoch"] = (task_dir / "qemu.pid").stat().st_mtime
            if task is not None:
                details["qmp_socket"] = str(task.qmp_socket)
            return VMStatus("running", pid=pid, vnc=task.vnc if task else None, details=details)
        if not (task_dir / "job.json").is_file():
            return VMStatus("missing")
        info = self._read_exit(task_dir)
        if not info and vm_id not in self._busy:
            # Started (job.json) and no record of how it ended: a QEMU may run that no pid file names.
            orphan = self._find_qemu(task_dir)
            if orphan is not None:
                self._adopt(vm_id, task_dir, orphan)
                return self._status(vm_id)
            # Recorded, so the next look does not search /proc again.
            info = self._record_gone(task_dir, pid)
        info.setdefault("task_dir", str(task_dir))
        return VMStatus("stopped", reason=info.get("message"), details=info)

    async def start(self, vm_id: str, job: dict[str, Any]) -> VMStatus:
        check_vm_id(vm_id)
        task_dir = self.tasks_root / vm_id
        # A job this driver cannot run is refused whatever the VM's state, before anything is created.
        task = build_task(vm_id, job, task_dir, self._qemu_path(), image_paths=self.image_paths,
                          args_allowlist=self.args_allowlist)
        async with self._locked(vm_id):
            current = self._status(vm_id)
            if current.state == "running":
                return current
            if not os.path.isfile(task.image_path):
                raise JobInvalid(f"config.image_path {task.image_path} does not exist")
            if task.incoming is not None and not os.path.isfile(task.incoming):
                raise JobInvalid(f"-incoming: the saved state {task.incoming} does not exist")
            argv = [*task.argv, *await self._run_as_args()]
            created = not task_dir.exists()
            pid: int | None = None
            self._busy.add(vm_id)
            began = time.monotonic()
            try:
                self.tasks_root.mkdir(parents=True, exist_ok=True, mode=0o700)
                task_dir.mkdir(exist_ok=True, mode=0o700)
                os.chmod(task_dir, 0o700)
                orphan = self._find_qemu(task_dir) if not created else None
                if orphan is not None:  # a QEMU whose starter died before writing its pid file
                    self._adopt(vm_id, task_dir, orphan)
                    return self._status(vm_id)
                self._remove_runtime(task_dir, task)
                _cap_log(task_dir / "serial.log", SERIAL_LOG_KEEP)
                # job.json first: a gateway that dies from here on leaves a QEMU the next one can
                # re-adopt with its VNC endpoint, and no record of an earlier exit.
                _write_atomic(task_dir / "job.json", json.dumps(job, indent=2) + "\n")
                (task_dir / "exit.json").unlink(missing_ok=True)
                pid = self._spawn(argv, task, task_dir)
                self._children[pid] = task_dir
                _write_atomic(task_dir / "qemu.pid", f"{pid}\n")
                await self._wait_ready(pid, task, task_dir)
            except BaseException as exc:
                self._abort_start(pid, task, task_dir, created, exc)
                if isinstance(exc, OSError):
                    raise DriverError(f"could not start QEMU: {exc}") from exc
                raise
            finally:
                self._busy.discard(vm_id)
            self._watch(vm_id, pid)
            log.info("VM %s: QEMU pid %d running after %.2f s", vm_id, pid, time.monotonic() - began)
            status = self._status(vm_id)
            status.details["start_seconds"] = round(time.monotonic() - began, 2)
            return status

    @staticmethod
    def _spawn(argv: list[str], task: QemuTask, task_dir: Path) -> int:
        """Start QEMU in its own session (it must outlive the gateway): stdin /dev/null,
        stdout appended to serial.log, stderr to stderr.log, only the task's environment.

        A restore (``-incoming "exec:cat STATE"``) gets the state file opened here as its fd 3 instead
        (``-incoming fd:3``): no shell, no cat, no pipe between them. QEMU then reads the file itself,
        which halved the median restore here (docs/DRIVERS.md); the job keeps the portable form."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
        try:
            fds.append(os.open(task_dir / "serial.log", flags | os.O_APPEND, 0o600))
            fds.append(os.open(task_dir / "stderr.log", flags | os.O_TRUNC, 0o600))
            if task.incoming is not None:
                fds.append(os.open(task.incoming, os.O_RDONLY | os.O_CLOEXEC))
                at = argv.index("-incoming")
                argv = [*argv[:at + 1], f"fd:{len(fds) - 1}", *argv[at + 2:]]
            env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", **task.env}
            return os.posix_spawn(argv[0], argv, env, setsid=True, setsigmask=(),
                                  setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                                  file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)])
        finally:
            for fd in fds:
                os.close(fd)

    async def _wait_ready(self, pid: int, task: QemuTask, task_dir: Path) -> None:
        deadline = time.monotonic() + self.boot_timeout
        while True:
            if not self._alive(pid, task_dir):
                code = self._exit_codes.get(pid)
                tail = _stderr_tail(task_dir)
                raise DriverError(f"QEMU exited during start ({_exit_message(code).removeprefix('QEMU ')}): "
                                  f"{tail or 'no output on stderr'}")
            if task.qmp_socket.exists():
                try:
                    reply = await self._qmp(task.qmp_socket, "query-status",
                                            timeout=max(0.5, deadline - time.monotonic()))
                    status = reply.get("status") if isinstance(reply, dict) else None
                    if status == "running":
                        return
                    if status == "paused" and task.incoming is not None:
                        # The restore is done ("inmigrate" before) but the state was saved from a paused
                        # VM that recorded its run state: QEMU then stays paused. images/warm.py saves
                        # without it (the VM starts by itself, as under Nomad); an older state needs this.
                        await self._qmp(task.qmp_socket, "cont", timeout=max(0.5, deadline - time.monotonic()))
                except QMP_ERRORS:
                    pass
            if time.monotonic() >= deadline:
                tail = _stderr_tail(task_dir)
                raise DriverError(f"QEMU did not report running on its QMP socket within {self.boot_timeout:g} s"
                                  + (f": {tail}" if tail else ""))
            await asyncio.sleep(RESTORE_POLL if task.incoming is not None or "-loadvm" in task.argv else POLL)

    def _abort_start(self, pid: int | None, task: QemuTask, task_dir: Path, created: bool,
                     exc: BaseException) -> None:
        """Undo a failed start: no process, no sockets, no pid file; a new task dir goes entirely."""
        if pid is not None:
            self._unwatch(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Synchronous on purpose: this also runs when the start is cancelled. SIGKILL takes ms.
            deadline = time.monotonic() + KILL_TIMEOUT
            while self._alive(pid, task_dir) and time.monotonic() < deadline:
                time.sleep(0.01)
        self._remove_runtime(task_dir, task)
        if created:
            shutil.rmtree(task_dir, ignore_errors=True)
        elif (task_dir / "job.json").exists():
            self._record_exit(task_dir, pid, "start-failed", f"start failed: {exc}")

    async def _shut_down(self, pid: int, task: QemuTask | None, task_dir: Path, timeout: float) -> str:
        """ACPI power-off, then QMP quit (or SIGTERM), then SIGKILL; returns which one ended QEMU."""
        qmp = task.qmp_socket if task else task_dir / "qmp.sock"
        if (task is None or task.graceful_shutdown) and timeout > 0:
            # Press the power button again every few seconds: a press during early boot, before the
            # guest listens for it (acpid), is lost.
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    await self._qmp(qmp, "system_powerdown", timeout=min(QMP_TIMEOUT, left))
                except QMP_ERRORS as exc:
                    log.warning("VM in %s: system_powerdown failed: %s", task_dir, exc)
                if await self._wait_gone(pid, task_dir, min(ACPI_REPEAT, max(0.0, deadline - time.monotonic()))):
                    return "acpi"
        try:
            await self._qmp(qmp, "quit")
            how = "quit"
        except QMP_ERRORS:
            how = "sigterm"  # QEMU quits cleanly on SIGTERM too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if await self._wait_gone(pid, task_dir, QUIT_TIMEOUT):
            return how
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if await self._wait_gone(pid, task_dir, KILL_TIMEOUT):
            return "sigkill"
        raise DriverError(f"QEMU (pid {pid}) did not exit after SIGKILL")

    async def stop(self, vm_id: str, timeout: float) -> None:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return
        if not (self.tasks_root / vm_id).is_dir():
            return  # never started here (and no lock file left behind for it)
        async with self._locked(vm_id):
            task_dir = self.tasks_root / vm_id
            pid = self._read_pid(task_dir)
            task = self._load_task(vm_id, task_dir)
            if pid is None or not self._alive(pid, task_dir):
                if pid is not None:
                    if not self._read_exit(task_dir):
                        self._record_exit(task_dir, pid, "gone", "QEMU stopped while vmgate was not watching")
                    self._remove_runtime(task_dir, task)
                return
            self._busy.add(vm_id)
            began = time.monotonic()
            try:
                how = await self._shut_down(pid, task, task_dir, timeout)
                seconds = time.monotonic() - began
                message = {"acpi": "powered off by the guest (ACPI)", "quit": "stopped with QMP quit",
                           "sigterm": "stopped with SIGTERM", "sigkill": "killed with SIGKILL"}[how]
                self._record_exit(task_dir, pid, how, f"{message} after {seconds:.1f} s", seconds)
                self._remove_runtime(task_dir, task)
                self._unwatch(pid)
                log.info("VM %s: %s after %.1f s", vm_id, message, seconds)
            finally:
                self._busy.discard(vm_id)

    async def destroy(self, vm_id: str) -> None:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return
        async with self._locked(vm_id, remove=True):
            task_dir = self.tasks_root / vm_id
            pid = self._read_pid(task_dir)
            self._busy.add(vm_id)
            try:
                if pid is not None and self._alive(pid, task_dir):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    if not await self._wait_gone(pid, task_dir, KILL_TIMEOUT):
                        raise DriverError(f"QEMU (pid {pid}) did not exit after SIGKILL")
                if pid is not None:
                    self._unwatch(pid)
                    self._exit_codes.pop(pid, None)
                await asyncio.to_thread(_remove_tree, task_dir)
            finally:
                self._busy.discard(vm_id)

    # ------------------------------------------------------------------ saved states (qcow2 internal snapshots)

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not _SNAPSHOT_TAG_RE.match(tag):
            raise DriverError(f"bad snapshot tag {tag!r}")

    async def _running_task(self, vm_id: str) -> tuple[int, Path, QemuTask]:
        """The live QEMU of ``vm_id`` and its task; the caller holds the VM's lock."""
        check_vm_id(vm_id)
        task_dir = self.tasks_root / vm_id
        pid = self._read_pid(task_dir)
        task = self._load_task(vm_id, task_dir)
        if pid is None or task is None or not self._alive(pid, task_dir):
            raise DriverError("the VM is not running")
        return pid, task_dir, task

    async def _hmp(self, task: QemuTask, command: str) -> None:
        """One HMP command through QMP (human-monitor-command). savevm, loadvm and delvm answer nothing
        when they worked and their error text when not. (QMP's own snapshot-save/-load jobs need the
        block node names and a job to poll; in QEMU 7.2 the HMP commands do the same, synchronously.)"""
        try:
            out = await self._qmp(task.qmp_socket, "human-monitor-command", {"command-line": command},
                                  timeout=SAVE_TIMEOUT)
        except QMP_ERRORS as exc:
            raise DriverError(f"{command.split()[0]} failed: {type(exc).__name__}: {exc}") from exc
        text = str(out or "").strip()
        if text:
            raise DriverError(f"{command.split()[0]} failed: {text[:500]}")

    async def _snapshot_sizes(self, task: QemuTask) -> dict[str, int]:
        """The tags of the internal snapshots of the VM's disk (image0), with their saved memory in bytes."""
        try:
            devices = await self._qmp(task.qmp_socket, "query-block")
        except QMP_ERRORS as exc:
            raise DriverError(f"query-block failed: {exc}") from exc
        for device in devices or []:
            inserted = device.get("inserted") or {}
            if device.get("device") == "image0" or inserted.get("file") == task.image_path:
                return {str(s["name"]): int(s.get("vm-state-size") or 0)
                        for s in (inserted.get("image") or {}).get("snapshots") or []}
        raise DriverError("the VM's disk image0 is not in query-block")

    async def save_state(self, vm_id: str, tag: str) -> int:
        self._check_tag(tag)
        async with self._locked(vm_id):
            _pid, _task_dir, task = await self._running_task(vm_id)
            began = time.monotonic()
            await self._hmp(task, f"savevm {tag}")
            size = (await self._snapshot_sizes(task)).get(tag)
            if size is None:
                raise DriverError(f"savevm {tag} left no snapshot of that name")
            log.info("VM %s: state saved as %s (%d MiB of memory) in %.2f s", vm_id, tag, size >> 20,
                     time.monotonic() - began)
            return size

    async def suspend_to(self, vm_id: str, path: str) -> int:
        target = Path(path)
        partial = target.with_name(target.name + ".part")
        async with self._locked(vm_id):
            pid, task_dir, task = await self._running_task(vm_id)
            self._busy.add(vm_id)
            began = time.monotonic()
            try:
                # QEMU runs as nobody and cannot open a file in the VM's folder: it gets ours (getfd).
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                client = QMPClient("vmgate-suspend")
                try:
                    await asyncio.wait_for(client.connect(str(task.qmp_socket)), QMP_TIMEOUT)
                    await asyncio.wait_for(client.execute("stop"), QMP_TIMEOUT)
                    try:
                        client.send_fd_scm(fd)
                        await asyncio.wait_for(client.execute("getfd", {"fdname": "vmgate-suspend"}), QMP_TIMEOUT)
                        # Unthrottled (the default limit is a network's, 128 MiB/s): the VM is paused anyway.
                        await asyncio.wait_for(client.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40}),
                                               QMP_TIMEOUT)
                        await asyncio.wait_for(client.execute("migrate", {"uri": "fd:vmgate-suspend"}), QMP_TIMEOUT)
                        deadline = time.monotonic() + SAVE_TIMEOUT
                        while True:
                            info = await asyncio.wait_for(client.execute("query-migrate"), QMP_TIMEOUT)
                            status = info.get("status") if isinstance(info, dict) else None
                            if status == "completed":
                                break
                            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                                raise DriverError(f"saving the memory {status or 'timed out'}: "
                                                  f"{info.get('error-desc', '') if isinstance(info, dict) else ''}")
                            await asyncio.sleep(RESTORE_POLL)
                        os.fsync(fd)
                    except BaseException:
                        with contextlib.suppress(*QMP_ERRORS):
                            await asyncio.wait_for(client.execute("cont"), QMP_TIMEOUT)
                        raise
                except QMP_ERRORS as exc:
                    partial.unlink(missing_ok=True)
                    raise DriverError(f"suspend failed: {type(exc).__name__}: {exc}") from exc
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
                finally:
                    os.close(fd)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.disconnect(), QMP_TIMEOUT)
                await self._shut_down(pid, task, task_dir, timeout=0)  # its memory is saved: no ACPI
                os.replace(partial, target)  # complete: now it may be resumed from
                size = target.stat().st_size
                seconds = time.monotonic() - began
                self._record_exit(task_dir, pid, "suspend", f"suspended: memory saved to {target.name} in "
                                                            f"{seconds:.2f} s", seconds)
                self._remove_runtime(task_dir, task)
                self._unwatch(pid)
                log.info("VM %s: suspended, %d MiB of memory saved in %.2f s", vm_id, size >> 20, seconds)
                return size
            finally:
                self._busy.discard(vm_id)

    async def load_state(self, vm_id: str, tag: str) -> None:
        self._check_tag(tag)
        async with self._locked(vm_id):
            _pid, _task_dir, task = await self._running_task(vm_id)
            if tag not in await self._snapshot_sizes(task):
                raise DriverError(f"the VM's disk has no snapshot {tag}")
            await self._hmp(task, f"loadvm {tag}")

    async def delete_state(self, vm_id: str, tag: str) -> None:
        self._check_tag(tag)
        async with self._locked(vm_id):
            _pid, _task_dir, task = await self._running_task(vm_id)
            if tag in await self._snapshot_sizes(task):
                await self._hmp(task, f"delvm {tag}")

    async def status(self, vm_id: str) -> VMStatus:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return VMStatus("missing")
        return self._status(vm_id)

    async def list_vms(self) -> dict[str, VMStatus]:
        found: dict[str, VMStatus] = {}
        try:
            entries = sorted(self.tasks_root.iterdir())
        except FileNotFoundError:
            return found
        for entry in entries:
            if VM_ID_RE.match(entry.name) and entry.is_dir():
                status = self._status(entry.name)
                if status.state != "missing":
                    found[entry.name] = status
        return found

    async def logs(self, vm_id: str, max_bytes: int) -> str:
        try:
            check_vm_id(vm_id)
        except JobInvalid:
            return ""
        if max_bytes <= 0:
            return ""
        data = await asyncio.to_thread(_tail, self.tasks_root / vm_id / "serial.log", max_bytes)
        return data.decode("utf-8", errors="replace")

    async def health(self) -> dict[str, Any]:
        problems: list[str] = []
        report: dict[str, Any] = {"driver": self.name, "vms_root": str(self.vms_root), "run_as": self.run_as}
        try:
            path = self._qemu_path()
            report["qemu_binary"] = path
            version = await self._qemu_version()
            report["qemu_version"] = ".".join(map(str, version))
            accels = await self._run([path, "-accel", "help"])
            report["accelerators"] = [line.strip() for line in accels.splitlines()[1:] if line.strip()]
        except (DriverError, OSError, TimeoutError) as exc:
            problems.append(f"QEMU is not runnable: {exc}")
        kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
        report["kvm_device"] = kvm
        report["accelerator_note"] = (
            "tcg works everywhere (slow: about 4 s to a shell for the tiny image); kvm needs a usable /dev/kvm"
            + (" - one is present, but nested KVM can hang: keep QEMU_ACCELERATOR=tcg unless a kvm VM"
               " was seen to boot here" if kvm else " and there is none here"))
        try:
            self.tasks_root.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.tasks_root / f".health-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            report["vms_root_writable"] = True
        except OSError as exc:
            report["vms_root_writable"] = False
            problems.append(f"VMS_ROOT {self.vms_root} is not writable: {exc.strerror or exc}")
        report["running"] = sum(1 for s in (await self.list_vms()).values() if s.state == "running")
        report["problems"] = problems
        report["ok"] = not problems
        return report

    async def close(self) -> None:
        for pid in list(self._watches):
            self._unwatch(pid)


__all__ = ["LocalDriver", "QemuTask", "build_task", "check_vm_id"]
