"""websockify that answers a VNC password on the browser's behalf: ``python -m console.proxy [websockify args]``.

A fleet VM's QEMU asks every VNC client for a password, new at each start (jobspecs/vnc_password.py). The
gateway puts it in the VM's console target in Redis; the token plugin (console/token_plugin.py) reads it
with the target, and this proxy does the RFB handshake with QEMU itself while it tells the browser that
no authentication is needed:

    QEMU -> proxy    "RFB 003.008\\n"            proxy -> browser  the same
    browser -> proxy "RFB 003.008\\n"            proxy -> QEMU     the same (3.7 or 3.8 only)
    QEMU -> proxy    security types [2, ...]    proxy -> browser  [1] (None)
    browser -> proxy 1                          proxy -> QEMU     2 (VNC authentication)
    QEMU -> proxy    16-byte challenge          proxy -> QEMU     the challenge DES-encrypted with the password
    QEMU -> proxy    SecurityResult             proxy -> browser  OK (3.8), or a failure and the end

From there on bytes flow both ways untouched (ClientInit, ServerInit, and the session). A target without a
password (the local driver's unix sockets) is proxied as websockify always does.

This is websockify's own command line, with one change: the request handler is ``VncAuthProxyRequestHandler``
(``websockify_init`` builds its server from the module's ``WebSocketProxy``, which this module replaces with
a subclass before calling it). DES comes from ``cryptography`` (its TripleDES with the key repeated three
times is single DES): VNC authentication is RFB's own, not chosen here.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from websockify import websocketproxy

from console import metrics
from console.nudge import NudgingSocket

HANDSHAKE_TIMEOUT = 15.0  # seconds for the whole handshake, both sides
SECURITY_NONE = 1  # as console/rfb.py says, which is not imported here: it would bring aiohttp into websockify
SECURITY_VNC_AUTH = 2
VERSIONS = {b"RFB 003.007\n": 7, b"RFB 003.008\n": 8}
RESULT_OK = b"\0\0\0\0"


class VncAuthError(Exception):
    """The handshake failed; the message says why (never the password)."""


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def des_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication's answer: the 16-byte challenge DES-encrypted (ECB) with the password as key,
    cut or padded to 8 bytes, each byte's bits reversed (RFB 6.2.2 and every server since)."""
    if len(challenge) != 16:
        raise VncAuthError(f"a challenge is 16 bytes, got {len(challenge)}")
    key = bytes(_reverse_bits(b) for b in password.encode()[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305 (RFB's own scheme)
    return encryptor.update(challenge) + encryptor.finalize()


class _Stream:
    """Read exactly n bytes from a source that delivers chunks, by a deadline."""

    def __init__(self, recv: Callable[[float], bytes], deadline: float) -> None:
        self._recv = recv
        self._deadline = deadline
        self.buffer = b""

    def read(self, n: int, what: str) -> bytes:
        while len(self.buffer) < n:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise VncAuthError(f"timed out waiting for {what}")
            chunk = self._recv(left)
            if not chunk:
                raise VncAuthError(f"connection closed before {what}")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def reason(self, what: str) -> str:
        """An RFB reason string: its length (u32), then up to 1 KiB of it."""
        (length,) = struct.unpack(">I", self.read(4, f"the length of {what}"))
        return self.read(min(length, 1024), what).decode(errors="replace")


def bridge(server_recv: Callable[[float], bytes], server_send: Callable[[bytes], None],
           client_recv: Callable[[float], bytes], client_send: Callable[[bytes], None], password: str,
           timeout: float = HANDSHAKE_TIMEOUT) -> tuple[bytes, bytes]:
    """Do the RFB handshake with a server that wants ``password`` and with a client that is told it needs
    none. Returns the bytes read beyond the handshake from (server, client), to be passed on as they are.
    Raises VncAuthError (after telling the client, where the protocol allows) if it cannot be done."""
    deadline = time.monotonic() + timeout
    server, client = _Stream(server_recv, deadline), _Stream(client_recv, deadline)
    server_version = server.read(12, "the server's version")
    if server_version not in VERSIONS:
        raise VncAuthError(f"the VNC server speaks {server_version!r}, not RFB 3.7 or 3.8")
    client_send(server_version)
    client_version = client.read(12, "the client's version")
    if client_version not in VERSIONS or VERSIONS[client_version] > VERSIONS[server_version]:
        raise VncAuthError(f"the client asked for {client_version!r}")
    minor = VERSIONS[client_version]
    server_send(client_version)
    count = server.read(1, "the security types")[0]
    if count == 0:
        raise VncAuthError(f"the VNC server refused the connection: {server.reason('the refusal')}")
    types = server.read(count, "the security types")
    if SECURITY_VNC_AUTH not in types:
        raise VncAuthError(f"the VNC server offers security types {list(types)}, not VNC authentication")
    client_send(bytes([1, SECURITY_NONE]))
    choice = client.read(1, "the client's security type")[0]
    if choice != SECURITY_NONE:
        raise VncAuthError(f"the client chose security type {choice}")
    server_send(bytes([SECURITY_VNC_AUTH]))
    server_send(des_response(password, server.read(16, "the challenge")))
    result = server.read(4, "the authentication result")
    if result != RESULT_OK:
        reason = "authentication failed"
        if minor == 8:  # a reason follows; and the client hears of it too (3.7 has no SecurityResult for None)
            reason = server.reason("the failure") or reason
            message = b"the VM's console refused the proxy"
            client_send(b"\0\0\0\1" + struct.pack(">I", len(message)) + message)
        raise VncAuthError(f"the VNC server did not take the password: {reason}")
    if minor == 8:
        client_send(RESULT_OK)
    return server.buffer, client.buffer


def _socket_recv(sock: socket.socket) -> Callable[[float], bytes]:
    def recv(timeout: float) -> bytes:
        sock.settimeout(timeout)
        try:
            return sock.recv(4096)
        except TimeoutError:
            raise VncAuthError("timed out waiting for the VNC server") from None
        finally:
            sock.settimeout(None)
    return recv


class VncAuthProxyRequestHandler(websocketproxy.ProxyRequestHandler):
    """websockify's handler, doing VNC authentication with the target when its token came with a password."""

    def _client_recv(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:  # a frame may carry no data (a ping, answered by websockify): wait for the next
            ready, _, _ = select.select([self.request], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise VncAuthError("timed out waiting for the browser")
            bufs, closed = self.recv_frames()
            data = b"".join(bufs)
            if data or closed:
                return data

    def _client_send(self, data: bytes) -> None:
        pending = self.send_frames([data])
        while pending:
            select.select([], [self.request], [], 1.0)
            pending = self.send_frames()

    def do_proxy(self, target: socket.socket) -> None:
        nudging = NudgingSocket(target)  # console/nudge.py: QEMU looks at the screen again after input
        try:
            self._proxy(nudging)
        finally:
            nudging.stop()

    def _proxy(self, target: Any) -> None:
        plugin: Any = self.server.token_plugin
        password = getattr(plugin, "vnc_password", None)
        if password:
            try:
                from_server, from_client = bridge(_socket_recv(target), target.sendall, self._client_recv,
                                                  self._client_send, password)
            except (VncAuthError, OSError) as exc:
                self.log_message("VNC authentication with the VM failed: %s", exc)
                raise self.CClose(1011, "The VM's console is not available") from None
            if from_client:
                target.sendall(from_client)
            if from_server:
                self._client_send(from_server)
        super().do_proxy(target)


class VncAuthWebSocketProxy(websocketproxy.WebSocketProxy):
    def __init__(self, RequestHandlerClass: type = VncAuthProxyRequestHandler, *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(RequestHandlerClass, *args, **kwargs)

    def top_new_client(self, startsock: socket.socket, address: Any) -> None:
        # The first thing a connection's forked process does (console/metrics.py).
        metrics.close_in_child()
        super().top_new_client(startsock, address)


def main() -> None:
    port = metrics.port_from_env()
    if port:
        metrics.serve(port)
    websocketproxy.WebSocketProxy = VncAuthWebSocketProxy
    websocketproxy.websockify_init()


if __name__ == "__main__":
    main()
