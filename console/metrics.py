"""The console proxy's own /metrics: how many console connections are open right now.

websockify serves every connection in a process of its own, forked from the main one, so the main process
counts its live children when Prometheus scrapes (``vmgate_websockify_active_sessions``); nothing has to
be told when a connection ends. The HTTP server runs in a thread of the main process, on 127.0.0.1 only;
each connection's process closes its inherited copy of the listening socket first thing
(``close_in_child``), so a proxy restarted while consoles stay open gets its port back.
Turned on by ``WEBSOCKIFY_METRICS_PORT`` (make run sets it; 0 or empty: off).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_server: WSGIServer | None = None
_server_pid = 0  # the process whose thread serves it


def live_children(pid: int | None = None) -> int:
    """Processes forked by ``pid`` (default: this one) that have not exited (zombies not counted)."""
    pid = pid or os.getpid()
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    alive = 0
    for child in children:
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The state is the field after the command's closing parenthesis (a command may contain spaces).
        if stat.rpartition(")")[2].split()[0] != "Z":
            alive += 1
    return alive


class SessionsCollector(Collector):
    """Reads the number of open console connections at each scrape."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("vmgate_websockify_active_sessions",
                                "Console connections open through this proxy (a websockify process each)",
                                value=live_children(self.pid))


def serve(port: int) -> None:
    """Serve /metrics on 127.0.0.1:``port`` from a thread of this (websockify's main) process."""
    global _server, _server_pid
    registry = CollectorRegistry()
    registry.register(SessionsCollector(os.getpid()))
    _server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    _server_pid = os.getpid()


def close_in_child() -> None:
    """In a connection's freshly forked process: let go of the metrics server's listening socket."""
    if _server is not None and os.getpid() != _server_pid:  # --run-once serves in the main process
        _server.socket.close()


def port_from_env() -> int:
    """WEBSOCKIFY_METRICS_PORT as a port number; 0 when unset, empty or 0."""
    value = os.environ.get("WEBSOCKIFY_METRICS_PORT", "").strip() or "0"
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"WEBSOCKIFY_METRICS_PORT={value} is not a port")
    return port
