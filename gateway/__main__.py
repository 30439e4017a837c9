"""`python -m gateway`: run the gateway with settings from the environment and `.env`."""

from __future__ import annotations

import sys

from aiohttp import web

from gateway import logs
from gateway.app import create_app
from gateway.config import ConfigError, Settings


def main() -> int:
    try:
        settings = Settings.load()
    except ConfigError as exc:
        print(f"vmgate: cannot start: {exc}", file=sys.stderr)
        return 2
    logs.setup()
    web.run_app(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                access_log_class=logs.AccessLogger,
                print=lambda msg: print(f"vmgate gateway: {msg.strip()}", file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
