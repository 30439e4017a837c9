"""What a fleet node needs for outbound VMs (docs/NETWORK.md "Fleet nodes"): Nomad's CNI network ``vmgate``
and the node's nftables rules. An outbound VM's job (jobspecs/fleet.py) asks Nomad for ``mode = "cni/vmgate"``:
the allocation gets a network namespace of its own, joined to the bridge ``vmgate0`` with an address of
``FLEET_POOL``; QEMU runs in it with the guest on QEMU's user-mode network::

    guest 10.0.2.15 ── slirp (QEMU, in the allocation's namespace) ── eth0 10.236.x.y ┐
                                                                   veth, bridge vmgate0 10.236.0.1 (the node)
    node: nftables inet vmgate_fleet: as the local driver's host table (drivers/local/network.py) with vmgate0
          for the VMs' links: nothing reaches the node itself, nothing new gets in but the console's mapped
          port, no private ranges, connections counted and rate-limited per VM; masquerade out.
          nftables bridge vmgate_fleet: nothing crosses the bridge from one allocation to another (IPv4: the
          guest's frames never reach the bridge; only QEMU's own sockets do, and slirp runs with ipv6=off).

The CNI plugins (Debian's containernetworking-plugins, in /usr/lib/cni): loopback, bridge with host-local
addresses, portmap (VNC's dynamic port on the node to 5900 in the namespace) and bandwidth (VM_BANDWIDTH_MBIT
each way, a token bucket like the local driver's). The node masquerades (the rules), not the bridge plugin.

    vmgate fleet-node conflist > /opt/cni/config/vmgate.conflist   # Nomad's cni_config_dir
    vmgate fleet-node rules > /etc/nftables.d/vmgate.nft          # nft -f it at every boot

Both follow the gateway's settings (.env: VM_BANDWIDTH_MBIT, VM_CONN_RATE, VM_CONN_MAX, EGRESS_ALLOW,
EGRESS_DENY, VM_DNS; gateway/cli/fleetnode.py); the allocations' addresses are FLEET_POOL on every node.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from drivers.local.network import NetworkConfig, host_rules
from jobspecs.fleet import CNI_NETWORK, VNC_INSIDE

__all__ = ["BRIDGE", "FLEET_POOL", "TABLE", "conflist", "node_rules"]

BRIDGE = "vmgate0"
FLEET_POOL = ipaddress.IPv4Network("10.236.0.0/16")  # the allocations' addresses on every node (node-local)
TABLE = "vmgate_fleet"  # on a node that also runs the local driver, its table (vmgate) stays apart


def conflist(config: NetworkConfig, pool: ipaddress.IPv4Network = FLEET_POOL) -> dict[str, Any]:
    """The CNI network configuration list ``vmgate`` (JSON) for Nomad's ``cni_config_dir``."""
    plugins: list[dict[str, Any]] = [
        {"type": "loopback"},
        {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": str(pool)}]], "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    ]
    if config.bandwidth_mbit:
        rate = config.bandwidth_mbit * 1_000_000  # bits per second
        burst = max(16 * 1024 * 8, rate // 50)  # bits: 20 ms at the rate, as the local driver's bucket
        plugins.append({"type": "bandwidth", "ingressRate": rate, "ingressBurst": burst,
                        "egressRate": rate, "egressBurst": burst})
    return {"cniVersion": "1.0.0", "name": CNI_NETWORK, "plugins": plugins}


def node_rules(config: NetworkConfig, pool: ipaddress.IPv4Network = FLEET_POOL) -> str:
    """The node's tables, for ``nft -f`` (each replaces its previous self atomically)."""
    inet = host_rules(NetworkConfig(pool=pool, dns=config.dns, egress_allow=config.egress_allow,
                                    egress_deny=config.egress_deny, conn_rate=config.conn_rate,
                                    conn_max=config.conn_max),
                      vm=f'"{BRIDGE}"', table=TABLE, let_in=f"ct status dnat tcp dport {VNC_INSIDE}")
    return inet + "\n".join([
        f"table bridge {TABLE} {{}}",
        f"delete table bridge {TABLE}",
        f"table bridge {TABLE} {{",
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        f'        ether type ip ip saddr {pool} counter drop comment "vm-to-vm"',
        f"        ether type ip ip daddr {pool} counter drop",
        "    }",
        "}",
        "",
    ])
