"""Live console sessions, in websockify's per-connection process: ending them, and counting them.

After a token is redeemed, the connection's process watches for the end of its session in a
daemon thread: the gateway publishes on the VM's and the user's end channels when the VM stops or
is destroyed and when the user logs out, and every session has a maximum duration (the token
record's ``max_session``). The thread then makes the process's main thread, which relays the
bytes, close the WebSocket with a close frame (code 4001 revoked, 4002 time limit). Redis going
away does not end a live session; the thread reconnects and, once back, checks whether it missed
a revocation. See docs/CONSOLE.md, "Console sessions". The same thread keeps the VM's
``console_live_key`` alive while the session lasts, so an open console keeps the VM from idle suspend,
and renews the session's place among its user's live sessions: a user holds at most the token
record's ``max_consoles`` (docs/CONSOLE.md, "How many consoles").
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

import redis
from websockify.websocketproxy import ProxyRequestHandler
from websockify.websockifyserver import WebSockifyRequestHandler

from console import redis_keys

log = logging.getLogger("vmgate.console.tokens")

REDIS_TIMEOUT = 3.0
STATE_POLL = 15.0  # seconds between checks of the VM's target and the user's generation, whatever pub/sub says
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # reconnecting to Redis while a session goes on
END_SIGNAL = signal.SIGUSR1  # the watcher thread asks the main thread to close the WebSocket
END_GRACE = 5.0  # seconds for a clean close before the connection's process is ended


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
    api_token_id: str | None = None  # opened with this API token: ends when it is revoked
    member: str = ""  # this session in its user's set of live sessions (redis_keys.user_sessions_key)


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
        if session.api_token_id:
            self.channels[redis_keys.api_token_end_channel(session.api_token_id)] = "API token revoked"

    def start(self) -> bool:
        """Start watching; False if this is not the main thread of a websockify connection process."""
        if multiprocessing.parent_process() is None or threading.current_thread() is not threading.main_thread():
            self.release()
            return False
        signal.signal(END_SIGNAL, _on_end_signal)
        # However the connection ends (the browser closes it, the relay fails), its process gives its
        # place back on the way out: multiprocessing runs its finalizers when a child process ends.
        multiprocessing.util.Finalize(None, self.release, exitpriority=10)
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

    def release(self) -> None:
        """Give the session's place among its user's live sessions back (best effort: it lapses anyway)."""
        if not self.session.member:
            return
        try:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT)
            with client:
                client.zrem(redis_keys.user_sessions_key(self.session.user_id), self.session.member)
        except redis.RedisError:
            pass

    def _revoked(self, client: redis.Redis) -> str | None:
        """Why the session was revoked since its token was redeemed, judged by state; else None."""
        session = self.session
        target, generation, token_revoked = client.mget(
            redis_keys.vnc_target_key(session.vm_id), redis_keys.user_generation_key(session.user_id),
            redis_keys.api_token_revoked_key(session.api_token_id or "-"))
        if target != session.target:  # the VM stopped (and maybe started again: a new QEMU)
            return "VM stopped"
        # A generation key that is gone has expired (logouts keep it for days): no new logout.
        if generation is not None and generation != session.user_generation:
            return "logged out"
        if session.api_token_id and token_revoked is not None:
            return "API token revoked"
        return None

    def _heartbeat(self, client: redis.Redis) -> None:
        """Tell the gateway's idle suspend that this VM's console is open (gateway/engine/activity.py),
        and renew the session's place among its user's live sessions."""
        session = self.session
        with client.pipeline(transaction=False) as pipe:
            pipe.set(redis_keys.console_live_key(session.vm_id), str(os.getpid()), ex=redis_keys.CONSOLE_LIVE_TTL)
            pipe.set(redis_keys.activity_key(session.vm_id), f"{time.time():.3f}", ex=31 * 86400)
            if session.member:
                pipe.zadd(redis_keys.user_sessions_key(session.user_id),
                          {session.member: time.time() + redis_keys.SESSION_LEASE})
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
        self.release()
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
