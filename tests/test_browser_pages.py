"""The web console's pages in headless Chromium, on the fake driver (fast; the real QEMU path is
tests/test_browser_console.py): sign-up to log-out through the forms, the dashboard's empty state and
quota bars, the New VM page and an over-quota create, the VM page (state, history, job spec, serial
log, stop, start, destroy with confirmation), a stopped VM's console, API tokens and the audit log,
the admin pages (and their 404 for everyone else), labels on every field, and phone widths."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from typing import Any

import psycopg2
import pytest

from gateway.config import Settings
from tests.conftest import Session, fake_gateway
from tests.fixtures.browser import (
    ARTIFACTS,
    OVERFLOWS,
    PHONE,
    UNLABELLED,
    base_url,
    chromium,
    log_in,
    new_page,
    require_assets,
    sign_up_and_confirm,
)

pytestmark = [pytest.mark.browser]

PASSWORD = "a long enough password"


@pytest.fixture
async def pages_gateway(aiohttp_server: Any, app_settings: Settings, database_url: str) -> Any:
    """The gateway on the fake driver, one VM and 512 MB per user, and a console URL where nothing listens."""
    require_assets()
    settings = dataclasses.replace(app_settings, quota_max_vms=1, quota_memory_mb=512,
                                   vnc_public_url="ws://127.0.0.1:9/vnc")
    return await fake_gateway(aiohttp_server, settings, database_url)


async def check_page_shape(page: Any, url: str) -> None:
    """Every field has a label, and nothing scrolls sideways at this width."""
    await page.goto(url)  # not "networkidle": a page with live state keeps its event stream open
    await page.wait_for_timeout(300)
    assert await page.evaluate(UNLABELLED) == [], url
    shape = await page.evaluate(OVERFLOWS)
    assert not shape["overflows"], f"{url} scrolls sideways at {page.viewport_size}: {shape['culprits']}"


async def test_user_pages(pages_gateway: Any) -> None:
    from playwright.async_api import expect

    server, base = pages_gateway, base_url(pages_gateway)
    email = "pages@example.test"
    async with chromium() as browser, new_page(browser, "pages") as page:
        # Sign up, confirm the address from the mail, log in (a wrong password first).
        await sign_up_and_confirm(page, server, email, PASSWORD)
        # By keyboard alone: Tab to the log-in form (past "Skip to content" and the home link), type, Enter.
        await page.goto(base + "/")
        for _ in range(5):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.id") == "login-email":
                break
        assert await page.evaluate("document.activeElement.id") == "login-email"
        await page.keyboard.type(email)
        await page.keyboard.press("Tab")
        await page.keyboard.type("not the password")
        await page.keyboard.press("Enter")
        await expect(page.locator("#message")).to_have_text("Wrong email or password.")
        await expect(page.locator("#message")).to_have_class("msg error")
        await log_in(page, server, email, PASSWORD)

        # A new user's dashboard: what to do, and an empty quota.
        await expect(page.locator("#empty")).to_contain_text("No VMs yet")
        await expect(page.locator("[data-quota=VMs]")).to_have_text("0 of 1")
        await page.get_by_role("link", name="Create your first VM").click()

        # New VM: the tiny card is chosen, the inputs hold its defaults within its limits.
        await expect(page).to_have_url(base + "/vms/new")
        await expect(page.locator(".template-card[data-template=tiny] input")).to_be_checked()
        await expect(page.locator("#memory_mb")).to_have_attribute("max", "512")  # the quota's, not the template's
        await expect(page.locator("#memory_mb-hint")).to_contain_text("your quota leaves 512 MB")
        await page.get_by_label("Name (optional)").fill("Not Valid")
        await page.get_by_role("button", name="Create VM").click()
        await expect(page.locator("#message")).to_contain_text("Name: lower-case letters")
        await page.get_by_label("Name (optional)").fill("web-1")
        await page.get_by_role("button", name="Create VM").click()
        # Nothing listens at this gateway's console URL: the console says the connection was refused.
        await page.wait_for_url("**/vms/*/console", timeout=60_000)
        vm_id = page.url.rstrip("/").split("/")[-2]
        await expect(page.locator("#status")).to_have_attribute("data-state", "refused", timeout=30_000)
        await expect(page.locator("#status")).to_contain_text("The console connection was refused")
        await expect(page.get_by_role("button", name="Reconnect")).to_be_visible()

        # The dashboard lists it, running, with its usage in the bars.
        await page.goto(base + "/")
        row = page.locator(f"li[data-vm-id='{vm_id}']")
        await expect(row.locator(".badge")).to_have_text("running")
        await expect(page.locator("[data-quota=VMs]")).to_have_text("1 of 1")

        # A second VM does not fit: the page warns, and the server's answer is shown.
        await page.goto(base + "/vms/new")
        await expect(page.locator("#quota-warning")).to_contain_text("no VM left")
        await page.get_by_role("button", name="Create VM").click()
        await expect(page.locator("#message")).to_contain_text("This VM does not fit your quota: vms.")

        # The VM page: state, history, job spec, serial log; stop, start, destroy.
        server.driver.write_serial(vm_id, "hello from ttyS0\n")
        await page.goto(base + "/")
        await page.get_by_role("link", name="Details of web-1").click()
        await expect(page.locator("#vm-state .badge")).to_have_text("running")
        await expect(page.locator("#history tbody tr")).not_to_have_count(0)
        await expect(page.locator("#jobspec")).to_contain_text('job "')
        await expect(page.locator("#serial")).to_contain_text("hello from ttyS0")
        await page.get_by_role("button", name="Stop").click()
        await expect(page.locator("#vm-state .badge")).to_have_text("stopped", timeout=30_000)
        # The console of a stopped VM says so.
        await page.goto(f"{base}/vms/{vm_id}/console")
        await expect(page.locator("#notice")).to_contain_text("The VM is stopped")
        await page.goto(f"{base}/vms/{vm_id}")
        await page.get_by_role("button", name="Start").click()
        await expect(page.locator("#vm-state .badge")).to_have_text("running", timeout=30_000)
        await page.get_by_role("button", name="Destroy…").click()
        dialog = page.locator("#destroy-dialog")
        await expect(dialog).to_be_visible()
        await dialog.get_by_role("button", name="Cancel").click()
        await expect(page.locator("#vm-state .badge")).to_have_text("running")
        await page.get_by_role("button", name="Destroy…").click()
        await dialog.get_by_role("button", name="Destroy").click()
        await page.wait_for_url(base + "/dashboard")
        await expect(page.locator("#empty")).to_be_visible(timeout=30_000)

        # Account: an API token is shown once, listed, revoked; the audit log lists what happened.
        await page.get_by_role("link", name="Account").click()
        await page.get_by_label("Name").fill("ci script")
        await page.get_by_role("button", name="Create token").click()
        await expect(page.locator("#new-token-value")).to_contain_text("vg_")
        token = await page.locator("#new-token-value").text_content()
        await expect(page.locator("#token-list")).to_contain_text("ci script")
        assert token and token[:11] in await page.locator("#token-list").inner_text()
        await page.get_by_role("button", name="Revoke ci script").click()
        await expect(page.locator("#token-list")).to_contain_text("revoked")
        await page.reload()
        await expect(page.locator("#new-token")).to_be_hidden()
        assert token not in await page.content()
        audit = page.locator("#audit")
        for action in ("user.signup", "user.login", "vm.create", "vm.destroy", "token.create", "token.revoke"):
            await expect(audit).to_contain_text(action)

        # Every page: labelled fields, no sideways scrolling on a phone or a desktop.
        state = await page.context.storage_state()
        async with new_page(browser, "pages-phone", viewport=PHONE, storage_state=state) as phone:
            for path in ("/dashboard", "/vms/new", "/account", f"/vms/{vm_id}"):
                await check_page_shape(phone, base + path)
            await phone.screenshot(path=str(ARTIFACTS / "vm-page-phone.png"), full_page=True)
        for path in ("/dashboard", "/vms/new", "/account"):
            await check_page_shape(page, base + path)

        await page.get_by_role("button", name="Log out").click()
        await expect(page.locator("#login-form")).to_be_visible()
        await page.goto(base + "/account")
        await expect(page.locator("#login-form")).to_be_visible()  # sent to log in, and back afterwards
        assert page.url.endswith("/account") and "?next=" in page.url

        # After logging in, `next` leads only to a page of this site: browsers drop tabs and newlines from
        # URLs, so "/<tab>/evil.example" would otherwise be "//evil.example", another origin.
        for sneaky in ("/%09/evil.example", "/%0a/evil.example", "/%5C/evil.example", "https://evil.example/"):
            await page.goto(base + "/?next=" + sneaky)
            form = page.locator("#login-form")
            await form.get_by_label("Email").fill(email)
            await form.get_by_label("Password").fill(PASSWORD)
            await form.get_by_role("button", name="Log in").click()
            await expect(page.locator("#who")).to_have_text(email)
            assert page.url == base + "/dashboard", (sneaky, page.url)
            await page.get_by_role("button", name="Log out").click()
            await expect(page.locator("#login-form")).to_be_visible()

    async with chromium() as browser, new_page(browser, "start-phone", viewport=PHONE) as phone:
        await check_page_shape(phone, base + "/")
        await check_page_shape(phone, base + "/reset")


async def test_admin_pages(pages_gateway: Any, sessions: Any, database_url: str) -> None:
    from playwright.async_api import expect

    server, base = pages_gateway, base_url(pages_gateway)
    user: Session = sessions(server)
    await user.signup_and_login("someone@example.test", PASSWORD)
    status, vm = await user.request("POST", "/api/vms", json={"template": "tiny", "name": "their-vm"})
    assert status in (201, 202), vm
    for _ in range(300):  # a create may answer before the VM runs (202); the test disables a running one
        if (await user.request("GET", f"/api/vms/{vm['vm_id']}"))[1]["state"] == "running":
            break
        await asyncio.sleep(0.1)
    admin: Session = sessions(server)
    await admin.signup_and_login("boss@example.test", PASSWORD)
    assert admin.user is not None
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE users SET role = 'admin' WHERE id = %s", (admin.user["id"],))
        conn.commit()

    # Anyone but an admin gets what a page that does not exist gets.
    missing = await user.request("GET", "/no-such-page")
    assert missing[0] == 404
    for path in ("/admin", "/admin/users", "/admin/vms", "/admin/queue", "/admin/slo"):
        assert await user.request("GET", path) == missing, path
        assert await sessions(server).request("GET", path) == missing, path

    async with chromium() as browser, new_page(browser, "admin") as page:
        await log_in(page, server, "boss@example.test", PASSWORD)
        await page.get_by_role("link", name="Admin").click()
        await expect(page).to_have_url(base + "/admin/users")
        card = page.locator("li[data-email='someone@example.test']")
        await expect(card).to_contain_text("Using 1/1 VMs")
        await card.get_by_text("Quota and access").click()
        await card.get_by_label("VMs").fill("4")
        await card.get_by_role("button", name="Save quota").click()
        await expect(page.locator("#message")).to_contain_text("changed quota.vms")
        await expect(card).to_contain_text("Using 1/4 VMs", timeout=10_000)
        await card.get_by_text("Quota and access").click()
        await card.get_by_role("button", name="Disable account…").click()
        await page.locator("#disable-dialog").get_by_role("button", name="Disable").click()
        await expect(page.locator("#message")).to_contain_text("changed is_active")
        await expect(card.locator("[data-disabled]")).to_be_visible(timeout=10_000)
        assert (await user.request("GET", "/api/me"))[0] == 401  # their session ended

        await page.get_by_role("link", name="All VMs").click()
        await expect(page.locator("#all-vms")).to_contain_text("their-vm")
        await expect(page.locator("#all-vms")).to_contain_text("someone@example.test")
        await expect(page.locator(f"tr[data-vm-id='{vm['vm_id']}'] .badge")).to_have_text(re.compile("^stopp"))

        await page.get_by_role("link", name="Queue").click()
        queue = page.locator("#queue")
        await expect(queue).not_to_have_text("Loading…")
        status, _ = await admin.request("GET", "/api/admin/queue")
        if status != 200:
            await expect(page.locator("#queue-unavailable")).to_contain_text("Not available")
        else:
            await expect(page.locator("#queue-unavailable")).to_have_count(0)
        await check_page_shape(page, base + "/admin/users")
