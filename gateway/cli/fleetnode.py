"""``vmgate fleet-node conflist|rules``: what a fleet's VM node installs for outbound VMs (drivers/fleetnet.py,
docs/NETWORK.md "Fleet nodes"), from this installation's settings: the CNI network ``vmgate`` for Nomad's
``cni_config_dir``, and the node's nftables rules for ``nft -f``. Neither needs Postgres or Nomad."""

from __future__ import annotations

import json
from typing import Any

from drivers.fleetnet import conflist, node_rules
from drivers.local.network import NetworkConfig, host_resolvers
from gateway.config import Settings


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("fleet-node", help="a VM node's CNI network (conflist) or nftables rules (rules)",
                                 description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("what", choices=("conflist", "rules"), help="which file to print")


def run(settings: Settings, args: Any) -> str:
    config = NetworkConfig(dns=settings.vm_dns or host_resolvers(), egress_allow=settings.egress_allow,
                           egress_deny=settings.egress_deny, bandwidth_mbit=settings.vm_bandwidth_mbit,
                           conn_rate=settings.vm_conn_rate, conn_max=settings.vm_conn_max)
    return json.dumps(conflist(config), indent=2) if args.what == "conflist" else node_rules(config).rstrip("\n")
