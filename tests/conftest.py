"""Shared fixtures: a real Postgres database per test session, Redis database 15 flushed per test
(``redis_test_url``/``redis_flush`` from tests/fixtures/websockify.py),
short temporary VM roots, and the real app built by ``create_app``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from email import policy as email_policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiohttp
import psycopg2
import pytest
import redis

from drivers.fake import FakeDriver
from drivers.local import cgroups, network
from gateway.config import Settings
from gateway.web.app import create_app
from gateway.web.appkeys import settings_key
from gateway.web.mail import OUTBOX_DIR

pytest_plugins: list[str] = ["tests.fixtures.websockify", "tests.fixtures.qemu", "tests.fixtures.redis_server",
                             "tests.fixtures.gateway_process"]

REPO = Path(__file__).resolve().parent.parent

# The tiers (docs/TESTING.md) select by mark, so marks follow from fixtures too: a test that uses one of
# these gets the mark even if its module forgot the decorator. item.fixturenames is the closure of
# what a test uses, so the fixtures that do the work are enough (local_gateway, browser_gateway,
# fleet_gateway, _warm_layer ... all reach tiny_images_dir).
# qemu: the images `make images` builds (their users boot them), the local driver, gateway processes on
# the local driver, and the bare SeaBIOS QEMUs of the console tests.
QEMU_FIXTURES = frozenset({"tiny_images_dir", "local_driver", "gateway_processes", "vm_a", "vm_b"})
# nomad: real Nomad and Consul agents (every one the fleet tests start, TLS ones too, lives in agent_dir).
NOMAD_FIXTURES = frozenset({"agent_dir", "nomad_agent", "consul_agent"})


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `qemu` and `nomad` every test that uses a fixture booting QEMU or starting Nomad/Consul."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & QEMU_FIXTURES:
            item.add_marker(pytest.mark.qemu)
        if used & NOMAD_FIXTURES:
            item.add_marker(pytest.mark.nomad)


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


def kill_qemu_under(directory: Path) -> int:
    """A safety net: kill any QEMU whose command line points into ``directory`` (ours, by path),
    whichever driver started it (the local driver's own children, or a Nomad executor's). Returns how many."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if cmdline and b"qemu-system" in cmdline[0] and any(str(directory).encode() in a for a in cmdline):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
    return killed


def release_vms_under(root: Path) -> None:
    """Kill the QEMUs of a VM root and remove their cgroups (drivers/local/cgroups.py): a test that ends with
    VMs running leaves no process, no empty cgroup and no network namespace behind."""
    deadline = time.monotonic() + 10
    while kill_qemu_under(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    for task_dir in sorted((root / "tasks").glob("*")):
        cgroups.remove(task_dir)
        network.down(task_dir)  # and their network namespaces (drivers/local/network.py)


@contextlib.contextmanager
def short_vms_root(prefix: str = "vg") -> Iterator[Path]:
    """A short VM root under /tmp (unix socket paths must stay under 108 bytes), emptied of VMs after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        release_vms_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vms_root() -> Iterator[Path]:
    """A short VM root under /tmp: unix socket paths must stay under 108 bytes."""
    with short_vms_root() as root:
        yield root


def _write_manifest(image_dir: Path, names: list[str]) -> None:
    files = {}
    for name in names:
        data = (image_dir / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (image_dir / "manifest.json").write_text(json.dumps({"name": image_dir.name, "files": files}))


@pytest.fixture(scope="session")
def stand_in_images() -> Iterator[Path]:
    """An images dir whose `tiny` holds a real (empty) qcow2 and a placeholder boot loader, with a
    valid manifest: enough for gateway tests that run on the fake driver."""
    root = Path(tempfile.mkdtemp(prefix="vgimg", dir="/tmp"))
    tiny = root / "tiny"
    tiny.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tiny / "disk.qcow2"), "64M"], check=True)
    (tiny / "boot.bin").write_bytes(b"stand-in boot loader")
    _write_manifest(tiny, ["disk.qcow2", "boot.bin"])
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_images_dir(base_settings: Settings) -> Path:
    """The real built images (IMAGES_DIR). `make test` builds them first, so there a missing image fails."""
    images = base_settings.images_dir
    if not (images / "tiny" / "manifest.json").is_file():
        not_built(f"the tiny image is not built in {images}; run `make images`")
    return images


def not_built(message: str) -> NoReturn:
    """An image or warm layer a test needs is missing: a failure under `make test` (VMGATE_TEST, which
    builds them first), a skip elsewhere."""
    if os.environ.get("VMGATE_TEST"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def app_settings(base_settings: Settings, database_url: str, redis_test_url: str, vms_root: Path,
                 stand_in_images: Path, redis_flush: redis.Redis, tmp_path: Path) -> Settings:
    """Settings for an app under test: its own database, Redis db 15 (flushed), a short VM root, and
    a data dir of its own whose outbox receives the mails (never SMTP, whatever .env says), and Argon2id at
    its cheapest (every test signs up and logs in; tests/test_auth.py pins the production cost). The
    lifecycle engine reconciles twice a second; the collector runs only when a test calls it. No sealed copies
    of the warm layers' RAM ahead (with the Debian templates built, 0.8 GB per gateway: tests/test_warm.py
    checks them on a gateway of its own)."""
    return dataclasses.replace(base_settings, postgres_url=database_url, redis_url=redis_test_url,
                               vms_root=vms_root, images_dir=stand_in_images, stop_timeout=15,
                               reconcile_interval=0.5, claim_idle=3.0, collect_interval=3600.0, restart_delay=0,
                               data_dir=tmp_path / "data", smtp_host="", argon2_memory_kib=1024, argon2_time_cost=1,
                               public_url="http://127.0.0.1:8080", vnc_public_url="ws://127.0.0.1:8080/vnc",
                               warm_memory_ahead=False)


def truncate_all(database_url: str) -> None:
    """Empty every table but the migrations ledger, so each test starts from a migrated, empty schema."""
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public'"
                    " AND tablename <> 'schema_migrations'")
        tables = [row[0] for row in cur.fetchall()]
        if tables:
            cur.execute(f"TRUNCATE {', '.join(tables)}")
        conn.commit()


def outbox_link(outbox: Path, email: str, purpose: str = "verify") -> str:
    """The link in the newest ``purpose`` mail to ``email`` that the gateway wrote to ``outbox``."""
    links = []
    for path in sorted(outbox.glob("*.eml")):
        msg = BytesParser(policy=email_policy.default).parsebytes(path.read_bytes())
        match = re.search(rf"https?://\S+/{purpose}\?token=[\w-]+", msg.get_body().get_content())
        if msg["To"] == email and match:
            links.append(match.group(0))
    assert links, f"no {purpose} mail to {email} in {outbox}"
    return links[-1]


def link_token(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


class Session:
    """A logged-in (or anonymous) HTTP session against the test server, with its own cookies.
    ``outbox`` is where the server's mails land (its DATA_DIR/outbox)."""

    def __init__(self, base_url: str, outbox: Path | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.outbox = outbox
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.user: dict[str, Any] | None = None
        self.csrf_token: str | None = None

    async def request(self, method: str, path: str, *, csrf: bool = True, **kwargs: Any) -> tuple[int, Any]:
        """Send a request; on unsafe methods the session's CSRF token goes along unless ``csrf=False``."""
        if csrf and self.csrf_token and method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
            kwargs["headers"] = {"X-CSRF-Token": self.csrf_token, **kwargs.get("headers", {})}
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def signup_and_login(self, email: str | None = None, password: str = "correct horse battery",
                               verify: bool = True) -> None:
        """Sign up, confirm the address with the mailed link (unless ``verify=False``), and log in."""
        email = email or f"u{uuid.uuid4().hex[:10]}@example.test"
        status, body = await self.request("POST", "/api/auth/signup", json={"email": email, "password": password})
        assert status == 201, body
        if verify:
            await self.verify_email(email)
        status, body = await self.request("POST", "/api/auth/login", json={"email": email, "password": password})
        assert status == 200, body
        self.user = body["user"]
        self.csrf_token = body["csrf_token"]

    async def verify_email(self, email: str) -> None:
        """Confirm ``email`` with the newest link in the outbox, posting its token as the /verify page does."""
        assert self.outbox is not None, "this session's server has no outbox"
        token = link_token(outbox_link(self.outbox, email))
        status, body = await self.request("POST", "/api/auth/verify", json={"token": token})
        assert status == 200, body

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[Any]:
    """Factory: ``await sessions(server)`` returns a new Session; all are closed afterwards."""
    made: list[Session] = []

    def make(server: Any) -> Session:
        app = getattr(server, "app", None)
        outbox = app[settings_key].data_dir / OUTBOX_DIR if app is not None and settings_key in app else None
        session = Session(str(server.make_url("/")), outbox=outbox)
        made.append(session)
        return session

    yield make
    for session in made:
        await session.close()


VM = {"template": "tiny", "cpu": 1, "memory_mb": 256, "disk_gb": 1, "userdata": None}


def declared(usage: dict[str, int]) -> dict[str, int]:
    """The counted part of /api/me's usage: what VMs were created with (storage is measured on disk)."""
    return {name: value for name, value in usage.items() if name != "storage_bytes"}


def assert_envelope(status: int, body: Any, expected_status: int, code: str | None = None) -> dict[str, Any]:
    """Assert an error answer is exactly the JSON envelope with this status (and code); return its error."""
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    if code:
        assert error["code"] == code, error
    return error


@pytest.fixture
def fake_driver() -> FakeDriver:
    """The in-memory driver behind ``server`` (a module may override it, e.g. with a boot delay)."""
    return FakeDriver()


async def fake_gateway(aiohttp_server: Any, settings: Settings, database_url: str,
                       driver: FakeDriver | None = None) -> Any:
    """A gateway on ``settings`` and a fake driver (``server.driver``), on a migrated, emptied database."""
    driver = driver if driver is not None else FakeDriver()
    srv = await aiohttp_server(create_app(settings, driver=driver))
    truncate_all(database_url)
    srv.driver = driver
    return srv


@pytest.fixture
async def server(aiohttp_server: Any, app_settings: Settings, database_url: str, fake_driver: FakeDriver) -> Any:
    """The gateway on the fake driver (``server.driver``), on a migrated, emptied database."""
    return await fake_gateway(aiohttp_server, app_settings, database_url, fake_driver)


@pytest.fixture
async def clients() -> AsyncIterator[list[Any]]:
    """A list to put extra clients in; each is closed after the test."""
    made: list[Any] = []
    yield made
    for client in made:
        await client.close()

