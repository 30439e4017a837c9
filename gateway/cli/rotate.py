"""``vmgate rotate-secret jwt|redis|postgres [--env-file .env] [--drop-old]``: a new secret, in use at once.

- ``jwt``: a new JWT_SECRET; the old one moves to the front of JWT_OLD_SECRETS, so sessions it signed stay
  valid until they expire (SESSION_TTL). ``--drop-old`` empties JWT_OLD_SECRETS once they have.
- ``redis``: a new password for Redis (``CONFIG SET requirepass``: connections already open stay
  authenticated, new ones need the new password) and REDIS_URL with it.
- ``postgres``: a new password for the role in POSTGRES_URL (``ALTER ROLE``: the same for open
  connections) and POSTGRES_URL with it.

The server is changed first and checked with the new secret, then the env file is rewritten (other lines
untouched, mode 600, replaced in one rename). Until the gateway and websockify restart (Ctrl-C and
``make run`` again; on a fleet, each gateway), they keep the connections they have and cannot open new
ones, so restart right after. The Nomad token is rotated with Nomad's own tools (docs/OPERATIONS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg2
import psycopg2.sql
import redis

from gateway.cli.common import Refused
from gateway.config import REPO_ROOT, Settings

KEEP_OLD_JWT = 3  # former JWT secrets kept (each rotation within SESSION_TTL adds one)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("rotate-secret", help="replace the JWT, Redis or Postgres secret (server and .env)",
                                 description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("which", choices=("jwt", "redis", "postgres"), help="the secret to replace")
    parser.add_argument("--env-file", type=Path, default=REPO_ROOT / ".env", help="the file to rewrite (.env)")
    parser.add_argument("--drop-old", action="store_true", help="jwt: forget the former secrets (JWT_OLD_SECRETS)")


def new_secret() -> str:
    """32 random bytes in URL-safe letters and digits only (safe in a URL, .env and a shell)."""
    return secrets.token_urlsafe(32).replace("-", "x").replace("_", "y")


def set_in_env_file(path: Path, values: dict[str, str]) -> None:
    """Set KEY=VALUE lines in ``path`` (replacing each key's line, appending missing keys), atomically."""
    lines = path.read_text().splitlines() if path.exists() else []
    left = dict(values)
    out = []
    for line in lines:
        match = re.match(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if match and match[1] in left:
            out.append(f"{match[1]}={left.pop(match[1])}")
        else:
            out.append(line)
    out += [f"{key}={value}" for key, value in left.items()]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(out) + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = quote(unquote(parts.username), safe="") if parts.username else ""
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def rotate_jwt(settings: Settings, env_file: Path, drop_old: bool) -> str:
    if drop_old:
        set_in_env_file(env_file, {"JWT_OLD_SECRETS": ""})
        return "JWT_OLD_SECRETS emptied: sessions signed before the last rotation end at the gateway's restart"
    old = [settings.jwt_secret, *settings.jwt_old_secrets][:KEEP_OLD_JWT]
    set_in_env_file(env_file, {"JWT_SECRET": new_secret(), "JWT_OLD_SECRETS": ",".join(old)})
    return (f"new JWT_SECRET in {env_file}; the old one is in JWT_OLD_SECRETS (sessions stay valid). Restart the "
            f"gateway; after SESSION_TTL ({settings.session_ttl} s) run `vmgate rotate-secret jwt --drop-old`")


def rotate_redis(settings: Settings, env_file: Path) -> str:
    password = new_secret()
    new_url = with_password(settings.redis_url, password)
    try:
        with redis.Redis.from_url(settings.redis_url, socket_timeout=5) as client:
            client.config_set("requirepass", password)
        with redis.Redis.from_url(new_url, socket_timeout=5) as client:
            client.ping()
    except redis.RedisError as exc:
        raise Refused(f"Redis did not take the new password: {exc}") from exc
    set_in_env_file(env_file, {"REDIS_URL": new_url})
    return (f"Redis has a new password, and REDIS_URL in {env_file} has it. Restart the gateway and websockify now "
            "(open connections keep working; new ones need the new password). make run passes it to Redis at its "
            "next start too")


def rotate_postgres(settings: Settings, env_file: Path) -> str:
    password = new_secret()
    new_url = with_password(settings.postgres_url, password)
    try:
        with psycopg2.connect(settings.postgres_url, connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute(psycopg2.sql.SQL("ALTER ROLE CURRENT_USER PASSWORD {}").format(psycopg2.sql.Literal(password)))
        conn.close()
        check = psycopg2.connect(new_url, connect_timeout=5)
        check.close()
    except psycopg2.Error as exc:
        raise Refused(f"Postgres did not take the new password: {exc}") from exc
    set_in_env_file(env_file, {"POSTGRES_URL": new_url})
    return (f"the Postgres role has a new password, and POSTGRES_URL in {env_file} has it. Restart the gateway now "
            "(open connections keep working; new ones need the new password)")


def run(settings: Settings, args: argparse.Namespace) -> str:
    if args.drop_old and args.which != "jwt":
        raise Refused("--drop-old is for jwt only")
    if args.which == "jwt":
        return rotate_jwt(settings, args.env_file, args.drop_old)
    if args.which == "redis":
        return rotate_redis(settings, args.env_file)
    return rotate_postgres(settings, args.env_file)
