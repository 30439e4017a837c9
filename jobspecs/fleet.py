"""What a VM job gets on the nomad target (a fleet): its VNC port, its Consul service and its network.

**VNC** listens on a port Nomad gives the allocation (label ``vnc``); websockify finds it through the Consul
service ``vmgate-vnc`` (tag ``vm-<id>``, meta vm_id/owner/alloc_id, a TCP check), docs/DRIVERS.md.

**Networks** (docs/NETWORK.md "Fleet nodes"):

- ``none``: the group is on the node's own network (``mode = "host"``) and QEMU's VNC listens on the node's
  address at the dynamic port; the NIC is on an empty hub (jobspecs/devices.py), as on the local driver.
- ``outbound``: the group gets a network namespace of its own from Nomad, on the CNI network ``vmgate``
  (``mode = "cni/vmgate"``; nodes install the configuration ``vmgate fleet-node conflist`` prints, with its
  bridge ``vmgate0``, and the node rules ``vmgate fleet-node rules`` prints: drivers/fleetnet.py). QEMU runs
  in that namespace; VNC listens on 5900 in it, which Nomad maps to the dynamic port on the node (CNI
  portmap). The guest's NIC is on QEMU's user-mode network (slirp), whose sockets are QEMU's own, in the
  allocation's namespace: the node's loopback (Nomad, Consul) is another namespace's, and the node rules
  keep the namespace away from the node, from other allocations and from private ranges. QEMU on a fleet
  node runs unprivileged (the task user), which cannot make a tap; slirp needs no privilege.
  The guest sees what the local driver gives it: 10.0.2.15/24, DNS at 10.0.2.2 (slirp forwards it to the
  node's resolvers), so a clone keeps a warm layer's lease; slirp's router is 10.0.2.3 (it refuses DNS and
  router on one address), and answers for 10.0.2.2 as well, so a restored guest's route still works.
"""

from __future__ import annotations

from typing import Any

from jobspecs.hcl import SECOND
from jobspecs.memory import QEMU_OVERHEAD_MB

__all__ = ["CNI_NETWORK", "FLEET_NETDEV", "VNC_PORT_LABEL", "VNC_SERVICE", "fleet_network",
           "fleet_parts", "vnc_arg"]

VNC_PORT_LABEL = "vnc"
VNC_SERVICE = "vmgate-vnc"  # the Consul service every VM's VNC registers as (tag vm-<id>)
VNC_ENV_FILE = "local/vnc.env"
# consul-template: `subtract A B` is B - A. Nomad's dynamic ports (20000-32000 by default) give
# displays 14100-26100, all within QEMU's 5900 + display <= 65535. In a namespace of its own NOMAD_PORT_vnc
# is the port inside it (5900): display 0.
VNC_DISPLAY_TEMPLATE = 'VMGATE_VNC_DISPLAY={{ env "NOMAD_PORT_vnc" | parseInt | subtract 5900 }}\n'
VNC_CHECK = {"Interval": 10 * SECOND, "Timeout": 2 * SECOND}
VNC_INSIDE = 5900  # VNC's port inside an outbound VM's namespace

CNI_NETWORK = "vmgate"  # the CNI network (its conflist's name) of outbound fleet VMs
FLEET_NETDEV = "user,id=net0,net=10.0.2.0/24,host=10.0.2.3,dns=10.0.2.2,dhcpstart=10.0.2.15,ipv6=off"


def vnc_arg(target: str, network: str = "none") -> str:
    """The value of ``-vnc``: the task directory's socket (local), the node's address and display (fleet,
    no network), or every address of the VM's own namespace (fleet, outbound: only the mapped port is
    reached from outside it)."""
    if target == "nomad":
        host = "0.0.0.0" if network == "outbound" else "${NOMAD_IP_vnc}"  # noqa: S104 (its own namespace)
        return f"{host}:${{VMGATE_VNC_DISPLAY}}"
    return "unix:${NOMAD_TASK_DIR}/vnc.sock"


def fleet_network(network: str) -> dict[str, Any]:
    """The group's ``network`` for a VM on ``network``."""
    if network == "outbound":
        return {"Mode": f"cni/{CNI_NETWORK}", "DynamicPorts": [{"Label": VNC_PORT_LABEL, "To": VNC_INSIDE}]}
    return {"Mode": "host", "DynamicPorts": [{"Label": VNC_PORT_LABEL}]}


def fleet_parts(vm: Any, name: str, user: str, cpu_mhz: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the nomad target adds to the job of ``vm`` (a VMSpec): (group fields: network and service, task
    fields: the display template, the unprivileged user QEMU runs as (nomad/README.md), resources with
    QEMU's memory beyond the guest's as the hard limit: Nomad's `-m` is `memory`, and with `memory` alone a
    guest that fills its RAM gets its QEMU killed by the task's cgroup; Nomad honours `memory_max` with memory
    oversubscription on (nomad/server.hcl))."""
    group = {
        "Networks": [fleet_network(vm.network)],
        "Services": [{
            "Name": VNC_SERVICE,
            "PortLabel": VNC_PORT_LABEL,
            "Provider": "consul",
            "Tags": [name],
            "Meta": {"vm_id": vm.id, "owner": vm.owner, "alloc_id": "${NOMAD_ALLOC_ID}"},
            "Checks": [{"Name": "vnc-tcp", "Type": "tcp", **VNC_CHECK}],
        }],
    }
    task = {"Templates": [{"EmbeddedTmpl": VNC_DISPLAY_TEMPLATE, "DestPath": VNC_ENV_FILE, "Envvars": True,
                           "ChangeMode": "noop"}], **({"User": user} if user else {}),
            "Resources": {"CPU": vm.cpu * cpu_mhz, "MemoryMB": vm.memory_mb,
                          "MemoryMaxMB": vm.memory_mb + QEMU_OVERHEAD_MB}}
    return group, task
