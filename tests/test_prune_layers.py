"""`vmgate prune-layers` (gateway/cli/layers.py): a warm layer goes only when it is not current, no live VM's
job names it, no overlay under VMS_ROOT is backed by it, and `current` left it longer ago than
ORPHAN_GRACE. Real qcow2 files (qemu-img) and a real Postgres; the layers are empty disks, not booted."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from gateway.cli import layers as layers_cli
from gateway.cli.common import apply_migrations
from gateway.cli.layers import prune
from gateway.config import Settings
from tests.conftest import truncate_all

REPO = Path(__file__).resolve().parent.parent


def qcow2(path: Path, backing: Path | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    argv += ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run([*argv, str(path), "64M"], check=True)
    return path


def make_layers(images: Path, *names: str) -> dict[str, Path]:
    """IMAGES_DIR/warm/tiny/<name>/ with a disk and a manifest (read-only files, as images/warm.py leaves
    them); ``current`` points at the last one, switched an hour ago."""
    root = images / "warm" / "tiny"
    layers = {}
    for name in names:
        layer = root / name
        disk = qcow2(layer / "disk.qcow2")
        (layer / "manifest.json").write_text(json.dumps({"id": name}))
        for f in (disk, layer / "manifest.json"):
            f.chmod(0o444)
        layers[name] = layer
    set_current(root, names[-1], age=3600)
    return layers


def set_current(root: Path, name: str, age: float) -> None:
    link = root / "current"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    then = time.time() - age
    os.utime(link, (then, then), follow_symlinks=False)


def add_vm(database_url: str, user_id: str, state: str, job: dict[str, object]) -> str:
    vm_id = str(uuid.uuid4())
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x') ON CONFLICT DO NOTHING",
                    (user_id, f"{user_id}@example.test"))
        cur.execute("INSERT INTO vms (id, user_id, name, template, cpu, memory_mb, disk_gb, state, desired_state, "
                    "jobspec) VALUES (%s, %s, 'vm', 'tiny', 1, 256, 1, %s, 'running', %s)",
                    (vm_id, user_id, state, json.dumps(job)))
    conn.close()
    return vm_id


def test_prune_removes_only_the_layers_nothing_uses(app_settings: Settings, database_url: str,
                                                    tmp_path: Path) -> None:
    settings = dataclasses.replace(app_settings, images_dir=tmp_path / "images", orphan_grace=120)
    asyncio.run(apply_migrations(settings))
    truncate_all(database_url)
    layers = make_layers(settings.images_dir, "00000000000000a1", "00000000000000b2", "00000000000000c3",
                         "00000000000000d4", "00000000000000e5")
    on_disk, in_fleet, by_dead_vm, unused, current = layers.values()
    user = str(uuid.uuid4())
    # An overlay on one layer (its VM's row is gone: the collector has not taken it yet) ...
    qcow2(settings.vms_root / "users" / user / f"{uuid.uuid4()}.qcow2", on_disk / "disk.qcow2")
    # ... a fleet VM whose job names another (its overlay is on its node), and a destroyed VM's job.
    live = add_vm(database_url, user, "running", {"Meta": {"warm_layer": in_fleet.name}})
    add_vm(database_url, user, "destroyed", {"Meta": {"warm_layer": by_dead_vm.name}})
    # A build's unfinished layer is not a layer; what an interrupted prune left is removed.
    building = settings.images_dir / "warm" / "tiny" / f".{unused.name}.new.x"
    building.mkdir()
    interrupted = qcow2(settings.images_dir / "warm" / "tiny" / ".00000000000000f6.prune.1" / "disk.qcow2").parent
    # Only folders images/warm.py makes are layers: not a stray folder, nor a link to one elsewhere (as a
    # layer or as a template).
    stray = settings.images_dir / "warm" / "tiny" / "lost+found"
    stray.mkdir()
    elsewhere = qcow2(tmp_path / "elsewhere" / "00000000000000aa" / "disk.qcow2").parent
    (settings.images_dir / "warm" / "tiny" / elsewhere.name).symlink_to(elsewhere)
    (settings.images_dir / "warm" / "linked").symlink_to(elsewhere.parent)

    report = prune(settings, dry_run=True)
    assert all(layer.is_dir() for layer in layers.values()), report
    assert f"would remove {by_dead_vm.name} (0 MiB), {unused.name} (0 MiB)" in report, report

    # `current` moved 10 s ago: a create may still be on the layer it left; nothing goes.
    set_current(current.parent, current.name, age=10)
    report = prune(settings)
    assert "removed none" in report and "current moved 10 s before the VMs were read" in report, report
    assert all(layer.is_dir() for layer in layers.values()), report

    set_current(current.parent, current.name, age=3600)
    report = prune(settings)
    assert not by_dead_vm.exists() and not unused.exists(), report
    assert on_disk.is_dir() and in_fleet.is_dir() and current.is_dir() and building.is_dir()
    assert not interrupted.exists()
    assert f"{on_disk.name} (overlay " in report and f"{in_fleet.name} (VM {live})" in report, report
    assert f"{current.name} (current)" in report, report
    assert sorted(p.name for p in current.parent.iterdir()) == sorted(
        [".lock", building.name, "current", on_disk.name, in_fleet.name, current.name, stray.name, elsewhere.name])
    assert (elsewhere / "disk.qcow2").is_file() and not (elsewhere.parent / ".lock").exists()


def test_a_vm_made_while_prune_waits_for_the_lock_keeps_its_layer(app_settings: Settings, database_url: str,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # prune reads the VMs, then waits for a template's build lock (a build of it, or of the template before
    # it, may take minutes). Meanwhile a VM is made on the current layer and the build moves `current` on;
    # by the time prune has the lock the move is older than ORPHAN_GRACE, but newer than what it read.
    settings = dataclasses.replace(app_settings, images_dir=tmp_path / "images", orphan_grace=1)
    asyncio.run(apply_migrations(settings))
    truncate_all(database_url)
    old, new = make_layers(settings.images_dir, "00000000000000a1", "00000000000000b2").values()
    root = old.parent
    (root / "current").unlink()
    (root / "current").symlink_to(old)  # a link made by hand, absolute: still the current layer
    read = threading.Event()
    real_backings = layers_cli._overlay_backings

    def backings_then_say(vms_root: Path) -> list[tuple[Path, Path]]:
        found = real_backings(vms_root)
        read.set()
        return found

    monkeypatch.setattr(layers_cli, "_overlay_backings", backings_then_say)
    reports: list[str] = []
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the build
        pruner = threading.Thread(target=lambda: reports.append(prune(settings)))
        pruner.start()
        assert read.wait(30)
        add_vm(database_url, str(uuid.uuid4()), "running", {"Meta": {"warm_layer": old.name}})
        set_current(root, new.name, age=0)
        time.sleep(1.5)  # longer than ORPHAN_GRACE
    pruner.join(30)
    assert reports and old.is_dir() and new.is_dir(), reports
    assert f"{old.name} (current moved" in reports[0], reports

    report = prune(settings)  # the next prune sees the VM
    assert f"{new.name} (current)" in report and f"{old.name} (VM " in report and "removed none" in report, report


def test_an_overlay_it_cannot_read_stops_it_before_anything_goes(app_settings: Settings, database_url: str,
                                                                  tmp_path: Path) -> None:
    settings = dataclasses.replace(app_settings, images_dir=tmp_path / "images")
    asyncio.run(apply_migrations(settings))
    truncate_all(database_url)
    layers = make_layers(settings.images_dir, "00000000000000a1", "00000000000000b2")
    broken = settings.vms_root / "users" / str(uuid.uuid4()) / f"{uuid.uuid4()}.qcow2"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"QFI\xfb" + (99).to_bytes(4, "big") + bytes(504))  # a qcow2 of version 99
    env = dict(os.environ, POSTGRES_URL=database_url, VMS_ROOT=str(settings.vms_root),
               IMAGES_DIR=str(settings.images_dir))
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "prune-layers"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot tell what {broken} is backed by" in result.stderr and "nothing removed" in result.stderr
    assert all(layer.is_dir() for layer in layers.values())
