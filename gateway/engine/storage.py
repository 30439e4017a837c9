"""VM disks: one qcow2 overlay per VM on a read-only, checksummed base image.

Overlays live at ``<VMS_ROOT>/users/<user_id>/<vm_id>.qcow2``. Base images are verified
against the sha256 manifest their build wrote before any overlay is made on them.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from gateway.errors import ServiceUnavailable
from jobspecs.manifest import MANIFEST, sha256_of


class ImageUnavailable(ServiceUnavailable):
    code = "image_unavailable"


class StorageError(Exception):
    """Creating or removing an overlay failed; the message says why."""


def user_dir(vms_root: Path, user_id: str) -> Path:
    """The folder of a user's overlays and saved memory states (one level, no subfolders)."""
    return vms_root / "users" / user_id


def overlay_path(vms_root: Path, user_id: str, vm_id: str) -> Path:
    return user_dir(vms_root, user_id) / f"{vm_id}.qcow2"


def allocated_bytes(vms_root: Path, user_id: str) -> int:
    """What the user's files take on disk: allocated blocks, not apparent or virtual sizes. That is their
    overlays with every internal snapshot in them (disk and saved memory), suspend states, and files
    being written (``.part``). Symlinks are not followed (vmgate makes none)."""
    total = 0
    try:
        with os.scandir(user_dir(vms_root, user_id)) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except FileNotFoundError:  # removed while we looked
                    continue
    except FileNotFoundError:
        return 0
    return total


def _stat_signature(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    # ctime cannot be set back by a user, so a rewritten file always changes the signature.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ImageVerifier:
    """Checks an image directory's files against its manifest.json; remembers files already checked."""

    def __init__(self) -> None:
        self._verified: dict[Path, tuple[int, int, int, int]] = {}
        # Files found not to match, as they were then: refused again without hashing them again (each create
        # of a broken template, and the gateway's check every minute, would otherwise re-read it whole).
        self._mismatched: dict[Path, tuple[tuple[int, int, int, int], str]] = {}  # (signature, expected sha256)

    def verify_sync(self, image_dir: Path, names: list[str]) -> None:
        manifest_path = image_dir / MANIFEST
        try:
            manifest: dict[str, Any] = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ImageUnavailable(f"Image {image_dir.name} is not built (no valid manifest); run `make images`.",
                                   details={"image": image_dir.name}) from None
        for name in names:
            path = image_dir / name
            entry = files.get(name) if isinstance(files, dict) else None
            if not isinstance(entry, dict) or "sha256" not in entry:
                raise ImageUnavailable(f"Image {image_dir.name}: {name} is missing from its manifest.",
                                       details={"image": image_dir.name, "file": name})
            try:
                signature = _stat_signature(path)
            except OSError:
                raise ImageUnavailable(f"Image {image_dir.name}: {name} is missing; run `make images`.",
                                       details={"image": image_dir.name, "file": name}) from None
            if self._verified.get(path) == signature:
                continue
            known_bad = self._mismatched.get(path) == (signature, entry["sha256"])
            if known_bad or sha256_of(path) != entry["sha256"]:
                self._verified.pop(path, None)
                self._mismatched[path] = (signature, entry["sha256"])
                raise ImageUnavailable(
                    f"Image {image_dir.name}: {name} does not match its sha256 in the manifest; refusing to use it.",
                    details={"image": image_dir.name, "file": name})
            self._mismatched.pop(path, None)
            self._verified[path] = signature

    async def verify(self, image_dir: Path, names: list[str]) -> None:
        """Raise ImageUnavailable unless every named file matches the manifest."""
        await asyncio.to_thread(self.verify_sync, image_dir, names)


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def create_overlay(base: Path, path: Path, size_gb: int) -> None:
    """Create ``path`` as a qcow2 overlay of ``base``. Idempotent; on failure nothing is left behind."""
    if path.exists():
        code, out = await _run("qemu-img", "info", "--output=json", "-U", str(path))
        try:
            backing = json.loads(out).get("backing-filename") if code == 0 else None
        except ValueError:
            backing = None
        if backing == str(base):
            return
        raise StorageError(f"{path.name} exists and is not an overlay of {base.name}")
    tmp = path.with_suffix(".qcow2.part")
    for _attempt in range(3):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        code, out = await _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                               str(tmp), f"{size_gb}G")
        if code == 0 or path.parent.is_dir():
            break
        # The collector removed the (empty, old) user folder between the mkdir and qemu-img: again.
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"qemu-img create failed: {out[-500:]}")
    os.chmod(tmp, 0o600)
    tmp.rename(path)


def state_path(overlay: Path) -> Path:
    """Where a suspended VM's memory is saved: ``<vm_id>.state`` beside its overlay (``.state.part`` while
    it is being written)."""
    return overlay.with_suffix(".state")


def _unlink_all(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def remove_state(overlay: Path) -> None:
    """Remove a VM's saved memory, once it runs on from it (or is destroyed). Idempotent. In a thread, as
    ``remove_overlay``."""
    await asyncio.to_thread(_unlink_all, *_state_files(overlay))


def _state_files(overlay: Path) -> tuple[Path, Path]:
    """A VM's saved memory and the file a save writes before it renames it."""
    state = state_path(overlay)
    return state, state.with_name(state.name + ".part")


async def remove_overlay(path: Path) -> None:
    """Remove an overlay (and a saved memory state beside it). Idempotent. The user's folder stays: removing
    it once empty would race with a create for the same user between its mkdir and its qemu-img (the
    collector removes old empty ones). In a thread: freeing a file's blocks takes the file system a while
    (18 ms for a 58 MiB memory state here), which the event loop would wait out."""
    await asyncio.to_thread(_unlink_all, path, path.with_suffix(".qcow2.part"), *_state_files(path))


# ---- internal snapshots (a VM's suspend state and its user's snapshots; docs/SNAPSHOTS.md) ----------
# Only for an overlay no QEMU has open: a running VM's snapshots go through its QEMU (the driver).

async def snapshot_tags(path: Path) -> set[str]:
    """The tags of the overlay's internal snapshots."""
    code, out = await _run("qemu-img", "info", "--output=json", "-U", str(path))
    if code != 0:
        raise StorageError(f"qemu-img info failed: {out[-500:]}")
    try:
        return {str(e["name"]) for e in json.loads(out).get("snapshots") or []}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"qemu-img info gave an unreadable answer: {exc}") from None


async def _snapshot(path: Path, flag: str, tag: str) -> None:
    code, out = await _run("qemu-img", "snapshot", flag, tag, str(path))
    if code != 0:
        raise StorageError(f"qemu-img snapshot {flag} {tag} failed: {out.strip()[-500:]}")


async def create_snapshot(path: Path, tag: str) -> None:
    """Take a disk-only snapshot ``tag`` of a stopped VM's overlay (replacing one of that tag)."""
    if tag in await snapshot_tags(path):
        await _snapshot(path, "-d", tag)
    await _snapshot(path, "-c", tag)


async def apply_snapshot(path: Path, tag: str) -> None:
    """Put the overlay's disk back to snapshot ``tag`` (the snapshot stays)."""
    await _snapshot(path, "-a", tag)


async def delete_snapshot(path: Path, tag: str) -> None:
    """Delete snapshot ``tag`` from the overlay. Idempotent."""
    if tag in await snapshot_tags(path):
        await _snapshot(path, "-d", tag)
