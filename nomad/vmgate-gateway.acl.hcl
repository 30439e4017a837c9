# ACL policy for the gateway's Nomad token (NOMAD_TOKEN). Least privilege: the gateway submits,
# reads, stops and purges VM jobs in its namespace and reads their logs (the serial console);
# nothing on nodes, agents, other namespaces, variables or ACLs.
#
#   nomad namespace apply -description "vmgate VMs" vmgate
#   nomad acl policy apply -description "vmgate gateway" vmgate-gateway nomad/vmgate-gateway.acl.hcl
#   nomad acl token create -name vmgate-gateway -policy vmgate-gateway -type client
#
# The namespace must match NOMAD_NAMESPACE. /v1/status/leader (the driver's health check) needs no token.

# Only capabilities, no `policy = "deny"`: in Nomad a deny wins over every capability next to it (the
# token could do nothing); anything not granted here is denied anyway.
namespace "vmgate" {
  # list-jobs: GET /v1/jobs?prefix=vm-          read-job: jobs, allocations, evaluations
  # submit-job: register, deregister and purge   read-logs: GET /v1/client/fs/logs/<alloc>
  capabilities = ["list-jobs", "read-job", "submit-job", "read-logs"]
}
