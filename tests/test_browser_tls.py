"""The stack as `make run` puts it together, over TLS, in headless Chromium: nginx rendered by
deploy/services.sh with an https PUBLIC_URL and the certificate deploy/tls.sh made under its local CA, a
real gateway process and a real websockify that accepts only the https origin (ExpectOrigin, as
deploy/supervise.py starts it). Chromium signs up, confirms the mailed https link, logs in, creates a
`tiny` VM and sees its console draw over wss:// through nginx. The session cookie is Secure, pages carry
Strict-Transport-Security, and plain HTTP is redirected to the https URL.

Chromium trusts exactly this server's key (--ignore-certificate-errors-spki-list, its SPKI's SHA-256),
not every certificate: an unpinned key would still fail."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import outbox_link
from tests.fixtures.browser import canvas_until, chromium, new_page, require_assets
from tests.fixtures.gateway_process import GatewayFactory, GatewayProcess
from tests.fixtures.websockify import free_port, start_websockify, stop_websockify
from tests.test_nginx import render, running_nginx, tls_env

pytestmark = [pytest.mark.qemu, pytest.mark.browser]


@dataclass
class TlsStack:
    """The public https URL, its plain HTTP redirect URL, the gateway behind them, nginx's key."""

    url: str
    http_url: str
    gateway: GatewayProcess
    server_key: Path


def spki_sha256(key: Path) -> str:
    """Base64 of the SHA-256 of the key's SubjectPublicKeyInfo, as Chromium's SPKI allow-list takes it."""
    der = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                         capture_output=True, check=True, timeout=30).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
def tls_stack(gateway_processes: GatewayFactory, redis_test_url: str, tmp_path: Path) -> Iterator[TlsStack]:
    require_assets()
    port, http_port, gateway_port = free_port(), free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    websockify = start_websockify(redis_test_url, tmp_path / "websockify.log", [
        "--auth-plugin", "websockify.auth_plugins.ExpectOrigin", "--auth-source", url])
    try:
        edge = tmp_path / "edge"
        conf = render(edge, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(gateway_port),
                      WEBSOCKIFY_PORT=str(websockify.port), **tls_env(port, http_port))
        gateway = gateway_processes(GATEWAY_PORT=str(gateway_port), PUBLIC_URL=url, VNC_PUBLIC_URL="")
        gateway.start()
        with running_nginx(conf):
            yield TlsStack(url, f"http://127.0.0.1:{http_port}", gateway, edge / "tls" / "server.key")
    finally:
        stop_websockify(websockify)


async def test_console_over_tls(tls_stack: TlsStack) -> None:
    from playwright.async_api import Error, expect

    url, email, password = tls_stack.url, "tls@example.test", "a long enough password"
    # Without the pin the certificate is refused: the flag below trusts this key, not any certificate.
    async with chromium() as untrusting, new_page(untrusting, "tls-untrusted") as page:
        with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
            await page.goto(url + "/")
    async with chromium(f"--ignore-certificate-errors-spki-list={spki_sha256(tls_stack.server_key)}") as browser, \
            new_page(browser, "tls-console") as page:
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))

        # Plain HTTP lands on the https URL, path kept.
        await page.goto(tls_stack.http_url + "/?from=http")
        assert page.url == url + "/?from=http"

        signup = page.locator("#signup-form")
        await signup.get_by_label("Email").fill(email)
        await signup.get_by_label("Password").fill(password)
        await signup.get_by_role("button", name="Sign up").click()
        await expect(page.locator("#message")).to_contain_text("Account created")
        link = outbox_link(tls_stack.gateway.outbox, email)
        assert link.startswith(url + "/verify?token=")  # mailed links name the https URL
        await page.goto(link)
        await expect(page.locator("#message")).to_contain_text(f"Your email address {email} is confirmed")

        await page.goto(url + "/")
        login = page.locator("#login-form")
        await login.get_by_label("Email").fill(email)
        await login.get_by_label("Password").fill(password)
        await login.get_by_role("button", name="Log in").click()
        await expect(page.locator("#who")).to_have_text(email)
        cookies: dict[str, Any] = {c["name"]: c for c in await page.context.cookies()}
        assert cookies["vmgate_session"]["secure"] and cookies["vmgate_session"]["httpOnly"]
        assert cookies["vmgate_csrf"]["secure"]

        response = await page.goto(url + "/dashboard")
        assert response is not None and response.headers["strict-transport-security"] == "max-age=31536000"

        await page.locator("main").get_by_role("link", name="New VM").click()
        await expect(page.locator(".template-card[data-template=tiny] input")).to_be_checked()
        await page.get_by_role("button", name="Create VM").click()
        await page.wait_for_url("**/vms/*/console", timeout=60_000)
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=60_000)
        await canvas_until(page, lambda s: s["distinct"] > 1, timeout=60)
        assert sockets and all(s.startswith(url.replace("https://", "wss://") + "/vnc") for s in sockets), sockets
