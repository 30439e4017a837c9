"""The operator's command, ``vmgate`` (or ``python -m gateway.cli``):

    vmgate serve                      run the gateway (``python -m gateway`` does the same)
    vmgate migrate                    apply the database migrations (``make migrate``)
    vmgate create-admin --email E     create an admin (``make admin EMAIL=E``)
    vmgate jobspec render VM_ID | export DIR | validate    a VM's Nomad job (gateway/cli/jobspec.py)
    vmgate backup [--out DIR] | restore FOLDER [--force]   all state to a folder and back (gateway/cli/backup.py)
    vmgate rotate-secret jwt|redis|postgres [--drop-old]   a new secret on the server and in .env (cli/rotate.py)
    vmgate fleet-node conflist|rules                       a fleet VM node's network files (cli/fleetnode.py)
    vmgate prune-layers [--dry-run]                        remove warm layers nothing uses (cli/layers.py)

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
from typing import Any
from urllib.parse import urlsplit

import psycopg2

from gateway import credentials, store
from gateway.cli import backup, fleetnode, jobspec, layers, rotate
from gateway.cli.common import EXIT_CONFIG, EXIT_POSTGRES, EXIT_REFUSED, Refused, apply_migrations, in_db
from gateway.config import ConfigError, Settings
from gateway.errors import Conflict
from gateway.rows import UserRecord, UserRow


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmgate", description="vmgate operator commands")
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
    commands.add_parser("serve", help="run the gateway (as `python -m gateway`)",
                        description="Run the gateway with settings from the environment and .env.")
    commands.add_parser("migrate", help="apply the database migrations (as `make migrate`)")
    jobspec.add_parser(commands)
    backup.add_parsers(commands)
    rotate.add_parser(commands)
    fleetnode.add_parser(commands)
    layers.add_parser(commands)
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
    if not credentials.MIN_PASSWORD <= len(password) <= credentials.MAX_PASSWORD:
        raise Refused(f"the password must be {credentials.MIN_PASSWORD} to {credentials.MAX_PASSWORD} characters")
    return password, False


def create_admin(settings: Settings, args: argparse.Namespace) -> str:
    """Create or promote the admin; returns what to tell the operator."""
    email = args.email.strip()
    if not credentials.EMAIL_RE.fullmatch(email) or len(email) > 254:
        raise Refused(f"{email!r} is not an email address")

    async def lookup(cur: Any) -> UserRecord | None:
        return await store.users.user_by_email(cur, email)

    existing = asyncio.run(in_db(settings, lookup))
    if existing is not None:
        if not args.promote:
            raise Refused(f"an account with the email {existing['email']} already exists; "
                          "pass --promote to make it an admin")
        if existing["role"] == "admin":
            return f"{existing['email']} is already an admin (id {existing['id']})"
        if existing["email_verified_at"] is None:
            raise Refused(f"{existing['email']} has not confirmed its address: whoever signed up with it may not own "
                          "it; let the owner verify it (or reset its password) first")

        async def live_tokens(cur: Any) -> int:
            return await store.tokens.live_api_tokens_of(cur, str(existing["id"]))

        if live := asyncio.run(in_db(settings, live_tokens)):
            raise Refused(f"{existing['email']} holds {live} usable API token(s); an admin's tokens must be made "
                          "after the promotion: revoke them (the account page) first")

        async def promote(cur: Any) -> None:
            async with cur.begin():
                await store.users.make_admin(cur, str(existing["id"]))
                await store.audit.record(cur, action="admin.promote", outcome="ok", user_id=str(existing["id"]),
                                         details={"via": "cli", "email": existing["email"]})

        asyncio.run(in_db(settings, promote))
        return f"promoted {existing['email']} to admin (id {existing['id']})"

    # Asked only now, so a refused email does not cost the operator a password prompt; and outside
    # the event loop, so Ctrl-C at the prompt ends the command at once.
    password, generated = _read_password(args)
    password_hash = asyncio.run(credentials.hash_password(password))

    async def create(cur: Any) -> UserRow:
        async with cur.begin():
            try:
                user = await store.users.create_user(cur, email, password_hash, role="admin")
            except Conflict:
                raise Refused(f"an account with the email {email} was created meanwhile") from None
            await store.users.make_admin(cur, str(user["id"]))
            await store.audit.record(cur, action="admin.create", outcome="ok", user_id=str(user["id"]),
                                     details={"via": "cli", "email": email})
        return user

    user = asyncio.run(in_db(settings, create))
    message = f"created admin {email} (id {user['id']})"
    if generated:
        message += f"\npassword (shown only this once): {password}"
    return message


def serve(settings: Settings) -> int:
    """Run the gateway in the foreground until it is stopped."""
    from aiohttp import web

    from gateway import logs
    from gateway.web.app import create_app

    logs.setup()
    web.run_app(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                access_log_class=logs.AccessLogger,
                print=lambda msg: print(f"vmgate gateway: {msg.strip()}", file=sys.stderr))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``vmgate`` command; returns its exit status."""
    args = _parser().parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"vmgate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    credentials.configure(settings)
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "migrate":
            print(f"migrations applied: {asyncio.run(apply_migrations(settings)) or 'none (up to date)'}")
            return 0
        if args.command == "jobspec":
            return jobspec.run(settings, args)
        if args.command in ("backup", "restore"):
            return backup.run(settings, args)
        if args.command == "fleet-node":
            print(fleetnode.run(settings, args))
            return 0
        if args.command == "prune-layers":
            print(layers.run(settings, args))
            return 0
        if args.command == "rotate-secret":
            print(rotate.run(settings, args))
            return 0
        print(create_admin(settings, args))
    except Refused as exc:
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
