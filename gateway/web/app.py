"""The application factory: one cleanup context per pool or client, routes, middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp_jinja2
import aiopg
import jinja2
import redis.asyncio as aioredis
from aiohttp import web

from drivers import DriverConfigError, load_driver
from drivers.base import Driver, DriverError
from gateway import credentials, store
from gateway.config import REPO_ROOT, ConfigError, Settings
from gateway.engine.engine import Engine
from gateway.engine.templates import Templates
from gateway.metrics import Metrics
from gateway.store.migrate import migrate
from gateway.tracing import Tracing
from gateway.web import accounts, admin, api, api_tokens, events, files, pages, slo, snapshots
from gateway.web.appkeys import (
    db_key,
    driver_key,
    engine_key,
    fanout_key,
    health_key,
    metrics_key,
    redis_key,
    settings_key,
    templates_key,
    tracing_key,
)
from gateway.web.envelope import error_middleware
from gateway.web.fanout import Fanout
from gateway.web.metrics import metrics_handler, metrics_middleware
from gateway.web.traces import add_request_id, trace_middleware

log = logging.getLogger("vmgate.app")

# Largest request body accepted (a VM's user data is at most 64 KiB); larger is a 413.
MAX_BODY = 256 * 1024
BACKGROUND_NICE = 19  # the nice value of the gateway's background thread (background_executor)
PIN_RECHECK = 60  # seconds between checks that the files kept in memory are still the current ones
NOVNC_DIR = REPO_ROOT / "node_modules" / "@novnc" / "novnc"
# Postgres connections per gateway process, at most (opened only as the load needs them). Under many
# concurrent API requests a pool that is too small makes them queue for a connection, which costs the
# gateway CPU in aiopg's waiting as well as latency; each process still stays well under Postgres's
# default max_connections (100) with room for a few gateways, the lifecycle engine's and the tests'.
POOL_MAXSIZE = 20


def _lowest_priority() -> None:
    """Make the calling thread the scheduler's last choice (nice 19; Linux gives each thread its own)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def background_executor() -> ThreadPoolExecutor:
    """One thread at the lowest CPU priority, for work no request waits for: after a start the gateway locks
    about 2 GB of images in memory and hashes them, a core for seconds, and the VMs resumed meanwhile took
    twice as long to start (docs/BENCHMARKS.md)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmgate-background", initializer=_lowest_priority)


async def _keep_in_memory(catalog: Templates, settings: Settings, driver: Driver) -> None:
    """Keep the files VM starts read locked in memory, and have the local driver make its sealed copies of
    the warm layers' RAM ahead of the first clone; following `make images` (checked every minute)."""
    qemu = shutil.which(settings.qemu_binary)
    extra = [Path(os.path.realpath(qemu))] if qemu else []
    prepare = getattr(driver, "prepare_memory", None) if settings.warm_memory_ahead else None
    loop = asyncio.get_running_loop()
    background = background_executor()
    try:
        while True:
            try:
                await loop.run_in_executor(background, catalog.keep_in_memory, extra)
                if prepare is not None:
                    await loop.run_in_executor(background, prepare,
                                               await loop.run_in_executor(background, catalog.verify_ahead))
            except (OSError, DriverError) as exc:
                log.warning("keeping the images in memory: %s", exc)
            await asyncio.sleep(PIN_RECHECK)
    finally:
        background.shutdown(wait=False, cancel_futures=True)  # never block the loop on a hash under way


def driver_from_settings(settings: Settings) -> Driver:
    """The driver VMGATE_DRIVER names, given its part of the settings; a problem with them is a ConfigError."""
    nomad = None
    if settings.driver == "nomad":
        from drivers.nomad import NomadConfig

        nomad = NomadConfig(addr=settings.nomad_addr, token=settings.nomad_token, namespace=settings.nomad_namespace,
                            cacert=settings.nomad_cacert, client_cert=settings.nomad_client_cert,
                            client_key=settings.nomad_client_key,
                            outbound=settings.nomad_outbound and settings.vm_network == "outbound")
    networks = None
    if settings.driver == "local" and settings.vm_network == "outbound":
        from drivers.local.network import NetworkConfig, host_resolvers

        networks = NetworkConfig(pool=settings.vm_net_pool, dns=settings.vm_dns or host_resolvers(),
                                 egress_allow=settings.egress_allow, egress_deny=settings.egress_deny,
                                 bandwidth_mbit=settings.vm_bandwidth_mbit, conn_rate=settings.vm_conn_rate,
                                 conn_max=settings.vm_conn_max)
    try:
        return load_driver(settings.driver, vms_root=settings.vms_root, qemu_binary=settings.qemu_binary, nomad=nomad,
                           networks=networks)
    except DriverConfigError as exc:
        raise ConfigError(exc.key, exc.problem) from exc


# Every page's scripts and styles are files of this site (type="module" scripts, the built stylesheet); a few
# style attributes set widths (meters), hence 'unsafe-inline' for styles only. noVNC talks to websockify over a
# WebSocket (VNC_PUBLIC_URL, another port in development), and draws cursors from data: URLs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self' ws: wss:; object-src 'none'; "
                           "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def _security_headers(hsts: bool) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Headers every answer carries (a page's own, such as the reset page's Referrer-Policy, win)."""
    async def add(_request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "same-origin")
        headers.setdefault("X-Frame-Options", "DENY")
        if response.content_type == "text/html":
            headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        if hsts:  # only when the public address is https: browsers then refuse plain http for a year
            headers.setdefault("Strict-Transport-Security", "max-age=31536000")

    return add


def create_app(settings: Settings, *, driver: Driver | None = None) -> web.Application:
    """Build the gateway. ``driver`` overrides the one VMGATE_DRIVER names (tests pass a fake)."""
    app = web.Application(middlewares=[trace_middleware, metrics_middleware, error_middleware],
                          client_max_size=MAX_BODY)
    app[settings_key] = settings
    app[metrics_key] = Metrics()
    app[tracing_key] = Tracing(settings.otlp_endpoint, settings.otel_service_name)
    app[health_key] = {}
    app.on_response_prepare.append(_security_headers(settings.public_url.startswith("https://")))
    app.on_response_prepare.append(add_request_id)
    credentials.configure(settings)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=jinja2.select_autoescape(default=True))

    async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await aiopg.create_pool(settings.postgres_url, minsize=1, maxsize=POOL_MAXSIZE, timeout=10)
        try:
            await migrate(pool)
            store.db.observe_queries(pool, app[metrics_key].db_query.observe)
            app[db_key] = pool
            yield
        finally:
            # terminate, not close: a connection still held by a task cancelled at shutdown must not
            # keep the process waiting for it.
            pool.terminate()
            await pool.wait_closed()

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5,
                                   socket_connect_timeout=5, health_check_interval=30)
        app[redis_key] = client
        try:
            yield
        finally:
            await client.aclose()

    async def fanout_ctx(app: web.Application) -> AsyncIterator[None]:
        # Its own Redis client and connection: event streams never take one from the API's pool.
        fanout = Fanout(settings.redis_url, per_user=settings.event_streams_per_user)
        app[fanout_key] = fanout
        await fanout.start()
        try:
            yield
        finally:
            await fanout.close()

    async def driver_ctx(app: web.Application) -> AsyncIterator[None]:
        app[driver_key] = driver if driver is not None else driver_from_settings(settings)
        try:
            yield
        finally:
            await app[driver_key].close()

    async def catalog_ctx(app: web.Application) -> AsyncIterator[None]:
        catalog = Templates(settings.images_dir)
        app[templates_key] = catalog
        # On one machine the gateway keeps what VM starts read (the warm layers above all) in memory.
        keeper = (asyncio.create_task(_keep_in_memory(catalog, settings, app[driver_key]))
                  if settings.driver == "local" else None)
        try:
            yield
        finally:
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            await asyncio.to_thread(catalog.release_memory)

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        engine = Engine(pool=app[db_key], redis=app[redis_key], driver=app[driver_key], templates=app[templates_key],
                        settings=settings, metrics=app[metrics_key], tracer=app[tracing_key].tracer)
        app[engine_key] = engine
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()
            await asyncio.to_thread(app[tracing_key].shutdown)  # the last spans go out

    # The lifecycle engine last: its first reconciler pass re-adopts the VMs that still run.
    app.cleanup_ctx.extend([postgres_ctx, redis_ctx, fanout_ctx, driver_ctx, catalog_ctx, engine_ctx])

    app.router.add_routes(api.routes)
    app.router.add_routes(api_tokens.routes)
    app.router.add_routes(snapshots.routes)
    app.router.add_routes(files.routes)
    app.router.add_routes(admin.routes)
    app.router.add_routes(slo.routes)
    app.router.add_routes(events.routes)
    accounts.setup(app)  # routes, and the mailer (after the Postgres context: see its docstring)
    app.router.add_routes(pages.routes)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_static("/static/app", Path(__file__).parent / "static")
    app.router.add_static("/static/console", REPO_ROOT / "console" / "static")
    # Only noVNC's ES modules and their vendored pako are served, not the whole npm package.
    for part in ("core", "vendor"):
        if (NOVNC_DIR / part).is_dir():
            app.router.add_static(f"/novnc/{part}", NOVNC_DIR / part)
        else:
            log.warning("noVNC is not installed (%s missing); run `make novnc`", NOVNC_DIR / part)
    return app
