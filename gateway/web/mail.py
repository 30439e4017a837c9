"""The mails vmgate sends (address verification, password reset), their one-time tokens, and
delivery: SMTP through ``smtplib`` in a thread, or, with no SMTP_HOST, an ``.eml`` file under
``DATA_DIR/outbox`` so the embedded default works offline.

Tokens are 256 random bits, mailed as a link, stored only as their SHA-256, good once and until
they expire. Delivery never raises: a mail that cannot go out is logged without its token and
reported as failed, so the caller decides what the user is told. Only the outbox transport puts
a link in a log record, next to the file's path, for the operator of an offline install; the JSON
log formatter (gateway/logs.py) still masks its ``token=`` value, so the full link is read from the
file (0600, in a 0700 folder).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import os
import secrets
import smtplib
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiopg

from gateway import store
from gateway.config import Settings
from gateway.credentials import hash_token
from gateway.rows import UserRow

log = logging.getLogger("vmgate.mail")

# Each SMTP step (connect, STARTTLS, each command) gives up after this many seconds.
SMTP_TIMEOUT = 10.0
# At shutdown, background mail work gets this long to finish before it is cancelled.
SHUTDOWN_GRACE = 3 * SMTP_TIMEOUT
OUTBOX_DIR = "outbox"
PURPOSES = ("verify", "reset")
# The audit action of each purpose's mail.
MAIL_ACTIONS = {"verify": "user.verify_mail", "reset": "user.reset_request"}


@dataclass(frozen=True)
class Mail:
    """One mail carrying one token's link."""

    to: str
    subject: str
    text: str
    purpose: str
    link: str
    token: str  # scrubbed from every error message that reaches a log


@dataclass(frozen=True)
class Delivery:
    ok: bool
    via: str  # "smtp" or "outbox"
    error: str | None = None  # why it failed, without the token


def mask_address(address: str) -> str:
    """``a***@example.org``: enough to tell mails apart in a log, not to collect addresses."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


def build_message(settings: Settings, mail: Mail) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = mail.to
    msg["Subject"] = mail.subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    domain = email.utils.parseaddr(settings.smtp_from)[1].rpartition("@")[2] or "localhost"
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: autoresponders leave it alone
    # 7bit keeps the link on one line for a person reading an outbox file; quoted-printable would
    # fold it. Anything 7bit cannot carry is left to the library's choice.
    if mail.text.isascii() and all(len(line) <= 998 for line in mail.text.splitlines()):
        msg.set_content(mail.text, cte="7bit")
    else:
        msg.set_content(mail.text)
    return msg


class Mailer:
    """Sends mails with the configured transport, and runs mail work in the background
    (tracked, so shutdown waits for it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def via(self) -> str:
        return "smtp" if self.settings.smtp_host else "outbox"

    async def send(self, mail: Mail) -> Delivery:
        """Deliver ``mail``; never raises. A failure is logged (token scrubbed) and returned."""
        msg = build_message(self.settings, mail)
        try:
            if self.settings.smtp_host:
                await asyncio.to_thread(self._send_smtp, msg)
                log.info("sent the %s mail to %s via %s", mail.purpose, mask_address(mail.to), self._where())
            else:
                path = await asyncio.to_thread(self._write_outbox, msg, mail.purpose)
                log.info("no SMTP_HOST: wrote the %s mail to %s into %s; its link: %s", mail.purpose,
                         mask_address(mail.to), path, mail.link, extra={"unmasked": True})
        except Exception as exc:  # any failure of the transport is reported, never raised
            reason = f"{type(exc).__name__}: {exc}".replace(mail.token, "***")[:300]
            log.warning("could not send the %s mail to %s via %s: %s", mail.purpose, mask_address(mail.to),
                        self._where(), reason)
            return Delivery(ok=False, via=self.via, error=reason)
        return Delivery(ok=True, via=self.via)

    def _where(self) -> str:
        return f"{self.settings.smtp_host}:{self.settings.smtp_port}" if self.settings.smtp_host else "the outbox"

    def _send_smtp(self, msg: EmailMessage) -> None:
        s = self.settings
        with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=SMTP_TIMEOUT) as smtp:
            if s.smtp_starttls:
                # Verifies the server's certificate and host name; a server without STARTTLS fails the mail.
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_user:
                smtp.login(s.smtp_user, s.smtp_password)
            smtp.send_message(msg)

    def _write_outbox(self, msg: EmailMessage, purpose: str) -> Path:
        outbox = self.settings.data_dir / OUTBOX_DIR
        outbox.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is cut by the umask and an existing folder keeps its own: set it outright.
        outbox.chmod(0o700)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = outbox / f"{stamp}-{purpose}-{secrets.token_hex(4)}.eml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(bytes(msg))
        return path

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background; a failure is logged."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background mail work failed: %s", type(exc).__name__, exc_info=exc)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for background work; cancel whatever is still running after ``timeout`` seconds."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        await self.drain(SHUTDOWN_GRACE)


# ---- one-time tokens -------------------------------------------------------------------------------

async def issue_token(cur: aiopg.Cursor, user_id: str, purpose: str, ttl: int) -> str:
    """A fresh token for ``purpose``, valid ``ttl`` seconds; the user's earlier unused ones are spent.

    Run it inside a transaction: spending the old tokens and storing the new one go together.
    """
    token = secrets.token_urlsafe(32)
    await store.tokens.spend_email_tokens(cur, user_id, purpose)
    await store.tokens.add_email_token(cur, user_id, purpose, hash_token(token), ttl)
    return token


async def token_is_valid(cur: aiopg.Cursor, token: str, purpose: str) -> bool:
    """Whether ``token`` would be accepted now (it is not spent; see ``consume_token``)."""
    return await store.tokens.email_token_is_valid(cur, hash_token(token), purpose)


async def consume_token(cur: aiopg.Cursor, token: str, purpose: str) -> str | None:
    """Spend ``token``: its user's id if it was for ``purpose``, unused, unexpired and its user is
    active; otherwise None (two requests racing with one token cannot both win)."""
    return await store.tokens.consume_email_token(cur, hash_token(token), purpose)


async def refusal_reason(cur: aiopg.Cursor, token: str, purpose: str) -> tuple[str, str | None]:
    """Why ``token`` was refused, and whose it is, for the audit log only (the client is told nothing)."""
    row = await store.tokens.email_token(cur, hash_token(token))
    if row is None:
        return "unknown", None
    user_id = str(row["user_id"])
    if row["purpose"] != purpose:
        return "wrong_purpose", user_id
    if row["used_at"] is not None:
        return "used", user_id
    if row["expired"]:
        return "expired", user_id
    return ("disabled" if not row["is_active"] else "raced"), user_id


# ---- the mails -------------------------------------------------------------------------------------

def _hours(seconds: int) -> str:
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return f"{hours} hour{'s' if hours != 1 else ''}"
    return f"{seconds // 60} minutes"


def compose(settings: Settings, purpose: str, to: str, token: str) -> Mail:
    """The verification or reset mail for ``to`` with ``token``'s link."""
    link = f"{settings.public_url}/{purpose}?token={token}"
    if purpose == "verify":
        subject = "Confirm your email address for vmgate"
        text = (f"Hello,\n\nsomeone, hopefully you, signed up for vmgate at {settings.public_url} with this "
                f"address.\nOpen this link to confirm it:\n\n{link}\n\n"
                f"The link works once and expires in {_hours(settings.verify_token_ttl)}. "
                "Until you confirm, you can log in but not create VMs.\n"
                "If you did not sign up, ignore this mail.\n")
    else:
        subject = "Reset your vmgate password"
        text = (f"Hello,\n\nsomeone, hopefully you, asked to reset the password of the vmgate account "
                f"for this address at {settings.public_url}.\nOpen this link to choose a new password:\n\n"
                f"{link}\n\nThe link works once and expires in {_hours(settings.reset_token_ttl)}. "
                "Setting a new password logs the account out everywhere.\n"
                "If you did not ask for this, ignore this mail: your password stays as it is.\n")
    return Mail(to=to, subject=subject, text=text, purpose=purpose, link=link, token=token)


async def send_account_mail(pool: aiopg.Pool, mailer: Mailer, user: UserRow, purpose: str,
                            ip: str | None, *, reason: str) -> Delivery:
    """Issue a ``purpose`` token for ``user``, mail its link, and audit the outcome."""
    settings = mailer.settings
    user_id = str(user["id"])
    ttl = settings.verify_token_ttl if purpose == "verify" else settings.reset_token_ttl
    async with store.db.cursor(pool) as cur:
        async with cur.begin():
            token = await issue_token(cur, user_id, purpose, ttl)
    delivery = await mailer.send(compose(settings, purpose, user["email"], token))
    # The transport's error stays in the log: users read their own audit entries.
    async with store.db.cursor(pool) as cur:
        await store.audit.record(cur, action=MAIL_ACTIONS[purpose], outcome="ok" if delivery.ok else "error",
                                 user_id=user_id, ip=ip, details={"reason": reason, "via": delivery.via})
    return delivery
