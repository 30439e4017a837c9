"""Tenant isolation, table-driven: user B (by cookie session and by API token) tries every endpoint
that takes an id on user A's VMs, tokens, account and audit entries, and always gets the same 404
as for an id that does not exist, never data; without valid credentials every one is a 401 (admin routes:
the 404 of a route that does not exist).
Afterwards A's objects are exactly as they were."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import VM, Session, assert_envelope
from tests.test_api_tokens import BearerSession, make_token

MISSING = "00000000-0000-0000-0000-000000000000"

# (method, path, JSON body) for every endpoint that names an object; {vm}, {token} and {user} are
# filled with A's ids (or unknown ones). The body is valid, so only ownership can refuse it.
OWNED = [
    ("GET", "/api/vms/{vm}", None),
    ("POST", "/api/vms/{vm}/stop?wait=60", None),
    ("POST", "/api/vms/{vm}/start?wait=60", None),
    ("DELETE", "/api/vms/{vm}", None),
    ("GET", "/api/vms/{vm}/console", None),
    ("GET", "/api/vms/{vm}/jobspec", None),
    ("GET", "/api/vms/{vm}/jobspec?format=hcl", None),
    ("GET", "/api/vms/{vm}/logs", None),
    ("GET", "/api/vms/{vm}/logs?max_bytes=100", None),
    ("DELETE", "/api/me/tokens/{token}", None),
    ("GET", "/api/admin/users/{user}", None),
    ("PATCH", "/api/admin/users/{user}", {"is_active": False}),
    ("PATCH", "/api/admin/users/{user}", {"quota": {"vms": 100}}),
    ("GET", "/api/admin/users", None),
    ("GET", "/api/admin/vms?user_id={user}", None),
    ("GET", "/api/admin/audit?user_id={user}", None),
]
# B's own lists: they answer 200 but must not contain anything of A's.
LISTS = ["/api/me", "/api/me/vms", "/api/me/vms?include_destroyed=true", "/api/me/tokens", "/api/me/audit",
         "/api/me/audit?limit=200"]


@dataclass
class Tenant:
    session: Session
    bearer: BearerSession
    token: dict[str, Any]
    running: dict[str, Any]
    stopped: dict[str, Any]

    @property
    def user_id(self) -> str:
        return str((self.session.user or {})["id"])

    def secrets(self) -> list[str]:
        """Strings of this tenant's that must never show up in another tenant's answers."""
        email = (self.session.user or {})["email"]
        return [self.user_id, email, self.running["vm_id"], self.stopped["vm_id"], self.running["name"],
                self.token["id"], self.token["prefix"], self.token["token"]]


async def make_tenant(server: Any, sessions: Any) -> Tenant:
    session: Session = sessions(server)
    await session.signup_and_login()
    token = await make_token(session, "isolation")
    bearer = BearerSession(str(server.make_url("/")), token["token"])
    status, running = await session.request("POST", "/api/vms?wait=60",
                                            json={**VM, "name": f"run-{uuid.uuid4().hex[:12]}"})
    assert status == 201, running
    status, stopped = await session.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, stopped
    assert (await session.request("POST", f"/api/vms/{stopped['vm_id']}/stop?wait=60"))[0] == 200
    return Tenant(session, bearer, token, running, stopped)


@pytest.fixture
async def tenants(server: Any, sessions: Any) -> Any:
    a = await make_tenant(server, sessions)
    b = await make_tenant(server, sessions)
    yield a, b
    for tenant in (a, b):
        await tenant.bearer.close()


def fill(path: str, vm: str, token: str, user: str) -> str:
    return path.format(vm=vm, token=token, user=user)


def assert_nothing_of(tenant: Tenant, body: Any) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    for secret in tenant.secrets():
        assert secret not in text, (secret, text[:500])


async def snapshot(tenant: Tenant) -> dict[str, Any]:
    """What A can see of their own objects, to compare before and after B's attempts."""
    answers = [await tenant.session.request("GET", path) for path in ("/api/me/vms", "/api/me/tokens", "/api/me")]
    assert [status for status, _ in answers] == [200, 200, 200], answers
    vms, tokens, me = (body for _, body in answers)
    states = {v["vm_id"]: (v["state"], v["desired_state"]) for v in vms["vms"]}
    return {"vms": states, "tokens": [(t["id"], t["revoked"]) for t in tokens["tokens"]],
            "me": {k: me[k] for k in ("user", "quota", "usage")}}


@pytest.mark.parametrize("caller", ["cookie", "bearer"])
async def test_other_tenants_objects_are_404(server: Any, tenants: tuple[Tenant, Tenant], caller: str) -> None:
    a, b = tenants
    before = await snapshot(a)
    client: Session = b.session if caller == "cookie" else b.bearer
    for vm_id in (a.running["vm_id"], a.stopped["vm_id"]):
        for method, path, body in OWNED:
            url = fill(path, vm_id, a.token["id"], a.user_id)
            status, answer = await client.request(method, url, json=body)
            assert status == 404, (method, url, answer)
            assert_envelope(status, answer, 404, "not_found")
            assert_nothing_of(a, answer)
            # The same answer as for an id that exists for nobody, so existence is not revealed.
            unknown = await client.request(method, fill(path, MISSING, MISSING, MISSING), json=body)
            assert unknown == (status, answer), (method, path)
            malformed = await client.request(method, fill(path, "x'1", "x'1", "x'1"), json=body)
            assert malformed[0] in (400, 404), (method, path, malformed)
    # The console page, like its API, is a 404 that says nothing of the VM.
    status, html = await client.request("GET", f"/vms/{a.running['vm_id']}/console")
    assert status == 404
    assert_nothing_of(a, html)

    for path in LISTS:
        status, answer = await client.request("GET", path)
        assert status == 200, (path, answer)
        assert_nothing_of(a, answer)

    # B's attempts changed nothing of A's: the VMs, the token and the account are as they were.
    assert await snapshot(a) == before
    assert (await a.bearer.request("GET", "/api/me"))[0] == 200
    status, vm = await a.session.request("GET", f"/api/vms/{a.running['vm_id']}")
    assert status == 200 and vm["state"] == "running"

    # Walking B's audit page by page never reaches A's entries, even where they interleave.
    await make_token(a.session, "interleaved")
    a_ids = {e["id"] for e in (await a.session.request("GET", "/api/me/audit?limit=200"))[1]["entries"]}
    walked: list[int] = []
    before_id = max(a_ids) + 1
    while before_id is not None:
        status, page = await client.request("GET", f"/api/me/audit?limit=1&before={before_id}")
        assert status == 200 and len(page["entries"]) <= 1
        walked += [e["id"] for e in page["entries"]]
        before_id = page["next_before"]
    b_ids = [e["id"] for e in (await b.session.request("GET", "/api/me/audit?limit=200"))[1]["entries"]]
    assert walked and a_ids.isdisjoint(walked) and walked == [i for i in b_ids if i < max(a_ids) + 1]


@pytest.mark.parametrize("caller", ["anonymous", "logged_out", "revoked_token", "forged_cookie"])
async def test_without_valid_credentials_everything_is_401_or_hidden(server: Any, sessions: Any,
                                                           tenants: tuple[Tenant, Tenant], caller: str) -> None:
    a, b = tenants
    client: Session
    code = "not_authenticated"
    if caller == "anonymous":
        client = sessions(server)
    elif caller == "forged_cookie":
        client = sessions(server)
        client.http.cookie_jar.update_cookies({"vmgate_session": "forged.jwt.value"}, server.make_url("/"))
    elif caller == "logged_out":
        client = b.session
        assert (await client.request("POST", "/api/auth/logout"))[0] == 200
    else:
        client = b.bearer
        assert (await b.session.request("DELETE", f"/api/me/tokens/{b.token['id']}"))[0] == 200
        code = "invalid_token"
    for method, path, body in [*OWNED, *(("GET", p, None) for p in LISTS), ("POST", "/api/vms", VM),
                               ("POST", "/api/me/tokens", {"name": "x"})]:
        url = fill(path, a.running["vm_id"], a.token["id"], a.user_id)
        status, answer = await client.request(method, url, json=body)
        # Admin routes answer everyone but admins as if they did not exist.
        assert_envelope(status, answer, *((404, "not_found") if path.startswith("/api/admin") else (401, code)))
        assert_nothing_of(a, answer)
        assert_nothing_of(b, answer)
    assert (await a.session.request("GET", f"/api/vms/{a.running['vm_id']}"))[1]["state"] == "running"
