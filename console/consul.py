"""Find a fleet VM's VNC endpoint in Consul: its healthy instance of the ``vmgate-vnc`` service.

Every fleet job registers its VNC port as the Consul service ``vmgate-vnc``, tagged ``vm-<id>``, with
meta ``vm_id`` and ``alloc_id`` (Nomad's allocation) and a TCP check (jobspecs/render.py). websockify's
token plugin asks Consul's health API for the passing instances of that service with the VM's tag and
takes the one of the allocation Nomad runs the VM in (the gateway's console target names it), so a
console never goes to an instance whose check fails, nor to one that merely says it is the VM's.

Consul is reached at ``CONSUL_HTTP_ADDR`` (``host:port`` or a URL; default ``127.0.0.1:8500``),
with ``CONSUL_HTTP_TOKEN`` as the ACL token and ``CONSUL_CACERT`` as the CA for https, the names the
``consul`` CLI uses. The plugin runs synchronously in websockify's per-connection process, so this
uses the standard library's HTTP client.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADDR = "127.0.0.1:8500"
REQUEST_TIMEOUT = 3.0
# A VM that has just started is registered before its first TCP check passed: wait for it a little.
HEALTHY_WAIT = 15.0
POLL = 0.5


class ConsulError(Exception):
    """Consul did not answer, or has no healthy instance for the VM; the message says which."""


def base_url(addr: str | None = None) -> str:
    addr = (addr if addr is not None else os.environ.get("CONSUL_HTTP_ADDR", "")) or DEFAULT_ADDR
    if "://" not in addr:
        addr = "http://" + addr
    if urllib.parse.urlsplit(addr).scheme not in ("http", "https"):
        raise ConsulError(f"CONSUL_HTTP_ADDR must be host:port or an http(s) URL, not {addr!r}")
    return addr.rstrip("/")


def pick_instance(entries: Any, vm_id: str, alloc_id: str | None = None) -> tuple[str, int] | None:
    """From a ``/v1/health/service/<name>?passing`` answer, the (address, port) of ``vm_id``'s instance (of
    the allocation ``alloc_id``, when given)."""
    if not isinstance(entries, list):
        return None
    for entry in entries:
        service = entry.get("Service") if isinstance(entry, dict) else None
        if not isinstance(service, dict):
            continue
        meta = service.get("Meta") or {}
        if meta.get("vm_id") != vm_id or (alloc_id is not None and meta.get("alloc_id") != alloc_id):
            continue
        node = entry.get("Node") if isinstance(entry.get("Node"), dict) else {}
        address = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if isinstance(address, str) and address and isinstance(port, int) and 0 < port < 65536:
            return address, port
    return None


def _get(url: str) -> Any:
    # Only http(s) URLs get here: base_url() refuses other schemes.
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    token = os.environ.get("CONSUL_HTTP_TOKEN")
    if token:
        request.add_header("X-Consul-Token", token)
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=os.environ.get("CONSUL_CACERT") or None)
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT, context=context) as response:  # noqa: S310
        return json.load(response)


def healthy_endpoint(service: str, vm_id: str, *, alloc_id: str | None = None, addr: str | None = None,
                     wait: float = HEALTHY_WAIT) -> tuple[str, int]:
    """The (address, port) of the VM's passing instance of ``service`` (of allocation ``alloc_id``, when
    given); waits up to ``wait`` s for one."""
    query = urllib.parse.urlencode({"passing": "true", "tag": f"vm-{vm_id}"})
    url = f"{base_url(addr)}/v1/health/service/{urllib.parse.quote(service, safe='')}?{query}"
    deadline = time.monotonic() + wait
    while True:
        try:
            found = pick_instance(_get(url), vm_id, alloc_id)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConsulError(f"Consul at {base_url(addr)} did not answer: {exc}") from exc
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            of_alloc = f" in allocation {alloc_id}" if alloc_id else ""
            raise ConsulError(f"Consul has no passing instance of {service} for vm {vm_id}{of_alloc}")
        time.sleep(POLL)
