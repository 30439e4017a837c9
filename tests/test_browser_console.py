"""The pages in headless Chromium (Debian's package, driven by Playwright; no browser download):
sign up and log in through the forms, create a `tiny` VM, land on its noVNC console, see the
guest's screen on the canvas, type `uname -a` and see the screen change and the command run."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.app import NOVNC_DIR, create_app
from gateway.config import REPO_ROOT, Settings
from gateway.keys import settings_key
from gateway.mail import OUTBOX_DIR
from tests.conftest import Session, outbox_link, truncate_all
from tests.test_e2e import READY, wait_for_serial

pytestmark = [pytest.mark.qemu, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
# Flags for a closed network and a root user (see docs/TESTING.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Sums the canvas's pixels in the page; a blank (single-colour) canvas gives distinct == 1.
CANVAS_STATS = """() => {
  const c = document.querySelector('#screen canvas');
  if (!c || !c.width) return {distinct: 0, sum: 0};
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const seen = new Set(); let sum = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i] << 16 | d[i + 1] << 8 | d[i + 2];
    sum += v % 9973;
    if (seen.size < 4) seen.add(v);
  }
  return {distinct: seen.size, sum};
}"""


@pytest.fixture
async def browser_gateway(aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path,
                          websockify_server: Any, database_url: str) -> Any:
    if not (NOVNC_DIR / "core" / "rfb.js").is_file():
        pytest.fail("noVNC is not installed; run `make novnc`")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed; run `make deps`")
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local",
                                   vnc_public_url=websockify_server.ws_url)
    server = await aiohttp_server(create_app(settings))
    truncate_all(database_url)
    return server


async def test_console_page_in_chromium(browser_gateway: Any, sessions: Any) -> None:
    from playwright.async_api import async_playwright, expect

    base = str(browser_gateway.make_url("/")).rstrip("/")
    email, password = "browser@example.test", "a long enough password"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1100, "height": 760})
        try:
            await page.goto(base + "/")
            signup = page.locator("#signup-form")
            await signup.get_by_label("Email").fill(email)
            await signup.get_by_label("Password").fill(password)
            await signup.get_by_role("button", name="Sign up").click()
            await expect(page.locator("#message")).to_contain_text("Account created")

            # Open the confirmation link the gateway mailed to its outbox, on this test server (the
            # link's host is PUBLIC_URL, an nginx that is not running here).
            link = urlsplit(outbox_link(browser_gateway.app[settings_key].data_dir / OUTBOX_DIR, email))
            await page.goto(f"{base}{link.path}?{link.query}")
            await expect(page.locator("#message")).to_contain_text(f"Your email address {email} is confirmed")
            assert "token=" not in page.url  # the page took the token out of the address bar
            await page.goto(base + "/")

            login = page.locator("#login-form")
            await login.get_by_label("Email").fill(email)
            await login.get_by_label("Password").fill("wrong password here")
            await login.get_by_role("button", name="Log in").click()
            await expect(page.locator("#message")).to_contain_text("Wrong email or password")
            await login.get_by_label("Password").fill(password)
            await login.get_by_role("button", name="Log in").click()
            await expect(page.locator("#who")).to_have_text(email)

            await expect(page.locator("#template option[value=tiny]")).to_have_count(1)
            await page.get_by_role("button", name="Create VM").click()
            await page.wait_for_url("**/vms/*/console", timeout=60_000)
            vm_id = page.url.rstrip("/").split("/")[-2]
            await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=30_000)

            # The API session of the same user reads the serial log while the browser shows the screen.
            api: Session = sessions(browser_gateway)
            for cookie in await page.context.cookies():
                api.http.cookie_jar.update_cookies({cookie["name"]: cookie["value"]},
                                                   response_url=browser_gateway.make_url("/"))
                if cookie["name"] == "vmgate_csrf":
                    api.csrf_token = cookie["value"]
            await wait_for_serial(api, vm_id, READY)
            await page.wait_for_function(f"({CANVAS_STATS})().distinct > 1", timeout=30_000)
            before = await page.evaluate(CANVAS_STATS)

            await page.locator("#screen canvas").click()
            # As a person types it: "|" with Shift held (without Shift, QEMU maps the keysym to "\").
            await page.keyboard.type("uname -a ")
            await page.keyboard.press("Shift+Backslash")
            # /dev/console is ttyS0 (the last console= on the kernel command line), typed without Shift.
            await page.keyboard.type(" tee /dev/console")
            await page.keyboard.press("Enter")
            serial = await wait_for_serial(api, vm_id, "Linux ")
            assert "cloud-amd64" in serial
            await page.wait_for_function(f"({CANVAS_STATS})().sum !== {before['sum']}", timeout=30_000)
            await page.screenshot(path=str(ARTIFACTS / "console-uname.png"))

            assert (await api.request("DELETE", f"/api/vms/{vm_id}"))[0] == 200
        except BaseException:
            await page.screenshot(path=str(ARTIFACTS / "console-failure.png"))
            raise
        finally:
            await browser.close()
