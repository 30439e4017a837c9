"""Backups (issue 16): `vmgate backup` taken from a running stack, with a VM running, one suspended and one
stopped, restores with `vmgate restore` onto a new database, VM root and images folder; the restored user
logs in, sees the VMs, starts the one that ran with its disk as it was and resumes the suspended one with
its memory as it was. A restore refuses a database with users and a
damaged backup."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import redis

from gateway.config import Settings
from gateway.web.app import create_app
from gateway.web.appkeys import driver_key
from jobspecs.manifest import sha256_of
from tests.conftest import Session, release_vms_under, short_vms_root, truncate_all
from tests.fixtures.qemu import type_text, wait_for_serial

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
VM = {"template": "tiny", "cpu": 1, "memory_mb": 256, "disk_gb": 1}
READY = "vmgate-tiny: ready"
PASSWORD = "correct horse battery"


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's command, configured as ``settings`` (the environment wins over .env)."""
    env = dict(os.environ, POSTGRES_URL=settings.postgres_url, REDIS_URL=settings.redis_url,
               VMS_ROOT=str(settings.vms_root), IMAGES_DIR=str(settings.images_dir), DATA_DIR=str(settings.data_dir),
               VMGATE_DRIVER="local")
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture
def restore_db(database_url: str) -> Iterator[str]:
    """An empty database beside the test one: the new machine's."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/") + "_restore"
    admin = psycopg2.connect(urlunsplit(parts._replace(path="/postgres")))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path="/" + name))
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def second_vms_root() -> Iterator[Path]:
    """The new machine's VM root."""
    with short_vms_root("vgb") as root:
        yield root


async def guest_says(driver: Any, vm_id: str, command: str, needle: str) -> None:
    """Type ``command`` on the VM's console and wait for ``needle`` on its serial port."""
    await type_text(driver.task_dir(vm_id) / "qmp.sock", command + "\n")
    await wait_for_serial(driver, vm_id, needle, timeout=60)


async def test_a_backup_of_a_running_stack_restores_on_a_clean_data_dir(
        aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path, database_url: str, restore_db: str,
        second_vms_root: Path, sessions: Any, redis_flush: redis.Redis, tmp_path: Path) -> None:
    old = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local",
                              data_dir=tmp_path / "old-data")
    gateway = await aiohttp_server(create_app(old))
    truncate_all(database_url)
    s: Session = sessions(gateway)
    email = "keeper@example.test"
    await s.signup_and_login(email, PASSWORD)
    driver = gateway.app[driver_key]

    status, running = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, running
    await wait_for_serial(driver, running["vm_id"], READY)
    await guest_says(driver, running["vm_id"],
                     "echo kept-in-backup > /root/marker; sync; echo marker-written > /dev/ttyS0", "marker-written")
    status, asleep = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, asleep
    await wait_for_serial(driver, asleep["vm_id"], READY)
    # A shell variable lives in memory only: it is back after a resume, not after a boot.
    await guest_says(driver, asleep["vm_id"], "X=only-in-memory; echo set > /dev/ttyS0", "set")
    status, body = await s.request("POST", f"/api/vms/{asleep['vm_id']}/suspend?wait=60")
    assert status == 200 and body["state"] == "suspended", body
    status, stopped = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, stopped
    status, body = await s.request("POST", f"/api/vms/{stopped['vm_id']}/stop?wait=60")
    assert status == 200 and body["state"] == "stopped", body

    # The backup, with the gateway up and one VM running: it is paused for its copy and runs on.
    result = await asyncio.to_thread(cli, old, "backup", "--out", str(tmp_path / "backups"))
    assert result.returncode == 0, result.stdout + result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "backups" and folder.is_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    by_id = {vm["id"]: vm for vm in manifest["vms"]}
    assert set(by_id) == {running["vm_id"], stopped["vm_id"], asleep["vm_id"]} and manifest["skipped"] == []
    assert "memory" in by_id[asleep["vm_id"]]
    assert by_id[running["vm_id"]]["running"] and not by_id[stopped["vm_id"]]["running"]
    assert "tiny" in manifest["images"] and "db.dump" in manifest["files"]
    status, body = await s.request("GET", f"/api/vms/{running['vm_id']}")
    assert body["state"] == "running"
    await guest_says(driver, running["vm_id"], "echo still-running > /dev/ttyS0", "still-running")

    # The machine is lost: the gateway, its VMs and Redis go; the backup folder is all that is left.
    await gateway.close()
    release_vms_under(old.vms_root)
    redis_flush.flushdb()

    new = dataclasses.replace(app_settings, postgres_url=restore_db, vms_root=second_vms_root,
                              images_dir=tmp_path / "new-images", driver="local", data_dir=tmp_path / "new-data")
    result = await asyncio.to_thread(cli, new, "restore", str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 VM(s) that were running" in result.stdout

    gateway = await aiohttp_server(create_app(new))
    s = sessions(gateway)
    status, body = await s.request("POST", "/api/auth/login", json={"email": email, "password": PASSWORD})
    assert status == 200, body
    s.csrf_token, user_id = body["csrf_token"], body["user"]["id"]
    status, body = await s.request("GET", "/api/me/vms")
    assert status == 200
    states = {vm["vm_id"]: vm["state"] for vm in body["vms"]}
    assert states == {running["vm_id"]: "stopped", stopped["vm_id"]: "stopped", asleep["vm_id"]: "suspended"}, body

    status, body = await s.request("POST", f"/api/vms/{running['vm_id']}/start?wait=90")
    assert status == 200 and body["state"] == "running", body
    driver = gateway.app[driver_key]
    await wait_for_serial(driver, running["vm_id"], READY)
    await guest_says(driver, running["vm_id"], "cat /root/marker > /dev/ttyS0", "kept-in-backup")
    assert (second_vms_root / "users" / user_id / f"{running['vm_id']}.qcow2").is_file()
    status, body = await s.request("POST", f"/api/vms/{asleep['vm_id']}/start?wait=90")
    assert status == 200 and body["state"] == "running", body
    await guest_says(driver, asleep["vm_id"], "echo $X > /dev/ttyS0", "only-in-memory")
    for vm_id in (running["vm_id"], stopped["vm_id"], asleep["vm_id"]):
        status, body = await s.request("DELETE", f"/api/vms/{vm_id}?wait=60")
        assert status == 200 and body["state"] == "destroyed", body

    # Now the database has a user: a second restore is refused, and so is a damaged backup.
    result = await asyncio.to_thread(cli, new, "restore", str(folder))
    assert result.returncode == 1 and "already has 1 user" in result.stderr, result.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    with (damaged / "db.dump").open("r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    result = await asyncio.to_thread(cli, new, "restore", "--force", str(damaged))
    assert result.returncode == 1 and "does not match the manifest" in result.stderr, result.stderr

    # A restore that fails once it has begun leaves the database as it was and takes the VM files it copied
    # away again. Twice: a dump its manifest vouches for but cut short (pg_restore fails before anything
    # changed), and a load that fails half-way (a guard in the database refuses the `vms` table after the
    # old schema was dropped and the dump's first tables made): the drop is rolled back with it.
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    dump = cut / "db.dump"
    dump.write_bytes(dump.read_bytes()[:dump.stat().st_size * 2 // 3])
    manifest = json.loads((cut / "manifest.json").read_text())
    manifest["files"]["db.dump"] = sha256_of(dump)
    (cut / "manifest.json").write_text(json.dumps(manifest))
    result = await asyncio.to_thread(cli, new, "restore", "--force", str(cut))
    assert result.returncode == 1 and "pg_restore failed" in result.stderr, result.stderr
    await still_as_it_was(s, restore_db, second_vms_root, email, user_id)

    with psycopg2.connect(restore_db) as conn, conn.cursor() as cur:
        cur.execute("CREATE SCHEMA guard")
        cur.execute("CREATE FUNCTION guard.refuse() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() WHERE object_identity = 'public.vms') "
                    "THEN RAISE EXCEPTION 'guard: no vms table here'; END IF; END $$")
        cur.execute("CREATE EVENT TRIGGER refuse_vms ON ddl_command_end EXECUTE FUNCTION guard.refuse()")
    conn.close()
    result = await asyncio.to_thread(cli, new, "restore", "--force", str(folder))
    assert result.returncode == 1 and "psql failed" in result.stderr, result.stderr
    assert "guard: no vms table here" in result.stderr, result.stderr
    await still_as_it_was(s, restore_db, second_vms_root, email, user_id)

    # A failure after the load (here the rows' new paths: a guard refuses any update of the new `vms`):
    # the VM files go again, the operator is told the database is the backup's, and the same restore with
    # --force, the guard gone, does it all.
    with psycopg2.connect(restore_db) as conn, conn.cursor() as cur:
        cur.execute("DROP EVENT TRIGGER refuse_vms")
        cur.execute("CREATE FUNCTION guard.refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "RAISE EXCEPTION 'guard: no updates of vms'; END $$")
        cur.execute("CREATE FUNCTION guard.on_vms() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() WHERE object_identity = 'public.vms' "
                    "AND command_tag = 'CREATE TABLE') THEN CREATE TRIGGER no_update BEFORE UPDATE ON public.vms "
                    "FOR EACH STATEMENT EXECUTE FUNCTION guard.refuse_update(); END IF; END $$")
        cur.execute("CREATE EVENT TRIGGER guard_vms ON ddl_command_end EXECUTE FUNCTION guard.on_vms()")
    conn.close()
    result = await asyncio.to_thread(cli, new, "restore", "--force", str(folder))
    assert result.returncode == 1 and "the backup's database is loaded, but finishing it failed" in result.stderr
    assert "guard: no updates of vms" in result.stderr and "run the same restore with --force" in result.stderr
    assert sorted(p.name for p in (second_vms_root / "users").rglob("*") if p.is_file()) == []
    with psycopg2.connect(restore_db) as conn, conn.cursor() as cur:
        cur.execute("DROP EVENT TRIGGER guard_vms")
        cur.execute("DROP SCHEMA guard CASCADE")
    conn.close()
    result = await asyncio.to_thread(cli, new, "restore", "--force", str(folder))
    assert result.returncode == 0, result.stderr
    assert (second_vms_root / "users" / user_id / f"{running['vm_id']}.qcow2").is_file()


async def still_as_it_was(s: Session, database_url: str, vms_root: Path, email: str, user_id: str) -> None:
    """After a failed restore: the one user, their three VMs destroyed, no VM file, and the user logs in."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT id::text, email FROM users")
        assert cur.fetchall() == [(user_id, email)]
        cur.execute("SELECT state, count(*) FROM vms GROUP BY state")
        assert cur.fetchall() == [("destroyed", 3)]
    conn.close()
    assert sorted(p.name for p in (vms_root / "users").rglob("*") if p.is_file()) == []
    status, body = await s.request("POST", "/api/auth/login", json={"email": email, "password": PASSWORD})
    assert status == 200 and body["user"]["id"] == user_id, body

