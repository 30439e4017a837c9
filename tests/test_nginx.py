"""nginx as `make run` configures it (deploy/nginx.conf.in, rendered by `deploy/services.sh render-nginx`):
its own refusals answer in the API's JSON error envelope (issue 13), and TRUSTED_PROXIES beyond loopback
becomes its real_ip configuration. The gateway behind it is down here on purpose: what nginx says itself.

TLS (issue 16): with an https PUBLIC_URL it serves TLS 1.2 and 1.3 only, with the certificate deploy/tls.sh
made under a local CA (kept across renders, made anew when it expires soon or does not name PUBLIC_URL's
host) or the operator's TLS_CERT and TLS_KEY; plain HTTP, on NGINX_HTTP_PORT or on the TLS port, is
redirected to the same path on PUBLIC_URL. tests/test_browser_tls.py goes through it in Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import Settings
from tests.conftest import assert_envelope, fake_gateway
from tests.fixtures.websockify import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make deps)")


def render(data_dir: Path, **env: str) -> Path:
    result = subprocess.run([str(REPO / "deploy/services.sh"), "render-nginx"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, "DATA_DIR": str(data_dir), **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return data_dir / "nginx" / "nginx.conf"


def render_fails(data_dir: Path, **env: str) -> str:
    """Render expecting a refusal; returns what the script said."""
    result = subprocess.run([str(REPO / "deploy/services.sh"), "render-nginx"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, "DATA_DIR": str(data_dir), **env})
    assert result.returncode != 0, result.stdout
    return result.stderr


def tls_env(port: int, http_port: int = 0, **env: str) -> dict[str, str]:
    """Settings for a TLS render on ``port``: the operator's certificate and NGINX_TLS from .env do not apply."""
    return {"NGINX_PORT": str(port), "NGINX_HTTP_PORT": str(http_port), "PUBLIC_URL": f"https://127.0.0.1:{port}",
            "NGINX_TLS": "auto", "TLS_CERT": "", "TLS_KEY": "", **env}


def listens(conf: str) -> list[str]:
    """The addresses (and flags) of the listen directives nginx reads: commented-out lines do not count."""
    return re.findall(r"^\s*listen\s+([^;]+);", conf, re.MULTILINE)


@contextlib.contextmanager
def running_nginx(conf: Path) -> Iterator[None]:
    """nginx (a daemon) with the rendered ``conf``, until the block ends."""
    prefix = ["-c", str(conf), "-p", f"{conf.parent}/", "-e", str(conf.parent / "error.log")]
    subprocess.run(["nginx", *prefix], check=True, timeout=30)
    try:
        deadline = time.monotonic() + 10
        while not (conf.parent / "nginx.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield
    finally:
        subprocess.run(["nginx", "-s", "quit", *prefix], check=False, timeout=30)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[str]:
    """nginx on a free port, in front of a gateway port nothing listens on; yields its base URL. PUBLIC_URL
    is http, as in a .env from before TLS: plain HTTP on NGINX_PORT and nothing else."""
    port, gateway_port = free_port(), free_port()
    conf = render(tmp_path, NGINX_PORT=str(port), GATEWAY_PORT=str(gateway_port), NGINX_HTTP_PORT=str(free_port()),
                  PUBLIC_URL=f"http://127.0.0.1:{port}", TLS_CERT="", TLS_KEY="")
    assert listens(conf.read_text()) == [f"127.0.0.1:{port}"]  # no TLS, no redirect server
    assert not (tmp_path / "tls").exists()
    with running_nginx(conf):
        yield f"http://127.0.0.1:{port}"


@dataclass
class TlsNginx:
    """An nginx serving TLS: its https URL, its plain HTTP redirect URL, the CA and the data dir."""

    url: str
    http_url: str
    ca: Path
    data_dir: Path
    conf: Path


@pytest.fixture
def tls_nginx(tmp_path: Path) -> Iterator[TlsNginx]:
    """nginx with PUBLIC_URL https on a free port and a redirecting plain HTTP port, the gateway down."""
    port, http_port = free_port(), free_port()
    conf = render(tmp_path, GATEWAY_PORT=str(free_port()), **tls_env(port, http_port))
    with running_nginx(conf):
        yield TlsNginx(f"https://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", tmp_path / "tls" / "ca.crt",
                       tmp_path, conf)


async def call(method: str, url: str, **kwargs: object) -> tuple[int, object, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kwargs) as resp:  # type: ignore[arg-type]
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body, dict(resp.headers)


async def test_nginx_answers_its_own_refusals_in_the_envelope(nginx: str) -> None:
    status, body, headers = await call("GET", nginx + "/api/vms/%00")
    assert_envelope(status, body, 400, "bad_request")
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, body, _ = await call("POST", nginx + "/api/auth/login", data=io.BytesIO(b"a" * (2 * 1024 * 1024)),
                                 headers={"Content-Type": "application/json"})
    assert_envelope(status, body, 413, "payload_too_large")
    status, body, headers = await call("GET", nginx + "/api/me")  # the gateway is not there
    assert_envelope(status, body, 503, "service_unavailable")
    assert headers["Retry-After"] == "5"
    status, body, _ = await call("GET", nginx + "/metrics")
    assert_envelope(status, body, 404, "not_found")


def test_trusted_proxies_become_real_ip_lines(tmp_path: Path) -> None:
    edge = render(tmp_path / "edge").read_text()
    assert "set_real_ip_from" not in edge and "limit_conn vmgate_per_ip" in edge
    behind = render(tmp_path / "behind", TRUSTED_PROXIES="127.0.0.1/32,::1/128,10.0.0.0/8").read_text()
    assert "set_real_ip_from 10.0.0.0/8;" in behind and "real_ip_recursive on;" in behind
    assert "set_real_ip_from 127.0.0.1" not in behind


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def trusting(ca: Path, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    """A client context that verifies the server (name included) against ``ca`` only."""
    context = ssl.create_default_context(cafile=str(ca))
    for name, version in versions.items():
        setattr(context, name, version)
    return context


async def test_https_with_the_generated_certificate(tls_nginx: TlsNginx) -> None:
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        url = tls_nginx.url.replace("127.0.0.1", host)
        status, body, _ = await call("GET", url + "/api/me", ssl=trusting(tls_nginx.ca))
        assert_envelope(status, body, 503, "service_unavailable")  # nginx's own answer, over TLS
    with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not trusted without the local CA
        await call("GET", tls_nginx.url + "/api/me")
    tls = tls_nginx.data_dir / "tls"
    assert (tls.stat().st_mode & 0o777) == 0o700
    for key in ("ca.key", "server.key"):
        assert ((tls / key).stat().st_mode & 0o777) == 0o600
    assert str(tls / "ca.key") not in tls_nginx.conf.read_text()  # nginx gets the server's key only
    text = openssl("x509", "-in", str(tls / "server.crt"), "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text and "TLS Web Server Authentication" in text


async def test_tls_1_2_and_1_3_are_served(tls_nginx: TlsNginx) -> None:
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in tls_nginx.conf.read_text()
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = trusting(tls_nginx.ca, minimum_version=version, maximum_version=version)
        status, _, _ = await call("GET", tls_nginx.url + "/api/me", ssl=context)
        assert status == 503


def test_tls_1_0_and_1_1_are_refused(tls_nginx: TlsNginx) -> None:
    # Offered by a client that allows them (security level 0): the server answers with the alert
    # protocol_version (70). openssl, because Python's ssl deprecates setting them.
    for flag in ("-tls1", "-tls1_1"):
        hello = subprocess.run(["openssl", "s_client", "-connect", tls_nginx.url.removeprefix("https://"), flag,
                                "-cipher", "DEFAULT:@SECLEVEL=0"], stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=30, check=False)
        assert hello.returncode != 0 and "alert protocol version" in hello.stdout + hello.stderr, hello.stderr


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_plain_http_is_redirected_to_public_url(tls_nginx: TlsNginx, method: str) -> None:
    path = "/vms/abc/console?tab=screen&x=1"
    # On the plain HTTP port, and plain HTTP sent to the TLS port (nginx's 497).
    for plain in (tls_nginx.http_url, tls_nginx.url.replace("https://", "http://")):
        status, _, headers = await call(method, plain + path, allow_redirects=False)
        assert status == 308, (plain, status)
        assert headers["Location"] == tls_nginx.url + path


def test_redirect_port_can_be_off_and_must_differ(tmp_path: Path) -> None:
    port = free_port()
    assert listens(render(tmp_path / "off", **tls_env(port, 0)).read_text()) == [f"127.0.0.1:{port} ssl"]
    assert "both" in render_fails(tmp_path / "same", **tls_env(port, port))
    # A TLS terminator in front of nginx: PUBLIC_URL is https, nginx itself speaks plain HTTP.
    behind = render(tmp_path / "behind", **tls_env(port, free_port(), NGINX_TLS="off")).read_text()
    assert listens(behind) == [f"127.0.0.1:{port}"] and not re.search(r"^\s*ssl_", behind, re.MULTILINE)
    assert not (tmp_path / "behind" / "tls").exists()


async def test_operator_certificate_is_used_as_given(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    cert, key = own / "cert.pem", own / "key.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
            "-subj", "/CN=operator", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert))
    port = free_port()
    conf = render(tmp_path / "data", GATEWAY_PORT=str(free_port()),
                  **tls_env(port, TLS_CERT=str(cert), TLS_KEY=str(key)))
    assert f"ssl_certificate {cert};" in conf.read_text() and f"ssl_certificate_key {key};" in conf.read_text()
    assert not (tmp_path / "data" / "tls").exists()  # no local CA made
    with running_nginx(conf):
        status, _, _ = await call("GET", f"https://127.0.0.1:{port}/api/me", ssl=trusting(cert))
        assert status == 503
    assert "TLS_KEY" in render_fails(tmp_path / "half", **tls_env(port, TLS_CERT=str(cert)))
    assert "no readable file" in render_fails(tmp_path / "gone", **tls_env(port, TLS_CERT=str(own / "x.pem"),
                                                                          TLS_KEY=str(key)))


def test_generated_certificate_is_kept_and_renewed(tmp_path: Path) -> None:
    port = free_port()
    tls = tmp_path / "tls"

    def files() -> tuple[bytes, bytes, bytes]:
        return (tls / "ca.crt").read_bytes(), (tls / "server.crt").read_bytes(), (tls / "server.key").read_bytes()

    render(tmp_path, **tls_env(port))
    first = files()
    render(tmp_path, **tls_env(port))
    assert files() == first  # kept across runs

    # PUBLIC_URL names another host: a new server certificate (and key) from the same CA.
    render(tmp_path, **tls_env(port, PUBLIC_URL=f"https://vmgate.test:{port}"))
    renamed = files()
    assert renamed[0] == first[0] and renamed[1] != first[1] and renamed[2] != first[2]
    assert "DNS:vmgate.test" in openssl("x509", "-in", str(tls / "server.crt"), "-noout", "-ext", "subjectAltName")

    # A certificate that expires within 30 days (here: tomorrow) is made anew.
    openssl("x509", "-req", "-in", str(_csr(tls)), "-CA", str(tls / "ca.crt"),
            "-CAkey", str(tls / "ca.key"), "-CAcreateserial", "-days", "1", "-out", str(tls / "server.crt"),
            "-extfile", str(_ext(tls, "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:vmgate.test")))
    short = (tls / "server.crt").read_bytes()
    render(tmp_path, **tls_env(port, PUBLIC_URL=f"https://vmgate.test:{port}"))
    assert (tls / "server.crt").read_bytes() != short
    openssl("x509", "-in", str(tls / "server.crt"), "-noout", "-checkend", str(300 * 86400))  # fails if not

    # A server certificate its CA did not sign (the CA was replaced) is made anew too.
    (tls / "ca.crt").unlink()
    render(tmp_path, **tls_env(port))
    openssl("verify", "-CAfile", str(tls / "ca.crt"), str(tls / "server.crt"))


def _csr(tls: Path) -> Path:
    csr = tls / "test.csr"
    openssl("req", "-new", "-key", str(tls / "server.key"), "-subj", "/CN=vmgate.test", "-out", str(csr))
    return csr


def _ext(tls: Path, line: str) -> Path:
    ext = tls / "test.ext"
    ext.write_text(line + "\n")
    return ext


def wait_for_text(path: Path, text: str, timeout: float = 5.0) -> None:
    """Until ``text`` is in the file (nginx writes its access log line after the answer)."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_a_request_id_goes_from_nginx_to_the_gateway_and_its_log(
        tmp_path: Path, aiohttp_server: Any, app_settings: Settings, database_url: str) -> None:
    """nginx names each request ($request_id), tells the gateway (X-Request-ID), which answers with it and
    logs with it; nginx's access log ends with it; nginx's own refusals carry one too (issue 16)."""
    gateway = await fake_gateway(aiohttp_server, app_settings, database_url)
    port = free_port()
    conf = render(tmp_path, NGINX_PORT=str(port), GATEWAY_PORT=str(gateway.port), NGINX_HTTP_PORT=str(free_port()),
                  PUBLIC_URL=f"http://127.0.0.1:{port}", TLS_CERT="", TLS_KEY="")
    with running_nginx(conf):
        status, _body, headers = await call("GET", f"http://127.0.0.1:{port}/api/healthz",
                                            headers={"X-Request-ID": "client-chosen-id"})
        assert status == 200
        request_id = headers["X-Request-ID"]
        # nginx's own id replaced the client's: the gateway answered with the id nginx logged.
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
        status, _body, refused = await call("GET", f"http://127.0.0.1:{port}/api/vms/%00")
        assert status == 400 and re.fullmatch(r"[0-9a-f]{32}", refused["X-Request-ID"])
        log = conf.parent / "access.log"
        await asyncio.to_thread(wait_for_text, log, request_id)
    line = next(x for x in log.read_text().splitlines() if "/api/healthz" in x)
    assert line.endswith(" " + request_id), line
