"""Every typed application key, in one place; handlers read ``request.app[db_key]``."""

from __future__ import annotations

import aiopg
import redis.asyncio as aioredis
from aiohttp import web

from drivers.base import Driver
from gateway.config import Settings
from gateway.engine.engine import Engine
from gateway.engine.templates import Templates
from gateway.metrics import Metrics
from gateway.tracing import Tracing
from gateway.web.fanout import Fanout
from gateway.web.mail import Mailer

settings_key = web.AppKey("settings", Settings)
db_key = web.AppKey("db", aiopg.Pool)
redis_key = web.AppKey("redis", aioredis.Redis)
driver_key = web.AppKey("driver", Driver)
templates_key = web.AppKey("catalog", Templates)
mailer_key = web.AppKey("mailer", Mailer)
metrics_key = web.AppKey("metrics", Metrics)
tracing_key = web.AppKey("tracing", Tracing)
engine_key = web.AppKey("engine", Engine)
# The last public health answer: {"at": loop time, "up": bool} (gateway/web/api.py, healthz).
health_key = web.AppKey("health", dict)
fanout_key = web.AppKey("fanout", Fanout)
