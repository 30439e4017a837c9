"""JSON log lines on stderr, one object a line, with secrets masked; and the access log's line."""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from gateway.tracing import REQUEST_ID

# Values of these query parameters, cookies and JSON fields never reach a log.
_SECRET_RE = re.compile(r"(?i)((?:token|password|vmgate_session|secret)[\"']?\s*[=:]\s*[\"']?)([^&\s\"';,]+)")


def mask_secrets(text: str) -> str:
    return _SECRET_RE.sub(lambda m: m.group(1) + "***", text)


_encode = json.JSONEncoder(ensure_ascii=False).encode


class JsonFormatter(logging.Formatter):
    # The "ts" field up to the second, for the second it was made in (one strftime a second, not a line).
    _second = -1
    _second_text = ""

    def _timestamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int(msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "ts": self._timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            # A record may opt out (extra={"unmasked": True}): only the offline outbox's link line does,
            # because with no SMTP server the log is how the operator gets that link to the user.
            "msg": message if getattr(record, "unmasked", False) else mask_secrets(message),
        }
        request_id = REQUEST_ID.get()  # the request (or the job of the request) this line was written for
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = mask_secrets(self.formatException(record.exc_info))
        return _encode(entry)


def _or_dash(value: str | None) -> str:
    return value if value is not None else "-"


class AccessLogger(AbstractAccessLogger):
    """The access log line aiohttp's default ``AccessLogger`` writes with its default format
    (``%a %t "%r" %s %b "%{Referer}i" "%{User-Agent}i"``), built directly rather than through its
    format interpreter: one line per request is on the hot path of every API call. The message is the
    same text, logged on the same logger (``aiohttp.access``), so it is masked like every other line."""

    _tz: datetime.timezone | None = None
    _tz_expires = 0.0

    @classmethod
    def _local_tz(cls) -> datetime.timezone:
        now = time.time()
        if cls._tz is None or now >= cls._tz_expires:
            cls._tz = datetime.timezone(datetime.timedelta(seconds=time.localtime(now).tm_gmtoff))
            cls._tz_expires = now + 60  # a DST change shows within a minute
        return cls._tz

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        try:
            started = datetime.datetime.now(self._local_tz()) - datetime.timedelta(seconds=time)
            version = request.version
            headers = request.headers
            self.logger.info(
                '%s [%s] "%s %s HTTP/%s.%s" %s %s "%s" "%s"',
                _or_dash(request.remote), started.strftime("%d/%b/%Y:%H:%M:%S %z"), request.method,
                request.path_qs, version.major, version.minor, response.status, response.body_length,
                headers.get("Referer", "-"), headers.get("User-Agent", "-"))
        except Exception:
            self.logger.exception("Error in logging")


def setup(level: str = "INFO") -> None:
    # A record need not carry what JsonFormatter never writes: the caller's file and line (found by
    # walking the stack), the thread and the process (a getpid() system call per record). These are the
    # switches the logging HOWTO's "Optimization" section names; the access log writes one record per request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
