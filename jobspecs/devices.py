"""The devices of a VM beyond its disk, by template (``qemu_args`` in jobspecs/render.py adds them).

Every VM: ``-nodefaults`` (no CD-ROM, floppy, default NIC), the serial console on stdio, one virtio NIC
(below), and virtio-rng (the host's entropy; a clone of a warm template reseeds its RNG from it).

Every VM also has a **second serial port** (the guest's ttyS1) on a unix socket in its task directory,
``wake.sock``. The local driver writes a line to it after every restore, and says so on the kernel command
line (``vmgate.wake=ttyS1``, ``WAKE_CMDLINE``): the guest's ``vmgate-clone-watch`` then waits in ``read`` on
ttyS1 and looks whether it is a new clone when the line comes (docs/IMAGES.md, "How a clone becomes a machine
of its own"). Before, the watcher looked five times a second, three quarters of an idle clone's CPU
(docs/BENCHMARKS.md). A fleet VM has the same port, so that a memory state saved under one driver loads
under the other (QEMU refuses a state that holds a device it does not have), but no one on a Nomad node
writes to it: its command line does not say ``vmgate.wake``, and its watcher keeps looking by itself.

**The NIC** is the same device with the same MAC in every VM, whatever its network (``VMSpec.network``,
docs/NETWORK.md): ``outbound`` connects it to ``tap0``, which the local driver makes in the VM's own network
namespace (drivers/local/network.py); ``none`` to a hub port with nothing else on the hub, so frames go
nowhere. QEMU's user-mode network (slirp) is used only by an outbound VM on a fleet node, inside the
allocation's own namespace (jobspecs/fleet.py); anywhere else its guest would reach the host's loopback
(Postgres, Redis, the gateway). One device for both lets any VM restore a warm layer saved with either,
which is why the tap runs without ``vnet_hdr``: with it the guest negotiates offloads a hub port cannot offer, and QEMU
refuses such a state on a hub port ("saved image requires vnet_hdr=on").

A text template (catalog ``"desktop": false``) has the standard VGA: the text console, 720x400.

A desktop template (``"desktop": true``, docs/CONSOLE.md "Desktop templates") has:

- **virtio-vga**: QEMU's VNC server forwards a client's SetDesktopSize (noVNC's "remote resizing") to it as
  the display's preferred size, the guest kernel reports a hotplug, and the guest applies the mode
  (images/debian-12-desktop: vmgate-resize). The standard VGA has a fixed mode list and answers
  SetDesktopSize with "invalid screen layout".
- **virtio-tablet-pci**: an absolute pointer, so the guest's cursor is where the browser's is.
- a **virtio-serial bus** for **qemu-vdagent** on a port named ``com.redhat.spice.0``: QEMU's own SPICE agent
  end, which carries the clipboard between the guest's spice-vdagent and QEMU's clipboard, which the VNC
  server offers to the browser (the extended clipboard pseudo-encoding noVNC speaks). The job names it in
  ``Meta.clipboard``; the chardev and port are plugged in over QMP once the VM runs, because QEMU 7.2's
  qemu-vdagent blocks migration (drivers/local/vdagent.py).
"""

from __future__ import annotations

from typing import Any

from jobspecs.fleet import FLEET_NETDEV

__all__ = ["CLIPBOARD_META", "NETDEVS", "NETWORKS", "NIC_MAC", "SERIAL_BUS", "VDAGENT_PORT", "WAKE_CMDLINE",
           "WAKE_SOCKET", "devices", "netdev"]

VDAGENT_PORT = "com.redhat.spice.0"  # the port name spice-vdagentd opens in the guest
SERIAL_BUS = "vmgate-serial"

TEXT = ("-vga", "std")
DESKTOP_DISPLAY = ("-vga", "none", "-device", "virtio-vga")
NETWORKS = ("outbound", "none")
NIC_MAC = "52:54:00:76:6d:01"
NETDEVS = {"outbound": "tap,id=net0,ifname=tap0,script=no,downscript=no,vnet_hdr=off",
           "none": "hubport,id=net0,hubid=0"}
NIC = ("-device", f"virtio-net-pci,netdev=net0,mac={NIC_MAC}")
COMMON = ("-serial", "stdio")
WAKE_SOCKET = "wake.sock"  # in the task directory
WAKE = ("-serial", f"unix:${{NOMAD_TASK_DIR}}/{WAKE_SOCKET},server=on,wait=off")
WAKE_CMDLINE = "vmgate.wake=ttyS1"  # on the local driver's kernel command lines: "ttyS1 will be poked"
RNG = ("-device", "virtio-rng-pci")
DESKTOP = ("-device", "virtio-tablet-pci", "-device", f"virtio-serial-pci,id={SERIAL_BUS}")
CLIPBOARD_META = {"clipboard": "vdagent"}  # job Meta of a desktop: the local driver plugs the clipboard in


def netdev(network: str, target: str = "local") -> str:
    """The NIC's backend for a VM on ``network`` on ``target`` (local or nomad)."""
    return FLEET_NETDEV if network == "outbound" and target == "nomad" else NETDEVS[network]


def devices(template: Any, network: str = "none", target: str = "local") -> list[str]:
    """QEMU arguments for the devices of a VM of ``template`` (a ``jobspecs.catalog.Template``) on ``network``."""
    common = [*COMMON, *WAKE, "-netdev", netdev(network, target), *NIC, *RNG]
    if template.desktop:
        return ["-nodefaults", *DESKTOP_DISPLAY, *common, *DESKTOP]
    return ["-nodefaults", *TEXT, *common]
