"""The REST API through a real server on a real Postgres and Redis, with the in-memory fake driver
(the real QEMU path is covered by tests/test_e2e.py and tests/test_driver_local.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from console import redis_keys
from drivers.fake import FakeDriver
from gateway.config import Settings
from gateway.web.app import create_app
from tests.conftest import VM, Session, assert_envelope, declared, truncate_all


@pytest.fixture
async def alice(server: Any, sessions: Any) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login()
    return session


@pytest.fixture
async def bob(server: Any, sessions: Any) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login()
    return session


# ---- accounts --------------------------------------------------------------------------------------

async def test_signup_login_me_logout(server: Any, sessions: Any) -> None:
    s: Session = sessions(server)
    status, body = await s.request("POST", "/api/auth/signup",
                                   json={"email": "Ada@Example.test", "password": "a long enough password"})
    assert status == 201
    assert body["user"]["email"] == "Ada@Example.test"
    assert "password" not in json.dumps(body)

    async with s.http.post(s.base_url + "/api/auth/login",
                           json={"email": "ada@example.test", "password": "a long enough password"}) as resp:
        assert resp.status == 200
        set_cookies = {c.split("=", 1)[0]: c for c in resp.headers.getall("Set-Cookie")}
        s.csrf_token = (await resp.json())["csrf_token"]
    session_cookie = set_cookies["vmgate_session"]
    assert "HttpOnly" in session_cookie and "SameSite=Lax" in session_cookie and "Path=/" in session_cookie
    assert "Secure" not in session_cookie  # PUBLIC_URL is http in the tests
    # The CSRF cookie is for the page's script to read and echo: not HttpOnly, same value as returned.
    assert "HttpOnly" not in set_cookies["vmgate_csrf"] and s.csrf_token in set_cookies["vmgate_csrf"]
    cookie = s.http.cookie_jar.filter_cookies(server.make_url("/"))["vmgate_session"]

    status, body = await s.request("GET", "/api/me")
    assert status == 200
    assert body["user"]["email"] == "Ada@Example.test"
    assert body["quota"] == {"vms": 3, "vcpus": 4, "memory_mb": 2048, "disk_gb": 20, "storage_gb": 40}
    assert body["usage"] == {"vms": 0, "vcpus": 0, "memory_mb": 0, "disk_gb": 0, "storage_bytes": 0}
    assert (await s.request("GET", "/api/me/vms")) == (200, {"vms": []})

    stolen = cookie.value
    status, _ = await s.request("POST", "/api/auth/logout")
    assert status == 200
    assert_envelope(*await s.request("GET", "/api/me"), 401, "not_authenticated")
    # The old cookie, replayed after logout, is refused: logout is enforced on the server.
    status, body = await s.request("GET", "/api/me", cookies={"vmgate_session": stolen})
    assert_envelope(status, body, 401)


async def test_login_failures_are_401(server: Any, alice: Session, sessions: Any) -> None:
    s: Session = sessions(server)
    email = alice.user["email"] if alice.user else ""
    for creds in ({"email": email, "password": "wrong password!!"},
                  {"email": "nobody@example.test", "password": "wrong password!!"}):
        status, body = await s.request("POST", "/api/auth/login", json=creds)
        assert_envelope(status, body, 401, "invalid_credentials")
    status, body = await s.request("GET", "/api/me", cookies={"vmgate_session": "forged.jwt.value"})
    assert_envelope(status, body, 401)


async def test_signup_duplicate_email_is_409(server: Any, sessions: Any) -> None:
    s: Session = sessions(server)
    creds = {"email": "dup@example.test", "password": "a long enough password"}
    assert (await s.request("POST", "/api/auth/signup", json=creds))[0] == 201
    creds["email"] = "DUP@example.test"
    assert_envelope(*await s.request("POST", "/api/auth/signup", json=creds), 409, "email_taken")


@pytest.mark.parametrize(("kwargs", "status", "code", "field"), [
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json", None),
    ({"data": b"[1, 2]", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json", None),
    ({"data": b"email=a", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415,
     "unsupported_media_type", None),
    ({"json": {"password": "a long enough password"}}, 422, "validation_failed", "email"),
    ({"json": {"email": 5, "password": "a long enough password"}}, 422, "validation_failed", "email"),
    ({"json": {"email": "not-an-email", "password": "a long enough password"}}, 422, "validation_failed", "email"),
    ({"json": {"email": "x@example.test", "password": "short"}}, 422, "validation_failed", "password"),
    ({"json": {"email": "x@example.test", "password": ["list"]}}, 422, "validation_failed", "password"),
    ({"json": {"email": "x@example.test", "password": "p" * 2000}}, 422, "validation_failed", "password"),
    ({"json": {"email": "x@example.test", "password": "a long enough password", "admin": True}}, 422,
     "validation_failed", "admin"),
    ({"data": b"{" + b" " * (300 * 1024) + b"}", "headers": {"Content-Type": "application/json"}}, 413,
     "payload_too_large", None),
])
async def test_signup_bad_input(server: Any, sessions: Any, kwargs: dict[str, Any], status: int, code: str,
                                field: str | None) -> None:
    s: Session = sessions(server)
    error = assert_envelope(*await s.request("POST", "/api/auth/signup", **kwargs), status, code)
    if field:
        assert error["details"]["field"] == field


# ---- the envelope everywhere ------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/api/nope", 404, "not_found"),
    ("PUT", "/api/auth/login", 405, "method_not_allowed"),
    ("GET", "/api/me", 401, "not_authenticated"),
    ("GET", "/api/me/vms", 401, "not_authenticated"),
    ("POST", "/api/vms", 401, "not_authenticated"),
    ("GET", "/api/vms/00000000-0000-0000-0000-000000000000", 401, "not_authenticated"),
    ("POST", "/api/vms/x/stop", 401, "not_authenticated"),
    ("DELETE", "/api/vms/x", 401, "not_authenticated"),
    ("GET", "/api/vms/x/console", 401, "not_authenticated"),
    ("GET", "/api/vms/x/jobspec", 401, "not_authenticated"),
    ("GET", "/api/vms/x/logs", 401, "not_authenticated"),
])
async def test_error_envelope_when_logged_out(server: Any, sessions: Any, method: str, path: str, status: int,
                                              code: str) -> None:
    s: Session = sessions(server)
    assert_envelope(*await s.request(method, path), status, code)


# ---- templates and VMs -----------------------------------------------------------------------------

async def test_templates_lists_tiny(server: Any, sessions: Any) -> None:
    status, body = await sessions(server).request("GET", "/api/templates")
    assert status == 200
    tiny = {t["name"]: t for t in body["templates"]}["tiny"]
    assert tiny["available"] is True
    assert tiny["limits"]["memory_mb"] == [128, 1024]
    assert tiny["defaults"] == {"cpu": 1, "memory_mb": 256, "disk_gb": 1}


async def test_vm_lifecycle_on_fake_driver(server: Any, alice: Session, app_settings: Settings,
                                           redis_flush: redis.Redis) -> None:
    status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, vm
    vm_id = vm["vm_id"]
    assert vm["state"] == "running"
    assert vm["vnc_url"] == f"http://127.0.0.1:8080/vms/{vm_id}/console"
    overlay = app_settings.vms_root / "users" / str(alice.user["id"] if alice.user else "") / f"{vm_id}.qcow2"
    assert overlay.is_file()

    status, me = await alice.request("GET", "/api/me")
    assert declared(me["usage"]) == {"vms": 1, "vcpus": 1, "memory_mb": 256, "disk_gb": 1}
    status, listing = await alice.request("GET", "/api/me/vms")
    assert [v["vm_id"] for v in listing["vms"]] == [vm_id]

    status, job = await alice.request("GET", f"/api/vms/{vm_id}/jobspec")
    assert status == 200 and job["Job"]["ID"] == f"vm-{vm_id}"
    assert job["Job"]["TaskGroups"][0]["Tasks"][0]["Config"]["image_path"] == str(overlay)
    status, hcl = await alice.request("GET", f"/api/vms/{vm_id}/jobspec?format=hcl")
    assert status == 200 and f'job "vm-{vm_id}"' in hcl
    assert_envelope(*await alice.request("GET", f"/api/vms/{vm_id}/jobspec?format=yaml"), 400)

    status, grant = await alice.request("GET", f"/api/vms/{vm_id}/console")
    assert status == 200
    assert grant["url"] == f"ws://127.0.0.1:8080/vnc?token={grant['token']}"
    record = json.loads(redis_flush.get(redis_keys.token_key(redis_keys.hash_token(grant["token"]))) or "{}")
    assert record["vm_id"] == vm_id and record["user_id"] == str(alice.user["id"] if alice.user else "")
    assert 0 < redis_flush.ttl(redis_keys.token_key(redis_keys.hash_token(grant["token"]))) <= 60

    status, logs = await alice.request("GET", f"/api/vms/{vm_id}/logs")
    assert status == 200 and isinstance(logs["serial"], str)
    assert_envelope(*await alice.request("GET", f"/api/vms/{vm_id}/logs?max_bytes=0"), 400)

    # A running VM cannot be started again; the conflict names its state.
    error = assert_envelope(*await alice.request("POST", f"/api/vms/{vm_id}/start?wait=60"), 409, "invalid_state")
    assert error["details"]["state"] == "running"

    status, stopped = await alice.request("POST", f"/api/vms/{vm_id}/stop?wait=60")
    assert status == 200 and stopped["state"] == "stopped"
    assert overlay.is_file()
    assert redis_flush.get(redis_keys.vnc_target_key(vm_id)) is None
    # Stopping revoked the outstanding console token.
    assert redis_flush.get(redis_keys.token_key(redis_keys.hash_token(grant["token"]))) is None
    assert_envelope(*await alice.request("GET", f"/api/vms/{vm_id}/console"), 409, "vm_not_running")

    status, started = await alice.request("POST", f"/api/vms/{vm_id}/start?wait=60")
    assert status == 200 and started["state"] == "running"

    status, gone = await alice.request("DELETE", f"/api/vms/{vm_id}?wait=60")
    assert status == 200 and gone["state"] == "destroyed"
    assert not overlay.exists()
    assert (await server.driver.status(vm_id)).state == "missing"
    status, me = await alice.request("GET", "/api/me")
    assert me["usage"]["vms"] == 0
    assert_envelope(*await alice.request("DELETE", f"/api/vms/{vm_id}?wait=60"), 409, "invalid_state")
    status, detail = await alice.request("GET", f"/api/vms/{vm_id}")
    assert [h["to"] for h in detail["history"]] == [
        "provisioning", "starting", "running", "stopping", "stopped", "starting", "running", "destroying",
        "destroyed"]


@pytest.mark.parametrize(("change", "field"), [
    ({"template": "huge"}, "template"),
    ({"template": 7}, "template"),
    ({"cpu": 0}, "cpu"),
    ({"cpu": 64}, "cpu"),
    ({"cpu": "1"}, "cpu"),
    ({"cpu": True}, "cpu"),
    ({"cpu": 1.5}, "cpu"),
    ({"memory_mb": 10**12}, "memory_mb"),
    ({"memory_mb": 64}, "memory_mb"),
    ({"disk_gb": 1000}, "disk_gb"),
    ({"disk_gb": -1}, "disk_gb"),
    ({"userdata": 5}, "userdata"),
    ({"userdata": "x" * (64 * 1024 + 1)}, "userdata"),
    ({"name": "Not A Valid Name!"}, "name"),
    ({"name": "a" * 64}, "name"),
    ({"colour": "blue"}, "colour"),
])
async def test_vm_create_bad_input(server: Any, alice: Session, app_settings: Settings,
                                   change: dict[str, Any], field: str) -> None:
    error = assert_envelope(*await alice.request("POST", "/api/vms?wait=60", json={**VM, **change}), 422,
                            "validation_failed")
    assert error["details"]["field"] == field
    assert (await alice.request("GET", "/api/me/vms"))[1] == {"vms": []}
    assert not list(app_settings.vms_root.glob("users/*/*.qcow2"))


async def test_vm_create_malformed_bodies(server: Any, alice: Session) -> None:
    headers = {"Content-Type": "application/json"}
    assert_envelope(*await alice.request("POST", "/api/vms", data=b"{", headers=headers), 400, "invalid_json")
    assert_envelope(*await alice.request("POST", "/api/vms", data=b'"tiny"', headers=headers), 400, "invalid_json")
    assert_envelope(*await alice.request("POST", "/api/vms", data=b"x" * (512 * 1024), headers=headers), 413)


async def test_quota_is_enforced(server: Any, alice: Session) -> None:
    # Default quota: 3 VMs, 4 vCPUs, 2048 MB, 20 GB.
    for _ in range(3):
        status, body = await alice.request("POST", "/api/vms?wait=60", json=VM)
        assert status == 201, body
    error = assert_envelope(*await alice.request("POST", "/api/vms?wait=60", json=VM), 403, "quota_exceeded")
    assert "vms" in error["details"]["exceeded"]
    status, me = await alice.request("GET", "/api/me")
    assert declared(me["usage"]) == {"vms": 3, "vcpus": 3, "memory_mb": 768, "disk_gb": 3}


async def test_memory_quota_names_memory(server: Any, alice: Session) -> None:
    assert (await alice.request("POST", "/api/vms?wait=60", json={**VM, "memory_mb": 1024}))[0] == 201
    assert (await alice.request("POST", "/api/vms?wait=60", json={**VM, "memory_mb": 1024}))[0] == 201
    error = assert_envelope(*await alice.request("POST", "/api/vms?wait=60", json={**VM, "memory_mb": 128}), 403,
                            "quota_exceeded")
    assert set(error["details"]["exceeded"]) == {"memory_mb"}


async def test_failed_create_leaves_nothing(server: Any, alice: Session, app_settings: Settings,
                                            redis_flush: redis.Redis) -> None:
    server.driver.fail_next_start = "qemu refused to start (injected)"
    error = assert_envelope(*await alice.request("POST", "/api/vms?wait=60", json=VM), 503, "provisioning_failed")
    vm_id = error["details"]["vm_id"]
    status, vm = await alice.request("GET", f"/api/vms/{vm_id}")
    assert vm["state"] == "error" and "injected" in vm["error"]
    assert not list(Path(app_settings.vms_root).glob("users/*/*.qcow2"))
    assert (await server.driver.status(vm_id)).state == "missing"
    assert redis_flush.get(redis_keys.vnc_target_key(vm_id)) is None
    status, me = await alice.request("GET", "/api/me")
    assert me["usage"] == {"vms": 0, "vcpus": 0, "memory_mb": 0, "disk_gb": 0, "storage_bytes": 0}
    # The failed VM can be cleaned away; it holds nothing.
    status, gone = await alice.request("DELETE", f"/api/vms/{vm_id}?wait=60")
    assert status == 200 and gone["state"] == "destroyed"


async def test_unbuilt_image_is_refused(server: Any, alice: Session, app_settings: Settings) -> None:
    disk = app_settings.images_dir / "tiny" / "disk.qcow2"
    original = disk.read_bytes()
    try:
        disk.write_bytes(original + b"tampered")
        error = assert_envelope(*await alice.request("POST", "/api/vms?wait=60", json=VM), 503, "image_unavailable")
        assert "sha256" in error["message"]
        assert (await alice.request("GET", "/api/me/vms"))[1] == {"vms": []}
    finally:
        disk.write_bytes(original)


OWNED_ENDPOINTS = [
    ("GET", "/api/vms/{id}"),
    ("POST", "/api/vms/{id}/stop?wait=60"),
    ("POST", "/api/vms/{id}/start?wait=60"),
    ("DELETE", "/api/vms/{id}"),
    ("GET", "/api/vms/{id}/console"),
    ("GET", "/api/vms/{id}/jobspec"),
    ("GET", "/api/vms/{id}/logs"),
]


async def test_other_users_vm_is_404(server: Any, alice: Session, bob: Session) -> None:
    status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201
    for method, path in OWNED_ENDPOINTS:
        for vm_id in (vm["vm_id"], "not-a-uuid", "00000000-0000-0000-0000-000000000000"):
            error = assert_envelope(*await bob.request(method, path.format(id=vm_id)), 404, "not_found")
            assert vm["vm_id"] not in json.dumps(error)
    # Bob's probing changed nothing of Alice's VM.
    status, still = await alice.request("GET", f"/api/vms/{vm['vm_id']}")
    assert status == 200 and still["state"] == "running"
    assert (await bob.request("GET", "/api/me/vms"))[1] == {"vms": []}


async def test_console_page_requires_login_and_ownership(server: Any, alice: Session, bob: Session,
                                                         sessions: Any) -> None:
    status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
    page = f"/vms/{vm['vm_id']}/console"
    status, html = await alice.request("GET", page)
    assert status == 200 and "/static/console/console.js" in html and vm["vm_id"] in html
    status, html = await bob.request("GET", page)
    assert status == 404 and "No such VM" in html
    anonymous: Session = sessions(server)
    async with anonymous.http.get(anonymous.base_url + page, allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"].startswith("/?next=")


def make_admin(database_url: str, user_id: str) -> None:
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET role = 'admin' WHERE id = %s", (user_id,))
        conn.commit()


async def test_healthz(server: Any, sessions: Any, database_url: str) -> None:
    """Anyone learns up or down; what each check said (versions, paths, errors) only an admin (issue 13)."""
    status, body = await sessions(server).request("GET", "/api/healthz")
    assert status == 200 and body == {"status": "ok"}
    alice: Session = sessions(server)
    await alice.signup_and_login()
    assert (await alice.request("GET", "/api/healthz"))[1] == {"status": "ok"}
    make_admin(database_url, alice.user["id"])  # type: ignore[index]
    status, body = await alice.request("GET", "/api/healthz")
    assert status == 200
    assert body["status"] == "ok" and body["checks"]["postgres"]["ok"] and body["checks"]["redis"]["ok"]


async def test_healthz_names_what_is_down(aiohttp_server: Any, app_settings: Settings, sessions: Any,
                                          database_url: str) -> None:
    broken = dataclasses.replace(app_settings, redis_url="redis://127.0.0.1:1/0")
    server = await aiohttp_server(create_app(broken, driver=FakeDriver()))
    truncate_all(database_url)
    status, body = await sessions(server).request("GET", "/api/healthz")
    assert status == 503 and body == {"status": "unavailable"}
    # What needs Redis answers 503 in the envelope rather than a 500: signup and login too, since their
    # rate limits live in Redis and fail closed (no unthrottled password guessing while Redis is down).
    s: Session = sessions(server)
    creds = {"email": "r@example.test", "password": "a long enough password"}
    assert_envelope(*await s.request("POST", "/api/auth/signup", json=creds), 503, "redis_unavailable")
    assert_envelope(*await s.request("POST", "/api/auth/login", json=creds), 503, "redis_unavailable")
    # A session made while Redis was up still works: logged-out sessions are recorded in Postgres, so
    # reads that need only Postgres go on (docs/LIFECYCLE.md, "When Redis or Postgres is away").
    healthy = await aiohttp_server(create_app(app_settings, driver=FakeDriver()))
    owner: Session = sessions(healthy)
    await owner.signup_and_login()
    cookie = owner.http.cookie_jar.filter_cookies(healthy.make_url("/"))["vmgate_session"].value
    status, me = await s.request("GET", "/api/me", cookies={"vmgate_session": cookie})
    assert status == 200 and me["user"]["id"] == owner.user["id"] if owner.user else False
    # An admin is told which check failed.
    make_admin(database_url, owner.user["id"])  # type: ignore[index]
    status, body = await s.request("GET", "/api/healthz", cookies={"vmgate_session": cookie})
    assert status == 503
    assert body["down"] == ["redis"] and body["checks"]["postgres"]["ok"]
    # ... and a logged-out one stays out, whatever Redis knows.
    assert (await owner.request("POST", "/api/auth/logout"))[0] == 200
    assert_envelope(*await s.request("GET", "/api/me", cookies={"vmgate_session": cookie}), 401)


async def test_metrics_exposed(server: Any, sessions: Any) -> None:
    s: Session = sessions(server)
    await s.request("GET", "/api/healthz")
    status, text = await s.request("GET", "/metrics")
    assert status == 200
    assert 'vmgate_api_requests_total{method="GET",route="/api/healthz",status="200"}' in text
