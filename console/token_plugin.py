"""websockify token plugin: redeem a vmgate console token from Redis and say where the VM's VNC is.

Run websockify with::

    websockify --token-plugin console.token_plugin.RedisTokens --token-source env:REDIS_URL 127.0.0.1:6080

``--token-source`` is a Redis URL, or ``env:NAME`` to read the URL from the environment variable
NAME (which keeps the Redis password out of the process list). A fleet VM's target names its
Consul service instead of an address: the plugin then asks Consul (``CONSUL_HTTP_ADDR``) for the
VM's healthy instance (console/consul.py).

websockify 0.13 forks one child per connection and calls ``lookup`` in that child before it
accepts the WebSocket, so every call opens its own Redis connection and keeps nothing. A token is
good for one connection: it is deleted as it is read (GETDEL), so a replay finds nothing. Whatever
goes wrong, the answer is ``None`` (websockify then closes the connection without an HTTP
response) and one log line says why, with the token masked.

After a token is redeemed, the connection's process watches for the end of its session in a
daemon thread: the gateway publishes on the VM's and the user's end channels when the VM stops or
is destroyed and when the user logs out, and every session has a maximum duration (the token
record's ``max_session``). The thread then makes the process's main thread, which relays the
bytes, close the WebSocket with a close frame (code 4001 revoked, 4002 time limit). Redis going
away does not end a live session; the thread reconnects and, once back, checks whether it missed
a revocation. See docs/CONSOLE.md, "Console sessions". The same thread keeps the VM's
``console_live_key`` alive while the session lasts, so an open console keeps the VM from idle suspend.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import redis
from websockify.token_plugins import BasePlugin
from websockify.websocketproxy import ProxyRequestHandler
from websockify.websockifyserver import WebSockifyRequestHandler, WebSockifyServer

from console import consul, redis_keys

log = logging.getLogger("vmgate.console.tokens")

REDIS_TIMEOUT = 3.0
MAX_SESSION_LIMIT = 7 * 86400  # the longest max_session a token record may ask for
STATE_POLL = 15.0  # seconds between checks of the VM's target and the user's generation, whatever pub/sub says
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # reconnecting to Redis while a session goes on
END_SIGNAL = signal.SIGUSR1  # the watcher thread asks the main thread to close the WebSocket
END_GRACE = 5.0  # seconds for a clean close before the connection's process is ended

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


@dataclass(frozen=True)
class Session:
    """A redeemed token: whose console it opened, for how long, and what the session ends on when it
    changes: the VM's VNC target as redeemed, and the user's revocation generation then (None:
    never revoked, or long ago)."""

    vm_id: str
    user_id: str
    max_session: int
    target: str
    user_generation: str | None


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
        masked = redis_keys.mask(token) if isinstance(token, str) else "?"
        try:
            target, session = self._redeem(token)
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
        try:
            watched = SessionWatcher(self.url, session).start()
        except Exception:  # a session nobody could end is not opened
            log.exception("console token %r refused: cannot watch its session", masked)
            return None
        if not watched:
            log.warning("console session of vm %s cannot be ended early: websockify is not running one process"
                        " per connection (do not use --libserver or --run-once)", session.vm_id)
        return target

    def _redeem(self, token: str) -> tuple[Target, Session]:
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
            with client.pipeline(transaction=True) as pipe:
                pipe.srem(redis_keys.vm_tokens_key(vm_id), token_hash)
                pipe.srem(redis_keys.user_tokens_key(user_id), token_hash)
                pipe.get(redis_keys.vnc_target_key(vm_id))
                pipe.get(redis_keys.user_generation_key(user_id))
                removed, _, raw_target, user_generation = pipe.execute()
        if record["expires_at"] <= time.time():
            raise Refused(f"expired (vm {vm_id})")
        if not removed:
            raise Refused(f"revoked: no longer in the set of vm {vm_id}")
        if user_generation is not None and user_generation != record.get("user_generation"):
            raise Refused(f"revoked: user {user_id} logged out after it was issued (vm {vm_id})")
        if raw_target is None:
            raise Refused(f"vm {vm_id} has no VNC target (not running)")
        target = _parse_target(raw_target, vm_id)
        return target, Session(vm_id, user_id, record["max_session"], raw_target, user_generation)


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
    service = data.get("consul_service")
    if service is not None:
        # A fleet VM: go where Consul says its healthy instance is now (console/consul.py).
        if not isinstance(service, str) or not service:
            raise Refused(f"VNC target of vm {vm_id} has a bad consul_service")
        try:
            found = consul.healthy_endpoint(service, vm_id)
        except consul.ConsulError as exc:
            raise Refused(str(exc)) from None
        log.info("vm %s: VNC at %s:%d, from Consul's healthy %s instance", vm_id, found[0], found[1], service)
        return found
    host, port = data.get("host"), data.get("port")
    if not isinstance(host, str) or not host:
        raise Refused(f"VNC target of vm {vm_id} has neither unix_socket nor host")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise Refused(f"VNC target of vm {vm_id} has a bad port")
    return (host, port)


# -- ending live sessions -------------------------------------------------------------------------

# What the main thread is to close the WebSocket with, once the watcher decides the session ends.
# Module state is per connection: every connection has a process of its own.
_ending: tuple[int, str] | None = None
_closing = False


def _on_end_signal(signum: int, frame: FrameType | None) -> None:
    """In the main thread: close the WebSocket, but only between two steps of the relay loop.

    ``ProxyRequestHandler.do_proxy`` relays bytes and spends its idle time in ``select``; raising
    ``CClose`` from its own frame leaves websockify's WebSocket object whole, and websockify then
    sends the close frame itself (``handle_websocket`` catches ``CClose``). Anywhere else (the
    upgrade still under way, a frame half written) the signal is ignored and the watcher sends
    another one a moment later.
    """
    global _closing
    if _ending is None or _closing or frame is None or frame.f_code is not ProxyRequestHandler.do_proxy.__code__:
        return
    _closing = True
    raise WebSockifyRequestHandler.CClose(*_ending)


class SessionWatcher:
    """Ends one live console session: when its VM's or user's consoles are revoked, or at its
    maximum duration. Runs as a daemon thread in the connection's own process."""

    def __init__(self, url: str, session: Session) -> None:
        self.url = url
        self.session = session
        self.deadline = time.monotonic() + session.max_session
        self.failures = 0
        self.channels = {
            redis_keys.vm_end_channel(session.vm_id): "VM stopped",
            redis_keys.user_end_channel(session.user_id): "logged out",
        }

    def start(self) -> bool:
        """Start watching; False if this is not the main thread of a websockify connection process."""
        if multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(END_SIGNAL, _on_end_signal)
        threading.Thread(target=self._run, name="vmgate-console-session", daemon=True).start()
        return True

    def _run(self) -> None:
        while True:
            try:
                code, reason = self._watch()
                break
            except Exception as exc:  # Redis down or slow, or anything else: the session goes on
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    code, reason = redis_keys.CLOSE_TIME_LIMIT, "time limit reached"
                    break
                delay = RETRY_DELAYS[min(self.failures, len(RETRY_DELAYS) - 1)]
                self.failures += 1
                log.warning("console session of vm %s: cannot watch for revocation (%s); it goes on, retrying in %ss",
                            self.session.vm_id, type(exc).__name__, delay)
                time.sleep(min(delay, remaining))
        self._end(code, reason)

    def _revoked(self, client: redis.Redis) -> str | None:
        """Why the session was revoked since its token was redeemed, judged by state; else None."""
        session = self.session
        target, generation = client.mget(redis_keys.vnc_target_key(session.vm_id),
                                         redis_keys.user_generation_key(session.user_id))
        if target != session.target:  # the VM stopped (and maybe started again: a new QEMU)
            return "VM stopped"
        # A generation key that is gone has expired (logouts keep it for days): no new logout.
        if generation is not None and generation != session.user_generation:
            return "logged out"
        return None

    def _heartbeat(self, client: redis.Redis) -> None:
        """Tell the gateway's idle suspend that this VM's console is open (gateway/engine/activity.py)."""
        vm_id = self.session.vm_id
        with client.pipeline(transaction=False) as pipe:
            pipe.set(redis_keys.console_live_key(vm_id), str(os.getpid()), ex=redis_keys.CONSOLE_LIVE_TTL)
            pipe.set(redis_keys.activity_key(vm_id), f"{time.time():.3f}", ex=31 * 86400)
            pipe.execute()

    def _watch(self) -> tuple[int, str]:
        """Subscribe, then wait for an end message, a change of state or the deadline."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT,
                                      health_check_interval=STATE_POLL, decode_responses=True)
        with client, client.pubsub() as pubsub:
            pubsub.subscribe(*self.channels)
            confirmed = 0
            # Only once both subscriptions are confirmed can the state check cover the rest.
            while confirmed < len(self.channels):
                message = pubsub.get_message(timeout=REDIS_TIMEOUT)
                if message is None:
                    raise redis.TimeoutError("SUBSCRIBE was not confirmed")
                if message["type"] == "message":
                    return redis_keys.CLOSE_REVOKED, self.channels.get(message["channel"], "revoked")
                confirmed += message["type"] == "subscribe"
            self.failures = 0
            while True:
                if reason := self._revoked(client):
                    return redis_keys.CLOSE_REVOKED, reason
                self._heartbeat(client)
                next_check = time.monotonic() + STATE_POLL
                while (now := time.monotonic()) < next_check:
                    if now >= self.deadline:
                        return redis_keys.CLOSE_TIME_LIMIT, "time limit reached"
                    message = pubsub.get_message(timeout=min(next_check, self.deadline) - now)
                    if message is not None and message["type"] == "message":
                        return redis_keys.CLOSE_REVOKED, self.channels.get(message["channel"], "revoked")

    def _end(self, code: int, reason: str) -> None:
        """Have the main thread close the WebSocket; if it cannot, end the process."""
        global _ending
        session = self.session
        log.info("console session of vm %s, user %s ended: %s", session.vm_id, session.user_id, reason)
        _ending = (code, reason)
        give_up = time.monotonic() + END_GRACE
        while time.monotonic() < give_up:
            if not _closing:  # once the close is under way, a signal would only interrupt its write
                os.kill(os.getpid(), END_SIGNAL)
            time.sleep(0.2)
        # Still here: the relay is stuck writing to a client that reads nothing. End the process; the
        # kernel closes both sockets. (Not SIGTERM: websockify's inherited handler would raise
        # Terminate into the blocked write, and multiprocessing would log a traceback for it.)
        log.warning("console session of vm %s did not close within %ss; ending its process", session.vm_id, END_GRACE)
        os._exit(1)
