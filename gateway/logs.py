"""JSON log lines on stderr, one object a line, with secrets masked."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# Values of these query parameters, cookies and JSON fields never reach a log.
_SECRET_RE = re.compile(r"(?i)((?:token|password|vmgate_session|secret)[\"']?\s*[=:]\s*[\"']?)([^&\s\"';,]+)")


def mask_secrets(text: str) -> str:
    return _SECRET_RE.sub(lambda m: m.group(1) + "***", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            # A record may opt out (extra={"unmasked": True}): only the offline outbox's link line does,
            # because with no SMTP server the log is how the operator gets that link to the user.
            "msg": record.getMessage() if getattr(record, "unmasked", False) else mask_secrets(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
