"""The store's plumbing: a pooled cursor whose rows are plain dicts, and the checks every query module shares.

The query modules beside it (users, vms, snapshots, tokens, audit) hold the SQL; each function takes such a
cursor first, returns plain dicts (typed in gateway/rows.py where they leave the store) and raises domain
errors (gateway.errors). Nothing above the store writes SQL."""

from __future__ import annotations

import contextlib
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiopg
import psycopg2
import psycopg2.extensions

from gateway.errors import NotFound

Row = dict[str, Any]


class DictCursor(psycopg2.extensions.cursor):  # type: ignore[misc]  # psycopg2 has no type stubs here
    """Rows as plain dicts, each built in one ``dict(zip(...))``. (psycopg2's RealDictCursor builds a row a
    column at a time through a Python ``__setitem__``: on a list of VMs, a large share of a request.)"""

    def _names(self) -> list[str]:
        return [column[0] for column in self.description or ()]

    def fetchone(self) -> Row | None:
        row = super().fetchone()
        return None if row is None else dict(zip(self._names(), row, strict=True))

    def fetchmany(self, size: int | None = None) -> list[Row]:
        names = self._names()
        rows = super().fetchmany(size) if size is not None else super().fetchmany()
        return [dict(zip(names, row, strict=True)) for row in rows]

    def fetchall(self) -> list[Row]:
        names = self._names()
        return [dict(zip(names, row, strict=True)) for row in super().fetchall()]

    def __iter__(self) -> Iterator[Row]:  # psycopg2's own iteration would skip fetchone and yield tuples
        while (row := self.fetchone()) is not None:
            yield row


# Per pool, what is told each statement's duration in seconds (the app's query histogram).
_observers: weakref.WeakKeyDictionary[aiopg.Pool, Callable[[float], None]] = weakref.WeakKeyDictionary()


def observe_queries(pool: aiopg.Pool, observe: Callable[[float], None]) -> None:
    """Have every statement run through ``cursor(pool)`` report its duration (sent to answered) to ``observe``."""
    _observers[pool] = observe


def _timed(execute: Callable[..., Any], observe: Callable[[float], None]) -> Callable[..., Any]:
    # A plain closure: functools.wraps would copy execute's attributes on every cursor of every request.
    async def run(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            await execute(*args, **kwargs)
        finally:
            observe(time.perf_counter() - started)

    return run


@contextlib.asynccontextmanager
async def cursor(pool: aiopg.Pool) -> AsyncIterator[aiopg.Cursor]:
    """Yield a dict cursor on a pooled connection (autocommit; use ``cur.begin()`` for transactions)."""
    async with pool.acquire() as conn, conn.cursor(cursor_factory=DictCursor) as cur:
        observe = _observers.get(pool)
        if observe is not None:
            # This cursor's own execute, timed: aiopg builds its Cursor itself, so no subclass can go in.
            cur.execute = _timed(cur.execute, observe)  # type: ignore[method-assign]
        yield cur


async def fetch_one(cur: aiopg.Cursor) -> Row | None:
    """The cursor's next row (a dict), or None."""
    row: Row | None = await cur.fetchone()
    return row


async def fetch_found(cur: aiopg.Cursor, missing: str) -> Row:
    """The cursor's next row; none is NotFound with the message ``missing``."""
    row = await fetch_one(cur)
    if row is None:
        raise NotFound(missing)
    return row


async def fetch_returned(cur: aiopg.Cursor) -> Row:
    """The row of a statement that always returns one (``INSERT ... RETURNING``, an aggregate)."""
    row = await fetch_one(cur)
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


async def fetch_all(cur: aiopg.Cursor) -> list[Row]:
    """The cursor's remaining rows (dicts)."""
    rows: list[Row] = await cur.fetchall()
    return rows


async def ping(cur: aiopg.Cursor) -> None:
    """One round trip: Postgres answers (the health check)."""
    await cur.execute("SELECT 1")


def is_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID (so it can be compared with a uuid column without an error)."""
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def is_db_down(exc: BaseException) -> bool:
    """True for errors that mean Postgres is unreachable rather than a bad query."""
    return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError | OSError)
