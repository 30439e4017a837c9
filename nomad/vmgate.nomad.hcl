# vmgate's own services on the cluster: the gateway and websockify (the console proxy).
# nginx (TLS, /api and /vnc) stays on the edge hosts (deploy/nginx.conf.in), pointed at the
# vmgate-gateway and vmgate-console services in Consul.
#
#   nomad var put -namespace vmgate nomad/jobs/vmgate @vmgate-secrets.json   # POSTGRES_URL, REDIS_URL, JWT_SECRET, NOMAD_TOKEN
#   nomad job run -namespace vmgate nomad/vmgate.nomad.hcl
#
# raw_exec: the gateway runs from a checkout with its venv at /opt/vmgate on nodes whose client
# enables raw_exec and sets meta vmgate_role = "control"; the gateway needs /srv/vmgate (shared
# storage: it creates the overlays with qemu-img) and qemu-img.

job "vmgate" {
  namespace   = "vmgate"
  datacenters = ["dc1"]
  type        = "service"

  constraint {
    attribute = "${meta.vmgate_role}"
    value     = "control"
  }

  group "gateway" {
    count = 1

    # Leave Consul (and so nginx's upstream list) 5 s before the task is stopped.
    shutdown_delay = "5s"

    network {
      port "http" {}
    }

    service {
      name     = "vmgate-gateway"
      port     = "http"
      provider = "consul"

      check {
        type     = "http"
        path     = "/api/healthz"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "gateway" {
      driver = "raw_exec"
      # The account that owns /srv/vmgate/vms (the overlays, mode 0600) and that VM tasks run QEMU as
      # (NOMAD_TASK_USER, the VM job's task user): neither the gateway nor any QEMU runs as root. Create it
      # with the same uid on every node: useradd --system --no-create-home --shell /usr/sbin/nologin vmgate
      user = "vmgate"

      config {
        command = "/opt/vmgate/.venv/bin/python"
        args    = ["-m", "gateway"]
      }

      env {
        PYTHONUNBUFFERED = "1"
        GATEWAY_HOST     = "${NOMAD_IP_http}"
        GATEWAY_PORT     = "${NOMAD_PORT_http}"
        VMGATE_DRIVER    = "nomad"
        NOMAD_NAMESPACE  = "vmgate"
        NOMAD_ADDR       = "https://nomad.service.consul:4646"
        NOMAD_CACERT     = "/etc/nomad.d/tls/nomad-agent-ca.pem"
        DATA_DIR         = "/srv/vmgate/data"
        VMS_ROOT         = "/srv/vmgate/vms"
        IMAGES_DIR       = "/srv/vmgate/images"
        PUBLIC_URL       = "https://vmgate.example.org"
      }

      # Secrets from Nomad Variables, never in the job file.
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/vmgate" }}
          POSTGRES_URL={{ .POSTGRES_URL }}
          REDIS_URL={{ .REDIS_URL }}
          JWT_SECRET={{ .JWT_SECRET }}
          NOMAD_TOKEN={{ .NOMAD_TOKEN }}
          {{ end }}
        EOT
        destination = "secrets/vmgate.env"
        env         = true
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "console" {
    count = 1

    shutdown_delay = "5s"

    network {
      port "ws" {}
    }

    service {
      name     = "vmgate-console"
      port     = "ws"
      provider = "consul"

      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "websockify" {
      driver = "raw_exec"

      config {
        # websockify's command line through console/proxy.py, which answers the VMs' VNC passwords.
        command = "/opt/vmgate/.venv/bin/python"
        args = [
          "-m", "console.proxy",
          "--token-plugin", "console.token_plugin.RedisTokens",
          "--token-source", "env:REDIS_URL",
          "--auth-plugin", "websockify.auth_plugins.ExpectOrigin",
          "--auth-source", "https://vmgate.example.org",
          "${NOMAD_IP_ws}:${NOMAD_PORT_ws}",
        ]
      }

      env {
        PYTHONPATH       = "/opt/vmgate"
        PYTHONUNBUFFERED = "1"
      }

      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/vmgate" }}REDIS_URL={{ .REDIS_URL }}{{ end }}
        EOT
        destination = "secrets/console.env"
        env         = true
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
