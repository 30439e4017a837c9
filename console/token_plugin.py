"""websockify token plugin: redeem a vmgate console token from Redis and say where the VM's VNC is.

Run websockify with::

    websockify --token-plugin console.token_plugin.RedisTokens --token-source env:REDIS_URL 127.0.0.1:6080

``--token-source`` is a Redis URL, or ``env:NAME`` to read the URL from the environment variable
NAME (which keeps the Redis password out of the process list).

websockify 0.13 forks one child per connection and calls ``lookup`` in that child before it
accepts the WebSocket, so every call opens its own Redis connection and keeps nothing. A token is
good for one connection: it is deleted as it is read (GETDEL), so a replay finds nothing. Whatever
goes wrong, the answer is ``None`` (websockify then closes the connection without an HTTP
response) and one log line says why, with the token masked. See docs/CONSOLE.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any

import redis
from websockify.token_plugins import BasePlugin
from websockify.websockifyserver import WebSockifyServer

from console import keys

log = logging.getLogger("vmgate.console.tokens")

REDIS_TIMEOUT = 3.0

# Where a token can appear in websockify's own log lines: the request path and query it logs after
# an upgrade (and in access log lines with --verbose), and its "Token '...' not found" on refusal.
_TOKEN_IN_QUERY = re.compile(r"(?i)(token=)([^&\s'\"]+)")
_TOKEN_NOT_FOUND = re.compile(r"Token '(.*)' not found", re.DOTALL)

Target = tuple[str, int] | list[str]


def mask_tokens(text: str) -> str:
    """Return ``text`` with any console token in it masked (websockify's log lines carry them)."""
    text = _TOKEN_NOT_FOUND.sub(lambda m: f"Token {keys.mask(m.group(1))!r} refused", text)
    return _TOKEN_IN_QUERY.sub(lambda m: m.group(1) + keys.mask(m.group(2)), text)


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


class RedisTokens(BasePlugin):
    """Resolve a one-time console token to the VNC target of its VM."""

    def __init__(self, src: str | None) -> None:
        super().__init__(src)
        self.url = _redis_url(src)
        # Fail at start-up, not on the first connection, if the URL cannot be parsed.
        redis.Redis.from_url(self.url).close()
        _install_log_filter()

    def lookup(self, token: str) -> Target | None:
        """Redeem ``token`` once; return ``['unix_socket', path]`` or ``(host, port)``, else None."""
        masked = keys.mask(token) if isinstance(token, str) else "?"
        try:
            target, vm_id, user_id = self._redeem(token)
        except Refused as exc:
            log.warning("console token %r refused: %s", masked, exc)
            return None
        except redis.RedisError as exc:
            log.warning("console token %r refused: Redis unavailable (%s)", masked, type(exc).__name__)
            return None
        except Exception:
            log.exception("console token %r refused: unexpected error", masked)
            return None
        log.info("console token %r redeemed: vm %s, user %s", masked, vm_id, user_id)
        return target

    def _redeem(self, token: str) -> tuple[Target, str, str]:
        if not isinstance(token, str) or not keys.TOKEN_RE.fullmatch(token):
            raise Refused("malformed")
        token_hash = keys.hash_token(token)
        client = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            decode_responses=True,
        )
        with client:
            raw = client.getdel(keys.token_key(token_hash))
            if raw is None:
                raise Refused("not issued, expired, revoked or already used")
            record = _parse_record(raw)
            vm_id = record["vm_id"]
            # SREM and GET in one MULTI, so a revocation (which deletes the set) is either wholly
            # before them or wholly after.
            with client.pipeline(transaction=True) as pipe:
                pipe.srem(keys.vm_tokens_key(vm_id), token_hash)
                pipe.get(keys.vnc_target_key(vm_id))
                removed, raw_target = pipe.execute()
        if record["expires_at"] <= time.time():
            raise Refused(f"expired (vm {vm_id})")
        if not removed:
            raise Refused(f"revoked: no longer in the set of vm {vm_id}")
        if raw_target is None:
            raise Refused(f"vm {vm_id} has no VNC target (not running)")
        return _parse_target(raw_target, vm_id), vm_id, str(record.get("user_id"))


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
    return record


def _parse_target(raw: str | bytes, vm_id: str) -> Target:
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
        return ["unix_socket", path]
    host, port = data.get("host"), data.get("port")
    if not isinstance(host, str) or not host:
        raise Refused(f"VNC target of vm {vm_id} has neither unix_socket nor host")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise Refused(f"VNC target of vm {vm_id} has a bad port")
    return (host, port)
