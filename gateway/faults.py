"""Crash points for the lifecycle tests: ``VMGATE_CRASH_AT=create.overlay`` makes this process
SIGKILL itself when a worker reaches that point, exactly like a worker that dies there.

Unset (always, outside the tests), ``crash_point`` does nothing. The points are listed in
docs/LIFECYCLE.md; the tests in tests/test_lifecycle_faults.py use every one of them.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("vmgate.faults")


def crash_point(name: str) -> None:
    """SIGKILL this process if ``VMGATE_CRASH_AT`` names ``name`` (a comma-separated list)."""
    wanted = os.environ.get("VMGATE_CRASH_AT", "")
    if wanted and name in wanted.split(","):
        log.warning("VMGATE_CRASH_AT=%s: killing this process (pid %d) at %s", wanted, os.getpid(), name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
