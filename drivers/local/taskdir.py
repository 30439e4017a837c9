"""The files of a VM's task directory, and the per-VM lock.

``<vms_root>/tasks/<vm_id>/`` (mode 0700) holds what a later driver needs to know about the VM: ``job.json``
(what it runs), ``qemu.pid`` (which process), ``exit.json`` (how it last stopped), ``serial.log`` and
``stderr.log`` (QEMU's output), and the unix sockets QEMU listens on. ``<vms_root>/tasks/.locks/`` holds
one lock file per VM: work on a VM is serialised across gateway processes, not only within one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from drivers.base import DriverError
from drivers.local import network
from drivers.local.job import GUEST_AGENT_SOCKET, MONITOR_SOCKET, QemuTask

log = logging.getLogger(__name__)

POLL = 0.05
LOCK_TIMEOUT = 120.0  # waiting for another process working on the same VM
RUNTIME_FILES = ("qemu.pid",)
POWERED_OFF = b"reboot: Power down"  # what Linux prints on the console as it powers the machine off
SERIAL_LOG_LIMIT = 2 << 20  # a running VM's serial.log is cut back to about SERIAL_LOG_KEEP beyond this
SERIAL_LOG_KEEP = 1 << 20  # and to its last MiB whenever the VM starts
LOG_TRIM_INTERVAL = 2.0  # seconds between two looks at the running VMs' serial logs


def exit_message(returncode: int | None) -> str:
    """How a QEMU that exited with ``returncode`` (None: unknown) ended, in words."""
    if returncode is None:
        return "QEMU exited"
    if returncode == 0:
        return "QEMU exited normally (the guest powered off)"
    if returncode < 0:
        return f"QEMU was killed by {signal.Signals(-returncode).name}"
    return f"QEMU exited with code {returncode}"


def tail(path: Path, max_bytes: int) -> bytes:
    """The last ``max_bytes`` of ``path`` (b"" if there is no such file)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            return handle.read(max_bytes)
    except FileNotFoundError:
        return b""


def stderr_tail(task_dir: Path, lines: int = 6) -> str:
    """The last lines QEMU wrote on stderr, joined with " | " (for an error message)."""
    text = tail(task_dir / "stderr.log", 4096).decode("utf-8", errors="replace").strip()
    return " | ".join(text.splitlines()[-lines:])


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (mode 0600) so that readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def cap_log(path: Path, keep: int = SERIAL_LOG_KEEP) -> None:
    """Cut ``path`` to its last ``keep`` bytes, starting at a line boundary."""
    try:
        if path.stat().st_size <= keep:
            return
    except FileNotFoundError:
        return
    data = tail(path, keep)
    newline = data.find(b"\n")
    if 0 <= newline < len(data) - 1:
        data = data[newline + 1:]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# fallocate(2) modes (linux/falloc.h). Not in the os module, which has only posix_fallocate.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def _fallocate_or_raise(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def trim_live_log(path: Path, limit: int, keep: int) -> int:
    """Bound a log a running QEMU appends to: once it holds more than ``limit`` bytes, drop its head so
    that about ``keep`` remain. Returns the bytes dropped (0: nothing to do).

    QEMU writes with O_APPEND and never seeks, so the head can go under it without a byte of what it
    writes being lost: ``FALLOC_FL_COLLAPSE_RANGE`` (ext4, xfs) removes whole blocks from the start
    and shifts the rest down, atomically with respect to the appends (both hold the inode lock). Where
    the filesystem cannot collapse, the head is punched out instead (``FALLOC_FL_PUNCH_HOLE``): its
    blocks are freed, so the disk used stays bounded, while the file's apparent size goes on growing
    (readers only ever read its tail). An ``flock`` keeps two trimmers of one file apart.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        block = st.st_blksize or 4096
        allocated = st.st_blocks * 512
        if st.st_size <= limit and allocated <= limit:
            return 0
        drop = (st.st_size - keep) // block * block
        if drop <= 0:
            return 0
        try:
            _fallocate_or_raise(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, drop)
            return drop
        except OSError:
            pass
        if allocated <= limit:
            return 0  # punched before: the head is a hole already
        _fallocate_or_raise(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, drop)
        return drop
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a task directory; raises DriverError if it cannot.

    Files may come and go under rmtree: QEMU unlinking a socket as it dies, or the exit watcher of
    another gateway process recording ``exit.json`` the moment the QEMU it watched was killed. Either
    makes one pass fail (ENOENT, ENOTEMPTY); a few more passes, a moment apart, finish the job."""
    for attempt in range(10):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            if not path.exists():
                return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or attempt == 9:
                raise DriverError(f"cannot remove {path}: {exc.strerror or exc}") from exc
        time.sleep(0.05)
    if path.exists():
        raise DriverError(f"cannot remove {path}")


def read_pid(task_dir: Path) -> int | None:
    """The pid ``qemu.pid`` names, if any."""
    try:
        return int((task_dir / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def read_exit(task_dir: Path) -> dict[str, Any]:
    """What ``exit.json`` says about how the VM last stopped ({} if nothing)."""
    try:
        data = json.loads((task_dir / "exit.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remove_runtime(task_dir: Path, task: QemuTask | None) -> None:
    """Remove the pid file and every socket (QEMU cannot unlink them once it dropped root), and the VM's
    network namespace (drivers/local/network.py): what exists only while its QEMU runs."""
    network.down(task_dir)
    names = {"qmp.sock", "vnc.sock", MONITOR_SOCKET, GUEST_AGENT_SOCKET, *RUNTIME_FILES}
    paths = {task_dir / name for name in names} | set(task.sockets if task else ())
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def powered_off_by_serial(task_dir: Path, info: dict[str, Any]) -> None:
    """For a QEMU whose exit status is lost: if the guest's console ends with Linux powering the machine
    off, record status 0 (a power-off, not a crash) in ``info`` and exit.json."""
    if POWERED_OFF in tail(task_dir / "serial.log", 512):
        info.update(returncode=0, message=f"QEMU (pid {info.get('pid')}) exited after the guest powered off "
                                          "(its serial console says so)")
        write_atomic(task_dir / "exit.json", json.dumps(info) + "\n")


# ---------------------------------------------------------------- one VM at a time

class VMLocks:
    """Serialise work on one VM, within this process (an asyncio lock) and across processes (flock)."""

    def __init__(self, lock_dir: Path) -> None:
        self.lock_dir = lock_dir
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, vm_id: str, remove: bool = False) -> AsyncIterator[None]:
        """Hold the VM's lock; ``remove``: delete its lock file when done (the VM is destroyed)."""
        lock = self._locks.setdefault(vm_id, asyncio.Lock())
        async with lock:
            self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.lock_dir / f"{vm_id}.lock"
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




class LogTrimmer:
    """Keeps every running VM's serial.log under SERIAL_LOG_LIMIT (plus what a guest writes in one
    LOG_TRIM_INTERVAL): a guest that writes to its serial port without end (``yes > /dev/ttyS0``) fills
    no disk. One background task per driver, started by the driver's first call inside an event loop."""

    def __init__(self, tasks_root: Path) -> None:
        self.tasks_root = tasks_root
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vmgate-serial-log-trim")

    def trim_all(self) -> int:
        """One pass over the task directories of running VMs; returns the bytes dropped."""
        dropped = 0
        try:
            entries = list(os.scandir(self.tasks_root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name.startswith(".") or not os.path.exists(os.path.join(entry.path, "qemu.pid")):
                continue
            try:
                dropped += trim_live_log(Path(entry.path) / "serial.log", SERIAL_LOG_LIMIT, SERIAL_LOG_KEEP)
            except OSError as exc:
                log.warning("cannot trim %s/serial.log: %s", entry.path, exc.strerror or exc)
        return dropped

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.trim_all)
            await asyncio.sleep(LOG_TRIM_INTERVAL)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
