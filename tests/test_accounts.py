"""Email verification and password reset against a real SMTP server (aiosmtpd, started here on
127.0.0.1), a real Postgres and Redis, and the in-memory fake driver; plus the offline outbox."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import stat
from collections.abc import Iterator
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import psycopg2
import pytest
import redis
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from console import redis_keys
from drivers.fake import FakeDriver
from gateway.config import Settings
from gateway.logs import JsonFormatter
from gateway.web.app import create_app
from gateway.web.appkeys import mailer_key
from tests.conftest import VM, Session, assert_envelope, link_token, outbox_link, truncate_all
from tests.fixtures.websockify import free_port

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new passphrase"
SMTP_LOGIN = ("mailer", "smtp password 123")


class Mailbox:
    """An aiosmtpd handler keeping every mail it accepts; ``reject`` makes it refuse DATA."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.recipients: list[list[str]] = []
        self.reject: str | None = None
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.reject:
            return self.reject
        self.recipients.append(list(envelope.rcpt_tos))
        message = BytesParser(policy=email_policy.default).parsebytes(envelope.content)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def links(self, purpose: str) -> list[str]:
        return [line for m in self.messages for line in body(m).splitlines() if f"/{purpose}?token=" in line]


def body(message: EmailMessage) -> str:
    part = message.get_body()
    assert part is not None
    return str(part.get_content())


@contextlib.contextmanager
def smtp_server(**kwargs: Any) -> Iterator[Mailbox]:
    mailbox = Mailbox()
    mailbox.port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=mailbox.port, **kwargs)
    controller.start()
    try:
        yield mailbox
    finally:
        controller.stop()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    with smtp_server() as box:
        yield box


def smtp_settings(app_settings: Settings, port: int, **changes: Any) -> Settings:
    """The app's settings sending through the test's SMTP server (clear text unless ``changes`` say otherwise)."""
    values: dict[str, Any] = {"smtp_host": "127.0.0.1", "smtp_port": port, "smtp_starttls": False,
                              "smtp_from": "vmgate <noreply@vmgate.test>", **changes}
    return dataclasses.replace(app_settings, **values)


@pytest.fixture
async def gateway(aiohttp_server: Any, app_settings: Settings, database_url: str, mailbox: Mailbox) -> Any:
    server = await aiohttp_server(create_app(smtp_settings(app_settings, mailbox.port), driver=FakeDriver()))
    truncate_all(database_url)
    return server


def db_rows(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall() if cur.description else []
        conn.commit()
    return rows


def audit(database_url: str, action: str) -> list[tuple[str, Any, Any]]:
    """(outcome, user_id, details) of every audit row of ``action``, oldest first."""
    return [(r[0], str(r[1]) if r[1] else None, r[2]) for r in db_rows(
        database_url, "SELECT outcome, user_id, details FROM audit_log WHERE action = %s ORDER BY id", (action,))]


def expire(database_url: str, token: str) -> None:
    db_rows(database_url, "UPDATE email_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = %s",
            (hashlib.sha256(token.encode()).hexdigest(),))


async def signup(session: Session, email: str, password: str = PASSWORD) -> dict[str, Any]:
    status, answer = await session.request("POST", "/api/auth/signup", json={"email": email, "password": password})
    assert status == 201, answer
    return dict(answer)


async def login(session: Session, email: str, password: str = PASSWORD) -> tuple[int, Any]:
    status, answer = await session.request("POST", "/api/auth/login", json={"email": email, "password": password})
    if status == 200:
        session.user, session.csrf_token = answer["user"], answer["csrf_token"]
    return status, answer


async def verify(session: Session, token: str) -> tuple[int, Any]:
    return await session.request("POST", "/api/auth/verify", json={"token": token})


# ---- sign-up and verification ----------------------------------------------------------------------

async def test_signup_mail_link_verify_then_create(gateway: Any, sessions: Any, mailbox: Mailbox,
                                                   app_settings: Settings, database_url: str) -> None:
    s: Session = sessions(gateway)
    answer = await signup(s, "Ada@Example.test")
    assert answer["verification_mail_sent"] is True and answer["user"]["email_verified"] is False

    # The mail arrived at the SMTP server, addressed to the new user, carrying the link.
    assert len(mailbox.messages) == 1 and mailbox.recipients == [["Ada@Example.test"]]
    mail = mailbox.messages[0]
    assert mail["To"] == "Ada@Example.test" and mail["From"] == "vmgate <noreply@vmgate.test>"
    assert "Confirm" in mail["Subject"] and mail["Message-ID"] and mail["Date"]
    [link] = mailbox.links("verify")
    assert link.startswith(f"{app_settings.public_url}/verify?token=")
    token = link_token(link)
    assert len(token) >= 43
    # Stored only as its SHA-256.
    stored = db_rows(database_url, "SELECT token_hash, purpose, expires_at - created_at FROM email_tokens")
    assert [(h, p) for h, p, _ in stored] == [(hashlib.sha256(token.encode()).hexdigest(), "verify")]
    assert stored[0][2].total_seconds() == app_settings.verify_token_ttl
    assert not db_rows(database_url, "SELECT 1 FROM email_tokens WHERE token_hash = %s", (token,))

    # Unverified: can log in, cannot create VMs.
    assert (await login(s, "ada@example.test"))[0] == 200
    assert (await s.request("GET", "/api/me"))[1]["user"]["email_verified"] is False
    assert_envelope(*await s.request("POST", "/api/vms?wait=60", json=VM), 403, "email_not_verified")

    # Following the link: the page loads (and would post the token), then the token is posted.
    page_path = link.removeprefix(app_settings.public_url)
    async with s.http.get(s.base_url + page_path) as resp:
        assert resp.status == 200
        assert resp.headers["Referrer-Policy"] == "no-referrer" and resp.headers["Cache-Control"] == "no-store"
        assert "/static/app/accounts.js" in await resp.text()
    async with s.http.get(s.base_url + "/static/app/accounts.js") as resp:
        assert resp.status == 200 and "/api/auth/verify" in await resp.text()
    status, answer = await verify(s, token)
    assert (status, answer) == (200, {"verified": True, "email": "Ada@Example.test"})

    assert (await s.request("GET", "/api/me"))[1]["user"]["email_verified"] is True
    status, vm = await s.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201 and vm["state"] == "running"

    user_id = (await s.request("GET", "/api/me"))[1]["user"]["id"]
    assert audit(database_url, "user.verify_mail") == [("ok", user_id, {"reason": "signup", "via": "smtp"})]
    assert audit(database_url, "user.verify") == [("ok", user_id, {})]


async def test_bad_verification_tokens_are_refused_alike(gateway: Any, sessions: Any, mailbox: Mailbox,
                                                         database_url: str) -> None:
    s: Session = sessions(gateway)
    await signup(s, "used@example.test")
    used = link_token(mailbox.links("verify")[-1])
    assert (await verify(s, used))[0] == 200
    await signup(s, "late@example.test")
    expired = link_token(mailbox.links("verify")[-1])
    expire(database_url, expired)
    forged = secrets.token_urlsafe(32)

    answers = []
    for token in (used, expired, forged, ""):
        status, answer = await verify(s, token)
        assert_envelope(status, answer, 400, "invalid_token")
        answers.append(answer)
    # Nothing tells the three apart.
    assert all(a == answers[0] for a in answers)
    assert "late@example.test" not in str(answers)
    status, me = await login(s, "late@example.test")
    assert me["user"]["email_verified"] is False
    # The audit log keeps the reason the client was not told.
    assert [(o, d.get("reason")) for o, _, d in audit(database_url, "user.verify")] == [
        ("ok", None), ("denied", "used"), ("denied", "expired"), ("denied", "unknown"), ("denied", "unknown")]
    # A token that is not a string is a malformed request, named as such.
    error = assert_envelope(*await s.request("POST", "/api/auth/verify", json={"token": 5}), 422)
    assert error["details"]["field"] == "token"


async def test_a_token_is_spent_once_even_under_a_race(gateway: Any, sessions: Any, mailbox: Mailbox) -> None:
    s: Session = sessions(gateway)
    await signup(s, "race@example.test")
    token = link_token(mailbox.links("verify")[-1])
    results = await asyncio.gather(*(verify(s, token) for _ in range(5)))
    assert sorted(status for status, _ in results) == [200, 400, 400, 400, 400]


async def test_resend_replaces_the_link(gateway: Any, sessions: Any, mailbox: Mailbox, database_url: str) -> None:
    s: Session = sessions(gateway)
    await signup(s, "again@example.test")
    first = link_token(mailbox.links("verify")[-1])
    assert_envelope(*await s.request("POST", "/api/auth/verify/resend"), 401, "not_authenticated")
    await login(s, "again@example.test")
    assert_envelope(*await s.request("POST", "/api/auth/verify/resend", csrf=False), 403, "csrf_failed")

    status, answer = await s.request("POST", "/api/auth/verify/resend")
    assert (status, answer) == (202, {"sent": True, "email": "again@example.test"})
    assert len(mailbox.messages) == 2
    second = link_token(mailbox.links("verify")[-1])
    assert second != first
    # The earlier link stopped working when the new one was issued.
    assert_envelope(*await verify(s, first), 400, "invalid_token")
    assert (await verify(s, second))[0] == 200
    assert_envelope(*await s.request("POST", "/api/auth/verify/resend"), 409, "already_verified")
    assert [d["reason"] for _, _, d in audit(database_url, "user.verify_mail")] == ["signup", "resend"]


async def test_resend_is_rate_limited(gateway: Any, sessions: Any, mailbox: Mailbox) -> None:
    s: Session = sessions(gateway)
    await signup(s, "eager@example.test")
    await login(s, "eager@example.test")
    for _ in range(3):  # resend_user: 3 per hour
        assert (await s.request("POST", "/api/auth/verify/resend"))[0] == 202
    async with s.http.post(s.base_url + "/api/auth/verify/resend",
                           headers={"X-CSRF-Token": s.csrf_token or ""}) as resp:
        error = assert_envelope(resp.status, await resp.json(), 429, "rate_limited")
        assert int(resp.headers["Retry-After"]) >= 1 and error["details"]["rule"] == "resend_user"
    assert len(mailbox.messages) == 4


# ---- password reset --------------------------------------------------------------------------------

async def request_reset(server: Any, session: Session, email: str) -> tuple[int, Any]:
    answer = await session.request("POST", "/api/auth/password-reset", json={"email": email})
    await server.app[mailer_key].drain()  # the mail goes out in the background
    return answer


async def test_password_reset_ends_every_session(gateway: Any, sessions: Any, mailbox: Mailbox,
                                                 database_url: str, redis_flush: redis.Redis) -> None:
    email = "forgetful@example.test"
    old: Session = sessions(gateway)
    await signup(old, email)
    assert (await verify(old, link_token(mailbox.links("verify")[-1])))[0] == 200
    await login(old, email)
    user_id = old.user["id"] if old.user else None
    status, vm = await old.request("POST", "/api/vms?wait=60", json=VM)
    assert status == 201
    status, grant = await old.request("GET", f"/api/vms/{vm['vm_id']}/console")
    assert status == 200
    console_token_key = redis_keys.token_key(redis_keys.hash_token(grant["token"]))
    assert redis_flush.exists(console_token_key)

    anonymous: Session = sessions(gateway)
    status, answer = await request_reset(gateway, anonymous, email.upper())
    assert (status, answer) == (202, {"accepted": True})
    [link] = mailbox.links("reset")
    assert mailbox.recipients[-1] == [email] and "Reset" in mailbox.messages[-1]["Subject"]
    token = link_token(link)
    async with anonymous.http.get(anonymous.base_url + "/reset?token=" + token) as resp:
        assert resp.status == 200 and resp.headers["Referrer-Policy"] == "no-referrer"
        assert 'id="reset-confirm-form"' in await resp.text()

    # A password that is too short is refused before the token is spent.
    confirm = "/api/auth/password-reset/confirm"
    error = assert_envelope(*await anonymous.request("POST", confirm, json={"token": token, "password": "short"}),
                            422, "validation_failed")
    assert error["details"]["field"] == "password"
    status, answer = await anonymous.request("POST", confirm, json={"token": token, "password": NEW_PASSWORD})
    assert (status, answer) == (200, {"password_reset": True})

    assert_envelope(*await login(sessions(gateway), email), 401, "invalid_credentials")
    status, answer = await login(sessions(gateway), email, NEW_PASSWORD)
    assert status == 200
    # The reset came through the mailbox, so the address counts as confirmed.
    assert answer["user"]["email_verified"] is True
    # The session from before the reset is over, cookie and CSRF token alike.
    assert_envelope(*await old.request("GET", "/api/me"), 401, "not_authenticated")
    assert_envelope(*await old.request("POST", "/api/vms?wait=60", json=VM), 401, "not_authenticated")
    # So are the console tokens issued to it.
    assert not redis_flush.exists(console_token_key)
    # The link is spent.
    status, answer = await anonymous.request("POST", confirm, json={"token": token, "password": PASSWORD})
    assert_envelope(status, answer, 400, "invalid_token")
    assert audit(database_url, "user.reset_request") == [("ok", user_id, {"reason": "reset_request",
                                                                          "via": "smtp"})]
    assert [(o, d.get("reason")) for o, _, d in audit(database_url, "user.reset")] == [("ok", None),
                                                                                      ("denied", "used")]


async def test_reset_for_an_unknown_address_looks_the_same(gateway: Any, sessions: Any, mailbox: Mailbox,
                                                          database_url: str) -> None:
    s: Session = sessions(gateway)
    await signup(s, "known@example.test")
    sent_before = len(mailbox.messages)
    known = await request_reset(gateway, s, "known@example.test")
    unknown = await request_reset(gateway, s, "nobody@example.test")
    assert known == unknown == (202, {"accepted": True})
    assert len(mailbox.messages) == sent_before + 1 and mailbox.recipients[-1] == ["known@example.test"]
    assert audit(database_url, "user.reset_request")[-1] == ("denied", None, {"reason": "no_account"})
    # A malformed address is a 422 like anywhere else; it says nothing about accounts.
    error = assert_envelope(*await s.request("POST", "/api/auth/password-reset", json={"email": "nope"}), 422)
    assert error["details"]["field"] == "email"


async def test_reset_tokens_expire_are_single_use_and_purpose_bound(gateway: Any, sessions: Any,
                                                                    mailbox: Mailbox, database_url: str) -> None:
    s: Session = sessions(gateway)
    email = "tokens@example.test"
    await signup(s, email)
    verify_token = link_token(mailbox.links("verify")[-1])
    confirm = "/api/auth/password-reset/confirm"

    await request_reset(gateway, s, email)
    first = link_token(mailbox.links("reset")[-1])
    await request_reset(gateway, s, email)
    second = link_token(mailbox.links("reset")[-1])
    expire(database_url, second)
    for token in (first, second, verify_token, secrets.token_urlsafe(32)):
        status, answer = await s.request("POST", confirm, json={"token": token, "password": NEW_PASSWORD})
        assert_envelope(status, answer, 400, "invalid_token")
    # A reset token does not verify an address either.
    await request_reset(gateway, s, email)
    third = link_token(mailbox.links("reset")[-1])
    assert_envelope(*await verify(s, third), 400, "invalid_token")
    assert (await s.request("POST", confirm, json={"token": third, "password": NEW_PASSWORD}))[0] == 200
    assert [d["reason"] for o, _, d in audit(database_url, "user.reset") if o == "denied"] == [
        "used", "expired", "wrong_purpose", "unknown"]
    assert (await login(s, email, NEW_PASSWORD))[0] == 200


async def test_reset_is_rate_limited_per_address(gateway: Any, sessions: Any, mailbox: Mailbox) -> None:
    s: Session = sessions(gateway)
    for _ in range(3):  # reset_email: 3 per hour, whether or not the address has an account
        assert (await request_reset(gateway, s, "target@example.test"))[0] == 202
    error = assert_envelope(*await request_reset(gateway, s, "Target@example.test"), 429, "rate_limited")
    assert error["details"]["rule"] == "reset_email"


async def test_disabled_account_gets_no_reset_mail(gateway: Any, sessions: Any, mailbox: Mailbox,
                                                   database_url: str) -> None:
    s: Session = sessions(gateway)
    await signup(s, "gone@example.test")
    db_rows(database_url, "UPDATE users SET is_active = false")
    assert await request_reset(gateway, s, "gone@example.test") == (202, {"accepted": True})
    assert mailbox.links("reset") == []
    assert audit(database_url, "user.reset_request")[-1][::2] == ("denied", {"reason": "disabled"})


# ---- delivery --------------------------------------------------------------------------------------

async def test_outbox_mode_writes_a_private_eml(aiohttp_server: Any, app_settings: Settings, sessions: Any,
                                                database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    assert app_settings.smtp_host == ""
    server = await aiohttp_server(create_app(app_settings, driver=FakeDriver()))
    truncate_all(database_url)
    s: Session = sessions(server)
    with caplog.at_level(logging.INFO, logger="vmgate.mail"):
        answer = await signup(s, "offline@example.test")
    assert answer["verification_mail_sent"] is True

    outbox = app_settings.data_dir / "outbox"
    [eml] = list(outbox.glob("*.eml"))
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o700 and stat.S_IMODE(eml.stat().st_mode) == 0o600
    mail = BytesParser(policy=email_policy.default).parsebytes(eml.read_bytes())
    assert isinstance(mail, EmailMessage)
    assert mail["To"] == "offline@example.test" and mail["From"] == app_settings.smtp_from
    link = outbox_link(outbox, "offline@example.test")
    assert link in body(mail) and link.startswith(app_settings.public_url + "/verify?token=")
    # The operator of an offline install finds the file, and the link, in the log.
    [line] = [r for r in caplog.records if str(eml) in r.getMessage() and link in r.getMessage()]
    # The JSON log keeps this one line whole (it opted out of masking); any other record is masked.
    assert link in JsonFormatter().format(line)
    other = logging.LogRecord("vmgate.x", logging.INFO, __file__, 1, "got %s", (link,), None)
    assert link_token(link) not in JsonFormatter().format(other)
    assert (await verify(s, link_token(link)))[0] == 200
    assert audit(database_url, "user.verify_mail")[0][2] == {"reason": "signup", "via": "outbox"}


@pytest.fixture
def issued_tokens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token ``secrets.token_urlsafe`` hands out during the test."""
    issued: list[str] = []
    real = secrets.token_urlsafe

    def spy(nbytes: int | None = None) -> str:
        token = real(nbytes)
        issued.append(token)
        return token

    monkeypatch.setattr(secrets, "token_urlsafe", spy)
    return issued


async def test_mail_server_down_keeps_the_account(aiohttp_server: Any, app_settings: Settings, sessions: Any,
                                                  database_url: str, caplog: pytest.LogCaptureFixture,
                                                  issued_tokens: list[str]) -> None:
    server = await aiohttp_server(create_app(smtp_settings(app_settings, free_port()), driver=FakeDriver()))
    truncate_all(database_url)
    s: Session = sessions(server)
    with caplog.at_level(logging.DEBUG):
        answer = await signup(s, "patient@example.test")
        assert answer["verification_mail_sent"] is False
        assert (await login(s, "patient@example.test"))[0] == 200
        assert_envelope(*await s.request("POST", "/api/auth/verify/resend"), 503, "mail_unavailable")
        assert await request_reset(server, s, "patient@example.test") == (202, {"accepted": True})
    failures = [r for r in caplog.records if r.name == "vmgate.mail" and r.levelno == logging.WARNING]
    assert len(failures) == 3 and all("could not send" in r.getMessage() for r in failures)
    assert "ConnectionRefusedError" in failures[0].getMessage()
    # No mail token reached any log line.
    mail_tokens = [t for t in issued_tokens if db_rows(
        database_url, "SELECT 1 FROM email_tokens WHERE token_hash = %s", (hashlib.sha256(t.encode()).hexdigest(),))]
    assert len(mail_tokens) == 3
    assert not any(t in caplog.text for t in mail_tokens)
    assert [o for o, _, _ in audit(database_url, "user.verify_mail")] == ["error", "error"]
    assert audit(database_url, "user.reset_request")[-1][0] == "error"


async def test_refused_mail_is_reported_and_can_be_resent(gateway: Any, sessions: Any, mailbox: Mailbox,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    s: Session = sessions(gateway)
    mailbox.reject = "554 5.7.1 not today"
    with caplog.at_level(logging.WARNING, logger="vmgate.mail"):
        assert (await signup(s, "later@example.test"))["verification_mail_sent"] is False
    assert "SMTPDataError" in caplog.text and "not today" in caplog.text
    mailbox.reject = None
    await login(s, "later@example.test")
    assert (await s.request("POST", "/api/auth/verify/resend"))[0] == 202
    assert (await verify(s, link_token(mailbox.links("verify")[-1])))[0] == 200


async def test_starttls_is_required_unless_turned_off(aiohttp_server: Any, app_settings: Settings,
                                                      sessions: Any, mailbox: Mailbox, database_url: str) -> None:
    # The default SMTP_STARTTLS=true never falls back to a clear-text session.
    settings = smtp_settings(app_settings, mailbox.port, smtp_starttls=True)
    server = await aiohttp_server(create_app(settings, driver=FakeDriver()))
    truncate_all(database_url)
    assert (await signup(sessions(server), "tls@example.test"))["verification_mail_sent"] is False
    assert mailbox.messages == []


# Only this test's server takes a password without TLS; aiosmtpd rightly warns about that.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_smtp_login(aiohttp_server: Any, app_settings: Settings, sessions: Any, database_url: str) -> None:
    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == SMTP_LOGIN
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself

    with smtp_server(authenticator=authenticate, auth_required=True, auth_require_tls=False) as box:
        for password, delivered in (("wrong password", False), (SMTP_LOGIN[1], True)):
            settings = smtp_settings(app_settings, box.port, smtp_user=SMTP_LOGIN[0], smtp_password=password)
            server = await aiohttp_server(create_app(settings, driver=FakeDriver()))
            truncate_all(database_url)
            answer = await signup(sessions(server), f"auth-{delivered}@example.test")
            assert answer["verification_mail_sent"] is delivered
        assert len(box.messages) == 1


async def test_pages_without_a_token_explain_themselves(gateway: Any, sessions: Any) -> None:
    s: Session = sessions(gateway)
    status, html = await s.request("GET", "/verify")
    assert status == 200 and 'id="verify-page"' in html
    status, html = await s.request("GET", "/reset")
    assert status == 200 and 'id="reset-request-form"' in html
    status, html = await s.request("GET", "/")
    assert 'href="/reset"' in html


# ---- the pages in a browser ------------------------------------------------------------------------

@pytest.mark.browser
async def test_resend_and_reset_pages_in_chromium(aiohttp_server: Any, app_settings: Settings, sessions: Any,
                                                  database_url: str) -> None:
    """An unverified user resends the link from the start page; a forgetful one resets through /reset,
    with the mismatch, success and spent-link messages; a bad /verify link explains itself."""
    from playwright.async_api import async_playwright, expect

    from tests.test_browser_console import CHROMIUM, CHROMIUM_ARGS

    server = await aiohttp_server(create_app(app_settings, driver=FakeDriver()))
    truncate_all(database_url)
    s: Session = sessions(server)
    assert s.outbox is not None
    email = "pages@example.test"
    await s.signup_and_login(email, verify=False)
    base = str(server.make_url("/")).rstrip("/")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        try:
            await page.goto(base + "/")
            login_form = page.locator("#login-form")
            await login_form.get_by_label("Email").fill(email)
            await login_form.get_by_label("Password").fill(PASSWORD)
            await login_form.get_by_role("button", name="Log in").click()
            await expect(page.locator("#verify-notice")).to_be_visible()
            await page.get_by_role("button", name="Send the link again").click()
            await expect(page.locator("#message")).to_contain_text(f"on its way to {email}")
            assert len(list(s.outbox.glob("*-verify-*.eml"))) == 2

            await page.get_by_role("button", name="Log out").click()
            await page.get_by_role("link", name="Forgot your password?").click()
            request_form = page.locator("#reset-request-form")
            await request_form.get_by_label("Email").fill(email)
            await request_form.get_by_role("button", name="Send the link").click()
            await expect(page.locator("#message")).to_contain_text("is on its way")
            await server.app[mailer_key].drain()
            link = outbox_link(s.outbox, email, "reset").removeprefix(app_settings.public_url)

            confirm = page.locator("#reset-confirm-form")

            async def set_password(repeat: str) -> None:
                await confirm.get_by_label("New password (10+ characters)").fill(NEW_PASSWORD)
                await confirm.get_by_label("New password again").fill(repeat)
                await confirm.get_by_role("button", name="Set the new password").click()

            await page.goto(base + link)
            assert "token=" not in page.url  # the page took it out of the address bar
            await set_password(NEW_PASSWORD + "?")
            await expect(page.locator("#message")).to_contain_text("The two passwords differ")
            await set_password(NEW_PASSWORD)
            await expect(page.locator("#message")).to_contain_text("Your password is changed")
            # The same link again: spent, and the page offers to mail a new one.
            await page.goto(base + link)
            await set_password(NEW_PASSWORD)
            await expect(page.locator("#message")).to_contain_text("has already been used, or has expired")
            await expect(request_form).to_be_visible()
            assert (await login(sessions(server), email, NEW_PASSWORD))[0] == 200

            await page.goto(base + "/verify?token=" + secrets.token_urlsafe(32))
            await expect(page.locator("#message")).to_contain_text("has already been used, or has expired")
        finally:
            await browser.close()
