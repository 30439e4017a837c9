# Nomad client agent for a node that runs vmgate VMs (the `qemu` task driver).
# Install as /etc/nomad.d/client.hcl next to a common.hcl holding datacenter, data_dir, tls and acl.
# Paths assume the operator layout of docs/OPERATIONS.md ("Fleet"): IMAGES_DIR=/srv/vmgate/images and
# VMS_ROOT=/srv/vmgate/vms, both on storage every node mounts at the same path.
# VM tasks run QEMU as the account NOMAD_TASK_USER names (default vmgate, the owner of the overlays):
# create it on every VM node with the same uid as on the gateway's node (nomad/vmgate.nomad.hcl).

data_dir  = "/var/lib/nomad"
bind_addr = "{{ GetPrivateIP }}"

client {
  enabled = true
  servers = ["nomad-server-1:4647", "nomad-server-2:4647", "nomad-server-3:4647"]

  # Static ports of other software stay out of Nomad's hands; VNC ports come from the dynamic
  # range (20000-32000), each VM gets one (${NOMAD_PORT_vnc}).
  reserved {
    reserved_ports = "22"
  }

  meta {
    vmgate_role = "vms"
  }

  # Outbound VMs (NOMAD_OUTBOUND=true on the gateway) run in a network namespace of their own on the CNI
  # network `vmgate`: Debian's containernetworking-plugins, and the conflist `vmgate fleet-node conflist`
  # prints (drivers/fleetnet.py), with the node rules `vmgate fleet-node rules` prints loaded by nftables at
  # boot (docs/NETWORK.md "Fleet nodes").
  cni_path       = "/usr/lib/cni"
  cni_config_dir = "/opt/cni/config"
}

tls {
  http = true
  rpc  = true

  ca_file   = "/etc/nomad.d/tls/nomad-agent-ca.pem"
  cert_file = "/etc/nomad.d/tls/global-client-nomad.pem"
  key_file  = "/etc/nomad.d/tls/global-client-nomad-key.pem"

  verify_server_hostname = true
  verify_https_client    = false
}

consul {
  # The local Consul agent (consul/agent.hcl): VM jobs register their VNC service through it.
  address = "127.0.0.1:8500"
}

plugin "qemu" {
  config {
    # image_path of a VM job is its overlay under VMS_ROOT; the base images and warm layers (its
    # backing files), the boot loaders in -kernel and the saved states in -incoming are under IMAGES_DIR.
    image_paths = ["/srv/vmgate/images", "/srv/vmgate/vms"]

    # Exactly the flags jobspecs.render puts in a VM job's args (tests/test_fleet.py checks it):
    # the boot loader (-kernel, GRUB) and the kernel command line it reads (-smbios type=11), vCPUs, VNC, QMP, QEMU's
    # seccomp sandbox, only the devices a VM needs (-nodefaults, -vga std, -serial stdio: the serial console
    # is the task's stdout), one NIC (-netdev: an empty hub, or for an outbound VM QEMU's user-mode network
    # inside the allocation's own namespace: jobspecs/fleet.py), virtio-rng (-device), the VM's
    # name for the guest (-fw_cfg), and the restore of a warm template's saved state on a warm VM's
    # first start (-incoming "exec:cat IMAGES_DIR/warm/<template>/<id>/state", with
    # -set drive.image0.file.auto-read-only=off: docs/IMAGES.md "Warm templates").
    # The allowlist is per flag: -netdev, -device, -fw_cfg, -smbios (file=), -set and -incoming "exec:" accept anything QEMU
    # does (a device, a host file copied into the guest, any option, a shell command), so only the
    # gateway may submit VM jobs (the Nomad ACL policy, docs/SECURITY.md). -loadvm TAG starts a VM from an
    # internal snapshot of its own disk (a resume or a restore: docs/SNAPSHOTS.md). -object carries each
    # start's VNC password (secret,id=vmgate-vnc,data=...: jobspecs/vnc_password.py).
    args_allowlist = [
      "-smp",
      "-kernel",
      "-smbios",
      "-vnc",
      "-qmp",
      "-sandbox",
      "-nodefaults",
      "-vga",
      "-serial",
      "-netdev",
      "-device",
      "-fw_cfg",
      "-set",
      "-incoming",
      "-loadvm",
      "-object",
    ]

    emulators_allowlist = ["x86_64"]
  }
}

# raw_exec is off on VM nodes; only nodes with vmgate_role = "control" (that run nomad/vmgate.nomad.hcl)
# enable it in their own client configuration.
plugin "raw_exec" {
  config {
    enabled = false
  }
}
