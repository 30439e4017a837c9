# Consul agent in client mode on every Nomad node (servers: the same file with `server = true`,
# `bootstrap_expect = 3` and `ui_config { enabled = true }`).
# Install as /etc/consul.d/agent.hcl.
#
# Service names vmgate uses (docs/OPERATIONS.md, "Fleet"):
#   vmgate-vnc       one instance per running VM, registered by its Nomad job; tag vm-<vm id>,
#                    meta vm_id and owner; a TCP check on the VNC port every 10 s
#   vmgate-gateway   the gateway (nomad/vmgate.nomad.hcl), HTTP check on /api/healthz
#   vmgate-console   websockify, TCP check

datacenter = "dc1"
data_dir   = "/var/lib/consul"

# Gossip and RPC on the node's private address; the HTTP API only for the local Nomad agent and
# the gateway's node.
bind_addr   = "{{ GetPrivateIP }}"
client_addr = "127.0.0.1"

retry_join = ["consul-server-1", "consul-server-2", "consul-server-3"]

ports {
  grpc = 8502
}

acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
}
