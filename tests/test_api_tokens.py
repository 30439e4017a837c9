"""API tokens (/api/me/tokens) end to end on a real server, Postgres and Redis with the fake driver:
made with a cookie session, used by a client that has no cookies, revoked, expired; and CSRF on
cookie sessions next to bearer requests that need none."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
from typing import Any

import psycopg2
import pytest

from tests.conftest import VM, Session, assert_envelope

DAY = 86400


class BearerSession(Session):
    """A client with no cookies that authenticates every request with an API token."""

    def __init__(self, base_url: str, token: str) -> None:
        super().__init__(base_url)
        self.token = token

    async def request(self, method: str, path: str, *, csrf: bool = True, **kwargs: Any) -> tuple[int, Any]:
        kwargs["headers"] = {"Authorization": f"Bearer {self.token}", **kwargs.get("headers", {})}
        return await super().request(method, path, csrf=csrf, **kwargs)


async def make_token(session: Session, name: str = "ci", **extra: Any) -> dict[str, Any]:
    status, body = await session.request("POST", "/api/me/tokens", json={"name": name, **extra})
    assert status == 201, body
    return body


def bearer(server: Any, token: str, made: list[Session]) -> BearerSession:
    client = BearerSession(str(server.make_url("/")), token)
    made.append(client)
    return client


def sql(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        rows = cur.fetchall() if cur.description else []
        conn.commit()
    return rows


def near(iso: str, seconds: int) -> bool:
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return abs((dt.datetime.fromisoformat(iso) - expected).total_seconds()) < 60


async def test_token_shown_once_and_works_without_cookies(server: Any, sessions: Any, clients: list[Session],
                                                          database_url: str) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    made = await make_token(alice, "deploy bot")
    assert set(made) == {"id", "name", "token", "prefix", "created_at", "expires_at"}
    token = made["token"]
    assert token.startswith("vg_") and len(token) >= 40 and made["prefix"] == token[:11]
    assert made["name"] == "deploy bot" and near(made["expires_at"], 30 * DAY)
    # Only the SHA-256 is stored.
    [(stored_hash, prefix)] = sql(database_url, "SELECT token_hash, prefix FROM api_tokens WHERE id = %s",
                                  made["id"])
    assert stored_hash == hashlib.sha256(token.encode()).hexdigest() and prefix == made["prefix"]
    assert not sql(database_url, "SELECT 1 FROM api_tokens WHERE token_hash = %s OR name = %s", token, token)

    status, listing = await alice.request("GET", "/api/me/tokens")
    assert status == 200 and token not in json.dumps(listing)
    [entry] = listing["tokens"]
    assert entry == {"id": made["id"], "name": "deploy bot", "prefix": made["prefix"],
                     "created_at": made["created_at"], "expires_at": made["expires_at"], "last_used_at": None,
                     "revoked": False, "revoked_at": None, "current": False}
    assert listing["next_cursor"] is None

    script = bearer(server, token, clients)
    assert not script.http.cookie_jar.filter_cookies(server.make_url("/"))
    status, me = await script.request("GET", "/api/me")
    assert status == 200 and me["user"]["id"] == (alice.user or {})["id"]
    # Unsafe methods with a bearer token need no CSRF header.
    status, vm = await script.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, vm
    status, mine = await script.request("GET", "/api/me/vms")
    assert [v["vm_id"] for v in mine["vms"]] == [vm["vm_id"]]
    assert (await script.request("GET", f"/api/vms/{vm['vm_id']}"))[0] == 200
    assert (await script.request("GET", f"/api/vms/{vm['vm_id']}/console"))[0] == 200
    status, stopped = await script.request("POST", f"/api/vms/{vm['vm_id']}/stop?wait=60")
    assert status == 200 and stopped["state"] == "stopped"
    status, gone = await script.request("DELETE", f"/api/vms/{vm['vm_id']}?wait=60")
    assert status == 200 and gone["state"] == "destroyed"
    # The cookie session sees what the script did.
    assert (await alice.request("GET", "/api/me/vms"))[1] == {"vms": []}

    status, listing = await script.request("GET", "/api/me/tokens")
    [entry] = listing["tokens"]
    assert entry["current"] is True and entry["last_used_at"] is not None

    status, revoked = await alice.request("DELETE", f"/api/me/tokens/{made['id']}")
    assert status == 200 and revoked["revoked"] is True and revoked["revoked_at"]
    for method, path in (("GET", "/api/me"), ("GET", "/api/me/vms"), ("POST", "/api/vms")):
        assert_envelope(*await script.request(method, path, json=VM), 401, "invalid_token")
    # Revoking again is a no-op, not an error, and is audited once.
    status, again = await alice.request("DELETE", f"/api/me/tokens/{made['id']}")
    assert status == 200 and again["revoked_at"] == revoked["revoked_at"]
    status, audit = await alice.request("GET", "/api/me/audit")
    actions = [e["action"] for e in audit["entries"]]
    assert actions.count("token.create") == 1 and actions.count("token.revoke") == 1
    created = next(e for e in audit["entries"] if e["action"] == "token.create")
    assert created["details"]["token_id"] == made["id"] and created["details"]["prefix"] == made["prefix"]
    assert token not in json.dumps(audit)


async def test_expired_token_is_refused(server: Any, sessions: Any, clients: list[Session],
                                        database_url: str) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    made = await make_token(alice, expires_in=3600)
    assert near(made["expires_at"], 3600)
    script = bearer(server, made["token"], clients)
    assert (await script.request("GET", "/api/me"))[0] == 200
    sql(database_url, "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = %s", made["id"])
    assert_envelope(*await script.request("GET", "/api/me"), 401, "invalid_token")
    # A bad token never falls back to the cookie session sent along with it.
    assert_envelope(*await alice.request("GET", "/api/me", headers={"Authorization": f"Bearer {made['token']}"}),
                    401, "invalid_token")


@pytest.mark.parametrize("header", ["Bearer vg_not-a-real-token", "Bearer not-even-the-prefix", "Bearer ",
                                    "Basic dXNlcjpwYXNz", "vg_token-without-scheme"])
async def test_malformed_bearer_is_401(server: Any, sessions: Any, header: str) -> None:
    s: Session = sessions(server)
    assert_envelope(*await s.request("GET", "/api/me", headers={"Authorization": header}), 401, "invalid_token")


async def test_expires_in_bounds_are_accepted(server: Any, sessions: Any) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    assert near((await make_token(alice, "short", expires_in=3600))["expires_at"], 3600)
    assert near((await make_token(alice, "long", expires_in=365 * DAY))["expires_at"], 365 * DAY)
    assert (await make_token(alice, "  padded  "))["name"] == "padded"
    assert (await make_token(alice, "n" * 64))["name"] == "n" * 64


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "n" * 65}, "name"),
    ({"name": 5}, "name"),
    ({"name": "ci", "expires_in": 3599}, "expires_in"),
    ({"name": "ci", "expires_in": 365 * DAY + 1}, "expires_in"),
    ({"name": "ci", "expires_in": "3600"}, "expires_in"),
    ({"name": "ci", "expires_in": True}, "expires_in"),
    ({"name": "ci", "expires_in": 3600.5}, "expires_in"),
    ({"name": "ci", "scopes": ["all"]}, "scopes"),
])
async def test_token_create_bad_input(server: Any, sessions: Any, body: dict[str, Any], field: str) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    error = assert_envelope(*await alice.request("POST", "/api/me/tokens", json=body), 422, "validation_failed")
    assert error["details"]["field"] == field
    assert (await alice.request("GET", "/api/me/tokens"))[1]["tokens"] == []


async def test_a_token_cannot_mint_tokens_but_can_revoke_itself(server: Any, sessions: Any,
                                                                clients: list[Session]) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    made = await make_token(alice)
    script = bearer(server, made["token"], clients)
    assert_envelope(*await script.request("POST", "/api/me/tokens", json={"name": "child"}), 403,
                    "session_required")
    status, body = await script.request("DELETE", f"/api/me/tokens/{made['id']}")
    assert status == 200 and body["revoked"] and body["current"]
    assert_envelope(*await script.request("GET", "/api/me/tokens"), 401, "invalid_token")


async def test_unknown_and_malformed_token_ids_are_404(server: Any, sessions: Any) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    for token_id in ("not-a-uuid", "00000000-0000-0000-0000-000000000000", "1; DROP TABLE api_tokens"):
        assert_envelope(*await alice.request("DELETE", f"/api/me/tokens/{token_id}"), 404, "not_found")


async def test_live_tokens_are_capped(server: Any, sessions: Any) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    made = [await make_token(alice, f"t{i}") for i in range(50)]
    error = assert_envelope(*await alice.request("POST", "/api/me/tokens", json={"name": "one too many"}), 409,
                            "too_many_tokens")
    assert error["details"]["max"] == 50
    assert (await alice.request("DELETE", f"/api/me/tokens/{made[0]['id']}"))[0] == 200
    await make_token(alice, "fits again")


async def test_token_list_pages(server: Any, sessions: Any) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    made = [(await make_token(alice, f"t{i}"))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        status, body = await alice.request("GET", "/api/me/tokens",
                                           params={"limit": "2", **({"cursor": cursor} if cursor else {})})
        assert status == 200 and len(body["tokens"]) <= 2
        seen += [t["id"] for t in body["tokens"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == list(reversed(made))  # newest first, each once
    for params, field in (({"limit": "0"}, "limit"), ({"limit": "201"}, "limit"), ({"limit": "x"}, "limit"),
                          ({"cursor": "garbage"}, "cursor"), ({"cursor": "WyJ4IiwgInkiXQ"}, "cursor")):
        error = assert_envelope(*await alice.request("GET", "/api/me/tokens", params=params), 400, "bad_request")
        assert error["details"]["field"] == field


# ---- CSRF: cookie sessions need the header, bearer requests do not --------------------------------------

@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/me/tokens", {"name": "ci"}),
    ("POST", "/api/vms", VM),
])
async def test_csrf_on_cookie_sessions(server: Any, sessions: Any, clients: list[Session], method: str, path: str,
                                       body: dict[str, Any]) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    assert_envelope(*await alice.request(method, path, json=body, csrf=False), 403, "csrf_failed")
    assert_envelope(*await alice.request(method, path, json=body, csrf=False,
                                         headers={"X-CSRF-Token": "wrong"}), 403, "csrf_failed")
    assert_envelope(*await alice.request(method, path, json=body, csrf=False,
                                         headers={"X-CSRF-Token": ""}), 403, "csrf_failed")
    # Nothing was done by the refused requests.
    assert (await alice.request("GET", "/api/me/tokens"))[1]["tokens"] == []
    assert (await alice.request("GET", "/api/me/vms"))[1]["vms"] == []
    status, done = await alice.request(method, path, json=body)
    assert status in (201, 202), done  # the VM create is accepted (202) and finishes in the background
    script = bearer(server, (await make_token(alice, "script"))["token"], clients)
    status, done = await script.request(method, path, json=body)
    if path == "/api/me/tokens":
        # Not a CSRF refusal: minting tokens is the one thing a bearer caller may not do.
        assert_envelope(status, done, 403, "session_required")
    else:
        assert status == 202, done  # no CSRF header needed


async def test_csrf_on_revoke_and_stop(server: Any, sessions: Any, clients: list[Session]) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    made = await make_token(alice)
    status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201
    for method, path in (("DELETE", f"/api/me/tokens/{made['id']}"), ("POST", f"/api/vms/{vm['vm_id']}/stop?wait=60"),
                         ("DELETE", f"/api/vms/{vm['vm_id']}?wait=60")):
        assert_envelope(*await alice.request(method, path, csrf=False), 403, "csrf_failed")
    # The bearer client stops the VM with no CSRF header at all.
    script = bearer(server, made["token"], clients)
    status, stopped = await script.request("POST", f"/api/vms/{vm['vm_id']}/stop?wait=60")
    assert status == 200 and stopped["state"] == "stopped"
