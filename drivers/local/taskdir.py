"""The files of a VM's task directory, and the per-VM lock.

``<vms_root>/tasks/<vm_id>/`` (mode 0700) holds what a later driver needs to know about the VM: ``job.json``
(what it runs), ``qemu.pid`` (which process), ``exit.json`` (how it last stopped), ``serial.log`` and
``stderr.log`` (QEMU's output), and the unix sockets QEMU listens on. ``<vms_root>/tasks/.locks/`` holds
one lock file per VM: work on a VM is serialised across gateway processes, not only within one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from drivers.base import DriverError
from drivers.local.job import GUEST_AGENT_SOCKET, MONITOR_SOCKET, QemuTask

POLL = 0.05
LOCK_TIMEOUT = 120.0  # waiting for another process working on the same VM
RUNTIME_FILES = ("qemu.pid",)
POWERED_OFF = b"reboot: Power down"  # what Linux prints on the console as it powers the machine off


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


def cap_log(path: Path, keep: int) -> None:
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


def remove_tree(path: Path) -> None:
    """Remove a task directory; raises DriverError if it cannot."""
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
    """Remove the pid file and every socket (QEMU cannot unlink them once it dropped to nobody)."""
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
