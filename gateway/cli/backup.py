"""``vmgate backup`` and ``vmgate restore``: all of a vmgate's state in one folder, and back.

    vmgate backup [--out DIR]        DIR/vmgate-<UTC time>/ (default DIR: DATA_DIR/backups); prints its path
    vmgate restore FOLDER [--force]  onto this machine's (empty) database, VMS_ROOT and IMAGES_DIR

A backup holds:

- ``db.dump``: Postgres (``pg_dump -Fc``): users, VMs, quotas, snapshots' records, API tokens, the audit log.
  The list of VMs whose disks are copied is read in the same database snapshot as the dump.
- ``vms/<user>/<vm>.qcow2`` (and ``.state``, a suspended VM's memory): every live VM's overlay, with its
  users' snapshots inside. A stopped or suspended VM's files are copied as they are; a running VM is paused
  for the copy (QEMU flushes its disk first), so its copy is what a power cut at that moment would leave,
  and it runs on afterwards. Each VM is copied holding its lifecycle lock, so no start, stop or destroy
  runs meanwhile. On a fleet (VMGATE_DRIVER=nomad) a running VM's disk is on its node and is not copied:
  the manifest lists it as skipped.
- ``images/…``: the image folders the overlays are backed by (a template's base image, its warm layer):
  a rebuilt image is not byte-identical, and an overlay is only valid on the very bytes it was made on.
- ``manifest.json``: the format, where the files came from, each VM, and each file's SHA-256.

Redis is not in it: it holds live state only (queues, console tokens, rate limits), rebuilt at start.
``.env`` is not either: it holds the secrets; keep it apart. A new JWT_SECRET only ends the old sessions.

A restore checks every file against the manifest first, refuses a database that already has users (unless
``--force``) and any VM file already present, then puts the images in IMAGES_DIR (an image folder already
there with other bytes is left alone and the backup's goes to ``IMAGES_DIR/restored/<backup>/``), copies
the overlays into VMS_ROOT and points their backing files at the new places, loads the dump (in one
transaction; a dump that fails to load, or a copy that fails before it, leaves the database as it was and
takes the copied overlays away again), applies newer migrations, points the VMs' stored paths at the new
places, and marks the VMs that were running or in a transition ``stopped``: their owners start them (from
the copied disk). docs/OPERATIONS.md, "Backups".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiopg

from drivers.base import DriverError, NotSupported
from gateway import states, store
from gateway.cli.common import Refused, apply_migrations
from gateway.config import Settings
from gateway.engine.locks import VmLocker
from gateway.states import Desired, VmState
from jobspecs.manifest import sha256_of

FORMAT = 1
MANIFEST = "manifest.json"
LOCK_WAIT = 120.0  # seconds to wait for a VM's lifecycle lock (a start or a stop in progress)
# States whose VM runs, may run, or was between two states: restored as stopped.
UNSETTLED = frozenset({VmState.RUNNING, *states.TRANSITIONAL})
COPY_TIMEOUT = 3600


def add_parsers(commands: Any) -> None:
    """Add ``backup`` and ``restore`` to the CLI's sub-commands."""
    doc = (__doc__ or "").split("\n\n")
    backup = commands.add_parser("backup", help="copy the database, the VMs' disks and their images to a folder",
                                 description=doc[0])
    backup.add_argument("--out", type=Path, help="where the backup's folder goes (default: DATA_DIR/backups)")
    restore = commands.add_parser("restore", help="restore a backup onto this machine's empty state",
                                  description=doc[0])
    restore.add_argument("folder", type=Path)
    restore.add_argument("--force", action="store_true",
                         help="restore although the database has users (they are replaced by the backup's)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "backup":
        folder = asyncio.run(backup(settings, args.out or settings.data_dir / "backups"))
        print(folder)
    else:
        print(asyncio.run(restore(settings, args.folder, force=args.force)))
    return 0


# ---- helpers -----------------------------------------------------------------------------------------

def _pg_env(url: str) -> dict[str, str]:
    """libpq's environment for ``url``: the password never reaches a command line."""
    parts = urlsplit(url)
    env = dict(os.environ, PGHOST=parts.hostname or "127.0.0.1", PGPORT=str(parts.port or 5432),
               PGDATABASE=unquote(parts.path.lstrip("/")))
    if parts.username:
        env["PGUSER"] = unquote(parts.username)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return env


def _tool(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/lib/postgresql/15/bin/{name}"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise Refused(f"{name} is missing (Debian's postgresql-client; make deps installs it)")


def _run(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=COPY_TIMEOUT, check=False)
    if result.returncode != 0:
        raise Refused(f"{Path(argv[0]).name} failed: {(result.stderr or result.stdout).strip()[-800:]}")
    return result.stdout


def _copy(src: Path, dst: Path) -> None:
    """Copy a (sparse) disk file: holes stay holes, a copy-on-write clone where the file system has one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    _run(["cp", "--sparse=always", "--reflink=auto", "--no-preserve=mode", str(src), str(dst)])


def backing_chain(image: Path) -> list[Path]:
    """The files ``image`` is backed by, nearest first (``qemu-img info --backing-chain``)."""
    out = _run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(image)])
    chain = json.loads(out)
    return [Path(layer["full-backing-filename"]) for layer in chain if layer.get("full-backing-filename")]


def _inside(path: Path, root: Path, what: str) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        raise Refused(f"{path} is not under {what} {root}") from None


# ---- backup ------------------------------------------------------------------------------------------

async def backup(settings: Settings, out_root: Path) -> Path:
    """Write a backup folder under ``out_root``; returns it. A failure leaves nothing behind."""
    await apply_migrations(settings)
    name = "vmgate-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    final, partial = out_root / name, out_root / f"{name}.part"
    if final.exists() or partial.exists():
        raise Refused(f"{final} exists already; wait a second")
    partial.mkdir(parents=True, mode=0o700)
    try:
        await _write(settings, partial, name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(final)
    return final


async def _write(settings: Settings, partial: Path, name: str) -> None:
    vms = await _dump(settings, partial / "db.dump")
    manifest: dict[str, Any] = {
        "format": FORMAT, "created_at": dt.datetime.now(dt.UTC).isoformat(), "name": name,
        "vms_root": str(settings.vms_root), "images_dir": str(settings.images_dir), "driver": settings.driver,
        "vms": [], "images": [], "skipped": [], "files": {},
    }
    image_dirs: set[Path] = set()
    from gateway.web.app import driver_from_settings  # the CLI builds the driver the gateway would

    driver = driver_from_settings(settings)
    locker = VmLocker(settings.postgres_url)
    try:
        for vm in vms:
            entry = await _copy_vm(settings, driver, locker, vm, partial)
            if entry is None:
                manifest["skipped"].append({"id": str(vm["id"]), "state": vm["state"],
                                            "why": "running on a fleet node: its disk is not on this machine"})
                continue
            manifest["vms"].append(entry)
            for backing in backing_chain(partial / entry["overlay"]):
                image_dirs.add(backing.parent)
    finally:
        await locker.close()
        await driver.close()
    for folder in sorted(image_dirs):
        rel = _inside(folder, settings.images_dir, "IMAGES_DIR")
        for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            _copy(file, partial / "images" / rel / file.name)
        manifest["images"].append(str(rel))
    for file in sorted(p for p in partial.rglob("*") if p.is_file()):
        manifest["files"][str(file.relative_to(partial))] = sha256_of(file)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


async def _dump(settings: Settings, target: Path) -> list[dict[str, Any]]:
    """pg_dump the database; returns the live VMs as that dump has them (one exported snapshot)."""
    pg_dump = _tool("pg_dump")
    async with aiopg.connect(settings.postgres_url, timeout=10) as conn, \
            conn.cursor(cursor_factory=store.db.DictCursor) as cur:
        await cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        await cur.execute("SELECT pg_export_snapshot() AS snapshot")
        snapshot = (await store.db.fetch_returned(cur))["snapshot"]
        await cur.execute("SELECT id, user_id, state, overlay_path FROM vms "
                          "WHERE state <> 'destroyed' AND overlay_path IS NOT NULL ORDER BY created_at")
        vms = await store.db.fetch_all(cur)
        # The dump sees exactly what this transaction sees; it must stay open until pg_dump has begun.
        proc = await asyncio.create_subprocess_exec(
            pg_dump, "-Fc", "--no-owner", "--no-privileges", f"--snapshot={snapshot}", "-f", str(target),
            env=_pg_env(settings.postgres_url), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _out, err = await proc.communicate()
        await cur.execute("COMMIT")
    if proc.returncode != 0:
        raise Refused(f"pg_dump failed: {err.decode(errors='replace').strip()[-800:]}")
    return vms


async def _copy_vm(settings: Settings, driver: Any, locker: VmLocker, vm: dict[str, Any],
                   dest: Path) -> dict[str, Any] | None:
    """Copy one VM's overlay (and saved memory) under its lock; None when its disk is not reachable here."""
    vm_id = str(vm["id"])
    overlay = Path(vm["overlay_path"])
    rel = _inside(overlay, settings.vms_root, "VMS_ROOT")
    async with locker.hold(vm_id, LOCK_WAIT):
        status = await driver.status(vm_id)
        entry: dict[str, Any] = {"id": vm_id, "user_id": str(vm["user_id"]), "state": vm["state"],
                                 "overlay": str(Path("vms") / rel), "running": status.state == "running"}
        if not overlay.is_file():
            if status.state == "running":
                return None  # a fleet VM: its overlay is on its node
            entry["overlay"] = None
            return entry
        if status.state == "running":
            try:
                async with driver.paused(vm_id):
                    await asyncio.to_thread(_copy, overlay, dest / entry["overlay"])
            except NotSupported:
                return None
            except DriverError:
                # It stopped between the status and the pause: its files are at rest now.
                await asyncio.to_thread(_copy, overlay, dest / entry["overlay"])
        else:
            await asyncio.to_thread(_copy, overlay, dest / entry["overlay"])
        state = overlay.with_suffix(".state")
        if state.is_file():
            await asyncio.to_thread(_copy, state, dest / "vms" / rel.with_suffix(".state"))
            entry["memory"] = str(Path("vms") / rel.with_suffix(".state"))
    return entry


# ---- restore -----------------------------------------------------------------------------------------

def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise Refused(f"{folder} is not a vmgate backup: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise Refused(f"{folder} has backup format {manifest.get('format')!r}; this vmgate reads {FORMAT}")
    for rel, digest in manifest["files"].items():
        path = folder / rel
        if not path.is_file() or sha256_of(path) != digest:
            raise Refused(f"{rel} in {folder} is missing or does not match the manifest: the backup is damaged")
    return manifest


async def _database_in_use(settings: Settings) -> int:
    """How many users the target database has (0 when it has no tables yet)."""
    async with aiopg.connect(settings.postgres_url, timeout=10) as conn, conn.cursor() as cur:
        await cur.execute("SELECT to_regclass('public.users') IS NOT NULL")
        exists = (await cur.fetchone())[0]
        if not exists:
            return 0
        await cur.execute("SELECT count(*) FROM users")
        return int((await cur.fetchone())[0])


def _load_dump(settings: Settings, dump: Path) -> None:
    """Replace the database's schema with the dump's in one transaction: a dump that fails to load (a
    truncated file, a newer format) leaves the database as it was, never half-made. ``pg_restore`` writes
    the dump as SQL first (its failure stops here, before anything changed); ``psql`` then drops the old
    schema and runs that SQL between one BEGIN and one COMMIT (ROLLBACK on the first error)."""
    env = _pg_env(settings.postgres_url)
    with tempfile.TemporaryDirectory(prefix="vmgate-restore-") as tmp:
        script = Path(tmp) / "db.sql"
        _run([_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", "-f", str(script),
              str(dump)])
        _run([_tool("psql"), "-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1",
              "-c", "DROP SCHEMA public CASCADE", "-c", "CREATE SCHEMA public", "-f", str(script)], env)


def _place_images(folder: Path, manifest: dict[str, Any], images_dir: Path) -> dict[str, str]:
    """Put the backup's image folders into IMAGES_DIR; returns old folder path -> new folder path."""
    moved: dict[str, str] = {}
    old_root = Path(manifest["images_dir"])
    for rel in manifest["images"]:
        src = folder / "images" / rel
        target = images_dir / rel
        files = sorted(p for p in src.iterdir() if p.is_file())
        # The backup's files were checked against the manifest already: their digests are there.
        digests = {f.name: manifest["files"][str(Path("images") / rel / f.name)] for f in files}
        same = target.is_dir() and all((target / name).is_file() and sha256_of(target / name) == digest
                                       for name, digest in digests.items())
        if target.exists() and not same:
            target = images_dir / "restored" / manifest["name"] / rel
        if not same:
            for f in files:
                _copy(f, target / f.name)
                (target / f.name).chmod(0o444)  # images are read-only, as `make images` leaves them
        moved[str(old_root / rel)] = str(target)
    return moved


def _rebase(image: Path, moved: dict[str, str]) -> None:
    """Point ``image``'s backing file at its new place (the bytes there are the same: no data moves)."""
    out = _run(["qemu-img", "info", "-U", "--output=json", str(image)])
    backing = json.loads(out).get("full-backing-filename")
    if not backing:
        return
    new = moved.get(str(Path(backing).parent))
    if new is None or str(Path(new) / Path(backing).name) == backing:
        return
    mode = image.stat().st_mode
    image.chmod(0o644)
    try:
        _run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(Path(new) / Path(backing).name),
              str(image)])
    finally:
        image.chmod(mode & 0o7777)


async def restore(settings: Settings, folder: Path, *, force: bool) -> str:
    """Restore the backup in ``folder`` onto this machine; returns what to tell the operator."""
    manifest = await asyncio.to_thread(_read_manifest, folder)
    users = await _database_in_use(settings)
    if users and not force:
        raise Refused(f"the database already has {users} user(s); restoring replaces them: pass --force to do it")
    old_vms_root = Path(manifest["vms_root"])
    targets = [(vm, settings.vms_root / Path(vm["overlay"]).relative_to("vms")) for vm in manifest["vms"]
               if vm["overlay"]]
    present = [str(p) for vm, t in targets for p in (t, t.with_suffix(".state"))
               if p.exists() and (p == t or vm.get("memory"))]
    if present:
        raise Refused(f"VM files exist already where the backup's go (VMS_ROOT {settings.vms_root}): {present[:3]}")

    moved = await asyncio.to_thread(_place_images, folder, manifest, settings.images_dir)
    for image_dir in moved.values():
        for image in Path(image_dir).glob("*.qcow2"):
            await asyncio.to_thread(_rebase, image, moved)
    # The VMs' files first, then the database: a copy that fails (a full disk) or a dump that does not
    # load takes the copied files away again and leaves the database as it was. (The image folders stay:
    # they are where they belong or under restored/, and a VM file names them only once it is copied.)
    # A failure after the load (a migration, the rows' paths) takes the files away too, and says that the
    # database holds the backup's rows now: the same restore with --force does it all again.
    copied: list[Path] = []
    loaded = False
    try:
        for vm, target in targets:
            copied.append(target)
            await asyncio.to_thread(_copy, folder / vm["overlay"], target)
            target.chmod(0o600)
            await asyncio.to_thread(_rebase, target, moved)
            if vm.get("memory"):
                copied.append(target.with_suffix(".state"))
                await asyncio.to_thread(_copy, folder / vm["memory"], copied[-1])
        await asyncio.to_thread(_load_dump, settings, folder / "db.dump")
        loaded = True
        await apply_migrations(settings)
        stopped = await _fix_rows(settings, manifest, {**moved, str(old_vms_root): str(settings.vms_root)})
    except BaseException as exc:
        for path in copied:
            path.unlink(missing_ok=True)
        if loaded and isinstance(exc, Exception):
            raise Refused(f"the backup's database is loaded, but finishing it failed ({type(exc).__name__}: "
                          f"{str(exc).strip()[:300]}); its VM files are removed again: run the same restore "
                          "with --force") from exc
        raise
    return (f"restored {manifest['name']}: {len(targets)} VM disk(s), {len(manifest['images'])} image folder(s); "
            f"{stopped} VM(s) that were running or between states are stopped (their owners start them)"
            + (f"; {len(manifest['skipped'])} fleet VM(s) were not in it" if manifest["skipped"] else ""))


async def _fix_rows(settings: Settings, manifest: dict[str, Any], moved: dict[str, str]) -> int:
    """Point the restored rows at the new paths and settle the VMs that were not at rest."""
    in_backup = {vm["id"] for vm in manifest["vms"] if vm["overlay"]}
    async with aiopg.create_pool(settings.postgres_url, minsize=1, maxsize=1, timeout=10) as pool, \
            store.db.cursor(pool) as cur:
        async with cur.begin():
            # Longest first, so a folder inside another is rewritten as itself.
            for old, new in sorted(moved.items(), key=lambda item: -len(item[0])):
                await cur.execute("UPDATE vms SET overlay_path = %s || substr(overlay_path, %s) "
                                  "WHERE starts_with(overlay_path, %s)", (new + "/", len(old) + 2, old + "/"))
                await cur.execute("UPDATE vms SET jobspec = replace(jobspec::text, %s, %s)::jsonb "
                                  "WHERE jobspec IS NOT NULL", (old + "/", new + "/"))
        await cur.execute("SELECT id, state FROM vms WHERE state <> 'destroyed'")
        rows = await store.db.fetch_all(cur)
        stopped = 0
        for row in rows:
            vm_id = str(row["id"])
            if vm_id not in in_backup and row["state"] != VmState.ERROR:
                await store.vms.transition(cur, vm_id, VmState.ERROR, desired=Desired.DESTROYED,
                                           reason=f"its disk is not in backup {manifest['name']}")
            elif row["state"] in UNSETTLED:
                await store.vms.transition(cur, vm_id, VmState.STOPPED, desired=Desired.STOPPED,
                                           reason=f"restored from backup {manifest['name']}")
                stopped += 1
        return stopped
