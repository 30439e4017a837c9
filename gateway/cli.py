"""Operator commands: ``python -m gateway.cli create-admin --email E`` (``make admin EMAIL=E``), and
``python -m gateway.cli jobspec render VM_ID | export DIR | validate`` (gateway/jobspec_cli.py).

There is no default admin and no default password: the first admin is made here, with a password
typed twice without echo (interactive), read from stdin (``--password-stdin``), or generated and
printed once (``--generate-password``). An existing account is refused unless ``--promote`` says to
make it an admin (its password is left alone).

Settings are read like the gateway reads them (``Settings.load()``: environment over ``.env``), and
pending migrations are applied first. Exit status: 0 done, 1 refused, 2 bad configuration,
3 Postgres unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiopg
import psycopg2

from gateway import auth, db, jobspec_cli, validation
from gateway.config import ConfigError, Settings
from gateway.errors import Conflict
from gateway.migrate import migrate

EXIT_REFUSED, EXIT_CONFIG, EXIT_POSTGRES = 1, 2, 3
T = TypeVar("T")


class Refused(Exception):
    """The command cannot do what was asked; the message says why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway.cli", description="vmgate operator commands")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser(
        "create-admin", help="create an admin account (or promote an existing one with --promote)",
        description="Create an admin account. Without a password option, asks for it twice without echo.")
    create.add_argument("--email", required=True, help="the admin's email address (their login)")
    source = create.add_mutually_exclusive_group()
    source.add_argument("--password-stdin", action="store_true",
                        help="read the password from stdin (one line) instead of asking")
    source.add_argument("--generate-password", action="store_true",
                        help="generate a strong password and print it once")
    create.add_argument("--promote", action="store_true",
                        help="if the account exists, make it an admin (its password is not changed)")
    jobspec_cli.add_parser(commands)
    return parser


def _read_password(args: argparse.Namespace) -> tuple[str, bool]:
    """The new admin's password and whether it was generated (and must be shown)."""
    if args.generate_password:
        return secrets.token_urlsafe(24), True
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.email}: ")
        if getpass.getpass("Again: ") != password:
            raise Refused("the passwords do not match")
    else:
        raise Refused("stdin is not a terminal: pass --password-stdin (and pipe the password) "
                      "or --generate-password")
    if not validation.MIN_PASSWORD <= len(password) <= validation.MAX_PASSWORD:
        raise Refused(f"the password must be {validation.MIN_PASSWORD} to {validation.MAX_PASSWORD} characters")
    return password, False


async def _in_db(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(cursor)`` on a migrated database."""
    async with aiopg.create_pool(settings.postgres_url, minsize=1, maxsize=1, timeout=10) as pool:
        await migrate(pool)
        async with db.cursor(pool) as cur:
            return await work(cur)


def create_admin(settings: Settings, args: argparse.Namespace) -> str:
    """Create or promote the admin; returns what to tell the operator."""
    email = args.email.strip()
    if not validation.EMAIL_RE.match(email) or len(email) > 254:
        raise Refused(f"{email!r} is not an email address")

    async def lookup(cur: Any) -> dict[str, Any] | None:
        return await db.user_by_email(cur, email)

    existing = asyncio.run(_in_db(settings, lookup))
    if existing is not None:
        if not args.promote:
            raise Refused(f"an account with the email {existing['email']} already exists; "
                          "pass --promote to make it an admin")
        if existing["role"] == "admin":
            return f"{existing['email']} is already an admin (id {existing['id']})"

        async def promote(cur: Any) -> None:
            async with cur.begin():
                await db.make_admin(cur, str(existing["id"]))
                await db.audit(cur, action="admin.promote", outcome="ok", user_id=str(existing["id"]),
                               details={"via": "cli", "email": existing["email"]})

        asyncio.run(_in_db(settings, promote))
        return f"promoted {existing['email']} to admin (id {existing['id']})"

    # Asked only now, so a refused email does not cost the operator a password prompt; and outside
    # the event loop, so Ctrl-C at the prompt ends the command at once.
    password, generated = _read_password(args)
    password_hash = asyncio.run(auth.hash_password(password))

    async def create(cur: Any) -> dict[str, Any]:
        async with cur.begin():
            try:
                user = await db.create_user(cur, email, password_hash, role="admin")
            except Conflict:
                raise Refused(f"an account with the email {email} was created meanwhile") from None
            await db.make_admin(cur, str(user["id"]))
            await db.audit(cur, action="admin.create", outcome="ok", user_id=str(user["id"]),
                           details={"via": "cli", "email": email})
        return user

    user = asyncio.run(_in_db(settings, create))
    message = f"created admin {email} (id {user['id']})"
    if generated:
        message += f"\npassword (shown only this once): {password}"
    return message


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"vmgate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "jobspec":
            return jobspec_cli.run(settings, args)
        print(create_admin(settings, args))
    except (Refused, jobspec_cli.JobspecRefused) as exc:
        print(f"vmgate: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (psycopg2.OperationalError, OSError) as exc:  # OSError covers timeouts too
        where = urlsplit(settings.postgres_url)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"vmgate: cannot use Postgres at {where.hostname}:{where.port or 5432}: {first_line}\n"
              "  start it with `make services` (or check POSTGRES_URL)", file=sys.stderr)
        return EXIT_POSTGRES
    except EOFError:
        print("vmgate: refused: no password was given", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("vmgate: interrupted", file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
