"""Shared fixtures: a real Postgres database per test session, Redis database 15 flushed per test
(``redis_test_url``/``redis_flush`` from tests/fixtures/websockify.py),
short temporary VM roots, and the real app built by ``create_app``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg2
import pytest
import redis

from gateway.config import Settings

pytest_plugins: list[str] = ["tests.fixtures.websockify", "tests.fixtures.qemu"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings from the environment and .env (make test starts the servers they name)."""
    return Settings.load()


def _with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def database_url(base_settings: Settings) -> Iterator[str]:
    """A fresh database for this test session, dropped afterwards."""
    name = f"vmgate_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(_with_db(base_settings.postgres_url, "postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(base_settings.postgres_url, name)
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def _kill_qemu_under(root: Path) -> None:
    """Kill any QEMU a failed test left running with files under ``root``."""
    for pidfile in root.glob("tasks/*/qemu.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text().strip())
            if str(root) in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def vms_root() -> Iterator[Path]:
    """A short VM root under /tmp: unix socket paths must stay under 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix="vg", dir="/tmp"))
    yield root
    _kill_qemu_under(root)
    shutil.rmtree(root, ignore_errors=True)


def _write_manifest(image_dir: Path, names: list[str]) -> None:
    files = {}
    for name in names:
        data = (image_dir / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (image_dir / "manifest.json").write_text(json.dumps({"name": image_dir.name, "files": files}))


@pytest.fixture(scope="session")
def stand_in_images() -> Iterator[Path]:
    """An images dir whose `tiny` holds a real (empty) qcow2 and placeholder kernel files, with a
    valid manifest: enough for gateway tests that run on the fake driver."""
    root = Path(tempfile.mkdtemp(prefix="vgimg", dir="/tmp"))
    tiny = root / "tiny"
    tiny.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tiny / "disk.qcow2"), "64M"], check=True)
    (tiny / "vmlinuz").write_bytes(b"stand-in kernel")
    (tiny / "initrd.img").write_bytes(b"stand-in initrd")
    _write_manifest(tiny, ["disk.qcow2", "vmlinuz", "initrd.img"])
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_images_dir(base_settings: Settings) -> Path:
    """The real built images (IMAGES_DIR). `make test` builds them first, so there a missing image fails."""
    images = base_settings.images_dir
    if not (images / "tiny" / "manifest.json").is_file():
        message = f"the tiny image is not built in {images}; run `make images`"
        if os.environ.get("VMGATE_TEST"):
            pytest.fail(message)
        pytest.skip(message)
    return images


@pytest.fixture
def app_settings(base_settings: Settings, database_url: str, redis_test_url: str, vms_root: Path,
                 stand_in_images: Path, redis_flush: redis.Redis) -> Settings:
    """Settings for an app under test: its own database, Redis db 15 (flushed), a short VM root."""
    return dataclasses.replace(base_settings, postgres_url=database_url, redis_url=redis_test_url,
                               vms_root=vms_root, images_dir=stand_in_images, stop_timeout=15,
                               public_url="http://127.0.0.1:8080", vnc_public_url="ws://127.0.0.1:8080/vnc")


def truncate_all(database_url: str) -> None:
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('users')")
        if cur.fetchone()[0] is not None:
            cur.execute("TRUNCATE users, vms, vm_events, audit_log")
        conn.commit()


class Session:
    """A logged-in (or anonymous) HTTP session against the test server, with its own cookies."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.user: dict[str, Any] | None = None

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def signup_and_login(self, email: str | None = None, password: str = "correct horse battery") -> None:
        email = email or f"u{uuid.uuid4().hex[:10]}@example.test"
        status, body = await self.request("POST", "/api/auth/signup", json={"email": email, "password": password})
        assert status == 201, body
        status, body = await self.request("POST", "/api/auth/login", json={"email": email, "password": password})
        assert status == 200, body
        self.user = body["user"]

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[Any]:
    """Factory: ``await sessions(server)`` returns a new Session; all are closed afterwards."""
    made: list[Session] = []

    def make(server: Any) -> Session:
        session = Session(str(server.make_url("/")))
        made.append(session)
        return session

    yield make
    for session in made:
        await session.close()
