# Nomad server agent (three of them form the cluster's Raft quorum).
# Install as /etc/nomad.d/server.hcl. TLS certificates come from `nomad tls ca create` /
# `nomad tls cert create -server` (docs/OPERATIONS.md, "Fleet").

datacenter = "dc1"
data_dir   = "/var/lib/nomad"
bind_addr  = "{{ GetPrivateIP }}"

server {
  enabled          = true
  bootstrap_expect = 3

  # Stopped VM jobs stay queryable for a day; vmgate keeps every job in Postgres anyway and
  # registers it again on start, so garbage collection never loses a VM.
  job_gc_threshold = "24h"

  # VM jobs set memory (the guest's RAM, QEMU's -m) and memory_max (that plus QEMU's own overhead: the task's
  # hard limit); without oversubscription Nomad would make memory the hard limit, and a guest that fills its
  # RAM would get its QEMU killed. Read at the cluster's first start (later: `nomad operator scheduler`).
  default_scheduler_config {
    memory_oversubscription_enabled = true
  }
}

acl {
  enabled = true
}

tls {
  http = true
  rpc  = true

  ca_file   = "/etc/nomad.d/tls/nomad-agent-ca.pem"
  cert_file = "/etc/nomad.d/tls/global-server-nomad.pem"
  key_file  = "/etc/nomad.d/tls/global-server-nomad-key.pem"

  verify_server_hostname = true
  verify_https_client    = false
}

consul {
  address = "127.0.0.1:8500"
}
