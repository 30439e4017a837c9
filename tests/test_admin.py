"""Administration (/api/admin), the audit log pages (/api/me/audit, /api/admin/audit) and the
create-admin command, on a real server, Postgres and Redis with the fake driver."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest

from drivers.base import DriverError
from tests.conftest import REPO, VM, Session, assert_envelope, declared
from tests.test_api_tokens import BearerSession, make_token, sql

PASSWORD = "correct horse battery"

ADMIN_ROUTES = [
    ("GET", "/api/admin/users", None),
    ("GET", "/api/admin/users?limit=1", None),
    ("GET", "/api/admin/users/{user}", None),
    ("PATCH", "/api/admin/users/{user}", {"quota": {"vms": 50}}),
    ("PATCH", "/api/admin/users/{user}", {"is_active": False}),
    ("GET", "/api/admin/vms", None),
    ("GET", "/api/admin/vms?include_destroyed=true", None),
    ("GET", "/api/admin/audit", None),
    ("GET", "/api/admin/audit?action=admin.", None),
]


def uid(session: Session) -> str:
    return str((session.user or {})["id"])


@pytest.fixture
async def admin(server: Any, sessions: Any, database_url: str) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login()
    sql(database_url, "UPDATE users SET role = 'admin' WHERE id = %s", uid(session))
    return session


@pytest.fixture
async def alice(server: Any, sessions: Any) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login(password=PASSWORD)
    return session


def bearer(server: Any, token: str, made: list[Session]) -> BearerSession:
    client = BearerSession(str(server.make_url("/")), token)
    made.append(client)
    return client


# ---- roles -----------------------------------------------------------------------------------------

async def test_admin_routes_are_404_to_everyone_else(server: Any, admin: Session, alice: Session, sessions: Any,
                                                     clients: list[Session], database_url: str) -> None:
    alice_token = bearer(server, (await make_token(alice))["token"], clients)
    anonymous: Session = sessions(server)
    unknown = await anonymous.request("GET", "/api/admin/no-such-route")
    for method, path, body in ADMIN_ROUTES:
        url = path.format(user=uid(admin))
        for caller in (alice, alice_token, anonymous):
            status, answer = await caller.request(method, url, json=body)
            assert_envelope(status, answer, 404, "not_found")
            assert uid(admin) not in str(answer)
            # Word for word what a route that does not exist answers: admin routes are not advertised.
            assert (status, answer) == unknown
    # None of those attempts changed the admin account.
    status, me = await admin.request("GET", "/api/me")
    assert status == 200 and me["quota"]["vms"] == 3
    # The role is read on every request: promoted, alice gets in; demoted, she is out again.
    sql(database_url, "UPDATE users SET role = 'admin' WHERE id = %s", uid(alice))
    assert (await alice.request("GET", "/api/admin/users"))[0] == 200
    assert (await alice_token.request("GET", "/api/admin/vms"))[0] == 200
    sql(database_url, "UPDATE users SET role = 'user' WHERE id = %s", uid(alice))
    assert_envelope(*await alice.request("GET", "/api/admin/users"), 404, "not_found")


async def test_admin_lists_users_and_vms_page_by_page(server: Any, admin: Session, sessions: Any) -> None:
    users: list[Session] = []
    for _ in range(3):
        s: Session = sessions(server)
        await s.signup_and_login()
        users.append(s)
    vm_ids = []
    for s in users:
        status, vm = await s.request("POST", "/api/vms?wait=60", json=VM)
        assert status == 201
        vm_ids.append(vm["vm_id"])
    assert (await users[0].request("DELETE", f"/api/vms/{vm_ids[0]}?wait=60"))[0] == 200

    seen, cursor = [], None
    while True:
        status, page = await admin.request("GET", "/api/admin/users",
                                           params={"limit": "3", **({"cursor": cursor} if cursor else {})})
        assert status == 200 and len(page["users"]) <= 3
        seen += page["users"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [u["id"] for u in seen] == [uid(s) for s in reversed([admin, *users])]  # newest first
    first = next(u for u in seen if u["id"] == uid(users[1]))
    assert first["quota"] == {"vms": 3, "vcpus": 4, "memory_mb": 2048, "disk_gb": 20, "storage_gb": 40}
    assert first["quota_overrides"] == {"vms": None, "vcpus": None, "memory_mb": None, "disk_gb": None,
                                        "storage_gb": None}
    assert declared(first["usage"]) == {"vms": 1, "vcpus": 1, "memory_mb": 256, "disk_gb": 1}
    assert first["usage"]["storage_bytes"] > 0  # its overlay, measured
    assert first["is_active"] is True and first["role"] == "user" and "password_hash" not in first
    # The destroyed VM frees its owner's share.
    assert next(u for u in seen if u["id"] == uid(users[0]))["usage"]["vms"] == 0

    email = (users[2].user or {})["email"]
    status, found = await admin.request("GET", "/api/admin/users", params={"email": email.upper()[2:9]})
    assert [u["id"] for u in found["users"]] == [uid(users[2])]
    status, one = await admin.request("GET", f"/api/admin/users/{uid(users[2])}")
    assert status == 200 and one["user"]["email"] == email

    status, live = await admin.request("GET", "/api/admin/vms")
    assert [v["vm_id"] for v in live["vms"]] == [vm_ids[2], vm_ids[1]]
    assert live["vms"][0]["user_id"] == uid(users[2]) and live["vms"][0]["owner_email"] == email
    status, everything = await admin.request("GET", "/api/admin/vms?include_destroyed=true&limit=2")
    assert len(everything["vms"]) == 2 and everything["next_cursor"]
    status, rest = await admin.request("GET", "/api/admin/vms", params={
        "include_destroyed": "true", "limit": "2", "cursor": everything["next_cursor"]})
    assert [v["vm_id"] for v in rest["vms"]] == [vm_ids[0]] and rest["next_cursor"] is None
    status, theirs = await admin.request("GET", f"/api/admin/vms?user_id={uid(users[1])}")
    assert [v["vm_id"] for v in theirs["vms"]] == [vm_ids[1]]
    status, gone = await admin.request("GET", "/api/admin/vms?state=destroyed")
    assert [v["vm_id"] for v in gone["vms"]] == [vm_ids[0]]

    for path, field in (("/api/admin/users?limit=500", "limit"), ("/api/admin/users?cursor=nope", "cursor"),
                        ("/api/admin/vms?state=happy", "state"), ("/api/admin/vms?user_id=7", "user_id"),
                        ("/api/admin/vms?include_destroyed=yes", "include_destroyed"),
                        ("/api/admin/audit?before=-1", "before"), ("/api/admin/audit?vm_id=x", "vm_id")):
        error = assert_envelope(*await admin.request("GET", path), 400, "bad_request")
        assert error["details"]["field"] == field
    for user_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        assert_envelope(*await admin.request("GET", f"/api/admin/users/{user_id}"), 404, "not_found")
        assert_envelope(*await admin.request("PATCH", f"/api/admin/users/{user_id}", json={"is_active": True}),
                        404, "not_found")


# ---- quotas ----------------------------------------------------------------------------------------

async def test_quota_override_is_shown_and_enforced(server: Any, admin: Session, alice: Session) -> None:
    url = f"/api/admin/users/{uid(alice)}"
    status, body = await admin.request("PATCH", url, json={"quota": {"vms": 1, "memory_mb": 4096}})
    assert status == 200, body
    assert body["changed"] == ["quota.vms", "quota.memory_mb"]
    assert body["user"]["quota"] == {"vms": 1, "vcpus": 4, "memory_mb": 4096, "disk_gb": 20, "storage_gb": 40}
    assert body["user"]["quota_overrides"] == {"vms": 1, "vcpus": None, "memory_mb": 4096, "disk_gb": None,
                                               "storage_gb": None}
    status, me = await alice.request("GET", "/api/me")
    assert me["quota"] == {"vms": 1, "vcpus": 4, "memory_mb": 4096, "disk_gb": 20, "storage_gb": 40}

    assert (await alice.request("POST", "/api/vms?wait=60", json=VM))[0] == 201
    error = assert_envelope(*await alice.request("POST", "/api/vms?wait=60", json=VM), 403, "quota_exceeded")
    assert error["details"]["exceeded"]["vms"] == {"quota": 1, "used": 1, "requested": 1}

    # Lowering below what is in use keeps the running VM and refuses new ones; null restores the default.
    status, body = await admin.request("PATCH", url, json={"quota": {"vms": 0}})
    assert status == 200 and body["user"]["usage"]["vms"] == 1
    assert (await alice.request("GET", "/api/me/vms"))[1]["vms"][0]["state"] == "running"
    status, body = await admin.request("PATCH", url, json={"quota": {"vms": None, "memory_mb": None}})
    assert status == 200 and body["user"]["quota"] == {"vms": 3, "vcpus": 4, "memory_mb": 2048, "disk_gb": 20,
                                                         "storage_gb": 40}
    assert (await alice.request("POST", "/api/vms?wait=60", json=VM))[0] == 201
    # Setting what is already set changes nothing and is not audited.
    status, body = await admin.request("PATCH", url, json={"quota": {"vms": None}})
    assert status == 200 and body["changed"] == []

    status, audit = await admin.request("GET", "/api/admin/audit?action=admin.user.quota")
    entries = audit["entries"]
    assert [e["details"]["after"] for e in entries] == [{"vms": None, "memory_mb": None}, {"vms": 0},
                                                        {"vms": 1, "memory_mb": 4096}]
    assert entries[-1]["details"]["before"] == {"vms": None, "memory_mb": None}
    assert all(e["user_id"] == uid(admin) and e["details"]["target_user_id"] == uid(alice) for e in entries)


@pytest.mark.parametrize(("body", "field"), [
    ({}, "quota"),
    ({"quota": 5}, "quota"),
    ({"quota": {"cpu": 2}}, "quota.cpu"),
    ({"quota": {"vms": -1}}, "quota.vms"),
    ({"quota": {"vms": 10001}}, "quota.vms"),
    ({"quota": {"vcpus": "4"}}, "quota.vcpus"),
    ({"quota": {"disk_gb": True}}, "quota.disk_gb"),
    ({"quota": {"memory_mb": 1.5}}, "quota.memory_mb"),
    ({"is_active": "false"}, "is_active"),
    ({"is_active": None}, "is_active"),
    ({"role": "admin"}, "role"),
])
async def test_patch_bad_input(server: Any, admin: Session, alice: Session, body: dict[str, Any],
                               field: str) -> None:
    error = assert_envelope(*await admin.request("PATCH", f"/api/admin/users/{uid(alice)}", json=body), 422,
                            "validation_failed")
    assert error["details"]["field"] == field
    status, me = await alice.request("GET", "/api/me")
    assert status == 200 and me["quota"]["vms"] == 3


# ---- disabling -------------------------------------------------------------------------------------

async def test_disabling_a_user_locks_them_out_and_stops_their_vms(server: Any, admin: Session, alice: Session,
                                                                    sessions: Any, clients: list[Session]) -> None:
    script = bearer(server, (await make_token(alice))["token"], clients)
    running = []
    for _ in range(2):
        status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
        assert status == 201
        running.append(vm["vm_id"])
    status, stopped = await script.request("POST", "/api/vms?wait=60", json=VM)
    assert (await alice.request("POST", f"/api/vms/{stopped['vm_id']}/stop?wait=60"))[0] == 200

    status, body = await admin.request("PATCH", f"/api/admin/users/{uid(alice)}", json={"is_active": False})
    assert status == 200, body
    assert body["changed"] == ["is_active"] and body["user"]["is_active"] is False
    assert body["tokens_revoked"] == 1 and body["failed_vms"] == []
    assert sorted(body["stopped_vms"]) == sorted(running)

    # Cookie session, API token and login are all refused now.
    assert_envelope(*await alice.request("GET", "/api/me"), 401, "not_authenticated")
    assert_envelope(*await script.request("GET", "/api/me"), 401, "invalid_token")
    fresh: Session = sessions(server)
    email = (alice.user or {})["email"]
    assert_envelope(*await fresh.request("POST", "/api/auth/login", json={"email": email, "password": PASSWORD}),
                    401, "invalid_credentials")
    # Her VMs are stopped (disks kept), in the database and in the driver.
    status, vms = await admin.request("GET", f"/api/admin/vms?user_id={uid(alice)}")
    assert {v["state"] for v in vms["vms"]} == {"stopped"} and len(vms["vms"]) == 3
    for vm_id in running:
        assert (await server.driver.status(vm_id)).state == "stopped"
    status, audit = await admin.request("GET", f"/api/admin/audit?user_id={uid(admin)}&action=admin.user.")
    [entry] = audit["entries"]
    assert entry["action"] == "admin.user.disable" and entry["details"]["target_user_id"] == uid(alice)
    assert sorted(entry["details"]["vms_to_stop"]) == sorted(running)

    # Enabled again, she logs in afresh; the old session and the revoked token stay dead.
    status, body = await admin.request("PATCH", f"/api/admin/users/{uid(alice)}", json={"is_active": True})
    assert status == 200 and body["changed"] == ["is_active"] and body["user"]["is_active"] is True
    assert_envelope(*await alice.request("GET", "/api/me"), 401, "not_authenticated")
    assert_envelope(*await script.request("GET", "/api/me"), 401, "invalid_token")
    assert (await fresh.request("POST", "/api/auth/login", json={"email": email, "password": PASSWORD}))[0] == 200
    status, audit = await admin.request("GET", "/api/admin/audit?action=admin.user.")
    assert [e["action"] for e in audit["entries"]] == ["admin.user.enable", "admin.user.disable"]


async def test_disable_reports_a_vm_that_would_not_stop(server: Any, admin: Session, alice: Session) -> None:
    made = [(await alice.request("POST", "/api/vms?wait=60", json=VM))[1]["vm_id"] for _ in range(3)]
    stuck = made[1]
    real_stop = server.driver.stop

    async def stop(vm_id: str, timeout: float) -> None:
        if vm_id == stuck:
            raise DriverError("QEMU ignored the stop (injected)")
        await real_stop(vm_id, timeout)

    server.driver.stop = stop
    status, body = await admin.request("PATCH", f"/api/admin/users/{uid(alice)}", json={"is_active": False})
    assert status == 200, body
    assert sorted(body["stopped_vms"]) == sorted(set(made) - {stuck})
    [failure] = body["failed_vms"]
    assert failure["vm_id"] == stuck and failure["error"]["code"] == "stop_failed"
    assert "injected" in failure["error"]["message"]
    assert body["user"]["is_active"] is False


async def test_admin_cannot_disable_themselves(server: Any, admin: Session) -> None:
    assert_envelope(*await admin.request("PATCH", f"/api/admin/users/{uid(admin)}", json={"is_active": False}),
                    409, "cannot_disable_self")
    assert (await admin.request("GET", "/api/admin/users"))[0] == 200


# ---- audit -----------------------------------------------------------------------------------------

async def test_my_audit_pages_newest_first(server: Any, alice: Session) -> None:
    for _ in range(2):
        status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
        assert (await alice.request("POST", f"/api/vms/{vm['vm_id']}/stop?wait=60"))[0] == 200
    status, everything = await alice.request("GET", "/api/me/audit")
    assert status == 200 and everything["next_before"] is None
    entries = everything["entries"]
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids, reverse=True)
    assert [e["action"] for e in entries[:4]] == ["vm.stop", "vm.create", "vm.stop", "vm.create"]
    assert {"user.signup", "user.login"} <= {e["action"] for e in entries}
    assert set(entries[0]) == {"id", "at", "action", "outcome", "vm_id", "ip", "details"}
    assert entries[0]["vm_id"] == vm["vm_id"] and entries[0]["ip"] == "127.0.0.1"

    walked, before = [], None
    while True:
        status, page = await alice.request("GET", "/api/me/audit",
                                           params={"limit": "3", **({"before": str(before)} if before else {})})
        walked += [e["id"] for e in page["entries"]]
        before = page["next_before"]
        if before is None:
            break
    assert walked == ids
    for params in ({"limit": "0"}, {"limit": "201"}, {"before": "abc"}, {"before": "0"}):
        assert_envelope(*await alice.request("GET", "/api/me/audit", params=params), 400, "bad_request")


async def test_admin_audit_sees_everyone(server: Any, admin: Session, alice: Session) -> None:
    status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
    status, audit = await admin.request("GET", "/api/admin/audit")
    assert status == 200
    owners = {e["user_id"] for e in audit["entries"]}
    assert {uid(admin), uid(alice)} <= owners
    status, for_vm = await admin.request("GET", f"/api/admin/audit?vm_id={vm['vm_id']}")
    assert [(e["action"], e["user_id"]) for e in for_vm["entries"]] == [("vm.create", uid(alice))]
    status, hers = await admin.request("GET", f"/api/admin/audit?user_id={uid(alice)}&limit=1")
    assert len(hers["entries"]) == 1 and hers["next_before"] == hers["entries"][0]["id"]


# ---- the create-admin command ----------------------------------------------------------------------

async def cli(database_url: str, *args: str, stdin: str = "") -> tuple[int, str, str]:
    env = {**os.environ, "POSTGRES_URL": database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=REPO, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def login(server: Any, sessions: Any, email: str, password: str) -> Session:
    session: Session = sessions(server)
    status, body = await session.request("POST", "/api/auth/login", json={"email": email, "password": password})
    assert status == 200, body
    session.user, session.csrf_token = body["user"], body["csrf_token"]
    return session


async def test_cli_creates_the_first_admin(server: Any, sessions: Any, alice: Session, database_url: str) -> None:
    rc, out, err = await cli(database_url, "create-admin", "--email", "Root@Example.test", "--password-stdin",
                             stdin="a strong admin password\n")
    assert rc == 0, err
    assert "created admin Root@Example.test" in out and "a strong admin password" not in out + err
    root = await login(server, sessions, "root@example.test", "a strong admin password")
    assert root.user and root.user["role"] == "admin" and root.user["email_verified"] is True
    assert (await root.request("GET", "/api/admin/users"))[0] == 200
    status, audit = await root.request("GET", "/api/me/audit")
    assert status == 200 and "admin.create" in [e["action"] for e in audit["entries"]]

    # The same email again (in any case) is refused and changes nothing.
    rc, out, err = await cli(database_url, "create-admin", "--email", "ROOT@example.test", "--password-stdin",
                             stdin="another password here\n")
    assert rc == 1 and "already exists" in err and "--promote" in err
    await login(server, sessions, "root@example.test", "a strong admin password")

    # An existing user is promoted only when asked, and keeps their password.
    email = (alice.user or {})["email"]
    rc, out, err = await cli(database_url, "create-admin", "--email", email)
    assert rc == 1 and "already exists" in err
    assert_envelope(*await alice.request("GET", "/api/admin/users"), 404)
    rc, out, err = await cli(database_url, "create-admin", "--email", email, "--promote")
    assert rc == 0 and "promoted" in out, err
    assert (await alice.request("GET", "/api/admin/users"))[0] == 200
    rc, out, err = await cli(database_url, "create-admin", "--email", email, "--promote")
    assert rc == 0 and "already an admin" in out


async def test_cli_generates_a_password_and_checks_input(server: Any, sessions: Any, database_url: str) -> None:
    rc, out, err = await cli(database_url, "create-admin", "--email", "gen@example.test", "--generate-password")
    assert rc == 0, err
    password = out.split("password (shown only this once): ", 1)[1].strip()
    assert len(password) >= 24
    await login(server, sessions, "gen@example.test", password)

    for args, stdin, message in (
        (["--email", "not-an-email", "--generate-password"], "", "not an email address"),
        (["--email", "short@example.test", "--password-stdin"], "short\n", "10 to 1024 characters"),
        # No terminal and no password option: it will not guess.
        (["--email", "quiet@example.test"], "", "--password-stdin"),
    ):
        rc, out, err = await cli(database_url, "create-admin", *args, stdin=stdin)
        assert rc == 1 and message in err, (args, err)
    assert not sql(database_url, "SELECT 1 FROM users WHERE email IN ('short@example.test', 'quiet@example.test')")
    rc, out, err = await cli("postgresql://nobody:nothing@127.0.0.1:1/none", "create-admin", "--email",
                             "x@example.test", "--generate-password")
    assert rc == 3 and "cannot use Postgres at 127.0.0.1:1" in err and "nothing" not in err
