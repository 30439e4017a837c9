"""The lifecycle engine built by hand, without aiohttp: its collaborators passed in (gateway/engine/engine.py),
on the real Postgres and Redis of the tests and the fake driver. One VM is driven through create, stop
and destroy by calling ``converge`` as a worker would, and a failed create leaves its audit entry; the
engine's modules import nothing of aiohttp or the web layer."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiopg
import pytest
import redis.asyncio as aioredis

from console import redis_keys
from drivers.fake import FakeDriver
from gateway import store
from gateway.config import Settings
from gateway.engine import storage
from gateway.engine.engine import Engine
from gateway.engine.templates import Templates
from gateway.metrics import Metrics
from gateway.states import Desired, VmState
from gateway.store.migrate import migrate
from tests.conftest import truncate_all

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def engine(app_settings: Settings, database_url: str) -> AsyncIterator[Engine]:
    """An engine on a migrated, emptied database, Redis (flushed) and a fake driver; its loops not started."""
    pool = await aiopg.create_pool(database_url, minsize=1, maxsize=4)
    client = aioredis.from_url(app_settings.redis_url, decode_responses=True)
    try:
        await migrate(pool)
        truncate_all(database_url)
        yield Engine(pool=pool, redis=client, driver=FakeDriver(), templates=Templates(app_settings.images_dir),
                     settings=app_settings, metrics=Metrics())
    finally:
        await client.aclose()
        pool.close()
        await pool.wait_closed()


async def admitted_vm(engine: Engine) -> dict[str, Any]:
    """A VM admitted as the API admits one (``provisioning``, no job yet: the engine renders it)."""
    vm_id = str(uuid.uuid4())
    async with store.db.cursor(engine.deps.pool) as cur:
        owner = await store.users.create_user(cur, f"u{uuid.uuid4().hex[:10]}@example.test", "not a hash")
        overlay = storage.overlay_path(engine.settings.vms_root, str(owner["id"]), vm_id)
        return await store.vms.admit_vm(cur, engine.settings, str(owner["id"]), {
            "id": vm_id, "name": "unit", "template": "tiny", "cpu": 1, "memory_mb": 256, "disk_gb": 1,
            "userdata": None, "overlay_path": str(overlay)})


async def ask(engine: Engine, vm_id: str, to: VmState, came_from: VmState, desired: Desired) -> None:
    """Record a user's request as the API does (a compare-and-set on the row)."""
    async with store.db.cursor(engine.deps.pool) as cur:
        assert await store.vms.transition(cur, vm_id, to, only_from=(came_from,), desired=desired) is not None


async def history(engine: Engine, vm_id: str) -> list[str]:
    async with store.db.cursor(engine.deps.pool) as cur:
        return [event["to_state"] for event in await store.vms.vm_events(cur, vm_id)]


async def audit_entries(engine: Engine, vm_id: str) -> list[tuple[str, str, str | None]]:
    async with store.db.cursor(engine.deps.pool) as cur:
        await cur.execute("SELECT action, outcome, details FROM audit_log WHERE vm_id = %s ORDER BY id", (vm_id,))
        return [(r["action"], r["outcome"], (r["details"] or {}).get("reason")) for r in await cur.fetchall()]


def operations(engine: Engine, operation: str, outcome: str) -> float:
    value = engine.deps.metrics.registry.get_sample_value(
        "vmgate_vm_operations_total", {"operation": operation, "outcome": outcome})
    return value or 0.0


async def test_one_vm_created_stopped_and_destroyed_through_converge(engine: Engine) -> None:
    driver = engine.deps.driver
    assert isinstance(driver, FakeDriver)
    vm = await admitted_vm(engine)
    vm_id, overlay = str(vm["id"]), Path(vm["overlay_path"])

    await engine.converge(vm_id)
    row = await engine.converger.row(vm_id)
    assert row is not None and row["state"] == VmState.RUNNING and row["jobspec"]
    assert await history(engine, vm_id) == ["provisioning", "starting", "running"]
    assert overlay.is_file()
    assert driver.vms[vm_id].pid is not None
    assert await engine.deps.redis.exists(redis_keys.vnc_target_key(vm_id))
    assert operations(engine, "create", "ok") == 1

    await ask(engine, vm_id, VmState.STOPPING, VmState.RUNNING, Desired.STOPPED)
    await engine.converge(vm_id)
    row = await engine.converger.row(vm_id)
    assert row is not None and (row["state"], row["desired_state"]) == ("stopped", "stopped")
    assert driver.vms[vm_id].pid is None and overlay.is_file()
    assert operations(engine, "stop", "ok") == 1

    await ask(engine, vm_id, VmState.DESTROYING, VmState.STOPPED, Desired.DESTROYED)
    await engine.converge(vm_id)
    row = await engine.converger.row(vm_id)
    assert row is not None and row["state"] == VmState.DESTROYED
    assert await history(engine, vm_id) == ["provisioning", "starting", "running", "stopping", "stopped",
                                             "destroying", "destroyed"]
    assert not overlay.exists() and vm_id not in driver.vms
    assert not await engine.deps.redis.exists(redis_keys.vnc_target_key(vm_id))
    assert operations(engine, "destroy", "ok") == 1
    assert await audit_entries(engine, vm_id) == []  # the engine audits only what failed


async def test_a_failed_create_leaves_nothing_but_its_reason(engine: Engine) -> None:
    driver = engine.deps.driver
    assert isinstance(driver, FakeDriver)
    vm = await admitted_vm(engine)
    vm_id = str(vm["id"])
    driver.fail_next_start = "no room on this host"

    await engine.converge(vm_id)
    row = await engine.converger.row(vm_id)
    assert row is not None
    assert (row["state"], row["desired_state"], row["error_reason"]) == ("error", "destroyed", "no room on this host")
    assert await history(engine, vm_id) == ["provisioning", "starting", "error"]
    assert await audit_entries(engine, vm_id) == [("vm.create", "error", "no room on this host")]
    assert operations(engine, "create", "error") == 1
    assert not Path(vm["overlay_path"]).exists() and vm_id not in driver.vms

    await engine.converge(vm_id)  # nothing more to do: no second entry
    assert await audit_entries(engine, vm_id) == [("vm.create", "error", "no room on this host")]


async def test_a_step_that_lost_a_race_does_what_is_wanted_now(engine: Engine) -> None:
    vm = await admitted_vm(engine)
    vm_id = str(vm["id"])
    row = await engine.converger.row(vm_id)
    assert row is not None
    # A destroy recorded after the worker read the row: its move from `provisioning` must not win.
    await ask(engine, vm_id, VmState.DESTROYING, VmState.PROVISIONING, Desired.DESTROYED)
    assert await engine.converger.moves.move(row, VmState.STARTING) is None
    await engine.converge(vm_id)
    assert await history(engine, vm_id) == ["provisioning", "destroying", "destroyed"]


def test_the_engine_imports_neither_aiohttp_nor_the_web_layer() -> None:
    code = ("import pkgutil, importlib, sys, gateway.engine\n"
            "for module in pkgutil.iter_modules(gateway.engine.__path__):\n"
            "    importlib.import_module(f'gateway.engine.{module.name}')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp' or m.startswith('gateway.web')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_image_verifier_hashes_a_mismatching_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that does not match its manifest is refused every time, but read whole only until it changes."""
    import json

    (tmp_path / "disk.qcow2").write_bytes(b"tampered")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"disk.qcow2": {"sha256": "0" * 64}}}))
    hashed: list[Path] = []
    real = storage.sha256_of
    monkeypatch.setattr(storage, "sha256_of", lambda path: hashed.append(path) or real(path))
    verifier = storage.ImageVerifier()
    for _ in range(3):
        with pytest.raises(storage.ImageUnavailable, match="does not match its sha256"):
            verifier.verify_sync(tmp_path, ["disk.qcow2"])
    assert len(hashed) == 1
    (tmp_path / "disk.qcow2").write_bytes(b"tampered again")  # a changed file is hashed afresh
    with pytest.raises(storage.ImageUnavailable, match="does not match its sha256"):
        verifier.verify_sync(tmp_path, ["disk.qcow2"])
    assert len(hashed) == 2
