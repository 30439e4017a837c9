"""Hostile users against the real app (Postgres, Redis, the gateway on the fake driver): issue 13.

Account takeover through an address someone else signed up with first: no API token before the address is
verified; the first verification and every password reset revoke the account's API tokens; promotion to
admin refuses an unverified account or one holding tokens. Event streams end with what opened them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from typing import Any

import aiohttp
import psycopg2
import pytest

from gateway import credentials
from gateway.engine import storage
from gateway.web import events
from tests.conftest import VM, Session, assert_envelope, link_token, outbox_link
from tests.test_admin import cli, login

PASSWORD = "correct horse battery"


def plant_token(database_url: str, user_id: str) -> str:
    """An API token stored for ``user_id`` as the API stores one: what an account could hold from before
    tokens needed a verified address. Returns the token."""
    token, token_hash = credentials.new_api_token()
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO api_tokens (id, user_id, name, token_hash, prefix, expires_at)"
                    " VALUES (%s, %s, 'planted', %s, %s, now() + interval '1 day')",
                    (str(uuid.uuid4()), user_id, token_hash, token[:11]))
        conn.commit()
    return token


async def reset_token(session: Session, email: str) -> str:
    """The token of the newest reset mail to ``email`` (the gateway sends it in the background)."""
    assert session.outbox is not None
    for _ in range(100):
        with contextlib.suppress(AssertionError):
            return link_token(outbox_link(session.outbox, email, "reset"))
        await asyncio.sleep(0.05)
    return link_token(outbox_link(session.outbox, email, "reset"))


async def bearer_status(server: Any, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            str(server.make_url("/api/me")), headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def test_an_unverified_account_gets_no_api_token(server: Any, sessions: Any) -> None:
    squatter: Session = sessions(server)
    await squatter.signup_and_login(verify=False)
    assert_envelope(*await squatter.request("POST", "/api/me/tokens", json={"name": "keep"}), 403,
                    "email_not_verified")
    await squatter.verify_email(squatter.user["email"])  # type: ignore[index]
    status, body = await squatter.request("POST", "/api/me/tokens", json={"name": "now"})
    assert status == 201 and body["token"].startswith("vg_"), body


async def test_the_owners_verification_revokes_what_the_squatter_made(server: Any, sessions: Any,
                                                                       database_url: str) -> None:
    squatter: Session = sessions(server)
    email = f"victim-{uuid.uuid4().hex[:6]}@example.test"
    await squatter.signup_and_login(email=email, verify=False)
    planted = plant_token(database_url, squatter.user["id"])  # type: ignore[index]
    assert await bearer_status(server, planted) == 200
    owner: Session = sessions(server)  # the mailbox's owner, not logged in, opens the link
    await owner.verify_email(email)
    assert await bearer_status(server, planted) == 401
    # The owner then takes the account back with a reset, which ends the squatter's session too.
    anonymous: Session = sessions(server)
    status, _ = await anonymous.request("POST", "/api/auth/password-reset", json={"email": email})
    assert status == 202
    token = await reset_token(anonymous, email)
    status, body = await anonymous.request("POST", "/api/auth/password-reset/confirm",
                                           json={"token": token, "password": "the owner's own password"})
    assert status == 200, body
    assert_envelope(*await squatter.request("GET", "/api/me"), 401)


async def test_a_password_reset_revokes_api_tokens(server: Any, sessions: Any) -> None:
    alice: Session = sessions(server)
    await alice.signup_and_login()
    status, made = await alice.request("POST", "/api/me/tokens", json={"name": "script"})
    assert status == 201, made
    assert await bearer_status(server, made["token"]) == 200
    email = alice.user["email"]  # type: ignore[index]
    status, _ = await alice.request("POST", "/api/auth/password-reset", json={"email": email})
    token = await reset_token(alice, email)
    status, body = await alice.request("POST", "/api/auth/password-reset/confirm",
                                       json={"token": token, "password": "a brand new password"})
    assert status == 200, body
    assert await bearer_status(server, made["token"]) == 401
    status, listed = await (await login(server, sessions, email, "a brand new password")).request(
        "GET", "/api/me/tokens")
    assert status == 200 and [t["revoked"] for t in listed["tokens"]] == [True], listed


async def test_promotion_refuses_unverified_accounts_and_accounts_with_tokens(
        server: Any, sessions: Any, database_url: str) -> None:
    squatter: Session = sessions(server)
    await squatter.signup_and_login(verify=False)
    rc, out, err = await cli(database_url, "create-admin", "--email", squatter.user["email"], "--promote")  # type: ignore[index]
    assert rc == 1 and "has not confirmed its address" in err, out + err
    alice: Session = sessions(server)
    await alice.signup_and_login()
    status, made = await alice.request("POST", "/api/me/tokens", json={"name": "script"})
    assert status == 201
    rc, out, err = await cli(database_url, "create-admin", "--email", alice.user["email"], "--promote")  # type: ignore[index]
    assert rc == 1 and "1 usable API token" in err, out + err
    assert alice.csrf_token
    status, _ = await alice.request("DELETE", f"/api/me/tokens/{made['id']}")
    assert status == 200
    rc, out, err = await cli(database_url, "create-admin", "--email", alice.user["email"], "--promote")  # type: ignore[index]
    assert rc == 0 and "promoted" in out, err


async def read_until_closed(resp: aiohttp.ClientResponse, seconds: float) -> bytes:
    """Everything the stream sends until the server ends it; fails if it is still open after ``seconds``."""
    return await asyncio.wait_for(resp.content.read(), seconds)


@pytest.mark.parametrize("how", ["logout", "token_revoked", "disabled"])
async def test_event_streams_end_with_what_opened_them(server: Any, sessions: Any, database_url: str,
                                                       monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setattr(events, "RECHECK", 0.2)
    alice: Session = sessions(server)
    await alice.signup_and_login()
    headers: dict[str, str] = {}
    made: dict[str, Any] = {}
    if how == "token_revoked":
        status, made = await alice.request("POST", "/api/me/tokens", json={"name": "stream"})
        assert status == 201
        headers = {"Authorization": f"Bearer {made['token']}"}
    client = alice.http if how != "token_revoked" else aiohttp.ClientSession()
    try:
        async with client.get(alice.base_url + "/api/me/events", headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"retry:")
            with pytest.raises(TimeoutError):  # while the session or token is good, the stream stays open
                await read_until_closed(resp, 1.0)
            if how == "logout":
                assert (await alice.request("POST", "/api/auth/logout"))[0] == 200
            elif how == "token_revoked":
                assert (await alice.request("DELETE", f"/api/me/tokens/{made['id']}"))[0] == 200
            else:
                with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
                    cur.execute("UPDATE users SET is_active = false WHERE id = %s", (alice.user["id"],))  # type: ignore[index]
                    conn.commit()
            await read_until_closed(resp, 5.0)
    finally:
        if client is not alice.http:
            await client.close()


@pytest.mark.parametrize("email", ["x,victim@example.com", "victim@example.com,x@example.com", '"a,b"@example.com',
                                   "Me <victim@example.com>", "a b@example.com", "victim@example.com;x@y.test",
                                   "ü@example.com", "me@localhost", "a..b@example.com"])
async def test_addresses_a_mail_header_could_split_are_refused(server: Any, sessions: Any, email: str) -> None:
    anonymous: Session = sessions(server)
    status, body = await anonymous.request("POST", "/api/auth/signup", json={"email": email, "password": PASSWORD})
    assert_envelope(status, body, 422, "validation_failed")
    assert body["error"]["details"]["field"] == "email"


async def test_names_are_matched_whole(server: Any, sessions: Any) -> None:
    """A trailing newline slipped past `^...$` with re.match; every pattern is now matched whole."""
    alice: Session = sessions(server)
    await alice.signup_and_login()
    status, body = await alice.request("POST", "/api/vms", json={**VM, "name": "web-1\n"})
    assert_envelope(status, body, 422, "validation_failed")
    status, body = await alice.request("POST", "/api/vms", json={**VM, "userdata": "x" * (32 * 1024 + 1)})
    assert_envelope(status, body, 422, "validation_failed")  # the user data bound is 32 KiB now
    status, vm = await alice.request("POST", "/api/vms?wait=30", json={**VM, "name": "web-1"})
    assert status == 201, vm
    status, listed = await alice.request("GET", "/api/me/vms")
    assert status == 200 and [v["vm_id"] for v in listed["vms"]] == [vm["vm_id"]], listed  # nothing half-made
    status, body = await alice.request("POST", f"/api/vms/{vm['vm_id']}/snapshots", json={"name": "first\n"})
    assert_envelope(status, body, 422, "validation_failed")
    status, body = await alice.request("POST", "/api/auth/login", json={"email": alice.user["email"] + "\n",  # type: ignore[index]
                                                                        "password": PASSWORD})
    assert status == 200, body  # surrounding whitespace is trimmed, as it always was: the same address


async def test_security_headers(server: Any, aiohttp_server: Any, app_settings: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(str(server.make_url("/"))) as page:
            csp = page.headers["Content-Security-Policy"]
            assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
            assert page.headers["X-Content-Type-Options"] == "nosniff" and page.headers["X-Frame-Options"] == "DENY"
            assert "Strict-Transport-Security" not in page.headers  # plain http: no HSTS
        async with http.get(str(server.make_url("/api/me"))) as api:
            assert api.status == 401 and api.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(str(server.make_url("/reset"))) as reset:
            assert reset.headers["Referrer-Policy"] == "no-referrer"  # the page's own stays
    from drivers.fake import FakeDriver
    from gateway.web.app import create_app

    behind_tls = await aiohttp_server(create_app(dataclasses.replace(app_settings, public_url="https://vm.example"),
                                                 driver=FakeDriver()))
    async with aiohttp.ClientSession() as http, http.get(str(behind_tls.make_url("/"))) as page:
        assert page.headers["Strict-Transport-Security"] == "max-age=31536000"


LB = "10.0.0.0/8"


@pytest.mark.parametrize(("peer", "xff", "real_ip", "expected"), [
    ("198.51.100.7", "6.6.6.6", None, "198.51.100.7"),  # not a proxy: its headers mean nothing
    ("127.0.0.1", None, None, "127.0.0.1"),
    ("127.0.0.1", "203.0.113.5", None, "203.0.113.5"),  # our nginx
    ("127.0.0.1", None, "203.0.113.5", "203.0.113.5"),  # X-Real-IP without X-Forwarded-For
    ("127.0.0.1", "203.0.113.5, 10.1.2.3", None, "203.0.113.5"),  # client, load balancer, nginx
    ("127.0.0.1", "6.6.6.6, 203.0.113.5, 10.1.2.3", None, "203.0.113.5"),  # a forged leftmost entry
    ("127.0.0.1", "10.9.9.9, 10.1.2.3", None, "10.9.9.9"),  # only proxies: the leftmost
    ("127.0.0.1", "not-an-ip, 10.1.2.3", None, "10.1.2.3"),  # garbage: stop at the last trusted hop
    ("10.1.2.3", "203.0.113.5", None, "203.0.113.5"),
])
def test_the_client_is_the_rightmost_untrusted_address(peer: str, xff: str | None, real_ip: str | None,
                                                       expected: str) -> None:
    import ipaddress

    from gateway.web.http import forwarded_client

    trusted = tuple(ipaddress.ip_network(n) for n in ("127.0.0.1/32", "::1/128", LB))
    assert forwarded_client(peer, xff, real_ip, trusted) == expected


async def test_behind_a_load_balancer_one_guesser_locks_out_only_itself(
        aiohttp_server: Any, app_settings: Any, sessions: Any, database_url: str) -> None:
    """30 wrong logins used to lock out everyone behind a proxy not on loopback (issue 13, item 6)."""
    import ipaddress

    from drivers.fake import FakeDriver
    from gateway.web.app import create_app
    from tests.conftest import truncate_all

    settings = dataclasses.replace(
        app_settings, rate_limits={**app_settings.rate_limits, "login_ip": (3, 60)},
        trusted_proxies=(*app_settings.trusted_proxies, ipaddress.ip_network(LB)))
    server = await aiohttp_server(create_app(settings, driver=FakeDriver()))
    truncate_all(database_url)
    victim: Session = sessions(server)
    await victim.signup_and_login(password=PASSWORD)
    email = victim.user["email"]  # type: ignore[index]
    guesser: Session = sessions(server)
    via_lb = {"X-Forwarded-For": "198.51.100.66, 10.0.0.2"}
    statuses = []
    for _ in range(4):
        statuses.append((await guesser.request("POST", "/api/auth/login", headers=via_lb,
                                               json={"email": f"nobody{_}@example.test", "password": "wrong one"}))[0])
    assert statuses[-1] == 429, statuses
    # Another client behind the same load balancer logs in.
    owner: Session = sessions(server)
    status, body = await owner.request("POST", "/api/auth/login", headers={"X-Forwarded-For": "203.0.113.9, 10.0.0.2"},
                                       json={"email": email, "password": PASSWORD})
    assert status == 200, body
    owner.csrf_token = body["csrf_token"]
    status, audit = await owner.request("GET", "/api/me/audit")
    assert status == 200 and audit["entries"][0]["ip"] == "203.0.113.9", audit["entries"][:1]


async def test_two_hundred_streams_from_one_user_starve_no_one(server: Any, sessions: Any,
                                                                app_settings: Any) -> None:
    """One account opening 200 event streams once exhausted the API's Redis pool: healthz and every other
    user's login answered 503 (issue 13, item 2). Streams now share one subscriber and are capped per user."""
    hog: Session = sessions(server)
    await hog.signup_and_login()
    cap = app_settings.event_streams_per_user
    url = hog.base_url + "/api/me/events"
    async with aiohttp.ClientSession(cookie_jar=hog.http.cookie_jar,
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        async def open_one() -> aiohttp.ClientResponse:
            resp = await http.get(url)
            if resp.status == 200:
                await resp.content.readline()  # the stream is up
            return resp

        streams = await asyncio.gather(*(open_one() for _ in range(200)))
        try:
            statuses = [resp.status for resp in streams]
            assert statuses.count(200) == cap and statuses.count(429) == 200 - cap, statuses
            refused = next(resp for resp in streams if resp.status == 429)
            assert (await refused.json())["error"]["code"] == "too_many_streams"
            # Everyone else carries on: a stranger signs up, logs in, creates a VM and watches it.
            other: Session = sessions(server)
            await other.signup_and_login()
            status, vm = await other.request("POST", "/api/vms?wait=30", json=VM)
            assert status == 201, vm
            async with other.http.get(other.base_url + f"/api/vms/{vm['vm_id']}/events") as own:
                assert own.status == 200
            status, health = await other.request("GET", "/api/healthz")
            assert status == 200 and health == {"status": "ok"}
        finally:
            for resp in streams:
                resp.close()
    # Closed streams give their places back.
    for _ in range(50):
        async with hog.http.get(url) as again:
            if again.status == 200:
                break
        await asyncio.sleep(0.1)
    assert again.status == 200


async def test_storage_quota_counts_the_bytes_on_disk(server: Any, sessions: Any, database_url: str,
                                                      app_settings: Any) -> None:
    """The storage quota measures what the user's folder takes on disk, whatever put it there; a create or a
    snapshot that would not fit is refused whole, and making room lets it through (issue 13)."""
    alice: Session = sessions(server)
    await alice.signup_and_login()
    user_id = alice.user["id"]  # type: ignore[index]
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET quota_storage_gb = 1 WHERE id = %s", (user_id,))
        conn.commit()
    status, vm = await alice.request("POST", "/api/vms?wait=30", json=VM)
    assert status == 201, vm
    status, me = await alice.request("GET", "/api/me")
    assert me["quota"]["storage_gb"] == 1 and 0 < me["usage"]["storage_bytes"] < 1 << 20, me  # a fresh overlay

    # 1 GiB of allocated blocks in the user's folder: what saved memory of snapshots and suspends adds up to.
    folder = storage.user_dir(app_settings.vms_root, user_id)
    filler = folder / f"{uuid.uuid4()}.state"
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, 1 << 30)
    status, me = await alice.request("GET", "/api/me")
    used = me["usage"]["storage_bytes"]
    assert used > 1 << 30, me
    files = sorted(folder.iterdir())
    status, body = await alice.request("POST", "/api/vms", json=VM)
    assert_envelope(status, body, 403, "quota_exceeded")
    assert body["error"]["details"]["exceeded"]["storage_bytes"] == {"quota": 1 << 30, "used": used,
                                                                     "requested": 1 << 20}
    status, listed = await alice.request("GET", "/api/me/vms")
    assert [v["vm_id"] for v in listed["vms"]] == [vm["vm_id"]] and sorted(folder.iterdir()) == files

    assert (await alice.request("POST", f"/api/vms/{vm['vm_id']}/stop?wait=30"))[0] == 200
    status, body = await alice.request("POST", f"/api/vms/{vm['vm_id']}/snapshots", json={"name": "full"})
    assert_envelope(status, body, 403, "quota_exceeded")
    assert (await alice.request("GET", f"/api/vms/{vm['vm_id']}/snapshots"))[1]["snapshots"] == []

    filler.unlink()  # room again
    status, snap = await alice.request("POST", f"/api/vms/{vm['vm_id']}/snapshots?wait=30", json={"name": "fits"})
    assert status == 201 and snap["state"] == "ready", snap
    status, me = await alice.request("GET", "/api/me")
    assert me["usage"]["storage_bytes"] < 1 << 30
