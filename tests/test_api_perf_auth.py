"""What the API's fast path must not change (docs/BENCHMARKS.md, section 5): a caller is resolved in one
Postgres round trip and nothing about it is cached, so a logged-out session, a disabled user, an ended
session epoch and a revoked API token are refused on the very next request; the access log line is the
text aiohttp's default access logger writes."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

import psycopg2
import pytest
from aiohttp import web, web_log
from aiohttp.test_utils import make_mocked_request

from gateway import credentials, logs
from gateway.web import auth
from gateway.web.appkeys import settings_key
from tests.conftest import Session, assert_envelope


def _sql(database_url: str, query: str, params: tuple[Any, ...]) -> None:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(query, params)


async def test_each_refusal_takes_effect_on_the_next_request(server: Any, sessions: Any, database_url: str) -> None:
    s: Session = sessions(server)
    await s.signup_and_login()
    user_id = (s.user or {})["id"]
    cookie = next(c.value for c in s.http.cookie_jar if c.key == auth.SESSION_COOKIE)
    claims = credentials.decode_session(server.app[settings_key], cookie)
    assert claims is not None
    for _ in range(3):  # warm: whatever could be remembered between requests would be by now
        assert (await s.request("GET", "/api/me/vms"))[0] == 200

    # The session's id revoked behind the gateway's back (what logout stores).
    _sql(database_url, "INSERT INTO revoked_sessions (jti, expires_at) VALUES (%s, now() + interval '1 hour')",
         (claims["jti"],))
    assert_envelope(*await s.request("GET", "/api/me/vms"), 401, "not_authenticated")
    _sql(database_url, "DELETE FROM revoked_sessions WHERE jti = %s", (claims["jti"],))
    assert (await s.request("GET", "/api/me/vms"))[0] == 200

    # The user disabled, then enabled again.
    _sql(database_url, "UPDATE users SET is_active = false WHERE id = %s", (user_id,))
    assert_envelope(*await s.request("GET", "/api/me/vms"), 401, "not_authenticated")
    _sql(database_url, "UPDATE users SET is_active = true WHERE id = %s", (user_id,))
    assert (await s.request("GET", "/api/me/vms"))[0] == 200

    # Every session of the user ended (password reset, admin disable).
    _sql(database_url, "UPDATE users SET session_epoch = session_epoch + 1 WHERE id = %s", (user_id,))
    assert_envelope(*await s.request("GET", "/api/me/vms"), 401, "not_authenticated")


async def test_a_revoked_or_disabled_bearer_token_is_refused_at_once(server: Any, sessions: Any,
                                                                     database_url: str) -> None:
    owner: Session = sessions(server)
    await owner.signup_and_login()
    user_id = (owner.user or {})["id"]
    token, digest = credentials.new_api_token()
    token_id = str(uuid.uuid4())
    _sql(database_url, "INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, expires_at)"
         " VALUES (%s, %s, 'perf', %s, %s, %s)",
         (token_id, user_id, digest, token[:10], dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
    script: Session = sessions(server)
    bearer = {"Authorization": f"Bearer {token}"}
    status, me = await script.request("GET", "/api/me", headers=bearer)
    # The caller is the token's owner, with the same fields as always (nothing of the token leaks in).
    assert status == 200 and me["user"]["id"] == user_id and set(me["user"]) == {
        "id", "email", "role", "email_verified", "is_active", "created_at"}
    assert (await script.request("GET", "/api/me/vms", headers=bearer))[0] == 200
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT last_used_at FROM api_tokens WHERE id = %s", (token_id,))
        assert cur.fetchone()[0] is not None  # its use is still recorded

    _sql(database_url, "UPDATE users SET is_active = false WHERE id = %s", (user_id,))
    assert_envelope(*await script.request("GET", "/api/me/vms", headers=bearer), 401, "invalid_token")
    _sql(database_url, "UPDATE users SET is_active = true WHERE id = %s", (user_id,))
    assert (await script.request("GET", "/api/me/vms", headers=bearer))[0] == 200
    _sql(database_url, "UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (token_id,))
    assert_envelope(*await script.request("GET", "/api/me/vms", headers=bearer), 401, "invalid_token")


@pytest.mark.parametrize("path, headers", [
    ("/api/me/vms", {"User-Agent": "Python/3.11 aiohttp/3.14.5"}),
    ("/api/vms?token=s3cret&x=1", {"Referer": "http://127.0.0.1:8080/", "User-Agent": "Mozilla/5.0"}),
    ("/", {}),
])
def test_access_log_line_is_aiohttps_default(path: str, headers: dict[str, str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    request = make_mocked_request("GET", path, headers=headers)
    response = web.Response(body=b"x" * 1470, status=200)
    logger = logging.getLogger("aiohttp.access")
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        web_log.AccessLogger(logger, web_log.AccessLogger.LOG_FORMAT).log(request, response, 0.002)
        ours = logs.AccessLogger(logger, "")
        assert ours.enabled
        ours.log(request, response, 0.002)
    theirs, mine = (r.getMessage() for r in caplog.records)
    # The two may straddle a second; compare with the timestamps taken out.
    assert mine.split("]", 1)[1] == theirs.split("]", 1)[1]
    assert mine.split("[", 1)[0] == theirs.split("[", 1)[0]
    assert len(mine.split("[", 1)[1].split("]")[0]) == len(theirs.split("[", 1)[1].split("]")[0])
    # And the JSON line still masks what it must.
    assert "s3cret" not in logs.JsonFormatter().format(caplog.records[1])
