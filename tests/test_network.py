"""VM networks (issue 15, docs/NETWORK.md) with the real local driver, QEMU, namespaces, nftables, tc and dnsmasq.

Every address a VM talks to here belongs to a namespace this test makes itself: an "outside" one (198.51.100.2,
a documentation range standing in for the internet, reached through the host as the internet would be), a
"private" one (10.99.0.2), and the host's own end of the outside link (198.51.100.1). A server listens in each;
the test reaches each from the host first, so a VM's failure to is the firewall's doing, and nftables' counters,
read back, say which rule dropped it.

Needs root, nftables, dnsmasq and the tiny image with its warm layer (make test installs and builds them)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DriverError
from drivers.local import LocalDriver, network
from jobspecs import JobSettings, Template, VMSpec, render_job
from jobspecs.devices import NETDEVS
from tests.fixtures.qemu import destroy_all, qemu_pids_under, type_text, wait_for_serial

pytestmark = pytest.mark.qemu

OUTSIDE = "198.51.100.2"  # the outside namespace: "the internet"
HOST_SIDE = "198.51.100.1"  # the host's end of the link to it: one of the host's own addresses
PRIVATE = "10.99.0.2"  # a namespace on a private range
PORT = 7000
SERVER = textwrap.dedent('''
    import fcntl, json, socket, struct, sys, threading, time
    host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = socket.create_server((host, port))
    def serve(conn, peer):
        # Says hello, then counts what it receives until EOF; "send N" first makes it send N bytes and time
        # them until the peer has acknowledged all of them (the send queue, SIOCOUTQ, is empty).
        conn.sendall(b"vmgate-outside-hello\\n")
        conn.settimeout(20)
        first = last = done = None; total = 0; sent = 0
        try:
            while data := conn.recv(65536):
                last = time.monotonic(); first = first or last; total += len(data)
                if data.startswith(b"send ") and not sent:
                    sent = int(data.split()[1]); first = time.monotonic()
                    conn.sendall(b"x" * sent); conn.shutdown(socket.SHUT_WR)
                    while struct.unpack("i", fcntl.ioctl(conn, 0x5411, b"\\0" * 4))[0] > 0:
                        time.sleep(0.005)
                    done = time.monotonic()
        except OSError:
            pass
        last = done if sent else last
        with open(log, "a") as f:
            f.write(json.dumps({"peer": peer[0], "bytes": total, "sent": sent,
                                "seconds": (last - first) if first else 0}) + "\\n")
        conn.close()
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
''')


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=check, timeout=30).stdout


@pytest.fixture(scope="module")
def net_host() -> None:
    why = network.problem()
    if why is not None:
        if os.environ.get("VMGATE_TEST"):
            pytest.fail(f"VM networks cannot be tested: {why} (make deps installs the tools; run as root)")
        pytest.skip(f"VM networks cannot be made here: {why}")


class Namespace:
    """A namespace of the test's own, linked to the host by a veth pair, with a logging TCP server in it."""

    def __init__(self, name: str, host_address: str, address: str, log_dir: Path) -> None:
        self.name, self.host_address, self.address = name, host_address, address
        self.log = log_dir / f"{name}.log"
        self.log.write_text("")
        self.server: subprocess.Popen[bytes] | None = None

    def create(self) -> None:
        self.remove()
        link = f"{self.name}-h"
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_address}/24", "dev", link)
        sh("ip", "link", "set", link, "up")
        sh("ip", "-n", self.name, "-batch", "-", stdin=f"link set lo up\naddr add {self.address}/24 dev eth0\n"
           f"link set eth0 up\nroute add default via {self.host_address}\n")
        self.server = serve_in(self.name, self.address, self.log)

    def remove(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        sh("ip", "link", "del", f"{self.name}-h", check=False)
        sh("ip", "netns", "del", self.name, check=False)

    def connections(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


def serve_in(netns: str, address: str, log: Path) -> subprocess.Popen[bytes]:
    """The logging TCP server (SERVER) on ``address``:PORT in namespace ``netns``."""
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SERVER, address, str(PORT), str(log)],
                            stdin=subprocess.DEVNULL)


def outside_resolver(name: str) -> subprocess.Popen[bytes]:
    """dnsmasq in the outside namespace, answering ``name`` with the outside address and nothing else."""
    return subprocess.Popen(["ip", "netns", "exec", "vmgt-out", "dnsmasq", "--keep-in-foreground",
                             "--conf-file=/dev/null", f"--listen-address={OUTSIDE}", "--bind-interfaces",
                             "--no-resolv", "--no-hosts", f"--address=/{name}/{OUTSIDE}"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def eventually(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        await asyncio.sleep(0.1)
    return check()


def reachable_from_host(address: str, port: int = PORT, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=1) as conn:
                return conn.recv(64).startswith(b"vmgate-outside-hello")
        except OSError:
            time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def namespaces(net_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Namespace]]:
    logs = tmp_path_factory.mktemp("netlogs")
    spaces = {"outside": Namespace("vmgt-out", HOST_SIDE, OUTSIDE, logs),
              "private": Namespace("vmgt-priv", "10.99.0.1", PRIVATE, logs)}
    try:
        for space in spaces.values():
            space.create()
        for space in spaces.values():
            assert reachable_from_host(space.address), f"the test's own server in {space.name} did not answer"
        yield spaces
    finally:
        for space in spaces.values():
            space.remove()


@pytest.fixture
def outside(namespaces: dict[str, Namespace]) -> dict[str, Namespace]:
    """The test's namespaces with their servers' logs emptied (of the host's probes, of earlier tests)."""
    time.sleep(0.3)  # a server logs a connection once it closed
    for space in namespaces.values():
        space.log.write_text("")
    return namespaces


@pytest.fixture
async def host_listener(outside: dict[str, Namespace]) -> AsyncIterator[list[str]]:
    """A server on one of the host's own addresses (the test's outside link), recording who connects."""
    peers: list[str] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(accept, HOST_SIDE, PORT + 1)
    async with server:
        yield peers


def config(**changes: Any) -> network.NetworkConfig:
    return network.NetworkConfig(**{"dns": (), "bandwidth_mbit": 0, **changes})


@pytest.fixture
async def drivers(vms_root: Path) -> AsyncIterator[Callable[..., LocalDriver]]:
    made: list[LocalDriver] = []

    def make(**changes: Any) -> LocalDriver:
        driver = LocalDriver(vms_root, networks=config(**changes))
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await destroy_all(driver)


@pytest.fixture
def warm_tiny(tiny_template: Template) -> Template:
    if tiny_template.warm_image() is None:
        pytest.fail(f"the tiny template has no warm layer in {tiny_template.warm_root}; run `make images`")
    return tiny_template


async def start_vm(driver: LocalDriver, template: Template, vms_root: Path, vm_id: str, net: str) -> Path:
    """A warm tiny clone on ``net``; returns its task directory."""
    warm = template.warm_image()
    assert warm is not None
    overlay = vms_root / "users" / "test" / f"{vm_id}.qcow2"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(warm.disk), "-F", "qcow2", str(overlay), "1G")
    spec = VMSpec.for_template(template, id=vm_id, owner="test", overlay_path=overlay, network=net)
    job = render_job(spec, template, JobSettings(), warm=warm)
    await driver.start(vm_id, job)
    await wait_for_serial(driver, vm_id, "clone of a warm template is now", timeout=60)
    return driver.task_dir(vm_id)


async def run_in_guest(driver: LocalDriver, vm_id: str, command: str, done: str, timeout: float = 60) -> str:
    """Type ``command`` on the VM's root shell (tty1); its output goes to the serial log, ``done`` ends it."""
    before = len((await driver.logs(vm_id, 4 << 20)).encode())
    await type_text(driver.task_dir(vm_id) / "qmp.sock", command + "\n", hold_ms=10)
    await wait_for_serial(driver, vm_id, done, timeout=timeout, after=before)
    return (await driver.logs(vm_id, 4 << 20)).encode()[before:].decode(errors="replace")


# Guest shell: p ADDRESS PORT TAG tries a TCP connection and prints REACHED-TAG or BLOCKED-TAG on the serial console.
PROBE = ("p() { if nc -w 4 $1 $2 </dev/null >/dev/null 2>&1; then echo REACHED-$3; else echo BLOCKED-$3; fi "
         ">/dev/ttyS0; }")


async def probe(driver: LocalDriver, vm_id: str, targets: dict[str, tuple[str, int]]) -> str:
    """Try every target from the guest at once; the serial output of all of them."""
    await run_in_guest(driver, vm_id, f"{PROBE}; echo defined-$((6*7)) >/dev/ttyS0", "defined-42")
    tries = " ".join(f"p {address} {port} {tag} &" for tag, (address, port) in targets.items())
    return await run_in_guest(driver, vm_id, f"{tries} sleep 6; echo probes-over-$((6*7)) >/dev/ttyS0",
                              "probes-over-42")


def counters(table: dict[str, Any] | None) -> dict[str, int]:
    """Packets each commented rule of the host's table counted."""
    assert table is not None, "the host's nftables table is not there"
    found: dict[str, int] = {}
    for item in table["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment"):
            for expr in rule["expr"]:
                if "counter" in expr:
                    found[rule["comment"]] = expr["counter"]["packets"]
    return found


def netns_of(task_dir: Path) -> str:
    return str(json.loads((task_dir / network.STATE).read_text())["netns"])


async def test_an_outbound_vm_reaches_the_outside_and_nothing_of_the_host_or_other_vms(
        drivers: Callable[..., LocalDriver], warm_tiny: Template, vms_root: Path, outside: dict[str, Namespace],
        host_listener: list[str]) -> None:
    driver = drivers()
    a = await start_vm(driver, warm_tiny, vms_root, "net-a", "outbound")
    b = await start_vm(driver, warm_tiny, vms_root, "net-b", "outbound")
    # A server inside B's namespace, on its end of B's link: another tenant's VM, as close as one gets.
    b_ns = netns_of(b)
    b_address = network.addresses(driver.network or config(), int(b_ns.removeprefix(network.PREFIX)))[1]
    b_log = vms_root / "b-server.log"
    b_log.write_text("")
    b_server = serve_in(b_ns, b_address, b_log)
    try:
        before = counters(network.host_table())
        out = await run_in_guest(driver, "net-a", "ip -4 addr show eth0 >/dev/ttyS0; ip route >/dev/ttyS0; "
                                 "nc -w 5 198.51.100.2 7000 </dev/null >/dev/ttyS0; echo probe-done-$((6*7)) "
                                 ">/dev/ttyS0", "probe-done-42")
        # The lease the warm layer took: the same address, router and DNS server in every VM.
        assert f"inet {network.GUEST}/24" in out and f"default via {network.GATEWAY}" in out, out
        assert "vmgate-outside-hello" in out, out
        seen = outside["outside"].connections()
        assert [c["peer"] for c in seen] == [HOST_SIDE], seen  # masqueraded twice: the host's address

        targets = {"host": (HOST_SIDE, PORT + 1), "private": (PRIVATE, PORT), "other-vm": (b_address, PORT),
                   "metadata": ("169.254.169.254", 80), "host-link": (network.addresses(
                       driver.network or config(), int(netns_of(a).removeprefix(network.PREFIX)))[0], PORT)}
        out = await probe(driver, "net-a", targets)
        for tag in targets:
            assert f"BLOCKED-{tag}" in out and f"REACHED-{tag}" not in out, (tag, out)
        assert host_listener == [] and outside["private"].connections() == [] and b_log.read_text() == ""
        # The host's server and the private one answer the host itself: the firewall, not absence, stopped the VM.
        assert reachable_from_host(PRIVATE, timeout=3)
        with socket.create_connection((HOST_SIDE, PORT + 1), timeout=3):
            pass
        after = counters(network.host_table())
        for rule in ("to-host", "private", "into-vm", "outbound"):
            assert after[rule] > before.get(rule, 0), (rule, before, after)
    finally:
        b_server.kill()
        b_server.wait()


async def test_the_rules_limits_and_dhcp_are_what_the_config_says(
        drivers: Callable[..., LocalDriver], warm_tiny: Template, vms_root: Path,
        outside: dict[str, Namespace]) -> None:
    driver = drivers(bandwidth_mbit=7, conn_rate=11, conn_max=33, egress_allow=(ipaddress.IPv4Network("10.1.2.0/24"),),
                     egress_deny=(ipaddress.IPv4Network("203.0.113.0/24"),))
    task = await start_vm(driver, warm_tiny, vms_root, "net-rules", "outbound")
    name = netns_of(task)
    text = sh("nft", "list", "table", "inet", network.TABLE)
    for needle in ("10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16", "100.64.0.0/10", "10.1.2.0/24", "203.0.113.0/24",
                   'iifname "vmg-*" counter', 'comment "to-host"', "ct count over 33", "limit rate over 11/second",
                   'oifname "vmg-*" counter', "meta nfproto ipv6", "masquerade"):
        assert needle in text, (needle, text)
    inside = sh("ip", "netns", "exec", name, "nft", "list", "table", "inet", network.TABLE)
    assert "policy drop" in inside and f'iifname "{network.TAP}" oifname "{network.UPLINK}" ip saddr {network.GUEST}' \
        in inside, inside
    assert "tbf" in sh("tc", "qdisc", "show", "dev", name) and "rate 7Mbit" in sh("tc", "qdisc", "show", "dev", name)
    assert "rate 7Mbit" in sh("tc", "-n", name, "qdisc", "show", "dev", network.UPLINK)
    assert "1" == Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    job = json.loads((task / "job.json").read_text())
    assert NETDEVS["outbound"] in job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    # EGRESS_DENY holds for a public address.
    out = await probe(driver, "net-rules", {"denied": ("203.0.113.9", 80)})
    assert "BLOCKED-denied" in out, out
    assert counters(network.host_table())["egress-deny"] > 0


async def test_a_vm_without_a_network_reaches_nothing_and_has_no_namespace(
        drivers: Callable[..., LocalDriver], warm_tiny: Template, vms_root: Path,
        outside: dict[str, Namespace]) -> None:
    driver = drivers()
    before = network.leftovers()
    task = await start_vm(driver, warm_tiny, vms_root, "net-none", "none")
    assert not (task / network.STATE).exists() and network.leftovers() == before
    out = await probe(driver, "net-none", {"outside": (OUTSIDE, PORT)})
    assert "BLOCKED-outside" in out, out
    assert outside["outside"].connections() == []


async def test_bandwidth_is_capped_each_way(drivers: Callable[..., LocalDriver], warm_tiny: Template,
                                           vms_root: Path, outside: dict[str, Namespace]) -> None:
    mbit = 2
    driver = drivers(bandwidth_mbit=mbit)
    await start_vm(driver, warm_tiny, vms_root, "net-bw", "outbound")
    size = 1024 * 1024
    await run_in_guest(driver, "net-bw", "dd if=/dev/zero bs=1024 count=1024 2>/dev/null | nc -w 3 198.51.100.2 "
                       "7000 >/dev/null; echo upload-done-$((6*7)) >/dev/ttyS0", "upload-done-42", timeout=120)
    [upload] = await eventually(outside["outside"].connections, 20)
    outside["outside"].log.write_text("")
    out = await run_in_guest(driver, "net-bw", "echo send 524288 | nc -w 5 198.51.100.2 7000 | wc -c >/dev/ttyS0; "
                             "echo download-done-$((6*7)) >/dev/ttyS0", "download-done-42", timeout=120)
    [download] = await eventually(outside["outside"].connections, 20)
    assert str(524288 + len("vmgate-outside-hello\n")) in out, out
    for way, bytes_, seconds in (("upload", upload["bytes"], upload["seconds"]),
                                 ("download", download["sent"], download["seconds"])):
        rate = bytes_ * 8 / seconds / 1e6
        print(f"{way} of {bytes_} bytes at a {mbit} Mbit/s cap: {rate:.2f} Mbit/s over {seconds:.1f} s")
        assert rate <= mbit * 1.15, (way, rate)  # a token bucket lets its burst (20 ms at the rate) through at once
    assert upload["bytes"] == size and download["sent"] == 524288


async def test_a_network_that_cannot_be_finished_fails_the_start_and_leaves_nothing(
        drivers: Callable[..., LocalDriver], warm_tiny: Template, vms_root: Path) -> None:
    """QEMU starts while the rest of the VM's network is made (network.finish), with the guest held (-S).
    When that fails (here dnsmasq), the start fails with the reason, and no QEMU, namespace, link or task
    directory is left."""
    before = network.leftovers()
    driver = drivers(tools={"dnsmasq": "/bin/false"})
    with pytest.raises(DriverError, match=r"network: .*/bin/false"):
        await start_vm(driver, warm_tiny, vms_root, "net-unfinished", "outbound")
    assert network.leftovers() == before
    assert qemu_pids_under(vms_root) == [] and not driver.task_dir("net-unfinished").exists()
    assert (await driver.status("net-unfinished")).state == "missing"  # as if it never was


async def test_namespaces_go_with_their_qemu_stopped_killed_or_abandoned(
        drivers: Callable[..., LocalDriver], warm_tiny: Template, vms_root: Path,
        outside: dict[str, Namespace], monkeypatch: pytest.MonkeyPatch) -> None:
    before = network.leftovers()
    driver = drivers()
    task = await start_vm(driver, warm_tiny, vms_root, "net-gone", "outbound")
    name = netns_of(task)
    assert name in network.leftovers()["netns"] and name in network.leftovers()["links"]
    await driver.stop("net-gone", timeout=0)
    assert network.leftovers() == before and not (task / network.STATE).exists()

    # A crash: the driver's watch sees QEMU end and removes the namespace.
    task = await start_vm(driver, warm_tiny, vms_root, "net-crash", "outbound")
    pid = int((task / "qemu.pid").read_text())
    os.kill(pid, 9)
    assert await eventually(lambda: network.leftovers() == before, 10), network.leftovers()

    # kill -9 of everything: the gateway (its driver) first, then QEMU; a new driver's tidy-up finds the
    # namespace without its QEMU and removes it with its dnsmasq, link and slot.
    task = await start_vm(driver, warm_tiny, vms_root, "net-orphan", "outbound")
    name = netns_of(task)
    await driver.close()
    os.kill(int((task / "qemu.pid").read_text()), 9)
    await asyncio.sleep(0.5)
    assert name in network.leftovers()["netns"]
    monkeypatch.setattr(network, "SWEEP_GRACE", 0.0)
    removed = await drivers().tidy()
    assert name in removed and network.leftovers() == before
    assert not (network.SLOTS / name.removeprefix(network.PREFIX)).exists()


async def test_the_guest_resolves_names_through_its_namespace(drivers: Callable[..., LocalDriver], warm_tiny: Template,
                                                              vms_root: Path, outside: dict[str, Namespace]) -> None:
    # A resolver in the outside namespace (VM_DNS) that knows one name: the guest asks its gateway (the
    # namespace's dnsmasq, from its DHCP lease), which forwards there.
    resolver = outside_resolver("outside.vmgate.test")
    try:
        driver = drivers(dns=(ipaddress.IPv4Address(OUTSIDE),))
        await start_vm(driver, warm_tiny, vms_root, "net-dns", "outbound")
        out = await run_in_guest(driver, "net-dns", "cat /etc/resolv.conf >/dev/ttyS0; nc -w 5 outside.vmgate.test "
                                 "7000 </dev/null >/dev/ttyS0; echo dns-done-$((6*7)) >/dev/ttyS0", "dns-done-42")
        assert f"nameserver {network.GATEWAY}" in out and "vmgate-outside-hello" in out, out
    finally:
        resolver.kill()
        resolver.wait()


async def test_make_down_keeps_the_host_table_while_a_vm_it_did_not_stop_runs(
        drivers: Callable[..., LocalDriver], warm_tiny: Template, vms_root: Path,
        outside: dict[str, Namespace]) -> None:
    # Another checkout's VM on the same host: `make down` here stops none of it, so its guest keeps the
    # host's rules (nothing of the host reachable from it) until it is gone.
    driver = drivers()
    task = await start_vm(driver, warm_tiny, vms_root, "net-other", "outbound")
    name = netns_of(task)
    try:
        removed = network.remove_all()
        assert name not in removed and f"nftables table inet {network.TABLE}" not in removed, removed
        assert network.host_table() is not None and name in network.leftovers()["netns"]
    finally:
        await driver.stop("net-other", timeout=0)
    assert network.leftovers()["netns"] == []  # the last one gone: now the table goes too
    assert driver.network is not None
    try:
        assert f"nftables table inet {network.TABLE}" in network.remove_all()
        assert network.host_table() is None
        # This driver made the rules at its first VM; with them gone its next VM puts them back first.
        await start_vm(driver, warm_tiny, vms_root, "net-after", "outbound")
        assert network.host_table() is not None
    finally:
        await driver.stop("net-after", timeout=0)
        network.ensure_host(driver.network)  # as they were, whatever happened above
