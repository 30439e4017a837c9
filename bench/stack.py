"""The real stack for one bench run, on 127.0.0.1 and free ports, isolated from `make run` and the tests:

- Postgres and Redis are the repo's servers (`deploy/services.sh up`, run by `make bench` first); the bench
  uses a database of its own (``vmgate_bench``, dropped afterwards) and Redis database 10 (flushed before and
  after; the tests use 11-15);
- the gateway is ``python -m gateway`` as `make run` runs it, with the local driver, a VM root and data
  dir under a short temporary directory (QEMU's unix socket paths must stay under 108 bytes), every rate
  limit off and large quotas (the bench creates far more than a person would), mails to its outbox;
- websockify with the token plugin and the Origin check, as deploy/supervise.py starts it;
- the bare aiohttp app (bench/bare.py) the API figure is compared with, and its minimal handler.

Every process is started in a session of its own; ``close`` ends them (their whole process groups), kills
any QEMU whose command line points into the bench's VM root, drops the database and flushes Redis db 10.
It is safe to call twice and is called on every way out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg2
import redis

from gateway.config import RATE_LIMIT_DEFAULTS, Settings

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = REPO / ".venv" / "bin" / "python"
# websockify's command line, run through console/proxy.py (which answers fleet VMs' VNC passwords).
WEBSOCKIFY = [str(REPO / ".venv" / "bin" / "python"), "-m", "console.proxy"]
DATABASE = "vmgate_bench"
REDIS_DB = 10
START_TIMEOUT = 60.0
STOP_GRACE = 10.0
NO_RATE_LIMITS = ",".join(f"{rule}=off" for rule in RATE_LIMIT_DEFAULTS)


class StackError(RuntimeError):
    """A part of the stack did not start; the message says which and ends with its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_redis_db(url: str, db: int) -> str:
    """``url`` pointing at Redis database ``db`` (the path wins over any ``?db=``, so both are replaced)."""
    parts = urlsplit(url)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "db"])
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", query, parts.fragment))


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@dataclass
class QemuProcess:
    pid: int
    rss: int  # bytes, VmRSS
    pss: int | None  # bytes, from smaps_rollup (shared pages split between their users); None if unreadable


def qemu_processes(root: Path) -> list[QemuProcess]:
    """The QEMU processes whose command line names a path under ``root``, with their memory."""
    found = []
    needle = str(root).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not argv or b"qemu-system" not in argv[0] or not any(needle in a for a in argv):
                continue
            rss = _kib_field((proc / "status").read_text(), "VmRSS:")
            if rss is None:  # a zombie: no memory left
                continue
            pss = None
            with contextlib.suppress(OSError):
                pss = _kib_field((proc / "smaps_rollup").read_text(), "Pss:")
            found.append(QemuProcess(int(proc.name), rss, pss))
    return found


def _kib_field(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name):
            return int(line.split()[1]) * 1024
    return None


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, bytes."""
    value = _kib_field(Path("/proc/meminfo").read_text(), "MemAvailable:")
    return value or 0


def kill_qemu_under(root: Path, timeout: float = 10.0) -> int:
    """SIGKILL every QEMU under ``root`` (the bench's own VMs, found by path) and wait until they are gone."""
    pids = [p.pid for p in qemu_processes(root)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while qemu_processes(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(pids)


@dataclass
class Child:
    """A process the bench started, leading its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it after a grace period."""
        if not self.alive():
            self._kill_group(signal.SIGKILL)  # forked children (websockify's) may outlive their parent
            return
        self._kill_group(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self._kill_group(signal.SIGKILL)
            self.proc.wait(STOP_GRACE)
        self._kill_group(signal.SIGKILL)

    def _kill_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


@dataclass
class Stack:
    """Build with ``Stack.start(run_dir)``; ``close()`` tears everything down."""

    settings: Settings
    run_dir: Path  # logs and results of this run (under bench/results/)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vgb")))
    children: list[Child] = field(default_factory=list)
    gateway_port: int = 0
    websockify_port: int = 0
    bare_port: int = 0
    database_created: bool = False
    _lock: IO[str] | None = None

    @property
    def vms_root(self) -> Path:
        return self.workdir / "vms"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def gateway_log(self) -> Path:
        return self.run_dir / "gateway.log"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def bare_url(self) -> str:
        return f"http://127.0.0.1:{self.bare_port}"

    @property
    def origin(self) -> str:
        """The Origin websockify expects (the gateway's PUBLIC_URL), as a browser on the console page sends it."""
        return self.gateway_url

    @property
    def database_url(self) -> str:
        return with_database(self.settings.postgres_url, DATABASE)

    @property
    def redis_url(self) -> str:
        return with_redis_db(self.settings.redis_url, REDIS_DB)

    # ------------------------------------------------------------------ start

    @classmethod
    def start(cls, run_dir: Path, progress: IO[str]) -> Stack:
        """Lock out a second bench, create the database, start websockify, the gateway and the bare app."""
        stack = cls(Settings.load(), run_dir)
        try:
            stack._take_lock()
            stack.vms_root.mkdir(mode=0o700)
            stack.data_dir.mkdir(mode=0o700)
            print(f"bench: VM root {stack.vms_root}, logs in {run_dir}", file=progress)
            stack._create_database()
            stack._flush_redis()
            stack.gateway_port, stack.websockify_port, stack.bare_port = free_port(), free_port(), free_port()
            stack._start_websockify()
            stack._start_gateway()
            stack._start_bare()
        except BaseException:
            stack.close()
            raise
        return stack

    def _take_lock(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        lock = (RESULTS / ".lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StackError("another make bench is running (bench/results/.lock is held)") from None
        self._lock = lock

    def _admin(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(with_database(self.settings.postgres_url, "postgres"))
        conn.autocommit = True
        return conn

    def _create_database(self) -> None:
        with contextlib.closing(self._admin()) as conn, conn.cursor() as cur:
            # A run killed with SIGKILL leaves its database behind: start from nothing.
            cur.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{DATABASE}"')
        self.database_created = True

    def _flush_redis(self) -> None:
        with redis.Redis.from_url(self.redis_url, socket_connect_timeout=3, socket_timeout=3) as client:
            client.flushdb()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VMGATE_CRASH")}
        env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "REDIS_URL": self.redis_url})
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log_path = self.run_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _start_websockify(self) -> None:
        child = self._spawn("websockify", [
            *WEBSOCKIFY,
            "--token-plugin", "console.token_plugin.RedisTokens",
            "--token-source", "env:REDIS_URL",
            "--auth-plugin", "websockify.auth_plugins.ExpectOrigin",
            "--auth-source", self.origin,
            f"127.0.0.1:{self.websockify_port}",
        ], self._env())
        self._wait(child, lambda: _listening(self.websockify_port))

    def _start_gateway(self) -> None:
        env = self._env()
        env.update({
            "POSTGRES_URL": self.database_url,
            "VMS_ROOT": str(self.vms_root), "DATA_DIR": str(self.data_dir),
            "IMAGES_DIR": str(self.settings.images_dir.absolute()),
            "VMGATE_DRIVER": "local",
            "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.gateway_port), "PUBLIC_URL": self.gateway_url,
            "VNC_PUBLIC_URL": f"ws://127.0.0.1:{self.websockify_port}/vnc",
            "SMTP_HOST": "", "RATE_LIMITS": NO_RATE_LIMITS,
            "QUOTA_MAX_VMS": "10000", "QUOTA_VCPUS": "100000", "QUOTA_MEMORY_MB": "100000000",
            "QUOTA_DISK_GB": "1000000",
            # No VM is suspended behind the bench's back (density counts running VMs); the resume
            # measurement suspends its VM through the API, the same step idle suspend takes.
            "IDLE_SUSPEND_AFTER": "0",
        })
        child = self._spawn("gateway", [str(PYTHON), "-m", "gateway"], env)
        self._wait(child, lambda: _http_ok(f"{self.gateway_url}/api/healthz"))

    def _start_bare(self) -> None:
        # --minimal: also the least handler that gives the gateway's answer, on the gateway's database.
        env = self._env()
        env.update({"POSTGRES_URL": self.database_url, "PUBLIC_URL": self.gateway_url})
        child = self._spawn("bare", [str(PYTHON), "-m", "bench.bare", "--port", str(self.bare_port), "--minimal"],
                            env)
        self._wait(child, lambda: _http_ok(f"{self.bare_url}/api/me/vms"))

    def _wait(self, child: Child, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if not child.alive():
                raise StackError(f"{child.name} exited with {child.proc.returncode} at start:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"{child.name} did not come up within {START_TIMEOUT:g} s:\n{child.log_tail()}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ state

    def qemu(self) -> list[QemuProcess]:
        return qemu_processes(self.vms_root)

    def vnc_socket(self, vm_id: str) -> Path:
        """The local driver's VNC socket of a VM (drivers/local: ``<vms_root>/tasks/<id>/vnc.sock``)."""
        return self.vms_root / "tasks" / vm_id / "vnc.sock"

    def check_alive(self) -> None:
        """Raise if a process of the stack died under the bench."""
        for child in self.children:
            if not child.alive():
                raise StackError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop the gateway first (so nothing restarts a VM), then kill the bench's QEMUs, stop websockify and
        the bare app, drop the database, flush Redis db 10, remove the VM root. Each step runs whatever
        the one before did."""
        gateway = [c for c in self.children if c.name == "gateway"]
        others = [c for c in self.children if c.name != "gateway"]
        for child in [*gateway, *others]:
            with contextlib.suppress(Exception):
                child.stop()
        self.children.clear()
        with contextlib.suppress(Exception):
            kill_qemu_under(self.vms_root)
        if self.database_created:
            with contextlib.suppress(Exception), contextlib.closing(self._admin()) as conn, conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
                self.database_created = False
        with contextlib.suppress(Exception):
            self._flush_redis()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - a URL the bench built, on loopback
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
