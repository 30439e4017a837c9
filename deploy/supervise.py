"""Run vmgate's foreground processes (gateway, websockify, nginx) for `make run` and stream their logs.

deploy/run.sh prepares everything (servers, migrations, .env in the environment) and then execs this.
Each child gets its own session, so the SIGINT a terminal sends on Ctrl-C reaches only this supervisor,
which then stops the children in order; QEMU processes the gateway started live in sessions of their
own and are never signalled. If one child exits, the supervisor says which and stops the rest.
Standard library only: it must run before and independently of the project's virtualenv.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
STOP_GRACE = 15.0  # seconds children get after SIGTERM before SIGKILL
HEALTH_TIMEOUT = 120.0
DEFAULT_PUBLIC_URL = "https://127.0.0.1:8443"  # deploy/lib.sh's default; run.sh always sets PUBLIC_URL
NAME_WIDTH = len("websockify")  # log prefixes line up


class Child:
    """One supervised process, its log file and the thread that copies its output."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, run_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.pid_path = run_dir / f"{name}.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pump: threading.Thread | None = None

    def start(self, out_lock: threading.Lock) -> None:
        log = self.log_path.open("ab", buffering=0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- {stamp} started: {' '.join(self.argv[:3])} ...\n".encode())
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid_path.write_text(f"{self.proc.pid}\n")
        assert self.proc.stdout is not None
        prefix = f"{self.name:<{NAME_WIDTH}} | ".encode()
        pump_args = (self.proc.stdout, log, prefix, out_lock)
        self.pump = threading.Thread(target=_pump, args=pump_args, daemon=True)
        self.pump.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        # The child leads its own process group; websockify's per-connection forks are in it too.
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def forget(self) -> None:
        self.pid_path.unlink(missing_ok=True)
        if self.pump is not None:
            self.pump.join(timeout=2)


def _pump(stream: IO[bytes], log: IO[bytes], prefix: bytes, lock: threading.Lock) -> None:
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        log.write(line)
        with lock:
            try:
                out.write(prefix + line)
                out.flush()
            except (BrokenPipeError, ValueError):
                pass  # the terminal is gone; the log file still gets everything
    log.close()


def say(lock: threading.Lock, message: str) -> None:
    with lock:
        try:
            sys.stdout.write(f"{'run':<{NAME_WIDTH}} | {message}\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (a fixed http://127.0.0.1 URL)
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def pid_alive(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def public_origin(url: str) -> str:
    """The Origin header a browser sends from pages under ``url``: scheme://host[:port]."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def nginx_ports(conf: Path) -> list[int]:
    """The ports an nginx configuration listens on (lines deploy/services.sh commented out do not count)."""
    return [int(port) for port in re.findall(r"^\s*listen\s+127\.0\.0\.1:(\d+)", conf.read_text(), re.MULTILINE)]


def local_ca(env: dict[str, str], public_url: str) -> Path | None:
    """The local CA that signed nginx's certificate (deploy/tls.sh), when nginx serves that one."""
    ca = Path(env["DATA_DIR"]) / "tls" / "ca.crt"
    own_tls = public_url.startswith("https://") and env.get("NGINX_TLS") != "off"
    return ca if own_tls and not env.get("TLS_CERT") and ca.is_file() else None


def build_children(
    args: argparse.Namespace, env: dict[str, str], log_dir: Path, run_dir: Path
) -> list[Child]:
    venv_bin = REPO / ".venv" / "bin"
    child_env = dict(env, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    children = [
        Child("gateway", [str(venv_bin / "python"), "-m", "gateway"], child_env, log_dir, run_dir),
        Child("websockify", [
            # websockify's own command line; console/proxy.py adds answering fleet VMs' VNC passwords.
            str(venv_bin / "python"), "-m", "console.proxy",
            "--token-plugin", "console.token_plugin.RedisTokens",
            # env: makes the plugin read the URL from the environment, keeping the password out of ps.
            "--token-source", "env:REDIS_URL",
            # Browsers send the page's origin; only pages served from PUBLIC_URL may open consoles.
            "--auth-plugin", "websockify.auth_plugins.ExpectOrigin",
            "--auth-source", public_origin(env.get("PUBLIC_URL", DEFAULT_PUBLIC_URL)),
            f"127.0.0.1:{env['WEBSOCKIFY_PORT']}",
        ], child_env, log_dir, run_dir),
    ]
    # Prometheus, unless PROMETHEUS_PORT=0: deploy/prometheus.sh renders its config and says how to run it.
    prometheus = subprocess.run([str(REPO / "deploy" / "prometheus.sh"), "argv"], env=env, check=True,
                                capture_output=True, text=True).stdout.split("\n")
    if prometheus[0]:
        children.append(Child("prometheus", [a for a in prometheus if a], env, log_dir, run_dir))
    if args.nginx_conf:
        nginx_dir = str(Path(args.nginx_conf).parent) + "/"
        children.append(Child("nginx", [
            "nginx", "-g", "daemon off;", "-c", args.nginx_conf, "-p", nginx_dir, "-e", "stderr",
        ], env, log_dir, run_dir))
    return children


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nginx-conf", help="run nginx in the foreground with this rendered config")
    parser.add_argument("--stop-services", default="",
                        help="servers (postgres redis) to stop on exit: the ones run.sh started")
    args = parser.parse_args()

    env = dict(os.environ)
    data_dir = Path(env["DATA_DIR"])
    log_dir, run_dir = data_dir / "logs", data_dir / "run"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_dir.chmod(0o700)  # request logs name users and addresses
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    me = run_dir / "supervise.pid"
    other = pid_alive(me)
    if other is not None and other != os.getpid():
        say(lock, f"make run is already running (pid {other}); `make down` stops it")
        return 1

    ports = {key: int(env.get(key) or 0) for key in
             ("GATEWAY_PORT", "WEBSOCKIFY_PORT", "WEBSOCKIFY_METRICS_PORT", "PROMETHEUS_PORT")}
    ports = {key: port for key, port in ports.items() if port}
    if args.nginx_conf:
        # The ports the rendered configuration listens on: NGINX_PORT, and NGINX_HTTP_PORT when it redirects.
        for port in nginx_ports(Path(args.nginx_conf)):
            ports["NGINX_HTTP_PORT" if str(port) == env.get("NGINX_HTTP_PORT") else "NGINX_PORT"] = port
    busy = [f"{key}={port}" for key, port in ports.items() if port_in_use(port)]
    if busy:
        say(lock, f"port(s) already in use on 127.0.0.1: {', '.join(busy)}. Is vmgate already running? "
                  "`make down` stops it; or change the port in .env")
        return 1

    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    me.write_text(f"{os.getpid()}\n")
    children = build_children(args, env, log_dir, run_dir)
    failed: str | None = None
    try:
        for child in children:
            child.start(lock)
        say(lock, f"started {', '.join(f'{c.name} (pid {c.proc.pid})' for c in children if c.proc)}; "
                  f"logs in {log_dir}")

        health = f"http://{env.get('GATEWAY_HOST', '127.0.0.1')}:{env['GATEWAY_PORT']}/api/healthz"
        public_url = env.get("PUBLIC_URL") or DEFAULT_PUBLIC_URL
        deadline = time.monotonic() + HEALTH_TIMEOUT
        up = False
        while not stop_requested:
            dead = next((c for c in children if not c.alive()), None)
            if dead is not None:
                assert dead.proc is not None
                failed = f"{dead.name} exited with code {dead.proc.returncode}; stopping the rest"
                break
            if not up:
                if healthy(health):
                    up = True
                    say(lock, f"vmgate is up: {public_url}"
                              "   (Ctrl-C stops it; VMs keep running, `make down` stops them too)")
                    ca = local_ca(env, public_url)
                    if ca is not None:
                        say(lock, f"its certificate is signed by a local CA: trust {ca} in your browser "
                                  '(docs/DEPLOYMENT.md, "HTTPS")')
                elif time.monotonic() > deadline:
                    failed = f"the gateway did not answer {health} within {HEALTH_TIMEOUT:.0f}s; stopping"
                    break
            time.sleep(0.25)
    finally:
        if failed:
            say(lock, failed)
        elif stop_requested:
            say(lock, f"got {signal.Signals(stop_requested[0]).name}; stopping (VMs keep running)")
        # nginx first so no new requests arrive, then websockify, then the gateway.
        for child in reversed(children):
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(c.alive() for c in children) and time.monotonic() < deadline and len(stop_requested) < 2:
            time.sleep(0.1)
        for child in children:
            if child.alive():
                say(lock, f"{child.name} did not stop in time; killing it")
                child.signal_group(signal.SIGKILL)
                assert child.proc is not None
                child.proc.wait()
            child.forget()
        if args.stop_services.split():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the servers shut down cleanly
            subprocess.run([str(REPO / "deploy" / "services.sh"), "down", *args.stop_services.split()],
                           check=False, stdin=subprocess.DEVNULL)
        me.unlink(missing_ok=True)
        say(lock, "stopped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
