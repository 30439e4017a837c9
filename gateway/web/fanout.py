"""One Redis subscriber per gateway process, fanning state changes out to the event streams it serves.

Each ``GET /api/.../events`` stream used to hold a pub/sub connection of its own from the API's Redis pool:
one user with a hundred streams exhausted it, and logins, health checks and every other user's requests
failed with 503 (issue 13). Now a single pattern subscription (``vmgate:events:*``) on a client of its own,
with one connection, reads every change and puts it on the in-process queue of each stream that listens to
its channel. The API's pool never serves a stream.

A stream's queue is bounded: a client that does not read is cut off (it reconnects with ``Last-Event-ID``
and replays from Postgres) rather than growing the gateway's memory. A user may hold ``per_user`` streams
at once in one gateway process; one more is 429 ``too_many_streams``. When the subscription breaks (Redis
away), every stream ends and new ones are refused with 503 until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions

from console.redis_keys import PREFIX
from gateway.errors import ApiError, ServiceUnavailable

log = logging.getLogger("vmgate.fanout")

PATTERN = f"{PREFIX}events:*"
QUEUE_SIZE = 256  # changes a stream may fall behind before it is cut off
RETRY = 1.0  # seconds between attempts to subscribe again after Redis went away
SUBSCRIBE_WAIT = 2.0  # seconds a new stream waits for the subscription before 503
ENDED = None  # put on a queue: the subscription broke or the stream fell behind, end the stream


class TooManyStreams(ApiError):
    status, code = 429, "too_many_streams"


@dataclass(eq=False)
class Listener:
    """One stream's end of the fan-out: the channel it listens to and its queue of raw messages."""

    channel: str
    user_id: str
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))


class Fanout:
    """The process's one subscriber, and the streams listening to it."""

    def __init__(self, redis_url: str, *, per_user: int) -> None:
        self.client = aioredis.from_url(redis_url, decode_responses=True, max_connections=1, socket_timeout=None,
                                        socket_connect_timeout=5, health_check_interval=30)
        self.per_user = per_user
        self.listeners: dict[str, set[Listener]] = {}
        self.per_user_count: dict[str, int] = {}
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe in the background (and again whenever the subscription breaks)."""
        self._task = asyncio.create_task(self._run(), name="vmgate-fanout")

    async def close(self) -> None:
        """Stop reading; every stream still open ends."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._end_all()
        await self.client.aclose()

    async def _run(self) -> None:
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(PATTERN)
                # Streams are let in only once Redis confirmed the subscription: nothing published after a
                # stream read Postgres can then be missed.
                while (await pubsub.get_message(timeout=5.0) or {}).get("type") != "psubscribe":
                    pass
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "pmessage":
                        self._deliver(str(message["channel"]), str(message["data"]))
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("event fan-out: the subscription broke (%s); streams end, retrying", exc)
            finally:
                self.subscribed.clear()
                self._end_all()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RETRY)

    def _deliver(self, channel: str, data: str) -> None:
        for listener in list(self.listeners.get(channel, ())):
            try:
                listener.queue.put_nowait(data)
            except asyncio.QueueFull:  # a client that does not read: cut it off, it replays on reconnect
                self._drop(listener)
                with contextlib.suppress(asyncio.QueueEmpty):
                    listener.queue.get_nowait()
                listener.queue.put_nowait(ENDED)

    def _end_all(self) -> None:
        for listeners in list(self.listeners.values()):
            for listener in list(listeners):
                with contextlib.suppress(asyncio.QueueFull):
                    listener.queue.put_nowait(ENDED)

    def _drop(self, listener: Listener) -> None:
        listeners = self.listeners.get(listener.channel)
        if listeners is not None and listener in listeners:
            listeners.discard(listener)
            if not listeners:
                del self.listeners[listener.channel]
            left = self.per_user_count.get(listener.user_id, 1) - 1
            if left > 0:
                self.per_user_count[listener.user_id] = left
            else:
                self.per_user_count.pop(listener.user_id, None)

    @contextlib.asynccontextmanager
    async def listen(self, channel: str, user_id: str) -> AsyncIterator[Listener]:
        """Listen to ``channel`` for as long as the block runs; changes published from now on arrive on the
        listener's queue. 429 past the user's cap, 503 while the subscription is down."""
        with contextlib.suppress(TimeoutError):  # just started, or Redis just came back
            await asyncio.wait_for(self.subscribed.wait(), SUBSCRIBE_WAIT)
        if not self.subscribed.is_set():
            raise ServiceUnavailable("Live updates are unavailable right now (Redis is unreachable); "
                                     "GET /api/vms/{id} still answers.", code="events_unavailable")
        if self.per_user_count.get(user_id, 0) >= self.per_user:
            raise TooManyStreams(f"At most {self.per_user} live event streams at once; close one first.",
                                 details={"limit": self.per_user})
        listener = Listener(channel, user_id)
        self.listeners.setdefault(channel, set()).add(listener)
        self.per_user_count[user_id] = self.per_user_count.get(user_id, 0) + 1
        try:
            yield listener
        finally:
            self._drop(listener)
