"""``vmgate prune-layers [--dry-run]``: remove the warm layers that nothing uses any more.

`make images` never removes a warm layer (images/warm.py): a rebuilt base image, a changed catalog entry
or a QEMU upgrade makes a new layer and points the template's ``current`` at it, and the VMs created from
the old layer keep their overlays on its disk for good. So layers pile up, 60 MB (``tiny``) to 500 MB (the
desktop) each. This removes a layer of ``IMAGES_DIR/warm/<template>/`` only when all of these hold:

- it is not the template's ``current``;
- no VM that is not destroyed names it in its stored job (its ``warm_layer``, or a path inside it): that
  covers a fleet's VMs, whose overlays are on their nodes, and a create still waiting in the queue;
- no file under ``VMS_ROOT/users`` is backed by a file in it (``qemu-img info``): the overlays of VMs whose
  rows are gone and which the collector has not taken yet;
- ``current`` left it more than ORPHAN_GRACE seconds before the VMs and overlays were read: a create that
  read ``current`` just before `make images` moved it has its row by then (counted from the read, since a
  VM made while this waits for a template's lock is on a layer that was current after the read).

Only a real folder named by a layer id (16 hex digits) under a real template folder is a layer.

It holds the template's build lock (the one `images/warm.py` takes), so no layer is built meanwhile, and
renames a layer out of the way before deleting its files, so a half-deleted layer never has a layer's
name (the next prune removes what an interrupted one left). An overlay it cannot read stops it before
anything is removed. docs/IMAGES.md, "Warm templates".
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.cli.common import Refused, in_db
from gateway.config import Settings
from jobspecs.catalog import WARM_CURRENT

LOCK = ".lock"  # images/warm.py's build lock, in each template's warm folder
LAYER_ID = re.compile(r"[0-9a-f]{16}")  # images/warm.py: a layer's id, the first 16 hex digits of a sha256
DOOMED = re.compile(rf"\.{LAYER_ID.pattern}\.prune\.[0-9]+")  # a layer _remove renamed out of the way


@dataclass
class Layer:
    path: Path
    users: list[str] = field(default_factory=list)  # why it stays: "current", "VM <id>", "overlay <path>"

    @property
    def size(self) -> int:
        return sum(f.stat().st_blocks * 512 for f in self.path.rglob("*") if f.is_file())


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("prune-layers", help="remove the warm layers no VM uses and that are not current",
                                 description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")


def run(settings: Settings, args: argparse.Namespace) -> str:
    return prune(settings, dry_run=args.dry_run)


def prune(settings: Settings, *, dry_run: bool = False, now: float | None = None) -> str:
    """Remove the unused layers (or only say which, ``dry_run``); returns the report, a line per template.
    ``now``: when the VMs and overlays were read (the grace counts from there)."""
    warm = settings.images_dir / "warm"
    templates = sorted(p for p in warm.iterdir() if _real_dir(p) and not p.name.startswith(".")) \
        if _real_dir(warm) else []
    if not templates:
        return f"no warm layers in {warm}"
    # Read before any lock, and the grace counted from this moment: a VM made after it is on a layer that
    # is current, or was current after this moment (so `current` moved less than ORPHAN_GRACE before it).
    read_at = time.time() if now is None else now
    jobs = _live_jobs(settings)
    lines = []
    try:
        backings = _overlay_backings(settings.vms_root)
        for root in templates:
            with open(root / LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                lines.append(_prune_template(settings, root, jobs, backings, dry_run, read_at))
    except (OSError, subprocess.SubprocessError) as exc:
        raise Refused("\n".join([*lines, f"stopped: {exc}"])) from exc
    return "\n".join(lines)


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _prune_template(settings: Settings, root: Path, jobs: list[tuple[str, str]],
                    backings: list[tuple[Path, Path]], dry_run: bool, read_at: float) -> str:
    if not dry_run:  # what an interrupted prune left under its dot names
        for leftover in root.iterdir():
            if DOOMED.fullmatch(leftover.name) and _real_dir(leftover):
                shutil.rmtree(leftover)
    # Only what images/warm.py makes is a layer: a folder named by a 16-hex-digit id (a stray `lost+found`,
    # an operator's copy or a link stays whatever it is).
    layers = {p.name: Layer(p) for p in sorted(root.iterdir()) if _real_dir(p) and LAYER_ID.fullmatch(p.name)}
    if not layers:
        return f"{root.name}: no layers"
    link = root / WARM_CURRENT
    current = Path(os.path.realpath(link)) if link.is_symlink() else None
    if current is not None and current.parent == root.resolve() and current.name in layers:
        layers[current.name].users.append("current")
    moved_ago = read_at - link.lstat().st_mtime if link.is_symlink() else None
    for vm_id, job in jobs:
        for layer_id, layer in layers.items():
            if layer_id in job or str(layer.path) + "/" in job:
                layer.users.append(f"VM {vm_id}")
    for overlay, backing in backings:
        for layer in layers.values():
            if layer.path.resolve() in (backing.parent, backing.resolve().parent):
                layer.users.append(f"overlay {overlay}")
    unused = [layer for layer in layers.values() if not layer.users]
    kept = [f"{layer.path.name} ({_why(layer.users)})" for layer in layers.values() if layer.users]
    if unused and moved_ago is not None and moved_ago < settings.orphan_grace:
        kept += [f"{layer.path.name} (current moved {max(moved_ago, 0):.0f} s before the VMs were read, under "
                 f"ORPHAN_GRACE {settings.orphan_grace} s)" for layer in unused]
        unused = []
    removed = []
    for layer in unused:
        size = layer.size
        if not dry_run:
            _remove(layer.path)
        removed.append(f"{layer.path.name} ({size / 2**20:.0f} MiB)")
    verb = "would remove" if dry_run else "removed"
    return (f"{root.name}: {verb} {', '.join(removed) or 'none'}; kept {', '.join(kept) or 'none'}")


def _why(users: list[str]) -> str:
    shown = users[:3] + ([f"{len(users) - 3} more"] if len(users) > 3 else [])
    return ", ".join(shown)


def _remove(layer: Path) -> None:
    """Out of the way under a dot name first (a layer is whole or absent), then its files."""
    doomed = layer.with_name(f".{layer.name}.prune.{os.getpid()}")
    layer.rename(doomed)
    shutil.rmtree(doomed)


def _live_jobs(settings: Settings) -> list[tuple[str, str]]:
    """(VM id, its stored job as text) of every VM that is not destroyed."""
    async def work(cur: Any) -> list[tuple[str, str]]:
        await cur.execute("SELECT id::text AS id, coalesce(jobspec::text, '') AS job FROM vms "
                          "WHERE state <> 'destroyed'")
        return [(row["id"], row["job"]) for row in await cur.fetchall()]

    return asyncio.run(in_db(settings, work))


def _overlay_backings(vms_root: Path) -> list[tuple[Path, Path]]:
    """(overlay, the file it is backed by) for every VM disk under VMS_ROOT/users."""
    found = []
    for overlay in sorted((vms_root / "users").glob("*/*.qcow2")):
        result = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0 and not overlay.exists():
            continue  # removed meanwhile (a destroy, the collector)
        try:
            info = json.loads(result.stdout) if result.returncode == 0 else None
        except ValueError:
            info = None
        if info is None:
            raise Refused(f"cannot tell what {overlay} is backed by ({(result.stderr or '').strip()[-300:]}): "
                          "nothing removed")
        backing = info.get("full-backing-filename")
        if backing:
            found.append((overlay, Path(backing)))
    return found
