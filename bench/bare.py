"""The yardstick for the API figure: a bare aiohttp app answering one small JSON document, run as
``python -m bench.bare --port N`` so it gets a process (and a core's worth of scheduling) of its own,
like the gateway. No middleware, no database, no logging: what aiohttp itself costs per request."""

from __future__ import annotations

import argparse

from aiohttp import web

BODY = {"vms": [{"vm_id": "00000000-0000-0000-0000-000000000000", "name": "bare", "state": "running"}]}


async def handle(_request: web.Request) -> web.Response:
    return web.json_response(BODY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/api/me/vms", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
