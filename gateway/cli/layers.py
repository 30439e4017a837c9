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
- ``current`` left it more than ORPHAN_GRACE seconds ago: a create that read ``current`` just before
  `make images` moved it has its row by then.

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
    """Remove the unused layers (or only say which, ``dry_run``); returns the report, a line per template."""
    warm = settings.images_dir / "warm"
    templates = sorted(p for p in warm.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if warm.is_dir() else []
    if not templates:
        return f"no warm layers in {warm}"
    # Read before any lock: a VM made after this is on a layer that is current, or was within ORPHAN_GRACE.
    jobs = _live_jobs(settings)
    backings = _overlay_backings(settings.vms_root)
    lines = []
    for root in templates:
        with open(root / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines.append(_prune_template(settings, root, jobs, backings, dry_run,
                                         time.time() if now is None else now))
    return "\n".join(lines)


def _prune_template(settings: Settings, root: Path, jobs: list[tuple[str, str]],
                    backings: list[tuple[Path, Path]], dry_run: bool, now: float) -> str:
    if not dry_run:  # what an interrupted prune left under its dot names
        for leftover in root.glob(".*.prune.*"):
            shutil.rmtree(leftover)
    layers = {p.name: Layer(p) for p in sorted(root.iterdir())
              if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")}
    if not layers:
        return f"{root.name}: no layers"
    link = root / WARM_CURRENT
    current = os.readlink(link) if link.is_symlink() else None
    if current in layers:
        layers[current].users.append("current")
    moved_ago = now - link.lstat().st_mtime if link.is_symlink() else None
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
        kept += [f"{layer.path.name} (current moved {moved_ago:.0f} s ago, under ORPHAN_GRACE "
                 f"{settings.orphan_grace} s)" for layer in unused]
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
