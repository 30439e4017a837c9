"""Every typed application key, in one place; handlers read ``request.app[db_key]``."""

from __future__ import annotations

import aiopg
import redis.asyncio as aioredis
from aiohttp import web

from drivers.base import Driver
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.mail import Mailer

settings_key = web.AppKey("settings", Settings)
db_key = web.AppKey("db", aiopg.Pool)
redis_key = web.AppKey("redis", aioredis.Redis)
driver_key = web.AppKey("driver", Driver)
catalog_key = web.AppKey("catalog", Catalog)
mailer_key = web.AppKey("mailer", Mailer)
