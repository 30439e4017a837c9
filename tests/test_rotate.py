"""`vmgate rotate-secret` (issue 16's runbook): each secret is replaced on its server and in the env file,
the new one works and the old one no longer does (a JWT's old secret still verifies sessions until it is
dropped). Run against a private Redis and a Postgres role of the test's own, never the shared servers'."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import redis

from gateway import credentials
from gateway.config import Settings, read_dotenv
from tests.fixtures.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
OTHER_LINES = "# a comment the rotation keeps\nSMTP_HOST=\n"


def rotate(env_file: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "rotate-secret", *args, "--env-file", str(env_file)],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False)


def test_redis_password_rotation(private_redis: RedisServer, tmp_path: Path) -> None:
    old_url = f"redis://:old-password-1234@127.0.0.1:{private_redis.port}/0"
    with redis.Redis(host="127.0.0.1", port=private_redis.port) as client:
        client.config_set("requirepass", "old-password-1234")
    env_file = tmp_path / ".env"
    env_file.write_text(OTHER_LINES + f"REDIS_URL={old_url}\n")
    with redis.Redis.from_url(old_url) as kept:  # a connection open across the rotation (a running gateway's)
        kept.ping()
        result = rotate(env_file, "redis", REDIS_URL=old_url)
        assert result.returncode == 0, result.stderr
        kept.ping()
    new_url = read_dotenv(env_file)["REDIS_URL"]
    assert new_url != old_url and env_file.read_text().startswith(OTHER_LINES)
    assert env_file.stat().st_mode & 0o777 == 0o600
    with redis.Redis.from_url(new_url) as client:
        assert client.ping()
    with redis.Redis.from_url(old_url) as client, pytest.raises(redis.AuthenticationError):
        client.ping()


@pytest.fixture
def own_role(database_url: str) -> Iterator[str]:
    """A login role of this test's own on the test Postgres: its URL (with its first password)."""
    name = f"rot_{uuid.uuid4().hex[:10]}"
    with contextlib.closing(psycopg2.connect(database_url)) as admin, admin.cursor() as cur:
        admin.autocommit = True
        cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'first-password-1234'")
    parts = urlsplit(database_url)
    url = urlunsplit(parts._replace(netloc=f"{name}:first-password-1234@{parts.hostname}:{parts.port}"))
    try:
        yield url
    finally:
        with contextlib.closing(psycopg2.connect(database_url)) as admin, admin.cursor() as cur:
            admin.autocommit = True
            cur.execute(f"DROP ROLE IF EXISTS {name}")


def test_postgres_password_rotation(own_role: str, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"POSTGRES_URL={own_role}\n" + OTHER_LINES)
    result = rotate(env_file, "postgres", POSTGRES_URL=own_role)
    assert result.returncode == 0, result.stderr
    new_url = read_dotenv(env_file)["POSTGRES_URL"]
    assert new_url != own_role and urlsplit(new_url).username == urlsplit(own_role).username
    psycopg2.connect(new_url).close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(own_role).close()


def test_jwt_rotation_keeps_sessions_until_the_old_secret_is_dropped(base_settings: Settings, tmp_path: Path) -> None:
    old = "o" * 40
    settings = dataclasses.replace(base_settings, jwt_secret=old, jwt_old_secrets=())
    token, _claims = credentials.issue_session(settings, {"id": str(uuid.uuid4()), "session_epoch": 0})
    env_file = tmp_path / ".env"
    env_file.write_text(OTHER_LINES + f"JWT_SECRET={old}\nJWT_OLD_SECRETS=\n")

    result = rotate(env_file, "jwt", JWT_SECRET=old, JWT_OLD_SECRETS="")
    assert result.returncode == 0, result.stderr
    values = read_dotenv(env_file)
    assert values["JWT_SECRET"] != old and len(values["JWT_SECRET"]) >= 32 and values["JWT_OLD_SECRETS"] == old
    rotated = dataclasses.replace(base_settings, jwt_secret=values["JWT_SECRET"], jwt_old_secrets=(old,))
    assert credentials.decode_session(rotated, token) is not None  # the session signed before goes on

    result = rotate(env_file, "jwt", "--drop-old", JWT_SECRET=values["JWT_SECRET"], JWT_OLD_SECRETS=old)
    assert result.returncode == 0, result.stderr
    assert read_dotenv(env_file)["JWT_OLD_SECRETS"] == ""
    dropped = dataclasses.replace(base_settings, jwt_secret=values["JWT_SECRET"], jwt_old_secrets=())
    assert credentials.decode_session(dropped, token) is None
    assert rotate(env_file, "redis", "--drop-old").returncode == 1  # --drop-old is jwt's only
