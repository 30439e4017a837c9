"""Numbered SQL migrations in gateway/store/migrations, applied in order at start-up and by `make migrate`."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path

import aiopg

from gateway.config import ConfigError, Settings

log = logging.getLogger("vmgate.migrate")
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number: serialises concurrent migrators (several gateways starting at once).
LOCK_ID = 0x766D67617465


def migrations() -> list[tuple[int, Path]]:
    """Return (version, path) for every NNN_name.sql file, in order."""
    found = []
    for path in MIGRATIONS_DIR.glob("*.sql"):
        match = re.match(r"^(\d+)_[a-z0-9_]+\.sql$", path.name)
        if not match:
            raise RuntimeError(f"migration file name must be NNN_name.sql: {path.name}")
        found.append((int(match.group(1)), path))
    found.sort()
    versions = [v for v, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migrations share a number")
    return found


async def migrate(pool: aiopg.Pool) -> list[int]:
    """Apply every migration not yet applied, each in its own transaction; return the versions applied."""
    applied_now: list[int] = []
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
        try:
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())")
            await cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, path in migrations():
                if version in done:
                    continue
                async with cur.begin():
                    await cur.execute(path.read_text())
                    await cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                      (version, path.name))
                log.info("applied migration %s", path.name)
                applied_now.append(version)
        finally:
            await cur.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
    return applied_now


async def _main() -> int:
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"vmgate: {exc}", file=sys.stderr)
        return 2
    async with aiopg.create_pool(settings.postgres_url, minsize=1, maxsize=1) as pool:
        applied = await migrate(pool)
    print(f"migrations applied: {applied or 'none (up to date)'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(asyncio.run(_main()))
