"""What the bench talks with: the gateway's API as a logged-in user, a closed-loop HTTP load generator,
and an RFB client (console/rfb.py's) that can also ask for a single pixel."""

from __future__ import annotations

import asyncio
import re
import secrets
import select
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from email import policy as email_policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

from bench.stats import percentile
from console.nudge import NudgingSocket
from console.rfb import RFBClient

SESSION_COOKIE = "vmgate_session"
# What QEMU's VNC server shows before the guest's display is up: a 640x480 placeholder surface with the
# text "Guest has not initialized the display (yet)." in it, which is not blank but is no console either.
# The tiny guest never uses 640x480 (SeaBIOS and the kernel's VGA text console are 720x400).
QEMU_PLACEHOLDER_SIZE = (640, 480)
_VERIFY_LINK = re.compile(r"https?://\S+/verify\?token=[\w-]+")


class BenchError(RuntimeError):
    """Something the bench needed did not happen (an API answer, a VM state, a frame)."""


class Api:
    """One user's cookie session against the gateway (its own connection pool and cookie jar)."""

    def __init__(self, base_url: str, outbox: Path) -> None:
        self.base_url = base_url.rstrip("/")
        self.outbox = outbox
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                          timeout=aiohttp.ClientTimeout(total=180))
        self.csrf_token = ""
        self.email = ""

    async def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200,),
                      **kwargs: Any) -> Any:
        """Send a request (with the CSRF header on unsafe methods) and return the JSON body; raise
        ``BenchError`` naming the answer unless its status is in ``expect``."""
        if method in ("POST", "PUT", "PATCH", "DELETE") and self.csrf_token:
            kwargs["headers"] = {"X-CSRF-Token": self.csrf_token, **kwargs.get("headers", {})}
        async with self.http.request(method, self.base_url + path, **kwargs) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            if resp.status not in expect:
                raise BenchError(f"{method} {path}: {resp.status} {body}")
            return body

    async def signup_and_login(self) -> None:
        """Sign up a fresh account, confirm it with the link the gateway wrote to its outbox, log in."""
        self.email = f"bench-{secrets.token_hex(6)}@example.test"
        password = secrets.token_urlsafe(18)
        await self.request("POST", "/api/auth/signup", json={"email": self.email, "password": password},
                           expect=(201,))
        token = await self._verify_token()
        await self.request("POST", "/api/auth/verify", json={"token": token})
        body = await self.request("POST", "/api/auth/login", json={"email": self.email, "password": password})
        self.csrf_token = body["csrf_token"]

    async def _verify_token(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in sorted(self.outbox.glob("*.eml")):
                msg = BytesParser(policy=email_policy.default).parsebytes(path.read_bytes())
                body = msg.get_body()
                match = _VERIFY_LINK.search(body.get_content() if body is not None else "")
                if msg["To"] == self.email and match:
                    return parse_qs(urlsplit(match.group(0)).query)["token"][0]
            await asyncio.sleep(0.1)
        raise BenchError(f"no verification mail to {self.email} in {self.outbox}")

    @property
    def session_cookie(self) -> str:
        """The ``Cookie`` header value that authenticates this session (for the load generator)."""
        for cookie in self.http.cookie_jar:
            if cookie.key == SESSION_COOKIE:
                return f"{SESSION_COOKIE}={cookie.value}"
        raise BenchError("not logged in")

    async def create_vm(self, **fields: Any) -> str:
        """``POST /api/vms`` (answered at once, 202); return the VM's id."""
        body = await self.request("POST", "/api/vms", json={"template": "tiny", **fields}, expect=(202,))
        return str(body["vm_id"])

    async def wait_state(self, vm_id: str, wanted: str = "running", *, timeout: float = 180.0,
                         poll: float = 0.02) -> dict[str, Any]:
        """Poll ``GET /api/vms/{id}`` every ``poll`` s until the VM is ``wanted``; raise if it fails instead."""
        deadline = time.monotonic() + timeout
        while True:
            vm: dict[str, Any] = await self.request("GET", f"/api/vms/{vm_id}")
            if vm["state"] == wanted:
                return vm
            if vm["state"] in ("error", "destroyed") or (vm["state"] == "stopped" and wanted == "running"):
                raise BenchError(f"VM {vm_id} went {vm['state']} instead of {wanted}: {vm.get('error')}")
            if time.monotonic() > deadline:
                raise BenchError(f"VM {vm_id} was not {wanted} within {timeout:g} s (state {vm['state']})")
            await asyncio.sleep(poll)

    async def console_url(self, vm_id: str) -> str:
        body = await self.request("GET", f"/api/vms/{vm_id}/console")
        return str(body["url"])

    async def serial(self, vm_id: str) -> str:
        body = await self.request("GET", f"/api/vms/{vm_id}/logs")
        return str(body["serial"])

    async def suspend(self, vm_id: str) -> None:
        await self.request("POST", f"/api/vms/{vm_id}/suspend?wait=60", expect=(200,))

    async def stop(self, vm_id: str) -> None:
        await self.request("POST", f"/api/vms/{vm_id}/stop?wait=60", expect=(200,))

    async def destroy(self, vm_id: str) -> None:
        """Destroy and wait until it is gone (a VM already being destroyed is waited for too)."""
        await self.request("DELETE", f"/api/vms/{vm_id}?wait=60", expect=(200, 202, 409))
        await self.wait_state(vm_id, "destroyed", timeout=120, poll=0.2)

    async def destroy_all(self, vm_ids: list[str], concurrency: int = 8) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(vm_id: str) -> None:
            async with gate:
                await self.destroy(vm_id)

        await asyncio.gather(*(one(v) for v in vm_ids))

    async def close(self) -> None:
        await self.http.close()


@dataclass
class Load:
    """What one load run saw: per-request latencies (seconds, successful requests only)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    response_bytes: int = 0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    def to_json(self) -> dict[str, Any]:
        return {"requests": len(self.latencies), "errors": self.errors, "elapsed_s": self.elapsed,
                "rps": self.rps, "p50_s": percentile(self.latencies, 50), "p99_s": self.p99,
                "max_s": max(self.latencies) if self.latencies else None,
                "response_bytes": self.response_bytes}


async def hammer(url: str, *, concurrency: int, cookie: str = "", duration: float | None = None,
                 requests: int | None = None) -> Load:
    """Closed loop: ``concurrency`` connections, each sending the next GET as soon as the last answered,
    for ``duration`` seconds or until ``requests`` were sent. Non-200 answers count as errors."""
    assert (duration is None) != (requests is None)
    load = Load()
    headers = {"Cookie": cookie} if cookie else {}
    left = requests if requests is not None else -1
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
        started = time.perf_counter()
        deadline = started + (duration or 0.0)

        async def worker() -> None:
            nonlocal left
            while True:
                if requests is not None:
                    if left <= 0:
                        return
                    left -= 1
                elif time.perf_counter() >= deadline:
                    return
                t0 = time.perf_counter()
                try:
                    async with http.get(url, headers=headers) as resp:
                        body = await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok, body = False, b""
                if ok:
                    load.latencies.append(time.perf_counter() - t0)
                    load.response_bytes = len(body)
                else:
                    load.errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        load.elapsed = time.perf_counter() - started
    return load


class BenchRFB(RFBClient):
    """console/rfb.py's client plus a request for any rectangle (the relay latency uses one pixel)."""

    async def request_rect(self, x: int, y: int, w: int, h: int, incremental: bool = False) -> int:
        """Ask for one rectangle; ``wait_for_update`` then waits for the answer."""
        self._check()
        self._request_mark = self.update_count
        await self._transport.send(struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h))
        return self._request_mark

    def is_guest_frame(self) -> bool:
        """A non-blank screen that is the guest's own, not QEMU's "not initialized" placeholder."""
        return not self.is_blank() and (self.width, self.height) != QEMU_PLACEHOLDER_SIZE

    def save_png(self, path: Path) -> None:
        """Write the framebuffer as an 8-bit RGB PNG (what the bench saw, for a person to check)."""
        w, h, fb = self.width, self.height, self.framebuffer
        rows = bytearray()
        for y in range(h):
            rows.append(0)  # filter: none
            line = fb[y * w * 4 : (y + 1) * w * 4]
            rgb = bytearray(w * 3)
            rgb[0::3], rgb[1::3], rgb[2::3] = line[2::4], line[1::4], line[0::4]  # B, G, R, pad -> R, G, B
            rows += rgb

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b""))

    @property
    def frame_bytes(self) -> int:
        """Bytes of pixel data in a full-screen update (Raw encoding, 32 bits a pixel)."""
        return self.width * self.height * 4


async def connect_ws(url: str, origin: str) -> BenchRFB:
    """An RFB session through websockify, sending the ``Origin`` a browser on the console page would."""
    rfb = await BenchRFB.connect_ws(url, origin=origin)
    assert isinstance(rfb, BenchRFB)  # connect_ws builds cls(...)
    return rfb


async def connect_unix_nudged(path: str) -> BenchRFB:
    """An RFB session on QEMU's VNC unix socket through the console proxy's own ``NudgingSocket``
    (console/nudge.py), relayed by a thread of this process: QEMU sees what it sees through websockify and
    the console proxy, so the two paths differ by websockify's relaying alone (and this one relay hop)."""
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        qemu.connect(path)
    except OSError:
        qemu.close()
        raise
    ours, theirs = socket.socketpair()
    threading.Thread(target=_relay, args=(theirs, NudgingSocket(qemu)), name="bench-relay", daemon=True).start()
    try:
        rfb = await BenchRFB.connect_socket(ours)
    except BaseException:
        ours.close()
        raise
    assert isinstance(rfb, BenchRFB)
    return rfb


def _relay(client: socket.socket, qemu: NudgingSocket) -> None:
    """Bytes both ways until either side closes, then both closed."""
    try:
        while True:
            readable, _, _ = select.select([client.fileno(), qemu.fileno()], [], [])
            for fd in readable:
                data = (client if fd == client.fileno() else qemu).recv(65536)
                if not data:
                    return
                (qemu if fd == client.fileno() else client).sendall(data)
    except OSError:
        pass
    finally:
        qemu.stop()
        qemu.close()
        client.close()
