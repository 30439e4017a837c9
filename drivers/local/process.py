"""QEMU processes: spawning them, telling which live process is which VM's, re-adopting, reaping, recording.

A VM's QEMU runs in a session of its own, not as a child the gateway must keep, so it outlives a gateway
restart. What a later driver needs to find it again is in the VM's task directory (drivers/local/taskdir.py).
A pid is only believed when ``/proc`` shows a QEMU whose command line points into that task directory, so a
recycled pid is never mistaken for the VM; a QEMU that no pid file names (its starter died in between) is
found in ``/proc`` and adopted.

``Processes`` is what one driver knows of the QEMUs under its tasks root: its children not yet reaped,
exit codes nobody read yet, pidfd watches that record an exit the moment it happens, and each VM's status
as seen from the files and ``/proc``. ``QemuBinary`` is the emulator and how QEMU drops root (run-as).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drivers.base import DriverError, VMStatus
from drivers.local import network
from drivers.local.confine import PER_VM, limit
from drivers.local.job import QemuTask, build_task
from drivers.local.taskdir import (
    POLL,
    LogTrimmer,
    exit_message,
    powered_off_by_serial,
    read_exit,
    read_pid,
    remove_runtime,
    stderr_tail,
    write_atomic,
)
from jobspecs import sandbox

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")
PR_SET_THP_DISABLE = 41  # <linux/prctl.h>


def no_huge_pages() -> None:
    """Turn transparent huge pages off for this process and every process it starts from now on (the flag
    is inherited across fork and kept across exec), so for the QEMUs: QEMU asks for huge pages on the
    guest's RAM and on TCG's code buffer (``MADV_HUGEPAGE``), and with the kernel's default ``defrag`` the
    fault that gets one compacts memory first. That made a resume's restore take 0.3-0.4 s instead of
    0.1 s now and then, and each idle clone held 26 MiB of huge pages, about 5 MiB more than its 4 KiB
    pages would be (docs/BENCHMARKS.md). The gateway itself never asks for huge pages."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        log.warning("cannot turn transparent huge pages off for QEMU: %s", os.strerror(ctypes.get_errno()))


def spawn(argv: list[str], task: QemuTask, task_dir: Path, prefix: Sequence[str] = (),
          memory_fd: int | None = None) -> int:
    """Start QEMU in its own session (it must outlive the gateway): stdin /dev/null,
    stdout appended to serial.log, stderr to stderr.log, only the task's environment.

    A restore (``-incoming "exec:cat STATE"``) gets the state file opened here as its fd 3 instead
    (``-incoming fd:3``): no shell, no cat, no pipe between them. QEMU then reads the file itself,
    which halved the median restore here (docs/DRIVERS.md); the job keeps the portable form.

    ``prefix`` runs QEMU through another program that execs it (``nsenter --net=...``: its network).

    ``memory_fd``: the sealed copy of the template RAM the job maps (drivers/local/memimage.py), given to
    QEMU as its fd 4 in place of the file's path. A restore over it waits (``-incoming defer``) until the
    driver has switched ``x-ignore-shared`` on; the driver then starts it from fd 3 (``restore_shared``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
    try:
        fds.append(os.open(task_dir / "serial.log", flags | os.O_APPEND, 0o600))
        fds.append(os.open(task_dir / "stderr.log", flags | os.O_TRUNC, 0o600))
        if task.incoming is not None:
            fds.append(os.open(task.incoming, os.O_RDONLY | os.O_CLOEXEC))
            at = argv.index("-incoming")
            source = "defer" if memory_fd is not None else f"fd:{len(fds) - 1}"
            argv = [*argv[:at + 1], source, *argv[at + 2:]]
        if memory_fd is not None and task.memory_file is not None:
            fds.append(os.dup(memory_fd))
            swapped = [arg.replace(f"mem-path={task.memory_file},", f"mem-path=/proc/self/fd/{len(fds) - 1},")
                       for arg in argv]
            if swapped == argv:
                raise DriverError(f"the memory backend's path is not {task.memory_file}")
            argv = swapped
        # Spawning was allowed for exec:cat only; a driver that makes QEMU drop root must let it (confine.py).
        argv = [*prefix, *sandbox.fit(argv, drops_root="-runas" in argv or "-run-with" in argv)]
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", **task.env}
        no_huge_pages()  # the process's flag, which QEMU inherits (setting it again costs one system call)
        return os.posix_spawn(argv[0], argv, env, setsid=True, setsigmask=(),
                              setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)])
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------- the QEMUs one driver knows of

class Processes:
    """The QEMUs under one tasks root: which live process is which VM's, their exits, each VM's status."""

    def __init__(self, tasks_root: Path, qemu_binary: str) -> None:
        self.tasks_root = tasks_root
        self.qemu_binary = qemu_binary
        # VMs a start/stop/destroy/suspend is working on: it records how their QEMU ended, not the watch.
        self.busy: set[str] = set()
        self._watches: dict[int, tuple[int, asyncio.AbstractEventLoop]] = {}  # pid -> (pidfd, loop)
        self._exit_codes: dict[int, int] = {}  # children reaped, until someone reads the code
        self._children: dict[int, Path] = {}  # QEMUs this driver spawned and has not reaped: their task dirs
        self.trimmer = LogTrimmer(tasks_root)  # keeps the running VMs' serial logs bounded

    # ------------------------------------------------------------ one VM, from its files and /proc

    def load_task(self, vm_id: str, task_dir: Path) -> QemuTask | None:
        """The task of the job the VM last started with (None if there is none, or it no longer checks)."""
        try:
            job = json.loads((task_dir / "job.json").read_text())
            return build_task(vm_id, job, task_dir, self.qemu_binary)
        except (OSError, ValueError, DriverError):
            return None

    def status(self, vm_id: str) -> VMStatus:
        """The VM as its task directory and /proc show it; adopts a QEMU that no pid file names."""
        task_dir = self.tasks_root / vm_id
        pid = read_pid(task_dir)
        if pid is not None and self.alive(pid, task_dir):
            self.watch(vm_id, pid)
            task = self.load_task(vm_id, task_dir)
            details: dict[str, Any] = {"task_dir": str(task_dir)}
            with contextlib.suppress(OSError):
                details["started_at_epoch"] = (task_dir / "qemu.pid").stat().st_mtime
            if task is not None:
                details["qmp_socket"] = str(task.qmp_socket)
            return VMStatus("running", pid=pid, vnc=task.vnc if task else None, details=details)
        if not (task_dir / "job.json").is_file():
            return VMStatus("missing")
        info = read_exit(task_dir)
        if not info and vm_id not in self.busy:
            # Started (job.json) and no record of how it ended: a QEMU may run that no pid file names.
            orphan = self.find(task_dir)
            if orphan is not None:
                self.adopt(vm_id, task_dir, orphan)
                return self.status(vm_id)
            # Recorded, so the next look does not search /proc again.
            info = self.record_gone(task_dir, pid)
        info.setdefault("task_dir", str(task_dir))
        return VMStatus("stopped", reason=info.get("message"), details=info)

    def adopt(self, vm_id: str, task_dir: Path, pid: int) -> None:
        """Make ``pid`` the VM's QEMU: a QEMU whose starter died before writing its pid file."""
        log.warning("VM %s: adopting QEMU pid %d, which no pid file named (its starter died)", vm_id, pid)
        write_atomic(task_dir / "qemu.pid", f"{pid}\n")
        (task_dir / "exit.json").unlink(missing_ok=True)
        self.watch(vm_id, pid)

    def _on_exit(self, vm_id: str, pid: int) -> None:
        self.unwatch(pid)
        self.reap(pid)
        if vm_id in self.busy:
            return  # the start, stop or destroy under way records how it ended
        task_dir = self.tasks_root / vm_id
        if read_pid(task_dir) != pid:
            return
        code = self.exit_code(pid)
        try:
            info = self.record_exit(task_dir, pid, "exited", exit_message(code))
            if code is None:  # an adopted QEMU: not our child, its status is lost
                powered_off_by_serial(task_dir, info)
            remove_runtime(task_dir, self.load_task(vm_id, task_dir))
        except FileNotFoundError:
            return  # another gateway process destroyed the VM as its QEMU died
        log.info("VM %s: %s", vm_id, info["message"])

    # ------------------------------------------------------------ processes

    def spawn(self, argv: list[str], task: QemuTask, task_dir: Path, prefix: Sequence[str] = (),
              memory_fd: int | None = None) -> int:
        """``spawn`` QEMU and remember it as our child (to reap it, and to know it before /proc does)."""
        pid = spawn(argv, task, task_dir, prefix, memory_fd)
        self._children[pid] = task_dir
        limit(pid, argv, task_dir, task.image_path)  # a QEMU with a uid of its own: a thread cap, a cgroup
        return pid

    def _is_qemu(self, pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return False
        comm = stat[stat.find(b"(") + 1:stat.rfind(b")")].decode(errors="replace")
        return comm.startswith("qemu-system") or comm == os.path.basename(self.qemu_binary)[:15]

    def reap(self, pid: int) -> None:
        """Collect the exit status of ``pid`` if it is our QEMU child and has exited (no zombies): one this
        object spawned, or a QEMU another driver in this process did (an adoption). Any other pid is left
        alone: ``find`` passes every pid in /proc through here, and taking the status of the gateway's other
        children (asyncio's qemu-img) made their owner see exit code 255."""
        if pid not in self._children and not self._is_qemu(pid):
            return
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            self._children.pop(pid, None)
            return
        if done:
            self._children.pop(pid, None)
            self._exit_codes[pid] = os.waitstatus_to_exitcode(status)

    def exit_code(self, pid: int) -> int | None:
        """The exit code of a reaped child, None if not known (yet, or not our child)."""
        return self._exit_codes.get(pid)

    def alive(self, pid: int, task_dir: Path) -> bool:
        """True if ``pid`` is a live QEMU whose command line points into ``task_dir`` (not a reused pid)."""
        self.reap(pid)
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
                self.reap(pid)
                return False
            return self._is_qemu(pid)
        exe = os.path.basename(argv[0]).decode(errors="replace")
        marker = os.fsencode(str(task_dir)) + b"/"
        return ((exe.startswith("qemu-system-") or exe == os.path.basename(self.qemu_binary))
                and b"-name" in argv and any(marker in arg for arg in argv))

    def find(self, task_dir: Path) -> int | None:
        """A live QEMU of this task dir that no pid file names: one whose starter died between spawning it
        and writing ``qemu.pid`` (a gateway killed at that instant). Found by its command line in /proc."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self.alive(int(entry.name), task_dir):
                return int(entry.name)
        return None

    async def wait_gone(self, pid: int, task_dir: Path, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the QEMU to end; False if it still runs."""
        deadline = time.monotonic() + timeout
        while self.alive(pid, task_dir):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL)
        return True

    def record_exit(self, task_dir: Path, pid: int | None, how: str, message: str,
                    seconds: float | None = None) -> dict[str, Any]:
        """Write exit.json: how the QEMU ``pid`` ended, with its exit code when it was our child."""
        info: dict[str, Any] = {"how": how, "message": message, "pid": pid,
                                "returncode": self._exit_codes.pop(pid, None) if pid else None,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if seconds is not None:
            info["seconds"] = round(seconds, 2)
        write_atomic(task_dir / "exit.json", json.dumps(info) + "\n")
        return info

    def record_gone(self, task_dir: Path, pid: int | None) -> dict[str, Any]:
        """Record a QEMU that ended while no driver watched it (its exit status is lost), and remove its network."""
        network.down(task_dir)
        if pid is None:
            return self.record_exit(task_dir, None, "gone", "QEMU did not start: what was starting it stopped first")
        last = stderr_tail(task_dir, 1)
        message = f"QEMU (pid {pid}) stopped while vmgate was not watching" + (f": {last}" if last else "")
        info = self.record_exit(task_dir, pid, "gone", message)
        powered_off_by_serial(task_dir, info)
        return info

    def watch(self, vm_id: str, pid: int) -> None:
        """Record the exit of the VM's QEMU ``pid`` the moment it happens (a pidfd in the running event loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        current = self._watches.get(pid)
        if current is not None:
            if current[1] is loop:
                return
            self.unwatch(pid)
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        loop.add_reader(fd, self._on_exit, vm_id, pid)
        self._watches[pid] = (fd, loop)

    def unwatch(self, pid: int) -> None:
        """Stop watching ``pid`` (no-op if not watched)."""
        entry = self._watches.pop(pid, None)
        if entry is None:
            return
        fd, loop = entry
        if not loop.is_closed():
            loop.remove_reader(fd)
        os.close(fd)

    def forget(self, pid: int) -> None:
        """Drop everything known of ``pid`` (its VM is destroyed)."""
        self.unwatch(pid)
        self._exit_codes.pop(pid, None)

    def close(self) -> None:
        """Stop every watch and the log trimmer; the QEMUs run on."""
        self.trimmer.close()
        for pid in list(self._watches):
            self.unwatch(pid)


# ---------------------------------------------------------------- the emulator, and dropping root

def default_run_as() -> str | None:
    """What QEMU drops to by default: a uid of its own per VM when running as root, nothing otherwise."""
    return PER_VM if os.geteuid() == 0 else None


async def run(argv: list[str], timeout: float = 10.0) -> str:
    """Run a short command (QEMU's --version, -accel help); its output, or DriverError if it failed."""
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


class QemuBinary:
    """The QEMU system emulator (QEMU_BINARY): where it is, its version, how it is told to drop root."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._version: tuple[int, int, int] | None = None

    def path(self) -> str:
        """The emulator's resolved path; DriverError if it is not on PATH."""
        found = shutil.which(self.name)
        if not found:
            raise DriverError(f"QEMU binary {self.name!r} not found (QEMU_BINARY)")
        return os.path.realpath(found)

    async def version(self) -> tuple[int, int, int]:
        """QEMU's version (asked once)."""
        if self._version is None:
            out = await run([self.path(), "--version"])
            match = _VERSION_RE.search(out)
            if not match:
                raise DriverError(f"cannot read the QEMU version from {out.strip()!r}")
            self._version = (int(match[1]), int(match[2]), int(match[3] or 0))
        return self._version

    async def run_as_args(self, user: str | None) -> list[str]:
        """The arguments that make QEMU drop to ``user`` once its files are open (none for None)."""
        if not user:
            return []
        # QEMU 9.1 deprecated -runas for -run-with user=.
        if await self.version() >= (9, 1, 0):
            return ["-run-with", f"user={user}"]
        return ["-runas", user]


