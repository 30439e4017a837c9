"""VM networks without a VM (issue 15, docs/NETWORK.md): the jobs the renderer writes and the local driver
accepts, the rules and limits rendered from the settings (checked by nftables itself where it is installed),
the settings' bounds, and what the API says about a VM's network (fake driver). tests/test_network.py runs
the real thing."""

from __future__ import annotations

import copy
import ipaddress
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from drivers import fleetnet
from drivers.base import JobInvalid
from drivers.fake import FakeDriver
from drivers.local import network
from drivers.local.job import build_task
from gateway.cli.main import main
from gateway.config import ConfigError, Settings
from jobspecs import DEFAULT_CATALOG, JobSettings, VMSpec, load_catalog, render_job, with_network
from jobspecs.devices import NETDEVS
from jobspecs.fleet import FLEET_NETDEV
from jobspecs.render import JobSpecError
from tests.conftest import VM, Session, assert_envelope

TASK_DIR = Path("/tmp/vg/tasks/net")


def job_for(net: str, target: str = "local") -> dict[str, Any]:
    template = load_catalog(DEFAULT_CATALOG, Path("/srv/images"))["tiny"]
    spec = VMSpec.for_template(template, id="net", owner="1", overlay_path="/srv/vms/net.qcow2", network=net)
    return render_job(spec, template, JobSettings(target=target))


def args_of(job: dict[str, Any]) -> list[str]:
    args: list[str] = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    return args


def test_the_job_carries_one_nic_on_a_tap_or_an_empty_hub() -> None:
    outbound, none = job_for("outbound"), job_for("none")
    assert outbound["Meta"]["network"] == "outbound" and none["Meta"]["network"] == "none"
    assert args_of(outbound)[args_of(outbound).index("-netdev") + 1] == NETDEVS["outbound"]
    assert args_of(none)[args_of(none).index("-netdev") + 1] == NETDEVS["none"]
    # The same device either way (a warm layer saved on one restores on the other), and never slirp.
    same = [a for a in args_of(outbound) if a != NETDEVS["outbound"]]
    assert same == [a for a in args_of(none) if a != NETDEVS["none"]]
    assert "-nic" not in same and not any(a.startswith("user") for a in same)
    assert build_task("net", outbound, TASK_DIR).network == "outbound"
    assert build_task("net", none, TASK_DIR).network == "none"
    with pytest.raises(JobSpecError, match="network"):
        job_for("bridged")
    # The local driver's own check refuses a job rendered for a fleet (slirp, VNC on TCP).
    with pytest.raises(JobInvalid):
        build_task("net", job_for("outbound", target="nomad"), TASK_DIR)


def test_a_fleet_job_puts_an_outbound_vm_in_a_namespace_of_its_own() -> None:
    """jobspecs/fleet.py: an outbound fleet VM's group is on the CNI network vmgate with VNC on 5900 inside it
    (mapped to the dynamic port), its NIC on slirp with the local driver's addresses; a `none` VM stays on the
    node's network with an empty hub. The same device either way, so with_network swaps it, VNC included."""
    outbound, none = job_for("outbound", target="nomad"), job_for("none", target="nomad")
    out_group, none_group = outbound["TaskGroups"][0], none["TaskGroups"][0]
    assert out_group["Networks"] == [{"Mode": "cni/vmgate", "DynamicPorts": [{"Label": "vnc", "To": 5900}]}]
    assert none_group["Networks"] == [{"Mode": "host", "DynamicPorts": [{"Label": "vnc"}]}]
    netdev = args_of(outbound)[args_of(outbound).index("-netdev") + 1]
    assert netdev == FLEET_NETDEV and "dns=10.0.2.2" in netdev and "restrict" not in netdev and "hostfwd" not in netdev
    assert args_of(outbound)[args_of(outbound).index("-vnc") + 1] == "0.0.0.0:${VMGATE_VNC_DISPLAY}"
    assert args_of(none)[args_of(none).index("-vnc") + 1] == "${NOMAD_IP_vnc}:${VMGATE_VNC_DISPLAY}"
    assert args_of(none)[args_of(none).index("-netdev") + 1] == NETDEVS["none"]
    assert [a for a in args_of(outbound) if a not in (netdev, "0.0.0.0:${VMGATE_VNC_DISPLAY}")] == \
        [a for a in args_of(none) if a not in (NETDEVS["none"], "${NOMAD_IP_vnc}:${VMGATE_VNC_DISPLAY}")]
    for start, goal in ((none, outbound), (outbound, none)):
        changed = with_network(start, goal["Meta"]["network"])
        assert changed["TaskGroups"][0]["Networks"] == goal["TaskGroups"][0]["Networks"]
        assert args_of(changed) == args_of(goal) and changed["Meta"]["network"] == goal["Meta"]["network"]


@pytest.mark.parametrize("change", [
    lambda args, meta: args.__setitem__(args.index("-netdev") + 1, "user,id=net0,hostfwd=tcp::2222-:22"),
    lambda args, meta: args.extend(["-nic", "user"]),
    lambda args, meta: args.extend(["-net", "nic"]),
    lambda args, meta: args.extend(["-netdev", "hubport,id=net1,hubid=0"]),  # a second NIC
    lambda args, meta: args.__setitem__(args.index("-netdev") + 1, NETDEVS["outbound"]),  # a tap, Meta says none
    lambda args, meta: meta.__setitem__("network", "outbound"),  # Meta says outbound, no tap
    lambda args, meta: meta.__setitem__("network", "everything"),
    lambda args, meta: args.__setitem__(args.index("-netdev") + 1, "tap,id=net0,ifname=eth0,script=/bin/sh"),
], ids=["slirp", "nic-user", "net-nic", "second-nic", "tap-without-meta", "meta-without-tap", "unknown-meta",
        "other-tap"])
def test_the_local_driver_refuses_any_other_network(change: Any) -> None:
    job = copy.deepcopy(job_for("none"))
    change(args_of(job), job["Meta"])
    with pytest.raises(JobInvalid):
        build_task("net", job, TASK_DIR)


def test_the_rules_follow_the_settings() -> None:
    config = network.NetworkConfig(dns=(ipaddress.IPv4Address("10.255.255.53"),),
                                   egress_allow=(ipaddress.IPv4Network("10.1.2.0/24"),),
                                   egress_deny=(ipaddress.IPv4Network("203.0.113.0/24"),), conn_rate=7, conn_max=9)
    rules = network.host_rules(config)
    forward = rules[rules.index("chain forward"):rules.index("chain postrouting")]
    order = ['oifname "vmg-*" ct state established,related accept', 'comment "into-vm"', "@egress_deny",
             "ct count over 9", "limit rate over 7/second burst 14 packets", "@dns", "@egress_allow", "@denied",
             'comment "outbound"']
    at = [forward.index(needle) for needle in order]
    assert at == sorted(at), "deny before the limits, the limits before any accept, private ranges last"
    for cidr in network.DENIED:
        assert cidr in rules
    assert "elements = { 10.1.2.0/24 }" in rules and "elements = { 203.0.113.0/24 }" in rules
    assert 'iifname "vmg-*" counter drop comment "to-host"' in rules  # nothing from a VM reaches the host
    unlimited = network.host_rules(network.NetworkConfig(conn_rate=0, conn_max=0))
    assert "ct count" not in unlimited and "limit rate" not in unlimited
    assert network.shaping("vmg-3", 8)[-6:] == ["rate", "8mbit", "burst", "20000", "latency", "100ms"]
    assert network.addresses(network.NetworkConfig(), 0) == ("10.237.0.5", "10.237.0.6")
    assert network.NetworkConfig().slots() == 16383
    inside = network.namespace_rules(network.NetworkConfig(uplink=False))
    assert "policy drop" in inside and 'oifname "eth0"' not in inside.split("chain forward")[1].split("chain post")[0]
    if shutil.which("nft") and network.problem() is None:  # nftables itself reads them
        subprocess.run(["nft", "-c", "-f", "-"], input=rules, text=True, check=True)


def test_a_fleet_nodes_network_and_rules_follow_the_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """`vmgate fleet-node conflist|rules` (drivers/fleetnet.py): the CNI network of outbound fleet VMs with the
    bandwidth cap, and the node's tables: the local driver's rules on the bridge, the console's mapped port let
    in, answers to the node let back, nothing across the bridge from one allocation to another."""
    config = network.NetworkConfig(dns=(ipaddress.IPv4Address("10.255.255.53"),), bandwidth_mbit=8, conn_rate=7)
    cni = fleetnet.conflist(config)
    assert cni["name"] == "vmgate" and [p["type"] for p in cni["plugins"]] == ["loopback", "bridge", "portmap",
                                                                               "bandwidth"]
    assert cni["plugins"][1]["bridge"] == fleetnet.BRIDGE and not cni["plugins"][1]["ipMasq"]
    assert cni["plugins"][3]["ingressRate"] == cni["plugins"][3]["egressRate"] == 8_000_000
    assert "bandwidth" not in json.dumps(fleetnet.conflist(network.NetworkConfig(bandwidth_mbit=0)))
    rules = fleetnet.node_rules(config)
    forward = rules[rules.index("chain forward"):rules.index("chain postrouting")]
    order = ['oifname "vmgate0" ct state established,related accept', 'oifname "vmgate0" ct status dnat tcp dport '
             '5900 accept', 'comment "into-vm"', "limit rate over 7/second", "@dns", "@denied", 'comment "outbound"']
    at = [forward.index(needle) for needle in order]
    assert at == sorted(at)
    assert 'iifname "vmgate0" counter drop comment "to-host"' in rules and "10.236.0.0/16" in rules
    assert "table bridge vmgate_fleet" in rules and 'ip saddr 10.236.0.0/16 counter drop comment "vm-to-vm"' in rules
    assert main(["fleet-node", "rules"]) == 0 and "table inet vmgate_fleet {" in capsys.readouterr().out
    assert main(["fleet-node", "conflist"]) == 0 and json.loads(capsys.readouterr().out)["name"] == "vmgate"
    if shutil.which("nft") and network.problem() is None:  # nftables itself reads them
        subprocess.run(["nft", "-c", "-f", "-"], input=rules, text=True, check=True)


def test_network_settings_are_checked(tmp_path: Path) -> None:
    base = {"POSTGRES_URL": "postgresql://x@127.0.0.1/x", "REDIS_URL": "redis://127.0.0.1", "JWT_SECRET": "s" * 32}
    settings = Settings.load({**base, "EGRESS_ALLOW": "10.1.0.0/16, 192.168.5.5", "VM_DNS": "9.9.9.9"},
                             dotenv=tmp_path / "none")
    assert settings.egress_allow == (ipaddress.IPv4Network("10.1.0.0/16"), ipaddress.IPv4Network("192.168.5.5/32"))
    assert settings.vm_dns == (ipaddress.IPv4Address("9.9.9.9"),) and settings.vm_network == "outbound"
    for key, value in (("VM_NET_POOL", "10.0.0.0/8"), ("VM_NET_POOL", "10.9.0.0/28"), ("EGRESS_DENY", "2001:db8::/32"),
                       ("VM_DNS", "10.0.0.0/24"), ("VM_NETWORK", "bridge"), ("VM_BANDWIDTH_MBIT", "-1")):
        with pytest.raises(ConfigError, match=key):
            Settings.load({**base, key: value}, dotenv=tmp_path / "none")


async def test_the_api_gives_the_templates_network_or_the_one_asked_for(server: Any, sessions: Any,
                                                                        fake_driver: FakeDriver) -> None:
    s: Session = sessions(server)
    await s.signup_and_login()
    status, vm = await s.request("POST", "/api/vms?wait=30", json=VM)
    assert status == 201 and vm["network"] == "outbound", vm
    status, job = await s.request("GET", f"/api/vms/{vm['vm_id']}/jobspec")
    assert job["Job"]["Meta"]["network"] == "outbound"
    status, quiet = await s.request("POST", "/api/vms?wait=30", json={**VM, "network": "none"})
    assert status == 201 and quiet["network"] == "none"
    assert (await s.request("GET", f"/api/vms/{quiet['vm_id']}"))[1]["network"] == "none"
    for bad in ("wifi", 1, ["outbound"]):
        error = assert_envelope(*await s.request("POST", "/api/vms", json={**VM, "network": bad}), 422,
                                "validation_failed")
        assert error["details"]["field"] == "network"
    # An installation that gives no network: the default falls back to none, asking for one is a conflict.
    fake_driver.offered_networks = ("none",)
    error = assert_envelope(*await s.request("POST", "/api/vms", json={**VM, "network": "outbound"}), 409,
                            "not_supported")
    assert error["details"]["offered"] == ["none"]
    assert len((await s.request("GET", "/api/me/vms"))[1]["vms"]) == 2  # the refused create left nothing


async def test_a_stopped_vm_changes_its_network(server: Any, sessions: Any, fake_driver: FakeDriver) -> None:
    s: Session = sessions(server)
    await s.signup_and_login()
    other: Session = sessions(server)
    await other.signup_and_login()
    status, vm = await s.request("POST", "/api/vms?wait=30", json=VM)
    path = f"/api/vms/{vm['vm_id']}"
    assert_envelope(*await s.request("PATCH", path, json={"network": "none"}), 409, "invalid_state")
    assert (await s.request("POST", f"{path}/stop?wait=30"))[0] == 200
    assert_envelope(*await other.request("PATCH", path, json={"network": "none"}), 404)
    for body in ({}, {"network": "wifi"}, {"network": "none", "cpu": 2}):
        assert_envelope(*await s.request("PATCH", path, json=body), 422, "validation_failed")
    status, changed = await s.request("PATCH", path, json={"network": "none"})
    assert status == 200 and changed["network"] == "none", changed
    job = (await s.request("GET", f"{path}/jobspec"))[1]["Job"]
    assert job["Meta"]["network"] == "none" and NETDEVS["none"] in args_of(job)
    # The next start runs the changed job.
    assert (await s.request("POST", f"{path}/start?wait=30"))[0] == 200
    assert fake_driver.vms[vm["vm_id"]].job["Meta"]["network"] == "none"
    assert (await s.request("POST", f"{path}/stop?wait=30"))[0] == 200
    fake_driver.offered_networks = ("none",)
    assert_envelope(*await s.request("PATCH", path, json={"network": "outbound"}), 409, "not_supported")
    audit = (await s.request("GET", "/api/me/audit"))[1]["entries"]
    assert any(e["action"] == "vm.network" and e["details"] == {"from": "outbound", "to": "none"} for e in audit), audit
