"""Quota admission under concurrency, against the real Postgres: 20 simultaneous creates by one user
at the edge of their quota never exceed it, whichever resource is the limit; ``GET /api/me`` agrees
with a direct count over ``vms`` afterwards; and VMs in ``error`` or ``destroyed`` hold no share."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from drivers.fake import FakeDriver
from gateway.config import Settings
from tests.conftest import VM, Session, assert_envelope, declared
from tests.test_api_tokens import BearerSession, make_token, sql

CONCURRENT = 20
RESOURCES = ("vms", "vcpus", "memory_mb", "disk_gb")
ROOMY = {"quota_max_vms": 100, "quota_vcpus": 100, "quota_memory_mb": 10**6, "quota_disk_gb": 10**4}


@pytest.fixture
def fake_driver() -> FakeDriver:
    # A short boot keeps many creates in flight at once, past admission and before "running".
    return FakeDriver(boot_delay=0.05)


@pytest.fixture
async def user(server: Any, sessions: Any) -> Any:
    session: Session = sessions(server)
    await session.signup_and_login()
    bearer = BearerSession(str(server.make_url("/")), (await make_token(session))["token"])
    yield session, bearer
    await bearer.close()


def set_quota(database_url: str, user_id: str, **columns: int) -> None:
    sets = ", ".join(f"{column} = %s" for column in columns)
    sql(database_url, f"UPDATE users SET {sets} WHERE id = %s", *columns.values(), user_id)  # noqa: S608


def counted(database_url: str, user_id: str) -> dict[str, int]:
    """Usage straight from the vms table: every VM not in error or destroyed."""
    [row] = sql(database_url, "SELECT count(*), coalesce(sum(cpu), 0), coalesce(sum(memory_mb), 0),"
                " coalesce(sum(disk_gb), 0) FROM vms WHERE user_id = %s AND state NOT IN ('error', 'destroyed')",
                user_id)
    return dict(zip(RESOURCES, (int(v) for v in row), strict=True))


async def check_books(session: Session, database_url: str, user_id: str) -> dict[str, Any]:
    """/api/me's usage equals the table's, is within quota, and no VM is left half-made."""
    status, me = await session.request("GET", "/api/me")
    assert status == 200
    assert declared(me["usage"]) == counted(database_url, user_id)
    for name in RESOURCES:
        assert me["usage"][name] <= me["quota"][name], (name, me)
    assert not sql(database_url, "SELECT id, state FROM vms WHERE user_id = %s AND state NOT IN"
                   " ('running', 'stopped', 'error', 'destroyed')", user_id)
    return me


async def race(clients: list[Session], body: dict[str, Any]) -> list[tuple[int, Any]]:
    """CONCURRENT creates at once, alternating between the user's cookie session and API token."""
    return await asyncio.gather(*(clients[i % len(clients)].request("POST", "/api/vms?wait=60", json=body)
                                  for i in range(CONCURRENT)))


@pytest.mark.parametrize(("limit", "quota", "before", "each", "fits"), [
    # 3 VMs allowed, 2 made beforehand: one more fits.
    ("vms", {"quota_max_vms": 3}, 2, {}, 1),
    # 5 vCPUs, 2 per VM: two fit, the third would need 6.
    ("vcpus", {"quota_vcpus": 5}, 0, {"cpu": 2}, 2),
    # 1000 MB, 256 MB per VM (one made beforehand): two more fit.
    ("memory_mb", {"quota_memory_mb": 1000}, 1, {"memory_mb": 256}, 2),
    # 7 GB, 2 GB per VM: three fit.
    ("disk_gb", {"quota_disk_gb": 7}, 0, {"disk_gb": 2}, 3),
])
async def test_concurrent_creates_never_exceed_quota(server: Any, user: tuple[Session, BearerSession],
                                                     database_url: str, app_settings: Settings, limit: str,
                                                     quota: dict[str, int], before: int, each: dict[str, Any],
                                                     fits: int) -> None:
    session, bearer = user
    user_id = str((session.user or {})["id"])
    set_quota(database_url, user_id, **{**ROOMY, **quota})
    body = {**VM, **each}
    for _ in range(before):
        assert (await session.request("POST", "/api/vms?wait=60", json=body))[0] == 201

    answers = await race([session, bearer], body)

    made = [vm for status, vm in answers if status == 201]
    refused = [(status, error) for status, error in answers if status != 201]
    assert len(made) == fits, answers
    for status, error in refused:
        details = assert_envelope(status, error, 403, "quota_exceeded")["details"]
        assert limit in details["exceeded"]
    assert all(vm["state"] == "running" for vm in made)
    me = await check_books(session, database_url, user_id)
    assert me["usage"]["vms"] == before + fits
    # Nothing was half-made for the refused ones: no rows, overlays or processes beyond the admitted.
    assert int(sql(database_url, "SELECT count(*) FROM vms WHERE user_id = %s", user_id)[0][0]) == before + fits
    assert len(list(Path(app_settings.vms_root).glob("users/*/*.qcow2"))) == before + fits
    running = [vm_id for vm_id in server.driver.vms if (await server.driver.status(vm_id)).state == "running"]
    assert len(running) == before + fits
    outcomes = dict(sql(database_url, "SELECT outcome, count(*) FROM audit_log WHERE user_id = %s"
                        " AND action = 'vm.create' GROUP BY outcome", user_id))
    assert outcomes == {"accepted": before + fits, "denied": CONCURRENT - fits}


async def test_error_and_destroyed_vms_free_their_share(server: Any, user: tuple[Session, BearerSession],
                                                        database_url: str) -> None:
    session, bearer = user
    user_id = str((session.user or {})["id"])
    # A create that fails after admission ends in `error` and holds nothing.
    server.driver.fail_next_start = "injected failure"
    error = assert_envelope(*await session.request("POST", "/api/vms?wait=60", json=VM), 503, "provisioning_failed")
    failed_id = error["details"]["vm_id"]
    made = []
    for _ in range(3):  # the default quota: 3 VMs, the error VM not among them
        status, vm = await session.request("POST", "/api/vms?wait=60", json=VM)
        assert status == 201, vm
        made.append(vm["vm_id"])
    assert_envelope(*await session.request("POST", "/api/vms?wait=60", json=VM), 403, "quota_exceeded")
    me = await check_books(session, database_url, user_id)
    assert declared(me["usage"]) == {"vms": 3, "vcpus": 3, "memory_mb": 768, "disk_gb": 3}
    assert sql(database_url, "SELECT state FROM vms WHERE id = %s", failed_id) == [("error",)]

    # A stopped VM still holds its share; a destroyed one does not, and the race for the freed slot
    # admits exactly one.
    assert (await session.request("POST", f"/api/vms/{made[0]}/stop?wait=60"))[0] == 200
    assert_envelope(*await session.request("POST", "/api/vms?wait=60", json=VM), 403, "quota_exceeded")
    assert (await bearer.request("DELETE", f"/api/vms/{made[0]}?wait=60"))[0] == 200
    answers = await race([session, bearer], VM)
    assert sorted(status for status, _ in answers) == [201] + [403] * (CONCURRENT - 1)
    await check_books(session, database_url, user_id)
    # Deleting the error VM changes nothing: it held nothing.
    assert (await session.request("DELETE", f"/api/vms/{failed_id}?wait=60"))[0] == 200
    assert (await check_books(session, database_url, user_id))["usage"]["vms"] == 3


async def test_creates_racing_a_destroy_stay_within_quota(server: Any, user: tuple[Session, BearerSession],
                                                          database_url: str) -> None:
    session, bearer = user
    user_id = str((session.user or {})["id"])
    made = [(await session.request("POST", "/api/vms?wait=60", json=VM))[1]["vm_id"] for _ in range(3)]
    destroy = bearer.request("DELETE", f"/api/vms/{made[1]}?wait=60")
    answers = await asyncio.gather(destroy, race([session, bearer], VM))
    assert answers[0][0] == 200
    created = [status for status, _ in answers[1] if status == 201]
    assert len(created) <= 1  # only the destroyed VM's slot can have been taken
    me = await check_books(session, database_url, user_id)
    assert me["usage"]["vms"] == 2 + len(created)
