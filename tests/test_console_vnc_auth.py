"""Fleet consoles behind a VNC password (issue 13, item 5): a real QEMU whose VNC listens on a TCP port and asks
for a password, as a fleet job's QEMU does (jobspecs/vnc_password.py), and a real websockify
(``python -m console.proxy``) that answers the password for the browser, who never sees it.

The QEMUs are diskless (SeaBIOS's screen is enough to prove pixels flow) and named, so ServerInit says which
one a connection reached."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable, Iterator

import pytest
import redis

from console import redis_keys
from console.proxy import VncAuthError, bridge, des_response
from console.rfb import RFBClient, RFBError
from jobspecs.vnc_password import SECRET_ID, new_password
from tests.fixtures.websockify import WebsockifyServer
from tests.test_console_proxy import (
    Vm,
    issue,
    start_vm,
    stop_vm,
    url_for,
    wait_for_log,
    wait_until_shown,
    ws_upgrade,
)

pytestmark = pytest.mark.qemu


def free_display() -> int:
    """A VNC display N whose port 5900 + N nothing listens on (QEMU takes displays, not ports)."""
    for _ in range(200):
        display = 100 + secrets.randbelow(5000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 5900 + display))
            except OSError:
                continue
            return display
    raise AssertionError("no free VNC display")


def start_tcp_vm(vm_id: str, password: str) -> tuple[Vm, int]:
    """A diskless QEMU with VNC on 127.0.0.1 behind ``password``, the way a fleet job's args say it."""
    display = free_display()
    vm = start_vm(vm_id, (f"127.0.0.1:{display},password-secret={SECRET_ID}", 5900 + display),
                  ["-object", f"secret,id={SECRET_ID},data={password}"])
    return vm, 5900 + display


@pytest.fixture(scope="module")
def locked_vm() -> Iterator[tuple[Vm, int, str]]:
    password = new_password()
    vm, port = start_tcp_vm("vg-locked", password)
    yield vm, port, password
    stop_vm(vm)


def publish_tcp(r: redis.Redis, vm_id: str, port: int, password: str | None) -> None:
    """What the gateway publishes for a fleet VM (without Consul: host and port as Nomad reports them)."""
    target: dict[str, object] = {"host": "127.0.0.1", "port": port}
    if password is not None:
        target["password"] = password
    r.set(redis_keys.vnc_target_key(vm_id), json.dumps(target))


async def test_websockify_answers_the_password_and_the_browser_needs_none(
        redis_flush: redis.Redis, websockify_server: WebsockifyServer, locked_vm: tuple[Vm, int, str]) -> None:
    vm, port, password = locked_vm
    publish_tcp(redis_flush, vm.vm_id, port, password)
    # The client offers security type None only (what noVNC does when no password is asked for).
    async with await RFBClient.connect_ws(url_for(websockify_server, issue(redis_flush, vm.vm_id))) as client:
        assert client.name == vm.vnc_name
        await wait_until_shown(client)
        await client.type_text("x")  # input flows too
    assert password not in websockify_server.log_text()


async def test_without_the_password_no_one_gets_in(redis_flush: redis.Redis, websockify_server: WebsockifyServer,
                                                   locked_vm: tuple[Vm, int, str]) -> None:
    vm, port, password = locked_vm
    # Straight to the port, as anyone on the node network could: QEMU offers VNC authentication only.
    with pytest.raises(RFBError, match="security"):
        await RFBClient.connect_tcp("127.0.0.1", port)
    # Through websockify with a target that has no password, or the wrong one: no console either.
    publish_tcp(redis_flush, vm.vm_id, port, None)
    with pytest.raises(RFBError):
        await RFBClient.connect_ws(url_for(websockify_server, issue(redis_flush, vm.vm_id)))
    wrong = "x" + password[1:] if password[0] != "x" else "y" + password[1:]
    publish_tcp(redis_flush, vm.vm_id, port, wrong)
    with pytest.raises(RFBError):
        await RFBClient.connect_ws(url_for(websockify_server, issue(redis_flush, vm.vm_id)))
    log = await wait_for_log(websockify_server, "VNC authentication with the VM failed")
    assert wrong not in log and password not in log
    # And the right one still works afterwards (the failures cost QEMU nothing).
    publish_tcp(redis_flush, vm.vm_id, port, password)
    async with await RFBClient.connect_ws(url_for(websockify_server, issue(redis_flush, vm.vm_id))) as client:
        assert client.name == vm.vnc_name


def test_des_response_is_rfbs() -> None:
    """VNC authentication's DES with bit-reversed key bytes, checked against a server-side computation:
    a zero password and a zero challenge give DES(0, 0) twice, the classic all-zero test vector."""
    assert des_response("", bytes(16)).hex() == "8ca64de9c1b123a7" * 2
    assert des_response("abcdefghij", b"\x01" * 16) == des_response("abcdefgh", b"\x01" * 16)  # 8 bytes used
    with pytest.raises(VncAuthError):
        des_response("pw", b"short")


def test_the_bridge_refuses_what_it_cannot_do() -> None:
    """Handshakes the proxy must not complete: an old client, a server without VNC authentication."""

    def feed(data: bytes) -> Callable[[float], bytes]:
        chunks = [data]
        return lambda timeout: chunks.pop(0) if chunks else b""

    sent: list[bytes] = []
    with pytest.raises(VncAuthError, match="client asked"):
        bridge(feed(b"RFB 003.008\n"), sent.append, feed(b"RFB 003.003\n"), sent.append, "pw")
    with pytest.raises(VncAuthError, match="not VNC authentication"):
        bridge(feed(b"RFB 003.008\n\x01\x01"), sent.append, feed(b"RFB 003.008\n"), sent.append, "pw")
    with pytest.raises(VncAuthError, match=r"not RFB 3\.7 or 3\.8"):
        bridge(feed(b"RFB 004.000\n"), sent.append, feed(b""), sent.append, "pw")


@pytest.mark.parametrize("target", [{"password": "not a pw!"}, {"password": 12345678}, {"password": "x" * 9},
                                    {"consul_service": "vmgate-vnc", "alloc_id": ""}])
async def test_a_bad_fleet_target_gets_no_console(redis_flush: redis.Redis, websockify_server: WebsockifyServer,
                                                  locked_vm: tuple[Vm, int, str], target: dict[str, object]) -> None:
    """A console target whose password or allocation is malformed is refused before any byte of HTTP."""
    vm, port, _ = locked_vm
    redis_flush.set(redis_keys.vnc_target_key(vm.vm_id), json.dumps({"host": "127.0.0.1", "port": port, **target}))
    token = issue(redis_flush, vm.vm_id)
    assert await ws_upgrade(url_for(websockify_server, token)) == b""
    await wait_for_log(websockify_server, r"has a bad (password|alloc_id)")
