"""websockify token plugin: redeem a vmgate console token from Redis and say where the VM's VNC is.

Run websockify with::

    python -m console.proxy --token-plugin console.token_plugin.RedisTokens --token-source env:REDIS_URL 127.0.0.1:6080

``--token-source`` is a Redis URL, or ``env:NAME`` to read the URL from the environment variable
NAME (which keeps the Redis password out of the process list). A fleet VM's target names its
Consul service: the plugin then asks Consul (``CONSUL_HTTP_ADDR``) for the VM's healthy instance
(console/consul.py) and takes it only if it is the allocation, address and port Nomad runs the VM at
(the target names them). A fleet target also carries the start's VNC password, kept on the plugin
(``vnc_password``) for console/proxy.py, which answers it to QEMU; run ``python -m console.proxy``
(websockify's command line) rather than ``websockify`` for that.

websockify 0.13 forks one child per connection and calls ``lookup`` in that child before it
accepts the WebSocket, so every call opens its own Redis connection and keeps nothing. A token is
good for one connection: it is deleted as it is read (GETDEL), so a replay finds nothing. Whatever
goes wrong, the answer is ``None`` (websockify then closes the connection without an HTTP
response) and one log line says why, with the token masked.

After a token is redeemed, the connection's process watches for the end of its session
(console/sessions.py): revocation, its maximum duration, and the user's cap on open consoles.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from typing import Any

import redis
from websockify.token_plugins import BasePlugin
from websockify.websockifyserver import WebSockifyServer

from console import consul, redis_keys
from console.sessions import END_GRACE, REDIS_TIMEOUT, Session, SessionWatcher

__all__ = ["END_GRACE", "RedisTokens", "Session", "SessionWatcher", "mask_tokens"]

log = logging.getLogger("vmgate.console.tokens")

MAX_SESSION_LIMIT = 7 * 86400  # the longest max_session a token record may ask for
_PASSWORD_RE = re.compile(r"[A-Za-z0-9]{1,8}")  # a VNC password as jobspecs/vnc_password.py makes them

# Where a token can appear in websockify's own log lines: the request path and query it logs after
# an upgrade (and in access log lines with --verbose), and its "Token '...' not found" on refusal.
_TOKEN_IN_QUERY = re.compile(r"(?i)(token=)([^&\s'\"]+)")
_TOKEN_NOT_FOUND = re.compile(r"Token '(.*)' not found", re.DOTALL)

Target = tuple[str, int] | list[str]


def mask_tokens(text: str) -> str:
    """Return ``text`` with any console token in it masked (websockify's log lines carry them)."""
    text = _TOKEN_NOT_FOUND.sub(lambda m: f"Token {redis_keys.mask(m.group(1))!r} refused", text)
    return _TOKEN_IN_QUERY.sub(lambda m: m.group(1) + redis_keys.mask(m.group(2)), text)


class _MaskTokensFilter(logging.Filter):
    """Rewrites websockify's log records so that no whole token reaches a log handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_tokens(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def _install_log_filter() -> None:
    # Every websockify message (server and per-connection handler alike) goes through this logger.
    ws_logger = WebSockifyServer.get_logger()
    if not any(isinstance(f, _MaskTokensFilter) for f in ws_logger.filters):
        ws_logger.addFilter(_MaskTokensFilter())


def _redis_url(source: str | None) -> str:
    if not source:
        raise ValueError("RedisTokens needs --token-source: a Redis URL or env:NAME")
    if source.startswith("env:"):
        name = source[4:]
        url = os.environ.get(name, "")
        if not url:
            raise ValueError(f"RedisTokens: environment variable {name} (from --token-source) is empty")
        return url
    return source


class Refused(Exception):
    """A token was refused; the message says why (and never holds the token)."""


# Take a place among the user's live sessions, unless they hold max_consoles already. One script, so
# two connections redeemed at once cannot both take the last place.
# KEYS[1] the user's sessions key; ARGV: now, max_consoles, lease end, member, key TTL.
_CLAIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisTokens(BasePlugin):
    """Resolve a one-time console token to the VNC target of its VM."""

    def __init__(self, src: str | None) -> None:
        super().__init__(src)
        self.url = _redis_url(src)
        # Fail at start-up, not on the first connection, if the URL cannot be parsed.
        redis.Redis.from_url(self.url).close()
        _install_log_filter()
        # The VNC password of the target the last lookup resolved (console/proxy.py answers it). websockify
        # forks a process per connection before the lookup, so this is the connection's own.
        self.vnc_password: str | None = None

    def lookup(self, token: str) -> Target | None:
        """Redeem ``token`` once; return ``['unix_socket', path]`` or ``(host, port)``, else None."""
        masked = redis_keys.mask(token) if isinstance(token, str) else "?"
        self.vnc_password = None
        try:
            target, session, self.vnc_password = self._redeem(token)
        except Refused as exc:
            log.warning("console token %r refused: %s", masked, exc)
            return None
        except redis.RedisError as exc:
            log.warning("console token %r refused: Redis unavailable (%s)", masked, type(exc).__name__)
            return None
        except Exception:
            log.exception("console token %r refused: unexpected error", masked)
            return None
        log.info("console token %r redeemed: vm %s, user %s", masked, session.vm_id, session.user_id)
        watcher = SessionWatcher(self.url, session)
        try:
            watched = watcher.start()
        except Exception:  # a session nobody could end is not opened
            log.exception("console token %r refused: cannot watch its session", masked)
            watcher.release()
            return None
        if not watched:
            log.warning("console session of vm %s cannot be ended early: websockify is not running one process"
                        " per connection (do not use --libserver or --run-once)", session.vm_id)
        return target

    def _redeem(self, token: str) -> tuple[Target, Session, str | None]:
        if not isinstance(token, str) or not redis_keys.TOKEN_RE.fullmatch(token):
            raise Refused("malformed")
        token_hash = redis_keys.hash_token(token)
        client = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            decode_responses=True,
        )
        with client:
            raw = client.getdel(redis_keys.token_key(token_hash))
            if raw is None:
                raise Refused("not issued, expired, revoked or already used")
            record = _parse_record(raw)
            vm_id, user_id = record["vm_id"], record["user_id"]
            # SREMs and GETs in one MULTI, so a revocation (which deletes the sets and the target,
            # or replaces the user's generation) is either wholly before them or wholly after.
            api_token_id = record["api_token_id"]
            with client.pipeline(transaction=True) as pipe:
                pipe.srem(redis_keys.vm_tokens_key(vm_id), token_hash)
                pipe.srem(redis_keys.user_tokens_key(user_id), token_hash)
                pipe.get(redis_keys.vnc_target_key(vm_id))
                pipe.get(redis_keys.user_generation_key(user_id))
                pipe.exists(redis_keys.api_token_revoked_key(api_token_id or "-"))
                removed, _, raw_target, user_generation, api_token_revoked = pipe.execute()
            if record["expires_at"] <= time.time():
                raise Refused(f"expired (vm {vm_id})")
            if not removed:
                raise Refused(f"revoked: no longer in the set of vm {vm_id}")
            if user_generation is not None and user_generation != record.get("user_generation"):
                raise Refused(f"revoked: user {user_id} logged out after it was issued (vm {vm_id})")
            if api_token_id and api_token_revoked:
                raise Refused(f"revoked: the API token it was issued to is revoked (vm {vm_id})")
            if raw_target is None:
                raise Refused(f"vm {vm_id} has no VNC target (not running)")
            target, password = _parse_target(raw_target, vm_id)
            member = f"{socket.gethostname()}:{os.getpid()}:{token_hash[:16]}"
            now = time.time()
            claimed = client.eval(_CLAIM, 1, redis_keys.user_sessions_key(user_id), f"{now:.3f}",
                                  record["max_consoles"], f"{now + redis_keys.SESSION_LEASE:.3f}", member,
                                  MAX_SESSION_LIMIT + redis_keys.SESSION_LEASE)
            if not claimed:
                raise Refused(f"user {user_id} has {record['max_consoles']} consoles open already (vm {vm_id})")
        return target, Session(vm_id, user_id, record["max_session"], raw_target, user_generation,
                               api_token_id, member), password


def _parse_record(raw: str | bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        raise Refused("token record is not JSON") from None
    if not isinstance(record, dict):
        raise Refused("token record is not a JSON object")
    vm_id, expires_at = record.get("vm_id"), record.get("expires_at")
    if not isinstance(vm_id, str) or not vm_id:
        raise Refused("token record has no vm_id")
    # json.loads accepts NaN and Infinity, and NaN compares false with every time.
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float) or not math.isfinite(expires_at):
        raise Refused(f"token record of vm {vm_id} has no finite numeric expires_at")
    user_id = record.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise Refused(f"token record of vm {vm_id} has no user_id")
    max_session = record.setdefault("max_session", redis_keys.DEFAULT_MAX_SESSION)
    if isinstance(max_session, bool) or not isinstance(max_session, int) or not 0 < max_session <= MAX_SESSION_LIMIT:
        raise Refused(f"token record of vm {vm_id} has a bad max_session")
    max_consoles = record.setdefault("max_consoles", redis_keys.DEFAULT_MAX_CONSOLES)
    if isinstance(max_consoles, bool) or not isinstance(max_consoles, int) or not 0 < max_consoles <= 100000:
        raise Refused(f"token record of vm {vm_id} has a bad max_consoles")
    api_token_id = record.setdefault("api_token_id", None)
    if api_token_id is not None and (not isinstance(api_token_id, str) or not api_token_id):
        raise Refused(f"token record of vm {vm_id} has a bad api_token_id")
    return record


def _parse_target(raw: str | bytes, vm_id: str) -> tuple[Target, str | None]:
    """Where the VM's VNC is, and the VNC password to answer there (None: none asked)."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise Refused(f"VNC target of vm {vm_id} is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(f"VNC target of vm {vm_id} is not a JSON object")
    path = data.get("unix_socket")
    if path:
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise Refused(f"VNC target of vm {vm_id} has a bad unix_socket")
        # websockify 0.13's validate_connection() reads this pair as (host, port) and, when
        # host == 'unix_socket', connects to the path in "port" as a unix socket.
        return ["unix_socket", path], None
    password = data.get("password")
    if password is not None and (not isinstance(password, str) or not _PASSWORD_RE.fullmatch(password)):
        raise Refused(f"VNC target of vm {vm_id} has a bad password")
    host, port = data.get("host"), data.get("port")
    if not isinstance(host, str) or not host:
        raise Refused(f"VNC target of vm {vm_id} has neither unix_socket nor host")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise Refused(f"VNC target of vm {vm_id} has a bad port")
    service, alloc_id = data.get("consul_service"), data.get("alloc_id")
    if service is not None:
        # A fleet VM: its healthy instance in Consul (console/consul.py), which must be the allocation
        # Nomad runs the VM in, at the address and port Nomad gave it: an instance that merely claims
        # to be the VM's (anyone who can register a service could) gets no console.
        if not isinstance(service, str) or not service:
            raise Refused(f"VNC target of vm {vm_id} has a bad consul_service")
        if alloc_id is not None and (not isinstance(alloc_id, str) or not alloc_id):
            raise Refused(f"VNC target of vm {vm_id} has a bad alloc_id")
        try:
            found = consul.healthy_endpoint(service, vm_id, alloc_id=alloc_id)
        except consul.ConsulError as exc:
            raise Refused(str(exc)) from None
        if found != (host, port):
            raise Refused(f"Consul's {service} instance of vm {vm_id} is at {found[0]}:{found[1]}, "
                          f"not where Nomad runs it ({host}:{port})")
        log.info("vm %s: VNC at %s:%d, Consul's healthy %s instance of allocation %s", vm_id, host, port,
                 service, alloc_id)
    return (host, port), password
