"""The desktop clipboard's QEMU end, plugged into a running VM and unplugged around every memory save.

A desktop template's job (``Meta.clipboard = "vdagent"``, jobspecs/devices.py) has a virtio-serial bus but
not the clipboard's port: QEMU 7.2's qemu-vdagent chardev blocks migration ("The vdagent chardev doesn't
yet support migration"), and a warm start, an idle suspend and a snapshot with memory are all migrations.
So the local driver adds the chardev and its port (``com.redhat.spice.0``, which the guest's
spice-vdagentd opens) over QMP once the VM runs, and removes both for the moment a save takes: the
guest sees the port go and come back, and its agent reconnects (images/debian-12-desktop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from drivers.local.qmp import QMP_ERRORS, qmp
from jobspecs.devices import SERIAL_BUS, VDAGENT_PORT

log = logging.getLogger("vmgate.driver.local")

CHARDEV_ID = "vmgate-vdagent"
PORT_ID = "vmgate-vdagent-port"
UNPLUG_TIMEOUT = 5.0  # seconds for the port to be gone


async def plug(qmp_socket: Path) -> bool:
    """Add the clipboard's chardev and port to a running QEMU; False (logged) when QEMU refused."""
    try:
        await qmp(qmp_socket, "chardev-add", {"id": CHARDEV_ID, "backend": {
            "type": "qemu-vdagent", "data": {"clipboard": True, "mouse": False}}})
        await qmp(qmp_socket, "device_add", {"driver": "virtserialport", "bus": f"{SERIAL_BUS}.0",
                                             "chardev": CHARDEV_ID, "name": VDAGENT_PORT, "id": PORT_ID})
        return True
    except QMP_ERRORS as exc:
        log.warning("QEMU at %s: the clipboard could not be plugged in: %s", qmp_socket, exc)
        return False


async def unplug(qmp_socket: Path) -> None:
    """Remove the port, then the chardev, which QEMU calls busy until the port's removal has finished
    (a moment after device_del returns); either may be absent (a VM started before they were plugged in)."""
    with contextlib.suppress(*QMP_ERRORS):
        await qmp(qmp_socket, "device_del", {"id": PORT_ID})
    deadline = time.monotonic() + UNPLUG_TIMEOUT
    while True:
        try:
            await qmp(qmp_socket, "chardev-remove", {"id": CHARDEV_ID})
            return
        except QMP_ERRORS as exc:
            if "busy" not in str(exc) or time.monotonic() >= deadline:
                return  # absent, or QEMU gone: the save that follows says what is wrong
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def detached(qmp_socket: Path, wanted: bool) -> AsyncIterator[None]:
    """Without the clipboard for the block (a memory save); plugged in again after it if QEMU still runs."""
    if not wanted:
        yield
        return
    await unplug(qmp_socket)
    try:
        yield
    finally:
        if qmp_socket.exists():
            await plug(qmp_socket)
