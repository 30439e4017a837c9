"""nginx as `make run` configures it (deploy/nginx.conf.in, rendered by `deploy/services.sh render-nginx`):
its own refusals answer in the API's JSON error envelope (issue 13), and TRUSTED_PROXIES beyond loopback
becomes its real_ip configuration. The gateway behind it is down here on purpose: what nginx says itself."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import assert_envelope
from tests.fixtures.websockify import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make deps)")


def render(data_dir: Path, **env: str) -> Path:
    result = subprocess.run([str(REPO / "deploy/services.sh"), "render-nginx"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False, env={**os.environ, "DATA_DIR": str(data_dir), **env})
    assert result.returncode == 0, result.stdout + result.stderr
    return data_dir / "nginx" / "nginx.conf"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[str]:
    """nginx on a free port, in front of a gateway port nothing listens on; yields its base URL."""
    port, gateway_port = free_port(), free_port()
    conf = render(tmp_path, NGINX_PORT=str(port), GATEWAY_PORT=str(gateway_port))
    prefix = ["-c", str(conf), "-p", f"{conf.parent}/", "-e", str(conf.parent / "error.log")]
    subprocess.run(["nginx", *prefix], check=True, timeout=30)
    try:
        deadline = time.monotonic() + 10
        while not (conf.parent / "nginx.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["nginx", "-s", "quit", *prefix], check=False, timeout=30)


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
