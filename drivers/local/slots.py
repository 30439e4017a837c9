"""Numbers a VM holds alone on this host for its life: its uid (drivers/local/confine.py) and its network slot
(drivers/local/network.py). Files under a ``slots`` folder record who holds what, so the numbers survive a
gateway restart and two drivers on one tasks root never hand out the same one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def claim(slots: Path, vm_id: str, base: int, span: int) -> int:
    """A number in ``base .. base+span-1`` that is the VM's alone: the one it has, else a free one, claimed.

    ``slots/<n>`` names the VM holding ``n`` (created with O_EXCL, so two VMs never share one) and
    ``slots/vm-<id>`` the VM's number; the search starts where a hash of the id points. The VM keeps its
    number until ``release``."""
    slots.mkdir(mode=0o700, parents=True, exist_ok=True)
    mine = slots / f"vm-{vm_id}"
    try:
        return int(mine.read_text())
    except (FileNotFoundError, ValueError):
        pass
    offset = int.from_bytes(hashlib.sha256(vm_id.encode()).digest()[:8], "big") % span
    for step in range(span):
        number = base + (offset + step) % span
        try:
            fd = os.open(slots / str(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            if (slots / str(number)).read_text() == vm_id:  # ours, from a claim whose record got lost
                break
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(vm_id)
        break
    else:
        raise RuntimeError(f"no free number for a VM in {slots} ({span} in use)")
    tmp = slots / f".vm-{vm_id}.tmp"
    tmp.write_text(str(number))
    os.replace(tmp, mine)
    return number


def release(slots: Path, vm_id: str) -> None:
    """Give the VM's number in ``slots`` back. Idempotent."""
    mine = slots / f"vm-{vm_id}"
    try:
        number = int(mine.read_text())
    except (FileNotFoundError, ValueError):
        return
    slot = slots / str(number)
    try:
        if slot.read_text() == vm_id:
            slot.unlink()
    except FileNotFoundError:
        pass
    mine.unlink(missing_ok=True)


def holder(slots: Path, number: int) -> str | None:
    """The VM holding ``number`` in ``slots``, if any."""
    try:
        return (slots / str(number)).read_text() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
