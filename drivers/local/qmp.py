"""Talking to a running QEMU over its QMP socket: single commands, HMP snapshot commands, saving memory;
and poking its guest after a restore (``poke_guest``).

QEMU serves one QMP client at a time, so nothing here holds a connection: each call opens its own and
closes it. Every failure of the transport is one of ``QMP_ERRORS``; the helpers that the driver's
saved-state calls use turn those into ``DriverError`` with a message a user may see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient, QMPError

from drivers.base import DriverError

log = logging.getLogger(__name__)

QMP_TIMEOUT = 5.0  # per QMP connect and per command
SAVE_TIMEOUT = 120.0  # savevm / loadvm / delvm / a memory save of one VM (a few hundred ms for the tiny image)
RESTORE_POLL = 0.01  # while a restore or a save runs: it takes about 0.1 s, so look often

QMP_ERRORS = (QMPError, OSError, EOFError, TimeoutError)


async def qmp(socket_path: Path, command: str, arguments: dict[str, Any] | None = None,
              timeout: float = QMP_TIMEOUT) -> Any:
    """One QMP command on a fresh connection (QEMU serves one QMP client at a time: never hold one)."""
    client = QMPClient("vmgate")
    try:
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
        return await asyncio.wait_for(client.execute(command, arguments), timeout)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), timeout)


async def hmp(socket_path: Path, command: str) -> None:
    """One HMP command through QMP (human-monitor-command). savevm, loadvm and delvm answer nothing
    when they worked and their error text when not. (QMP's own snapshot-save/-load jobs need the
    block node names and a job to poll; in QEMU 7.2 the HMP commands do the same, synchronously.)"""
    try:
        out = await qmp(socket_path, "human-monitor-command", {"command-line": command}, timeout=SAVE_TIMEOUT)
    except QMP_ERRORS as exc:
        raise DriverError(f"{command.split()[0]} failed: {type(exc).__name__}: {exc}") from exc
    text = str(out or "").strip()
    if text:
        raise DriverError(f"{command.split()[0]} failed: {text[:500]}")


async def snapshot_sizes(socket_path: Path, image_path: str) -> dict[str, int]:
    """The tags of the internal snapshots of the VM's disk (image0), with their saved memory in bytes."""
    try:
        devices = await qmp(socket_path, "query-block")
    except QMP_ERRORS as exc:
        raise DriverError(f"query-block failed: {exc}") from exc
    for device in devices or []:
        inserted = device.get("inserted") or {}
        if device.get("device") == "image0" or inserted.get("file") == image_path:
            return {str(s["name"]): int(s.get("vm-state-size") or 0)
                    for s in (inserted.get("image") or {}).get("snapshots") or []}
    raise DriverError("the VM's disk image0 is not in query-block")


async def set_ignore_shared(socket_path: Path, on: bool) -> None:
    """Switch QEMU's ``x-ignore-shared`` migration capability: a state saved or restored with it leaves out
    the RAM kept in a shared file (jobspecs/memory.py). QEMU 7.2 has no command-line property for it."""
    try:
        await qmp(socket_path, "migrate-set-capabilities",
                  {"capabilities": [{"capability": "x-ignore-shared", "state": on}]})
    except QMP_ERRORS as exc:
        raise DriverError(f"could not set x-ignore-shared: {type(exc).__name__}: {exc}") from exc


def _refused(exc: BaseException | None) -> bool:
    """True for a connect refused because nobody listens on the socket yet."""
    return isinstance(exc, ConnectionRefusedError) or (isinstance(exc, ConnectError)
                                                       and isinstance(exc.exc, ConnectionRefusedError))


async def restore_shared(socket_path: Path, alive: Any, timeout: float) -> None:
    """Start the restore of a QEMU started with ``-incoming defer`` over its template's RAM: once its QMP
    socket answers, ``x-ignore-shared`` on, then the state from its fd 3 (drivers/local/process.py)."""
    deadline = time.monotonic() + timeout
    while True:
        if socket_path.exists():
            try:
                await set_ignore_shared(socket_path, True)
                break
            except DriverError as exc:
                # QEMU makes the socket file (bind) a moment before it listens; a connect in between is
                # refused. A loaded host widens that moment (seen at 36 clones in make bench's density).
                if not _refused(exc.__cause__):
                    raise
        if not alive() or time.monotonic() > deadline:
            raise DriverError("QEMU never opened its QMP socket for the restore")
        await asyncio.sleep(RESTORE_POLL)
    try:
        await qmp(socket_path, "migrate-incoming", {"uri": "fd:3"})
    except QMP_ERRORS as exc:
        raise DriverError(f"the restore did not start: {type(exc).__name__}: {exc}") from exc


async def poke_guest(wake_socket: Path) -> None:
    """Write a line to the guest's ttyS1 (``-serial unix:.../wake.sock``, jobspecs/devices.py): its
    ``vmgate-clone-watch`` waits for it after a restore to look whether it is a new clone. A lost poke is
    logged, not raised: the watcher also looks every 30 s by itself."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(wake_socket)), QMP_TIMEOUT)
        try:
            writer.write(b"\n")
            await asyncio.wait_for(writer.drain(), QMP_TIMEOUT)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), QMP_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        log.warning("could not poke the guest at %s after a restore: %s", wake_socket, exc)


async def save_memory(socket_path: Path, path: Path) -> None:
    """Pause the VM (QMP ``stop``) and write its memory, a migration stream, to ``path``; the VM stays
    paused. On failure the VM runs on (``cont``), ``path`` is removed and DriverError says why."""
    # QEMU runs as a uid of its own (confine.py) and cannot open a file in the VM's folder: it gets ours (getfd).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    client = QMPClient("vmgate-suspend")
    try:
        await asyncio.wait_for(client.connect(str(socket_path)), QMP_TIMEOUT)
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
        path.unlink(missing_ok=True)
        raise DriverError(f"suspend failed: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), QMP_TIMEOUT)
