"""Rate limits and login throttling (gateway/web/ratelimit.py) on a real Redis, and through the real app:
429 with Retry-After on every limited endpoint, recovery after the window, and login throttling
that an attacker cannot turn into a lockout of the account's owner. Windows are 1-3 s, set through
Settings.rate_limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import redis.asyncio as aioredis

from drivers.fake import FakeDriver
from gateway.config import RATE_LIMIT_DEFAULTS, ConfigError, Settings, describe
from gateway.web import ratelimit
from gateway.web.app import create_app
from tests.conftest import VM, Session, assert_envelope, truncate_all

PASSWORD = "correct horse battery"
# Effectively unlimited, so that a test sees only the rule it is about.
LOOSE = (1000, 60)
MakeServer = Callable[..., Awaitable[Any]]
# Not the shared test database 15: every test anywhere flushes that as it starts, and these tests
# count keys across seconds-long windows, so another test run on the machine would wipe their counts.
REDIS_DB = 14


@pytest.fixture
def redis_test_db() -> int:
    return REDIS_DB



@pytest.fixture
async def make_server(aiohttp_server: Any, app_settings: Settings, database_url: str) -> MakeServer:
    """Factory: a gateway on the fake driver whose rate-limit rules are overridden by ``rules``
    (every other rule is loosened), plus any other settings in ``changes``."""

    async def make(rules: dict[str, tuple[int, int] | None], **changes: Any) -> Any:
        limits = {name: LOOSE for name in RATE_LIMIT_DEFAULTS} | rules
        settings = dataclasses.replace(app_settings, rate_limits=limits, **changes)
        server = await aiohttp_server(create_app(settings, driver=FakeDriver()))
        truncate_all(database_url)
        return server

    return make


@pytest.fixture
async def limiter(app_settings: Settings, redis_flush: redis.Redis) -> AsyncIterator[Callable[..., ratelimit.Limiter]]:
    """Factory: a Limiter on the flushed test Redis with the given rules."""
    client = aioredis.from_url(app_settings.redis_url, decode_responses=True)

    def make(**rules: tuple[int, int] | None) -> ratelimit.Limiter:
        return ratelimit.Limiter(client, dataclasses.replace(app_settings, rate_limits=dict(rules)))

    yield make
    await client.aclose()


def mark_verified(database_url: str, user_id: str) -> None:
    """Verify a user's email straight in the database (creating VMs needs a verified email)."""
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET email_verified_at = now() WHERE id = %s", (user_id,))
        conn.commit()


async def signed_up(server: Any, sessions: Any, email: str | None = None) -> Session:
    session: Session = sessions(server)
    await session.signup_and_login(email)
    return session


async def login(session: Session, email: str, password: str = PASSWORD, ip: str = "198.51.100.7") -> tuple[int, Any]:
    """POST /api/auth/login as if from ``ip`` (the test client is loopback, so X-Real-IP is believed)."""
    return await session.request("POST", "/api/auth/login", json={"email": email, "password": password},
                                 headers={"X-Real-IP": ip})


async def request_with_headers(session: Session, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    """Like Session.request, but also returns the response headers (for Retry-After)."""
    if session.csrf_token and method in ("POST", "PUT", "PATCH", "DELETE"):
        kwargs["headers"] = {"X-CSRF-Token": session.csrf_token, **kwargs.get("headers", {})}
    async with session.http.request(method, session.base_url + path, **kwargs) as resp:
        return resp.status, await resp.json(), resp.headers


def assert_limited(status: int, body: Any, headers: Any, rule: str) -> int:
    """The 429 envelope with Retry-After, naming ``rule``; returns Retry-After."""
    error = assert_envelope(status, body, 429, "rate_limited")
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1
    assert error["details"] == {"rule": rule, "retry_after": retry_after}
    return retry_after


# ---- the limiter on its own ------------------------------------------------------------------------

async def test_counts_refuses_and_recovers_after_the_window(limiter: Callable[..., ratelimit.Limiter]) -> None:
    lim = limiter(signup_ip=(3, 1))
    for _ in range(3):
        await lim.hit([("signup_ip", ["203.0.113.1"])])
    with pytest.raises(ratelimit.RateLimited) as refused:
        await lim.hit([("signup_ip", ["203.0.113.1"])])
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.headers == {"Retry-After": "1"}
    assert refused.value.details == {"rule": "signup_ip", "retry_after": 1}
    # Another key is counted on its own.
    await lim.hit([("signup_ip", ["203.0.113.2"])])
    await asyncio.sleep(1.05)
    await lim.hit([("signup_ip", ["203.0.113.1"])])


async def test_window_slides_and_refusals_are_not_counted(limiter: Callable[..., ratelimit.Limiter]) -> None:
    """Retry-After is when the oldest counted request leaves the window; hammering meanwhile
    (refused, so not counted) does not push that back."""
    lim = limiter(console_user=(2, 3))
    await lim.hit([("console_user", ["u1"])])
    await asyncio.sleep(1.2)
    await lim.hit([("console_user", ["u1"])])
    with pytest.raises(ratelimit.RateLimited) as refused:
        await lim.hit([("console_user", ["u1"])])
    assert refused.value.retry_after == 2  # ceil(3 - 1.2 s)
    for _ in range(20):
        with pytest.raises(ratelimit.RateLimited):
            await lim.hit([("console_user", ["u1"])])
    await asyncio.sleep(1.9)  # the first request has left the window, the second has not
    await lim.hit([("console_user", ["u1"])])
    with pytest.raises(ratelimit.RateLimited):
        await lim.hit([("console_user", ["u1"])])


async def test_several_rules_count_all_or_nothing(limiter: Callable[..., ratelimit.Limiter],
                                                  redis_flush: redis.Redis) -> None:
    lim = limiter(reset_ip=(5, 60), reset_email=(1, 60))
    await lim.hit([("reset_ip", ["ip"]), ("reset_email", ["a@example.test"])])
    with pytest.raises(ratelimit.RateLimited) as refused:
        await lim.hit([("reset_ip", ["ip"]), ("reset_email", ["a@example.test"])])
    assert refused.value.rule == "reset_email"
    # The refused request was not counted under reset_ip either.
    assert redis_flush.zcard(lim.key("reset_ip", "ip")) == 1


async def test_refund_and_reset(limiter: Callable[..., ratelimit.Limiter]) -> None:
    lim = limiter(verify_ip=(1, 60))
    hit = await lim.hit([("verify_ip", ["ip"])])
    await lim.refund(hit)
    await lim.hit([("verify_ip", ["ip"])])
    with pytest.raises(ratelimit.RateLimited):
        await lim.hit([("verify_ip", ["ip"])])
    await lim.reset("verify_ip", "ip")
    await lim.hit([("verify_ip", ["ip"])])


async def test_a_rule_that_is_off_never_limits(limiter: Callable[..., ratelimit.Limiter],
                                               redis_flush: redis.Redis) -> None:
    lim = limiter(signup_ip=None)
    for _ in range(5):
        await lim.hit([("signup_ip", ["ip"])])
    assert redis_flush.dbsize() == 0
    with pytest.raises(KeyError):  # a rule name that does not exist is a bug, not "unlimited"
        await lim.hit([("no_such_rule", ["ip"])])


async def test_keys_hold_no_emails_or_addresses(limiter: Callable[..., ratelimit.Limiter],
                                                redis_flush: redis.Redis) -> None:
    lim = limiter(reset_email=(2, 60), reset_ip=(3, 60))
    await lim.hit([("reset_email", ["Someone@Example.test"]), ("reset_ip", ["192.0.2.44"])])
    stored = redis_flush.keys("*")
    assert len(stored) == 2
    assert all(k.startswith("vmgate:rl:reset_") for k in stored)
    assert not any("example" in k.lower() or "192.0.2" in k for k in stored)
    # Case and surrounding blanks do not make a new key.
    await lim.hit([("reset_email", [" SOMEONE@example.test "])])
    with pytest.raises(ratelimit.RateLimited) as refused:
        await lim.hit([("reset_email", ["someone@example.test"])])
    assert refused.value.rule == "reset_email"


def test_rate_limits_setting_parses_overrides(tmp_path: Path) -> None:
    base = {"POSTGRES_URL": "postgresql://u:p@127.0.0.1:5433/db", "REDIS_URL": "redis://127.0.0.1:6380/0",
            "JWT_SECRET": "x" * 40}
    no_dotenv = tmp_path / "absent.env"
    settings = Settings.load(base, dotenv=no_dotenv)
    assert settings.rate_limits == RATE_LIMIT_DEFAULTS
    settings = Settings.load({**base, "RATE_LIMITS": " login_pair=3/60 , signup_ip=off,"}, dotenv=no_dotenv)
    assert settings.rate_limits["login_pair"] == (3, 60)
    assert settings.rate_limits["signup_ip"] is None
    assert settings.rate_limits["login_ip"] == RATE_LIMIT_DEFAULTS["login_ip"]
    for bad in ("nope=1/60", "login_pair=3", "login_pair=0/60", "login_pair=3/0", "login_pair=a/b", "login_pair"):
        with pytest.raises(ConfigError) as error:
            Settings.load({**base, "RATE_LIMITS": bad}, dotenv=no_dotenv)
        assert error.value.key == "RATE_LIMITS"
    assert describe_entry("RATE_LIMITS")[:2] == ("RATE_LIMITS", "")
    assert describe_entry("CONSOLE_MAX_SESSION")[:2] == ("CONSOLE_MAX_SESSION", "28800")


def describe_entry(key: str) -> tuple[str, str | None, str]:
    return next(entry for entry in describe() if entry[0] == key)


# ---- 429 on every limited endpoint -----------------------------------------------------------------

async def test_signup_is_limited_per_ip(make_server: MakeServer, sessions: Any) -> None:
    server = await make_server({"signup_ip": (2, 2)})
    s: Session = sessions(server)

    async def signup(ip: str) -> tuple[int, Any, Any]:
        creds = {"email": f"u{uuid.uuid4().hex[:10]}@example.test", "password": PASSWORD}
        return await request_with_headers(s, "POST", "/api/auth/signup", json=creds, headers={"X-Real-IP": ip})

    assert (await signup("203.0.113.9"))[0] == 201
    assert (await signup("203.0.113.9"))[0] == 201
    retry_after = assert_limited(*await signup("203.0.113.9"), "signup_ip")
    assert (await signup("203.0.113.10"))[0] == 201  # another address is not affected
    await asyncio.sleep(retry_after)
    assert (await signup("203.0.113.9"))[0] == 201


async def test_vm_create_is_limited_per_user(make_server: MakeServer, sessions: Any, database_url: str) -> None:
    server = await make_server({"vm_create_user": (2, 2)})
    alice = await signed_up(server, sessions)
    bob = await signed_up(server, sessions)
    for user in (alice, bob):
        mark_verified(database_url, user.user["id"] if user.user else "")
    assert (await alice.request("POST", "/api/vms?wait=60", json=VM))[0] == 201
    assert (await alice.request("POST", "/api/vms?wait=60", json=VM))[0] == 201
    retry_after = assert_limited(*await request_with_headers(alice, "POST", "/api/vms", json=VM), "vm_create_user")
    assert (await bob.request("POST", "/api/vms?wait=60", json=VM))[0] == 201
    await asyncio.sleep(retry_after)
    assert (await alice.request("POST", "/api/vms?wait=60", json=VM))[0] == 201


async def with_running_vm(server: Any, sessions: Any, database_url: str) -> tuple[Session, str]:
    """A verified user with a running VM; returns the session and the VM's id."""
    alice = await signed_up(server, sessions)
    mark_verified(database_url, alice.user["id"] if alice.user else "")
    status, vm = await alice.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201, vm
    return alice, vm["vm_id"]


async def test_console_is_limited_per_user(make_server: MakeServer, sessions: Any, database_url: str) -> None:
    server = await make_server({"console_user": (2, 2)})
    alice, vm_id = await with_running_vm(server, sessions, database_url)
    path = f"/api/vms/{vm_id}/console"
    assert (await alice.request("GET", path))[0] == 200
    assert (await alice.request("GET", path))[0] == 200
    retry_after = assert_limited(*await request_with_headers(alice, "GET", path), "console_user")
    await asyncio.sleep(retry_after)
    assert (await alice.request("GET", path))[0] == 200


async def test_vm_actions_and_snapshots_are_limited_per_user(make_server: MakeServer, sessions: Any,
                                                            database_url: str) -> None:
    """Starts, stops and suspends share one rule, snapshots and restores another; a destroy is never held back."""
    server = await make_server({"vm_action_user": (2, 600), "snapshot_user": (1, 600)})
    alice, vm_id = await with_running_vm(server, sessions, database_url)
    assert (await alice.request("POST", f"/api/vms/{vm_id}/stop?wait=30"))[0] == 200
    assert (await alice.request("POST", f"/api/vms/{vm_id}/start?wait=30"))[0] == 200
    assert_limited(*await request_with_headers(alice, "POST", f"/api/vms/{vm_id}/stop"), "vm_action_user")
    status, vm = await alice.request("GET", f"/api/vms/{vm_id}")
    assert status == 200 and \
        vm["state"] == "running" and vm["desired_state"] == "running", vm  # the refused stop: nothing
    path = f"/api/vms/{vm_id}/snapshots"
    # Counted before anything else is checked: the fake driver cannot snapshot a running VM (409), and
    # that attempt still used the one snapshot this user had.
    assert_envelope(*await alice.request("POST", path, json={"name": "one"}), 409, "not_supported")
    assert_limited(*await request_with_headers(alice, "POST", path, json={"name": "two"}), "snapshot_user")
    assert (await alice.request("DELETE", f"/api/vms/{vm_id}?wait=30"))[0] == 200


async def test_a_refused_console_request_resumes_nothing(make_server: MakeServer, sessions: Any,
                                                       database_url: str) -> None:
    """The console's rate limit is checked before a suspended VM is woken for it (issue 13)."""
    server = await make_server({"console_user": (1, 60)})
    alice, vm_id = await with_running_vm(server, sessions, database_url)
    path = f"/api/vms/{vm_id}/console"
    assert (await alice.request("GET", path))[0] == 200
    assert (await alice.request("POST", f"/api/vms/{vm_id}/stop?wait=60"))[0] == 200
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE vms SET state = 'suspended', desired_state = 'suspended' WHERE id = %s", (vm_id,))
        conn.commit()
    assert_limited(*await request_with_headers(alice, "GET", path), "console_user")
    _, after = await alice.request("GET", f"/api/vms/{vm_id}")
    assert (after["state"], after["desired_state"]) == ("suspended", "suspended"), after


# ---- login throttling --------------------------------------------------------------------------------

async def test_login_pair_is_throttled_and_the_owner_elsewhere_is_not(make_server: MakeServer,
                                                                      sessions: Any) -> None:
    server = await make_server({"login_pair": (3, 2)})
    victim = await signed_up(server, sessions)
    email = victim.user["email"] if victim.user else ""
    attacker: Session = sessions(server)
    for _ in range(3):
        assert_envelope(*await login(attacker, email, "wrong password!!", ip="203.0.113.66"), 401,
                        "invalid_credentials")
    # The pair is throttled: even the right password is refused from there, before it is checked.
    status, body, headers = await request_with_headers(
        attacker, "POST", "/api/auth/login", json={"email": email, "password": PASSWORD},
        headers={"X-Real-IP": "203.0.113.66"})
    retry_after = assert_limited(status, body, headers, "login_pair")
    # The owner, from their own address, logs in all the same.
    assert (await login(sessions(server), email, ip="198.51.100.7"))[0] == 200
    # Hammering while throttled is not counted and does not make the lockout last longer.
    for _ in range(10):
        assert (await login(attacker, email, "wrong password!!", ip="203.0.113.66"))[0] == 429
    await asyncio.sleep(retry_after)
    assert (await login(attacker, email, ip="203.0.113.66"))[0] == 200


async def test_a_successful_login_clears_the_pair(make_server: MakeServer, sessions: Any) -> None:
    server = await make_server({"login_pair": (3, 60)})
    user = await signed_up(server, sessions)
    email = user.user["email"] if user.user else ""
    s: Session = sessions(server)
    for _ in range(2):
        assert (await login(s, email, "wrong password!!"))[0] == 401
    assert (await login(s, email))[0] == 200
    for _ in range(3):  # three more failures allowed: the count started afresh
        assert (await login(s, email, "wrong password!!"))[0] == 401
    assert (await login(s, email))[0] == 429


async def test_login_ip_is_throttled_across_accounts(make_server: MakeServer, sessions: Any) -> None:
    server = await make_server({"login_ip": (3, 2)})
    s: Session = sessions(server)
    for i in range(3):
        assert (await login(s, f"guess{i}@example.test", "wrong password!!", ip="203.0.113.5"))[0] == 401
    status, body, headers = await request_with_headers(
        s, "POST", "/api/auth/login", json={"email": "guess9@example.test", "password": "wrong password!!"},
        headers={"X-Real-IP": "203.0.113.5"})
    retry_after = assert_limited(status, body, headers, "login_ip")
    # Unknown accounts are throttled exactly like real ones (a 429 reveals nothing), other IPs are not.
    assert (await login(s, "guess9@example.test", "wrong password!!", ip="203.0.113.6"))[0] == 401
    await asyncio.sleep(retry_after)
    assert (await login(s, "guess9@example.test", "wrong password!!", ip="203.0.113.5"))[0] == 401


async def test_login_account_spares_the_owners_known_addresses(make_server: MakeServer, sessions: Any) -> None:
    """Failures from many addresses throttle the account, but not from where its owner logged in."""
    server = await make_server({"login_account": (3, 2)})
    owner: Session = sessions(server)
    email = f"owner{uuid.uuid4().hex[:8]}@example.test"
    assert (await owner.request("POST", "/api/auth/signup", json={"email": email, "password": PASSWORD}))[0] == 201
    assert (await login(owner, email, ip="198.51.100.20"))[0] == 200  # a known address from now on
    attacker: Session = sessions(server)
    for i in range(3):
        assert (await login(attacker, email, "wrong password!!", ip=f"203.0.113.{100 + i}"))[0] == 401
    status, body, headers = await request_with_headers(
        attacker, "POST", "/api/auth/login", json={"email": email, "password": PASSWORD},
        headers={"X-Real-IP": "203.0.113.200"})
    retry_after = assert_limited(status, body, headers, "login_account")
    assert (await login(sessions(server), email, ip="198.51.100.20"))[0] == 200
    await asyncio.sleep(retry_after)
    assert (await login(attacker, email, ip="203.0.113.200"))[0] == 200
