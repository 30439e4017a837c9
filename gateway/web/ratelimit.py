"""Rate limits in Redis: named rules, counted per key (an IP, a user, an email), answered with 429.

Calling it from a handler::

    from gateway.web import ratelimit
    from gateway.web.http import client_ip

    await ratelimit.limit(request, "reset_ip", client_ip(request))
    await ratelimit.limit(request, "reset_email", email)

``limit`` counts one request against the rule for that key and raises ``RateLimited`` (429,
code ``rate_limited``, header ``Retry-After`` in whole seconds >= 1, details ``{rule,
retry_after}``) when the rule's count for the window is already used up. A refused request is
not counted, so a client that keeps hammering is not locked out any longer than the window.
Key parts are any strings (``None`` is allowed, for an unknown IP), compared without case or
surrounding blanks; they are never stored as they are, only as an HMAC, so Redis holds no emails
or addresses.

Rules (``config.RATE_LIMIT_DEFAULTS``; ``RATE_LIMITS=rule=COUNT/SECONDS,...`` or ``rule=off``):

============== ==================== ===================================================
rule           default              counts
============== ==================== ===================================================
login_ip       30 per 15 min        failed logins from one IP, any account
login_pair     5 per 15 min         failed logins for one account from one IP
login_account  20 per hour          failed logins for one account from IPs it has not
                                    logged in from successfully in the last 30 days
signup_ip      20 per hour          signups from one IP
verify_ip      30 per hour          email verification attempts from one IP
resend_user    3 per hour           verification mails re-sent for one user
reset_ip       10 per hour          password-reset requests from one IP
reset_email    3 per hour           password-reset mails to one address
vm_create_user 30 per 10 min        VM creates by one user
console_user   30 per minute        console tokens issued to one user
vm_action_user 60 per 10 min        starts, stops and suspends by one user (destroys are not limited)
snapshot_user  30 per 10 min        snapshots taken and restored by one user
files_user     60 per 10 min        file uploads and downloads by one user (gateway/web/files.py)
============== ==================== ===================================================

Logins go through ``login_attempt`` instead, which applies the three login rules at once and
clears them on success (see docs/SECURITY.md, "Rate limits").

How: a sliding-window log, one sorted set per rule and key (members are requests, scores their
times), checked and updated by one Lua script so that concurrent requests cannot both take the
last slot. Chosen over a fixed window with INCR+EXPIRE because a fixed window lets a client send
twice the limit across a window boundary and its Retry-After is the window's end rather than
when a slot frees up; the log costs at most COUNT members per key, and the counts here are small.
Times come from Redis (``TIME``), so gateways with skewed clocks agree. If Redis is down the
limiter raises Redis's error and the request fails with 503: limits fail closed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from gateway import credentials
from gateway.config import Settings
from gateway.errors import ApiError
from gateway.web.appkeys import redis_key, settings_key

log = logging.getLogger("vmgate.ratelimit")

PREFIX = "vmgate:rl:"
# A login that succeeded from an IP makes that (account, IP) pair "known" for this long: failures
# from elsewhere (login_account) never lock the account's owner out of their usual places.
KNOWN_LOGIN_TTL = 30 * 86400

# KEYS: one sorted set per rule. ARGV[1]: a unique member for this request; then, per key, the
# rule's count and window in milliseconds. Returns {0, 0} if the request was counted under every
# key, else {i, wait_ms}: key i (1-based) is full and its next slot frees in wait_ms (the longest
# wait among the full keys); nothing was counted.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local full, wait = 0, 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count >= limit then
    local entry = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    local frees = tonumber(entry[2]) + window - now
    if frees > wait then
      full, wait = i, frees
    end
  end
end
if full > 0 then
  return {full, wait}
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('PEXPIRE', key, tonumber(ARGV[2 * i + 1]))
end
return {0, 0}
"""
_SCRIPT_SHA = hashlib.sha1(_SLIDING_WINDOW.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


class RateLimited(ApiError):
    """429: a rate-limit rule is used up for this key; ``Retry-After`` says when a slot frees."""

    status, code = 429, "rate_limited"

    def __init__(self, rule: str, retry_after: int) -> None:
        super().__init__(f"Too many requests; try again in {retry_after} s.",
                         details={"rule": rule, "retry_after": retry_after},
                         headers={"Retry-After": str(retry_after)})
        self.rule = rule
        self.retry_after = retry_after


@dataclass(frozen=True)
class Hit:
    """One request as counted: the sorted sets it went into and its member there (for ``refund``)."""

    keys: tuple[str, ...]
    member: str


class Limiter:
    """The rules of ``settings`` over one Redis; cheap to build, so handlers build one per request."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.rules = settings.rate_limits
        # Keys hold an HMAC of their parts: a dump of Redis does not list who tried what from where.
        self._secret = hashlib.sha256(b"vmgate rate-limit keys\0" + settings.jwt_secret.encode()).digest()

    def key(self, rule: str, *parts: str | None) -> str:
        """The Redis key of ``rule`` for ``parts``; parts differing only in case or surrounding blanks
        (an email typed two ways) are the same."""
        joined = "\0".join("-" if part is None else part.strip().lower() for part in parts)
        digest = hmac.new(self._secret, f"{rule}\0{joined}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{PREFIX}{rule}:{digest}"

    def rule(self, name: str) -> tuple[int, int] | None:
        """(count, window seconds) of a rule, or None if it is off. An unknown name is a bug: KeyError."""
        return self.rules[name]

    async def hit(self, checks: Sequence[tuple[str, Sequence[str | None]]]) -> Hit:
        """Count one request under every (rule, key parts) in ``checks``, or under none of them and
        raise ``RateLimited`` naming the rule whose slot frees last."""
        names: list[str] = []
        redis_keys: list[str] = []
        args: list[int | str] = [secrets.token_hex(8)]
        for name, parts in checks:
            rule = self.rule(name)
            if rule is None:
                continue
            names.append(name)
            redis_keys.append(self.key(name, *parts))
            args += [rule[0], rule[1] * 1000]
        if not redis_keys:
            return Hit((), str(args[0]))
        try:
            full, wait_ms = await self.redis.evalsha(_SCRIPT_SHA, len(redis_keys), *redis_keys, *args)
        except redis.exceptions.NoScriptError:  # a Redis restarted or flushed since the last call
            full, wait_ms = await self.redis.eval(_SLIDING_WINDOW, len(redis_keys), *redis_keys, *args)
        if int(full):
            rule_name = names[int(full) - 1]
            retry_after = max(1, math.ceil(int(wait_ms) / 1000))
            log.info("rate limited: %s, retry after %s s", rule_name, retry_after)
            raise RateLimited(rule_name, retry_after)
        return Hit(tuple(redis_keys), str(args[0]))

    async def refund(self, hit: Hit) -> None:
        """Take a counted request back out (it turned out not to be what the rule counts)."""
        if hit.keys:
            async with self.redis.pipeline(transaction=True) as pipe:
                for key in hit.keys:
                    pipe.zrem(key, hit.member)
                await pipe.execute()

    async def reset(self, rule: str, *parts: str | None) -> None:
        """Forget everything counted under ``rule`` for ``parts``."""
        await self.redis.delete(self.key(rule, *parts))


def limiter(request: web.Request) -> Limiter:
    """The limiter for the request's app."""
    return Limiter(request.app[redis_key], request.app[settings_key])


async def limit(request: web.Request, rule: str, *parts: str | None) -> Hit:
    """Count this request under ``rule`` for ``parts`` (e.g. ``client_ip(request)``, a user id, an
    email); raise ``RateLimited`` (429) if the rule is used up. See the module docstring."""
    return await limiter(request).hit([(rule, parts)])


# ---- login throttling ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoginAttempt:
    """A login attempt counted as a failure until ``succeeded`` says otherwise."""

    limiter: Limiter
    hit: Hit
    email: str
    ip: str | None

    async def succeeded(self) -> None:
        """The password was right: this attempt was no failure, the pair starts afresh, and the
        (account, IP) pair is known from now on."""
        await self.limiter.refund(self.hit)
        await self.limiter.reset("login_pair", self.email, self.ip)
        await self.limiter.redis.set(self.limiter.key("login_known", self.email, self.ip), "1", ex=KNOWN_LOGIN_TTL)


async def login_attempt(request: web.Request, email: str, ip: str | None) -> LoginAttempt:
    """Count a login attempt before the password is checked, or raise ``RateLimited``.

    Counted (and refused when full): ``login_ip`` for the IP, ``login_pair`` for (account, IP)
    and, unless this account has logged in from this IP before, ``login_account``. The account is
    its email as typed (normalised), whether or not such an account exists, so a 429 tells nothing
    about which emails are registered. Call ``succeeded()`` on the result once the login is good;
    a failed login leaves the attempt counted. Counting before checking means parallel guesses
    cannot all slip through before the first failure is recorded.
    """
    lim = limiter(request)
    email = credentials.email_key(email)
    known = bool(await lim.redis.exists(lim.key("login_known", email, ip)))
    checks: list[tuple[str, Sequence[str | None]]] = [("login_ip", (ip,)), ("login_pair", (email, ip))]
    if not known:
        checks.append(("login_account", (email,)))
    return LoginAttempt(lim, await lim.hit(checks), email, ip)
