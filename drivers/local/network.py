"""Outbound networks for the local driver's VMs: a network namespace per VM, NAT out, nothing in.

One running VM with ``network: outbound`` (docs/NETWORK.md has the picture)::

    guest eth0 10.0.2.15/24 ── tap0 10.0.2.2/24 ┐ netns vmg-N: dnsmasq (DHCP, DNS) on tap0; nftables: forward
                                                │ tap0 → eth0 only, from 10.0.2.15 only; masquerade to eth0;
                                   eth0 P.2/30 ┘ nothing in but replies, DHCP, DNS and ping on tap0
                                        │ veth
    host: vmg-N P.1/30 ── nftables ``inet vmgate``: nothing from a vmg-* reaches the host itself (input);
          forwarded, no new connection into a VM, none from one VM to another, none to private, link-local,
          loopback, multicast or reserved ranges (EGRESS_ALLOW opens some, EGRESS_DENY closes more), no IPv6,
          new connections per VM rate-limited and counted; masquerade out. tc tbf on both veth ends.

QEMU runs inside the namespace (``nsenter --net``) and opens ``tap0``; its VNC, QMP and agent sockets are
unix sockets in the task directory, which no namespace hides. Every VM's guest has the same address, MAC,
gateway and DNS server, so a clone restored from a warm layer keeps the lease its template took (infinite)
and nothing in the guest changes: the namespace translates. ``P`` is the VM's /30 from ``VM_NET_POOL``,
numbered by a host-wide slot (``/run/vmgate/netslots``; /run is cleared at boot, like namespaces).

The namespace lives exactly as long as the VM's QEMU: ``make`` before the spawn (the namespace and its tap),
``finish`` while QEMU starts with the guest held (the rest), ``down`` whenever the QEMU is
gone (stop, crash, suspend, a failed start, destroy), and ``sweep`` removes any vmg-* namespace with no QEMU
in it (a gateway killed mid-way, ``kill -9`` of everything) and any vmg-* link without its namespace.

Runs ``ip``, ``nft``, ``tc``, ``nsenter``, ``dnsmasq`` as root; ``problem()`` says why a host cannot (no network).

Over 400 lines: the namespace's whole life (rules, making, finishing, removing, sweeping) is kept in one place,
since each step relies on what the others leave.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from drivers.base import DriverError
from drivers.local import slots

log = logging.getLogger(__name__)

GUEST = "10.0.2.15"  # the guest's address in every namespace (DHCP, infinite lease)
GATEWAY = "10.0.2.2"  # tap0 in every namespace: the guest's router and DNS server
GUEST_PREFIX = 24
TAP = "tap0"  # what the job's -netdev tap,ifname= names
UPLINK = "eth0"  # the namespace's end of the veth pair
PREFIX = "vmg-"  # namespaces and host links: vmg-<slot>
TABLE = "vmgate"  # nftables table (family inet) on the host and in every namespace
SLOTS = Path("/run/vmgate/netslots")
NETNS_DIR = Path("/run/netns")
STATE = "net.json"  # in the task directory: the VM's namespace while its QEMU runs
SWEEP_GRACE = 30.0  # seconds a namespace may be without its QEMU (being set up) before sweep removes it
COMMAND_TIMEOUT = 10.0
TOOLS = ("ip", "nft", "tc", "nsenter", "dnsmasq")

# Never reachable from a VM unless EGRESS_ALLOW says so: "this network", RFC 1918, shared address space
# (carrier NAT), loopback, link-local (cloud metadata at 169.254.169.254), IETF protocol assignments,
# benchmarking, multicast, reserved and broadcast.
DENIED = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
          "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4")


@dataclass(frozen=True)
class NetworkConfig:
    """What the gateway's settings say about VM networks (gateway/config.py: VM_NET_*, EGRESS_*)."""

    pool: ipaddress.IPv4Network = ipaddress.IPv4Network("10.237.0.0/16")
    dns: tuple[ipaddress.IPv4Address, ...] = ()  # upstream resolvers dnsmasq forwards to
    egress_allow: tuple[ipaddress.IPv4Network, ...] = ()
    egress_deny: tuple[ipaddress.IPv4Network, ...] = ()
    bandwidth_mbit: int = 100  # each way, per VM; 0: no limit
    conn_rate: int = 50  # new connections per second per VM (burst: twice that); 0: no limit
    conn_max: int = 1024  # connections open at once per VM; 0: no limit
    uplink: bool = True  # False: DHCP and nothing else (the warm-layer build: a lease, no way out)
    tools: dict[str, str] = field(default_factory=dict, compare=False)

    def slots(self) -> int:
        return max(0, (self.pool.num_addresses // 4) - 1)  # /30s, the pool's first one left unused


def host_resolvers(path: Path = Path("/etc/resolv.conf")) -> tuple[ipaddress.IPv4Address, ...]:
    """The host's IPv4 name servers that a namespace can reach (not loopback ones such as systemd-resolved's)."""
    found: list[ipaddress.IPv4Address] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(parts[1])
                    if isinstance(address, ipaddress.IPv4Address) and not address.is_loopback:
                        found.append(address)
    return tuple(found)


def problem() -> str | None:
    """Why VMs cannot get networks on this host, or None when they can."""
    if os.geteuid() != 0:
        return "the local driver does not run as root (network namespaces, taps and nftables need it)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: iproute2 nftables util-linux dnsmasq-base)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (tap devices)"
    return None


# ---------------------------------------------------------------- the rules (pure; tests read them back)

def _set(name: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv4Address | str]) -> str:
    items = ", ".join(str(n) for n in networks)
    body = f"type ipv4_addr; flags interval; auto-merge;{f' elements = {{ {items} }};' if items else ''}"
    return f"    set {name} {{ {body} }}\n"


def host_rules(config: NetworkConfig, vm: str = f'"{PREFIX}*"', table: str = TABLE, let_in: str = "") -> str:
    """The host's ``inet vmgate`` table, for ``nft -f`` (replaces the previous one atomically). ``vm`` matches
    the VMs' links, ``let_in`` accepts some new connections into VMs (a fleet node's console: drivers/fleetnet)."""
    limits = []
    if config.conn_max:
        limits.append(f"        ct state new add @vm_conns {{ ip saddr ct count over {config.conn_max} }} "
                      'counter drop comment "conn-max"')
    if config.conn_rate:
        limits.append(f"        ct state new update @vm_rate {{ ip saddr limit rate over {config.conn_rate}/second "
                      f'burst {config.conn_rate * 2} packets }} counter drop comment "conn-rate"')
    return "\n".join([
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        _set("denied", DENIED) + _set("egress_deny", config.egress_deny) + _set("egress_allow", config.egress_allow)
        + _set("dns", config.dns).rstrip("\n"),
        "    set vm_conns { type ipv4_addr; size 65535; flags dynamic; }",
        "    set vm_rate { type ipv4_addr; size 65535; flags dynamic,timeout; timeout 1m; }",
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        f"        iifname {vm} ct state established,related accept",  # answers to the host (a node's checks)
        f'        iifname {vm} counter drop comment "to-host"',
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        f"        oifname {vm} ct state established,related accept",
        *([f"        oifname {vm} {let_in} accept"] if let_in else []),
        f'        oifname {vm} counter drop comment "into-vm"',
        f"        iifname != {vm} accept",
        '        meta nfproto ipv6 counter drop comment "ipv6"',
        f"        ip saddr != {config.pool} counter drop comment \"spoofed\"",
        "        ct state established,related accept",
        '        ip daddr @egress_deny counter drop comment "egress-deny"',
        *limits,
        '        ip daddr @dns meta l4proto { tcp, udp } th dport 53 accept',
        "        ip daddr @egress_allow accept",
        '        ip daddr @denied counter drop comment "private"',
        '        counter accept comment "outbound"',
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f"        ip saddr {config.pool} oifname != {vm} masquerade",
        "    }",
        "}",
        "",
    ])


def namespace_rules(config: NetworkConfig) -> str:
    """The ``inet vmgate`` table inside a VM's namespace."""
    out = [
        f'        iifname "{TAP}" oifname "{UPLINK}" ip saddr {GUEST} accept',
        f'        iifname "{UPLINK}" oifname "{TAP}" ct state established,related accept',
    ] if config.uplink else []
    return "\n".join([
        f"table inet {TABLE} {{",
        "    chain input {",
        "        type filter hook input priority filter; policy drop;",
        "        iif lo accept",
        "        ct state established,related accept",
        f'        iifname "{TAP}" udp dport {{ 53, 67 }} accept',
        f'        iifname "{TAP}" tcp dport 53 accept',
        f'        iifname "{TAP}" icmp type echo-request accept',
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy drop;",
        *out,
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f'        oifname "{UPLINK}" masquerade',
        "    }",
        "}",
        "",
    ])


def shaping(dev: str, mbit: int) -> list[str]:
    """``tc`` arguments that cap what leaves ``dev`` at ``mbit`` Mbit/s (a token bucket; its burst is 20 ms at
    the rate, at least a few packets)."""
    burst = max(16 * 1024, mbit * 1_000_000 // 8 // 50)
    return ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
            "latency", "100ms"]


def addresses(config: NetworkConfig, slot: int) -> tuple[str, str]:
    """The host's and the namespace's ends of the veth pair of ``slot`` (its /30 in the pool)."""
    base = int(config.pool.network_address) + 4 * (slot + 1)
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def dnsmasq_args(config: NetworkConfig, task_dir: Path) -> list[str]:
    upstream = [f"--server={server}" for server in config.dns] if config.uplink else []
    return [
        "--conf-file=/dev/null", f"--interface={TAP}", "--except-interface=lo", "--bind-interfaces",
        f"--dhcp-range={GUEST},{GUEST},255.255.255.0,infinite", f"--dhcp-option=option:router,{GATEWAY}",
        f"--dhcp-option=option:dns-server,{GATEWAY}", "--dhcp-authoritative", "--leasefile-ro",
        "--no-resolv", "--no-hosts", "--dns-forward-max=64", "--cache-size=500", *upstream,
        f"--pid-file={task_dir / 'dnsmasq.pid'}", f"--log-facility={task_dir / 'dnsmasq.log'}",
        "--user=nobody", "--group=nogroup",
    ]


# ---------------------------------------------------------------- commands

def _tool(config: NetworkConfig | None, name: str) -> str:
    if config is not None and name in config.tools:
        return config.tools[name]
    return shutil.which(name) or name


def _run(argv: list[str], stdin: str | None = None, *, check: bool = True) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DriverError(f"network: {argv[0]} failed: {exc}") from exc
    if check and done.returncode != 0:
        raise DriverError(f"network: {' '.join(argv[:4])}... failed: {(done.stderr or done.stdout).strip()[:500]}")
    return done.stdout


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def enter(name: str, config: NetworkConfig | None = None) -> list[str]:
    """What runs a command inside namespace ``name`` (prefix QEMU's argv with it)."""
    return [_tool(config, "nsenter"), f"--net={netns_path(name)}", "--"]


def ensure_host(config: NetworkConfig) -> None:
    """Forwarding on, and the host's table as ``config`` says (idempotent, atomic)."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    _run([_tool(config, "nft"), "-f", "-"], host_rules(config))


def host_table(config: NetworkConfig | None = None) -> dict[str, object] | None:
    """The host's table as nftables reports it (``nft -j``), or None when it is not there."""
    out = _run([_tool(config, "nft"), "-j", "list", "table", "inet", TABLE], check=False)
    return json.loads(out) if out.strip() else None


def make(config: NetworkConfig, task_dir: Path) -> str:
    """The VM's namespace with its tap and nothing else, which is all QEMU needs to start in it: a way out,
    rules, limits and DHCP come with ``finish``, which the guest must not run before (the local driver
    starts QEMU between the two, with the guest held, and lets it run once ``finish`` returned)."""
    key = hashlib.sha256(os.fsencode(str(task_dir.absolute()))).hexdigest()[:24]  # names its slot
    down(task_dir)
    slot = slots.claim(SLOTS, key, 0, config.slots())
    name = f"{PREFIX}{slot}"
    if netns_path(name).exists():  # a stray of a VM that no longer holds the slot
        _remove(name, config)
    ip = _tool(config, "ip")
    (task_dir / STATE).write_text(json.dumps({"netns": name, "slot": slot, "key": key}) + "\n")
    try:
        _run([ip, "netns", "add", name])
        _run([ip, "-n", name, "-batch", "-"], "\n".join([
            "link set lo up", f"tuntap add dev {TAP} mode tap", f"addr add {GATEWAY}/{GUEST_PREFIX} dev {TAP}",
            f"link set {TAP} up"]) + "\n")
    except BaseException:
        down(task_dir, config)
        raise
    return name


def finish(config: NetworkConfig, task_dir: Path, name: str) -> None:
    """The rest of what ``make`` began: the link to the host, the namespace's rules and limits, dnsmasq."""
    ip, tc, nft = _tool(config, "ip"), _tool(config, "tc"), _tool(config, "nft")
    host_end, ns_end = addresses(config, int(name.removeprefix(PREFIX)))  # make() names it after its slot
    try:
        if config.uplink:
            _run([ip, "-batch", "-"], "\n".join([
                f"link add {name} type veth peer name {UPLINK} netns {name}",
                f"addr add {host_end}/30 dev {name}",
                f"link set {name} up",
            ]) + "\n")
            _run([ip, "-n", name, "-batch", "-"], "\n".join([
                f"addr add {ns_end}/30 dev {UPLINK}", f"link set {UPLINK} up",
                f"route add default via {host_end}"]) + "\n")
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")
        inside = enter(name, config)
        _run([*inside, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.disable_ipv6=1",
              "net.ipv6.conf.default.disable_ipv6=1"])
        _run([*inside, nft, "-f", "-"], namespace_rules(config))
        if config.uplink and config.bandwidth_mbit:
            _run([tc, *shaping(name, config.bandwidth_mbit)])  # what the VM downloads
            _run([tc, "-n", name, *shaping(UPLINK, config.bandwidth_mbit)])  # what it uploads
        (task_dir / "dnsmasq.log").unlink(missing_ok=True)
        _run([*inside, _tool(config, "dnsmasq"), *dnsmasq_args(config, task_dir)])
    except BaseException:
        down(task_dir, config)
        raise


def down(task_dir: Path, config: NetworkConfig | None = None) -> None:
    """Remove the VM's namespace, links and DHCP server, and free its slot. Idempotent; never raises for
    what is already gone."""
    try:
        state = json.loads((task_dir / STATE).read_text())
    except (OSError, ValueError):
        return
    name = state.get("netns")
    if isinstance(name, str) and name.startswith(PREFIX):
        _remove(name, config)
    if isinstance(state.get("key"), str):
        slots.release(SLOTS, state["key"])
    (task_dir / STATE).unlink(missing_ok=True)
    (task_dir / "dnsmasq.pid").unlink(missing_ok=True)


def _remove(name: str, config: NetworkConfig | None = None) -> None:
    """End every process in namespace ``name`` (dnsmasq; a QEMU is gone by now), delete its host link and
    the namespace (which takes its own links, rules and qdiscs with it)."""
    ip = _tool(config, "ip")
    if netns_path(name).exists():
        for _ in range(50):
            pids = [int(p) for p in _run([ip, "netns", "pids", name], check=False).split() if p.isdigit()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
    _run([ip, "link", "del", name], check=False)
    _run([ip, "netns", "del", name], check=False)


def leftovers() -> dict[str, list[str]]:
    """vmgate namespaces and host links on this host: {"netns": [...], "links": [...]}."""
    names = sorted(p.name for p in NETNS_DIR.glob(f"{PREFIX}*")) if NETNS_DIR.is_dir() else []
    links = sorted(p.name for p in Path("/sys/class/net").glob(f"{PREFIX}*"))
    return {"netns": names, "links": links}


def _has_qemu(name: str, config: NetworkConfig | None) -> bool:
    out = _run([_tool(config, "ip"), "netns", "pids", name], check=False)
    for pid in out.split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                return True
    return False


def sweep(config: NetworkConfig | None = None, grace: float = SWEEP_GRACE) -> list[str]:
    """Remove every vmgate namespace with no QEMU in it that is older than ``grace`` seconds (its VM is
    gone: killed, crashed while nobody watched), every vmgate link without its namespace, and the slots
    they held. Returns what it removed."""
    removed = []
    found = leftovers()
    for name in found["netns"]:
        slot = name.removeprefix(PREFIX)
        try:  # the slot file is written just before the namespace is made
            age = time.time() - (SLOTS / slot).stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            age = grace
        if age < grace or _has_qemu(name, config):
            continue
        _remove(name, config)
        removed.append(name)
        holder = slots.holder(SLOTS, int(slot)) if slot.isdigit() else None
        if holder is not None:
            slots.release(SLOTS, holder)
    for link in found["links"]:
        if not netns_path(link).exists():
            _run([_tool(config, "ip"), "link", "del", link], check=False)
            removed.append(link)
    if removed:
        log.warning("network: removed leftovers of VMs that are gone: %s", ", ".join(removed))
    return removed


def leased(task_dir: Path) -> bool:
    """True once the VM's guest took its DHCP lease (dnsmasq logs the acknowledgement)."""
    try:
        return f"DHCPACK({TAP}) {GUEST}" in (task_dir / "dnsmasq.log").read_text(errors="replace")
    except OSError:
        return False


def remove_all() -> list[str]:
    """``make down``: every vmgate namespace without a QEMU, every vmgate link left, and then the host's
    table, unless a namespace is still there: a QEMU this ``make down`` did not stop (another checkout's on
    the same host, say) keeps the rules that keep its guest off the host."""
    removed = sweep(grace=0.0)
    if host_table() is None:
        return removed
    running = leftovers()["netns"]
    if running:
        log.warning("network: kept the host's table inet %s: VMs still run in %s", TABLE, ", ".join(running))
        return removed
    _run([_tool(None, "nft"), "delete", "table", "inet", TABLE], check=False)
    return [*removed, f"nftables table inet {TABLE}"]


def main() -> None:
    """deploy/down.sh: ``python -c 'from drivers.local import network; network.main()'``."""
    for item in remove_all() if problem() is None else []:
        print(f"network: removed {item}")
