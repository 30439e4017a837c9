"""Sessions and callers (gateway/web/auth.py) on a real server, Postgres and Redis: CSRF bound to the
session, JWT key rotation, ending every session of a user, and bearer tokens that never fall back
to the cookie."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import jwt
import psycopg2

from drivers.fake import FakeDriver
from gateway import credentials
from gateway.config import Settings
from gateway.web.app import create_app
from tests.conftest import Session, assert_envelope, truncate_all

OLD_KEY = "an-old-signing-key-that-is-long-enough-0123456789"


async def test_csrf_guards_cookie_sessions_only(server: Any, sessions: Any) -> None:
    s: Session = sessions(server)
    await s.signup_and_login()
    body = {"template": "tiny"}
    assert_envelope(*await s.request("POST", "/api/vms?wait=60", json=body, csrf=False), 403, "csrf_failed")
    assert_envelope(*await s.request("POST", "/api/vms?wait=60", json=body, csrf=False,
                                     headers={"X-CSRF-Token": "not-the-token"}), 403, "csrf_failed")
    # Reads need no token; logout is unsafe and needs it like everything else.
    assert (await s.request("GET", "/api/me", csrf=False))[0] == 200
    assert_envelope(*await s.request("POST", "/api/auth/logout", csrf=False), 403, "csrf_failed")
    assert (await s.request("GET", "/api/me"))[0] == 200
    assert (await s.request("POST", "/api/auth/logout"))[0] == 200


async def test_csrf_token_of_another_session_is_refused(server: Any, sessions: Any) -> None:
    a: Session = sessions(server)
    b: Session = sessions(server)
    await a.signup_and_login()
    await b.signup_and_login()
    stolen = b.csrf_token or ""
    assert_envelope(*await a.request("POST", "/api/auth/logout", csrf=False,
                                     headers={"X-CSRF-Token": stolen}), 403, "csrf_failed")


async def test_sessions_signed_with_a_former_key_stay_valid(aiohttp_server: Any, app_settings: Settings,
                                                            database_url: str, sessions: Any) -> None:
    old = dataclasses.replace(app_settings, jwt_secret=OLD_KEY)
    old_server = await aiohttp_server(create_app(old, driver=FakeDriver()))
    truncate_all(database_url)
    s: Session = sessions(old_server)
    await s.signup_and_login()
    cookie = s.http.cookie_jar.filter_cookies(old_server.make_url("/"))["vmgate_session"].value

    rotated = dataclasses.replace(app_settings, jwt_old_secrets=(OLD_KEY,))
    new_server = await aiohttp_server(create_app(rotated, driver=FakeDriver()))
    t: Session = sessions(new_server)
    status, me = await t.request("GET", "/api/me", cookies={"vmgate_session": cookie})
    assert status == 200 and me["user"]["id"] == (s.user or {})["id"]
    # New sessions are signed with the current key only.
    token, _ = credentials.issue_session(rotated, {"id": me["user"]["id"], "session_epoch": 0})
    assert jwt.decode(token, rotated.jwt_secret, algorithms=["HS256"])["sub"] == me["user"]["id"]

    dropped = dataclasses.replace(app_settings, jwt_old_secrets=())
    final_server = await aiohttp_server(create_app(dropped, driver=FakeDriver()))
    u: Session = sessions(final_server)
    assert_envelope(*await u.request("GET", "/api/me", cookies={"vmgate_session": cookie}), 401)


async def test_tampered_or_foreign_jwt_is_refused(server: Any, sessions: Any, app_settings: Settings) -> None:
    s: Session = sessions(server)
    await s.signup_and_login()
    user_id = (s.user or {})["id"]
    claims = {"sub": user_id, "exp": 2**31, "jti": "x", "epoch": 0, "csrf": "c"}
    forged = jwt.encode(claims, "some-other-key-that-is-long-enough-0123456789", algorithm="HS256")
    unsigned = jwt.encode(claims, None, algorithm="none")
    fresh: Session = sessions(server)
    for cookie in (forged, unsigned, "garbage"):
        assert_envelope(*await fresh.request("GET", "/api/me", cookies={"vmgate_session": cookie}), 401)


async def test_ending_all_sessions_refuses_old_cookies(server: Any, sessions: Any, database_url: str) -> None:
    s: Session = sessions(server)
    await s.signup_and_login()
    email, user_id = (s.user or {})["email"], (s.user or {})["id"]
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET session_epoch = session_epoch + 1 WHERE id = %s", (user_id,))
    assert_envelope(*await s.request("GET", "/api/me"), 401, "not_authenticated")
    # A new login gets the new epoch and works.
    t: Session = sessions(server)
    status, body = await t.request("POST", "/api/auth/login",
                                   json={"email": email, "password": "correct horse battery"})
    assert status == 200 and body["csrf_token"]
    assert (await t.request("GET", "/api/me"))[0] == 200


def _insert_token(database_url: str, user_id: str, *, expires_in: int = 3600, revoked: bool = False) -> str:
    token, digest = credentials.new_api_token()
    now = dt.datetime.now(dt.UTC)
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, expires_at, revoked_at)"
                    " VALUES (%s, %s, 'test', %s, %s, %s, %s)",
                    (str(uuid.uuid4()), user_id, digest, token[:10], now + dt.timedelta(seconds=expires_in),
                     now if revoked else None))
    return token


async def test_bearer_tokens(server: Any, sessions: Any, database_url: str) -> None:
    owner: Session = sessions(server)
    await owner.signup_and_login()
    user_id = (owner.user or {})["id"]
    good = _insert_token(database_url, user_id)
    script: Session = sessions(server)
    status, me = await script.request("GET", "/api/me", headers={"Authorization": f"Bearer {good}"})
    assert status == 200 and me["user"]["id"] == user_id
    # Unsafe methods with a bearer token need no CSRF header.
    status, body = await script.request("POST", "/api/auth/logout", headers={"Authorization": f"Bearer {good}"})
    assert status == 200, body

    for bad in (_insert_token(database_url, user_id, expires_in=-10),
                _insert_token(database_url, user_id, revoked=True), "vg_" + "x" * 43, "not-even-a-token"):
        assert_envelope(*await script.request("GET", "/api/me", headers={"Authorization": f"Bearer {bad}"}),
                        401, "invalid_token")
    assert_envelope(*await script.request("GET", "/api/me", headers={"Authorization": "Basic dXNlcjpwYXNz"}),
                    401, "invalid_token")
    # A bad bearer token is refused even when a valid session cookie comes along: no silent fall-back.
    status, body = await owner.request("GET", "/api/me", headers={"Authorization": "Bearer vg_wrong"})
    assert_envelope(status, body, 401, "invalid_token")
    assert (await owner.request("GET", "/api/me"))[0] == 200


async def test_passwords_are_argon2id_at_the_rfc9106_cost_by_default(app_settings: Settings) -> None:
    """The tests hash cheaply (app_settings); the defaults are RFC 9106's low-memory Argon2id profile, and a
    hash made at one cost still verifies after the cost changes."""
    from gateway import credentials

    documented = {f.name: f.metadata["default"] for f in dataclasses.fields(Settings)}
    assert (documented["argon2_memory_kib"], documented["argon2_time_cost"]) == ("65536", "3")
    credentials.configure(dataclasses.replace(app_settings, argon2_memory_kib=65536, argon2_time_cost=3))
    strong = await credentials.hash_password("correct horse battery")
    assert strong.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    credentials.configure(app_settings)
    cheap = await credentials.hash_password("correct horse battery")
    assert cheap.startswith("$argon2id$v=19$m=1024,t=1,p=4$")
    assert await credentials.verify_password(strong, "correct horse battery")
    assert not await credentials.verify_password(strong, "wrong horse battery")
