"""The web console end to end in headless Chromium (Debian's package, driven by Playwright; no browser
download) on the real local driver, QEMU and websockify: sign up and confirm the address from the
mail, log in (a wrong password first), create a `tiny` VM on the New VM page, land on its noVNC
console (after a token that expired on the way was refused), see the guest's screen on the canvas,
type a command and paste text and see both run, then stop it, see its console say so, destroy it
and log out.

Its screenshot tests/artifacts/console-running.png is the one in README.md (docs/WEB.md says how to
refresh it)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from gateway.web.app import create_app
from tests.conftest import truncate_all
from tests.fixtures.browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    api_session_of,
    base_url,
    canvas_until,
    chromium,
    log_in,
    new_page,
    require_assets,
    sign_up_and_confirm,
)
from tests.test_e2e import READY, wait_for_serial

__all__ = ["CHROMIUM", "CHROMIUM_ARGS"]  # tests/test_accounts.py takes them from here

pytestmark = [pytest.mark.qemu, pytest.mark.browser]

# Console tokens live 5 s (the least allowed), so the test can hold one back until it expires.
TOKEN_TTL = 5

@pytest.fixture
async def browser_gateway(aiohttp_server: Any, app_settings: Settings, tiny_images_dir: Path,
                          websockify_server: Any, database_url: str) -> Any:
    require_assets()
    settings = dataclasses.replace(app_settings, images_dir=tiny_images_dir, driver="local",
                                   vnc_public_url=websockify_server.ws_url, console_token_ttl=TOKEN_TTL)
    server = await aiohttp_server(create_app(settings))
    truncate_all(database_url)
    return server


async def test_web_console_end_to_end(browser_gateway: Any, sessions: Any) -> None:
    from playwright.async_api import Route, expect

    server, base = browser_gateway, base_url(browser_gateway)
    email, password = "browser@example.test", "a long enough password"
    async with chromium() as browser, new_page(browser, "console") as page:
        await sign_up_and_confirm(page, server, email, password)
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
        await expect(page.locator("#empty")).to_be_visible()

        # The first console token is held back until it has expired: websockify refuses it.
        held: list[str] = []

        async def hold_first_token(route: Route) -> None:
            if held:
                await route.continue_()
                return
            held.append(route.request.url)
            response = await route.fetch()
            await asyncio.sleep(TOKEN_TTL + 1.5)
            await route.fulfill(response=response)

        await page.route("**/api/vms/*/console", hold_first_token)

        await page.locator("main").get_by_role("link", name="New VM").click()
        await expect(page.locator(".template-card[data-template=tiny] input")).to_be_checked()
        await page.get_by_role("button", name="Create VM").click()
        # Whether the create answers at once (202) or once the VM runs (201), the page ends up here.
        await page.wait_for_url("**/vms/*/console", timeout=60_000)
        vm_id = page.url.rstrip("/").split("/")[-2]
        status = page.locator("#status")
        await expect(status).to_have_attribute("data-state", "refused", timeout=60_000)
        await expect(status).to_contain_text("The console connection was refused (token expired or VM not running).")
        assert held
        await page.get_by_role("button", name="Reconnect").click()  # a fresh token this time
        await expect(status).to_have_attribute("data-state", "connected", timeout=30_000)

        # The API session of the same user reads the serial log while the browser shows the screen.
        api = await api_session_of(page, server, sessions)
        await wait_for_serial(api, vm_id, READY)
        before = await canvas_until(page, lambda s: s["distinct"] > 1)

        await page.locator("#screen canvas").click()
        # As a person types it: "|" with Shift held (Playwright sends a bare "|" without Shift, and
        # QEMU would map that keysym to "\"). /dev/console is ttyS0 (the last console= on the kernel
        # command line).
        await page.keyboard.type("uname -a ")
        await page.keyboard.press("Shift+Backslash")
        await page.keyboard.type(" tee /dev/console")
        await page.keyboard.press("Enter")
        serial = await wait_for_serial(api, vm_id, "Linux ")
        assert "cloud-amd64" in serial
        await canvas_until(page, lambda s: s["sum"] != before["sum"])

        # Paste: capitals and ">" arrive as a person would type them, Shift included.
        await page.get_by_role("button", name="Paste text").click()
        await page.get_by_label("Text to type").fill("echo Pasted-OK > /dev/console\n")
        await page.get_by_role("button", name="Type it").click()
        await wait_for_serial(api, vm_id, "Pasted-OK")  # QEMU paces keys: wait for the guest to say so

        # A German keyboard (QWERTZ): its "z" key sits where a US keyboard has "y", so the browser reports
        # key "z" with code "KeyY". noVNC sends QEMU's extended key event, the physical key's scan code, and
        # the guest's own layout (US in tiny) picks the character: "y". Had the keysym been translated
        # through QEMU's en-us map instead, the guest would get "z", and a guest set to German would show
        # "y" for the key labelled "z". docs/CONSOLE.md, "Keyboard layouts".
        await page.locator("#screen canvas").click()
        await page.keyboard.type("echo layout-")
        cdp = await page.context.new_cdp_session(page)
        for kind in ("keyDown", "keyUp"):
            await cdp.send("Input.dispatchKeyEvent", {"type": kind, "key": "z", "code": "KeyY", "text": "z",
                                                      "windowsVirtualKeyCode": 90, "nativeVirtualKeyCode": 90})
        await page.keyboard.type("-ok ")
        await page.keyboard.press("Shift+Period")
        await page.keyboard.type(" /dev/console")
        await page.keyboard.press("Enter")
        serial = await wait_for_serial(api, vm_id, "layout-")
        assert "layout-y-ok" in serial and "layout-z-ok" not in serial
        await expect(page.get_by_role("button", name="Ctrl-Alt-Del")).to_be_enabled()
        await page.screenshot(path=str(ARTIFACTS / "console-running.png"))

        # The VM page: live state, history, job spec, serial log tail; then stop.
        await page.locator(".console-bar .vm-name").click()
        await expect(page.locator("#vm-state .badge")).to_have_text("running")
        await expect(page.locator("#jobspec")).to_contain_text('job "')
        await expect(page.locator("#serial")).to_contain_text("Pasted-OK")
        await expect(page.locator("#history")).to_contain_text("running")
        await page.get_by_role("button", name="Stop").click()
        await expect(page.locator("#vm-state .badge")).to_have_text("stopped", timeout=90_000)

        await page.goto(f"{base}/vms/{vm_id}/console")
        await expect(page.locator("#notice")).to_contain_text("The VM is stopped")
        await expect(status).to_have_attribute("data-state", "stopped")

        await page.goto(f"{base}/vms/{vm_id}")
        await page.get_by_role("button", name="Destroy…").click()
        await page.locator("#destroy-dialog").get_by_role("button", name="Destroy").click()
        await page.wait_for_url(base + "/dashboard")
        await expect(page.locator("#empty")).to_be_visible(timeout=60_000)
        await expect(page.locator(f"li[data-vm-id='{vm_id}']")).to_have_count(0)

        await page.get_by_role("button", name="Log out").click()
        await expect(page.locator("#login-form")).to_be_visible()
        assert (await api.request("GET", "/api/me"))[0] == 401  # the shared session ended with it


async def test_suspend_resume_and_snapshots_in_the_browser(browser_gateway: Any, sessions: Any) -> None:
    """The VM page suspends a VM and shows it suspended; its console resumes it with the screen as it was;
    the page takes a snapshot (memory included) and deletes it."""
    from playwright.async_api import expect

    server, base = browser_gateway, base_url(browser_gateway)
    email, password = "sleeper@example.test", "a long enough password"
    async with chromium() as browser, new_page(browser, "suspend") as page:
        await sign_up_and_confirm(page, server, email, password)
        await log_in(page, server, email, password)
        api = await api_session_of(page, server, sessions)
        status, vm = await api.request("POST", "/api/vms?wait=90", json={"template": "tiny"})
        assert status == 201, vm
        vm_id = vm["vm_id"]

        await page.goto(f"{base}/vms/{vm_id}")
        badge = page.locator("#vm-state .badge")
        await expect(badge).to_have_text("running")
        await page.get_by_role("button", name="Suspend").click()
        await expect(badge).to_have_text("suspended", timeout=60_000)
        await expect(page.locator("#vm-panel")).to_contain_text("Suspended")
        await page.goto(f"{base}/dashboard")
        await expect(page.locator(f"li[data-vm-id='{vm_id}'] .badge")).to_have_text("suspended")

        await page.get_by_role("link", name=f"Resume {vm['name']} and open its console").click()
        status_el = page.locator("#status")
        await expect(status_el).to_have_attribute("data-state", "connected", timeout=60_000)
        await canvas_until(page, lambda s: s["distinct"] > 1)
        assert (await api.request("GET", f"/api/vms/{vm_id}"))[1]["state"] == "running"

        await page.goto(f"{base}/vms/{vm_id}")
        await page.get_by_label("New snapshot's name").fill("first one")
        await page.get_by_role("button", name="Take snapshot").click()
        row = page.locator("#snapshot-list tbody tr", has_text="first one")
        await expect(row).to_contain_text("disk and memory", timeout=60_000)
        await expect(row).to_contain_text("ready")
        await page.get_by_role("button", name="Delete first one").click()
        await expect(page.locator("#snapshots")).to_contain_text("No snapshots yet.", timeout=60_000)
        assert (await api.request("DELETE", f"/api/vms/{vm_id}?wait=60"))[0] == 200
