"""Settings, read once at start-up from the environment and an optional `.env` file.

Environment variables win over `.env`. A missing or malformed value raises ``ConfigError``
naming the key, which stops start-up.

Over 400 lines: one declaration per setting (each with its check and its description, the source of
`.env.example`), and they belong together.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A configuration value is missing or malformed."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config {key}: {problem}")
        self.key = key


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines; blank lines and # comments are skipped; quotes are stripped."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{path}:{lineno}", "expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _url(schemes: tuple[str, ...], optional: bool = False) -> Callable[[str, str], str]:
    def parse(key: str, value: str) -> str:
        if optional and value == "":
            return value
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.netloc or parts.query):
            raise ConfigError(key, f"expected a URL with scheme {'/'.join(schemes)}, got {value!r}")
        return value.rstrip("/") if parts.scheme in ("http", "https", "ws", "wss") else value

    return parse


def _number(kind: type, lo: float, hi: float) -> Callable[[str, str], Any]:
    noun = "an integer" if kind is int else "a number"

    def parse(key: str, value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise ConfigError(key, f"expected {noun}, got {value!r}") from None
        if not lo <= number <= hi:
            raise ConfigError(key, f"must be between {lo:g} and {hi:g}, got {number:g}")
        return number

    return parse


def _int(lo: int, hi: int) -> Callable[[str, str], int]:
    return _number(int, lo, hi)


def _float(lo: float, hi: float) -> Callable[[str, str], float]:
    return _number(float, lo, hi)


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(key: str, value: str) -> str:
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _path(key: str, value: str) -> Path:
    if not value:
        raise ConfigError(key, "must not be empty")
    path = Path(value)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def _optional_path(key: str, value: str) -> Path | None:
    return _path(key, value) if value else None


def _secret(key: str, value: str) -> str:
    if len(value) < 32:
        raise ConfigError(key, "must be at least 32 characters (make run writes a random one to .env)")
    return value


def _old_secrets(key: str, value: str) -> tuple[str, ...]:
    secrets = tuple(v.strip() for v in value.split(",") if v.strip())
    for secret in secrets:
        _secret(key, secret)
    return secrets


def _str(key: str, value: str) -> str:
    return value


def _bool(key: str, value: str) -> bool:
    if value not in ("true", "false"):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value == "true"


def _host(key: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ConfigError(key, f"expected a host name or address, got {value!r}")
    return value


def _user(key: str, value: str) -> str:
    if value and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ConfigError(key, f"expected an account name (a-z 0-9 _ -, at most 32) or nothing, got {value!r}")
    return value


def _networks(key: str, value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(key, f"expected addresses or CIDRs separated by commas, got {item!r}") from None
    return tuple(nets)


def _ipv4_networks(key: str, value: str) -> tuple[ipaddress.IPv4Network, ...]:
    nets = _networks(key, value)
    if not all(isinstance(net, ipaddress.IPv4Network) for net in nets):
        raise ConfigError(key, "expected IPv4 addresses or CIDRs (VMs have no IPv6)")
    return tuple(net for net in nets if isinstance(net, ipaddress.IPv4Network))


def _ipv4_addresses(key: str, value: str) -> tuple[ipaddress.IPv4Address, ...]:
    nets = _ipv4_networks(key, value)
    if any(net.num_addresses != 1 for net in nets):
        raise ConfigError(key, "expected single IPv4 addresses")
    return tuple(net.network_address for net in nets)


def _pool(key: str, value: str) -> ipaddress.IPv4Network:
    nets = _ipv4_networks(key, value)
    if len(nets) != 1 or not 16 <= nets[0].prefixlen <= 24:
        raise ConfigError(key, f"expected one IPv4 network from /16 to /24, got {value!r}")
    return nets[0]


def _csv(key: str, value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise ConfigError(key, "expected a comma-separated list")
    return items


# Rate-limit rules: name -> (requests, window in seconds). RATE_LIMITS overrides any of them;
# gateway/web/ratelimit.py applies them and docs/SECURITY.md ("Rate limits") says what each counts.
RATE_LIMIT_DEFAULTS: dict[str, tuple[int, int]] = {
    "login_ip": (30, 900),
    "login_pair": (5, 900),
    "login_account": (20, 3600),
    "signup_ip": (20, 3600),
    "verify_ip": (30, 3600),
    "resend_user": (3, 3600),
    "reset_ip": (10, 3600),
    "reset_email": (3, 3600),
    "vm_create_user": (30, 600),
    "console_user": (30, 60),
    "vm_action_user": (60, 600),
    "snapshot_user": (30, 600),
    "files_user": (60, 600),
}


def _rate_limits(key: str, value: str) -> dict[str, tuple[int, int] | None]:
    """``rule=COUNT/SECONDS`` or ``rule=off``, comma-separated, over RATE_LIMIT_DEFAULTS."""
    rules: dict[str, tuple[int, int] | None] = dict(RATE_LIMIT_DEFAULTS)
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        name, _, spec = (part.strip() for part in item.partition("="))
        if name not in RATE_LIMIT_DEFAULTS:
            raise ConfigError(key, f"unknown rule {name!r}; rules: {', '.join(RATE_LIMIT_DEFAULTS)}")
        if spec == "off":
            rules[name] = None
            continue
        count, _, window = spec.partition("/")
        if not (count.isdigit() and window.isdigit() and 1 <= int(count) <= 10**6 and 1 <= int(window) <= 86400 * 30):
            raise ConfigError(key, f"{name}: expected COUNT/SECONDS (1-1000000 / 1-2592000) or off, got {spec!r}")
        rules[name] = (int(count), int(window))
    return rules


# Settings whose empty value means a folder under DATA_DIR.
DERIVED_PATHS = {"vms_root": "vms", "images_dir": "images"}


def _setting(env: str, parse: Callable[[str, str], Any], default: str | None, doc: str) -> Any:
    return field(metadata={"env": env, "parse": parse, "default": default, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """Every setting vmgate reads. `.env.example` lists the same keys with the same comments."""

    postgres_url: str = _setting("POSTGRES_URL", _url(("postgresql", "postgres")), None,
                                 "Postgres DSN (users, VMs, quotas, audit)")
    redis_url: str = _setting("REDIS_URL", _url(("redis", "rediss", "unix")), None,
                              "Redis URL (queue, live state, console tokens, rate limits)")
    jwt_secret: str = _setting("JWT_SECRET", _secret, None, "HMAC key for session JWTs, 32+ characters")
    jwt_old_secrets: tuple[str, ...] = _setting(
        "JWT_OLD_SECRETS", _old_secrets, "",
        "Former JWT_SECRETs, comma-separated: sessions they signed stay valid, none are signed with them")
    smtp_host: str = _setting("SMTP_HOST", _str, "", "SMTP server; empty writes mails to DATA_DIR/outbox")
    smtp_port: int = _setting("SMTP_PORT", _int(1, 65535), "587", "SMTP port")
    smtp_from: str = _setting("SMTP_FROM", _str, "vmgate@localhost", "From address of mails vmgate sends")
    smtp_user: str = _setting("SMTP_USER", _str, "", "SMTP login name; empty sends without logging in")
    smtp_password: str = _setting("SMTP_PASSWORD", _str, "", "SMTP password, used with SMTP_USER")
    smtp_starttls: bool = _setting("SMTP_STARTTLS", _bool, "true",
                                   "true or false: upgrade the SMTP connection with STARTTLS before logging in")
    verify_token_ttl: int = _setting("VERIFY_TOKEN_TTL", _int(300, 30 * 86400), "86400",
                                     "Lifetime of an email verification link, seconds")
    reset_token_ttl: int = _setting("RESET_TOKEN_TTL", _int(300, 86400), "3600",
                                    "Lifetime of a password reset link, seconds")
    public_url: str = _setting("PUBLIC_URL", _url(("http", "https")), "https://127.0.0.1:8443",
                               "URL users reach vmgate at (nginx): https serves TLS on NGINX_PORT, http plain "
                               'HTTP (docs/DEPLOYMENT.md, "HTTPS")')
    vnc_public_url: str = _setting("VNC_PUBLIC_URL", _url(("ws", "wss"), optional=True), "",
                                   "WebSocket URL of the console proxy; empty derives it from PUBLIC_URL + /vnc")
    driver: str = _setting("VMGATE_DRIVER", _choice("local", "nomad"), "local",
                           "local (QEMU on this host) or nomad (a Nomad cluster)")
    nomad_addr: str = _setting("NOMAD_ADDR", _url(("http", "https")), "http://127.0.0.1:4646", "Nomad HTTP API")
    nomad_token: str = _setting(
        "NOMAD_TOKEN", _str, "",
        "Nomad ACL token of the gateway (policy nomad/vmgate-gateway.acl.hcl); empty without ACLs")
    nomad_cacert: Path | None = _setting("NOMAD_CACERT", _optional_path, "",
                                         "CA bundle that signed Nomad's TLS certificate; empty uses the system's."
                                         " TLS is always verified")
    nomad_client_cert: Path | None = _setting("NOMAD_CLIENT_CERT", _optional_path, "",
                                              "Client certificate for Nomad's mutual TLS; empty sends none")
    nomad_client_key: Path | None = _setting("NOMAD_CLIENT_KEY", _optional_path, "",
                                             "Key of NOMAD_CLIENT_CERT")
    consul_http_addr: str = _setting("CONSUL_HTTP_ADDR", _str, "127.0.0.1:8500", "Consul HTTP API")
    data_dir: Path = _setting("DATA_DIR", _path, "data", "Where vmgate keeps its state (relative to the repo)")
    vms_root: Path = _setting("VMS_ROOT", _path, "", "VM overlays and runtime files; empty means DATA_DIR/vms")
    images_dir: Path = _setting("IMAGES_DIR", _path, "", "Built base images; empty means DATA_DIR/images")
    gateway_host: str = _setting("GATEWAY_HOST", _host, "127.0.0.1", "Address the gateway binds")
    gateway_port: int = _setting("GATEWAY_PORT", _int(1, 65535), "8000", "Port the gateway binds")
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _setting(
        "TRUSTED_PROXIES", _networks, "127.0.0.1/32,::1/128",
        "Proxies whose X-Forwarded-For is believed (CIDRs, comma-separated): this host's nginx, and any load"
        " balancer in front of it")
    qemu_binary: str = _setting("QEMU_BINARY", _str, "qemu-system-x86_64", "QEMU system emulator")
    qemu_accelerator: str = _setting("QEMU_ACCELERATOR", _choice("tcg", "kvm"), "tcg",
                                     "tcg (works everywhere) or kvm (needs a usable /dev/kvm)")
    warm_memory_ahead: bool = _setting(
        "WARM_MEMORY_AHEAD", _bool, "true",
        "true or false: when the gateway starts, check the images' and warm layers' sha256 and have the local driver"
        " copy the warm layers' RAM into sealed memory, so no template's first VM waits for them (the copies are held"
        " while the gateway runs: 57 MiB for tiny, about 0.8 GB with the Debian templates too); false: on first use")
    nomad_datacenters: tuple[str, ...] = _setting("NOMAD_DATACENTERS", _csv, "dc1", "Datacenters of VM jobs")
    nomad_namespace: str = _setting("NOMAD_NAMESPACE", _host, "default", "Namespace of VM jobs")
    nomad_task_user: str = _setting("NOMAD_TASK_USER", _user, "vmgate",
                                    "Account QEMU runs as on fleet nodes (the VM task's user); empty: Nomad's default")
    nomad_outbound: bool = _setting("NOMAD_OUTBOUND", _bool, "false",
                                    "true once every VM node has the CNI network `vmgate` and the node rules"
                                    " (vmgate fleet-node; docs/NETWORK.md): fleet VMs then get VM_NETWORK")
    console_token_ttl: int = _setting("CONSOLE_TOKEN_TTL", _int(5, 60), "60", "Console token lifetime, seconds")
    console_max_session: int = _setting("CONSOLE_MAX_SESSION", _int(60, 7 * 86400), "28800",
                                        "Longest a console connection stays open, seconds; then websockify ends it")
    consoles_per_user: int = _setting("CONSOLES_PER_USER", _int(1, 1000), "10",
                                      "Console connections (each a websockify process) one user may hold open at once")
    rate_limits: dict[str, tuple[int, int] | None] = _setting(
        "RATE_LIMITS", _rate_limits, "",
        "Rate-limit overrides, rule=COUNT/SECONDS or rule=off, comma-separated; empty keeps the defaults"
        " (rules and defaults: docs/SECURITY.md)")
    session_ttl: int = _setting("SESSION_TTL", _int(300, 30 * 86400), "43200", "Session lifetime, seconds")
    event_streams_per_user: int = _setting("EVENT_STREAMS_PER_USER", _int(1, 1000), "20",
                                           "Live event streams (GET .../events) one user may hold open per gateway")
    argon2_memory_kib: int = _setting("ARGON2_MEMORY_KIB", _int(1024, 4 * 1024 * 1024), "65536",
                                      "Argon2id memory per password hash, KiB (lower only for tests)")
    argon2_time_cost: int = _setting("ARGON2_TIME_COST", _int(1, 20), "3",
                                     "Argon2id passes per password hash (lower only for tests)")
    stop_timeout: int = _setting("STOP_TIMEOUT", _int(1, 600), "30",
                                 "Seconds a guest gets to power off before a hard stop")
    restart_attempts: int = _setting("RESTART_ATTEMPTS", _int(0, 100), "2",
                                     "Restarts of a crashed VM within RESTART_INTERVAL (the job's restart block)")
    restart_interval: int = _setting("RESTART_INTERVAL", _int(1, 7 * 86400), "1800",
                                     "Window, seconds, in which RESTART_ATTEMPTS are counted")
    restart_delay: int = _setting("RESTART_DELAY", _int(0, 3600), "15", "Seconds before a crashed VM is restarted")
    restart_mode: str = _setting("RESTART_MODE", _choice("fail", "delay"), "fail",
                                 "When restarts run out: fail (state error) or delay (wait out the window)")
    workers: int = _setting("WORKERS", _int(0, 64), "2",
                            "Lifecycle workers in each gateway process (0: this process only serves the API)")
    reconcile_interval: float = _setting("RECONCILE_INTERVAL", _float(0.1, 3600), "5",
                                         "Seconds between reconciler passes (desired vs actual state)")
    collect_interval: float = _setting("COLLECT_INTERVAL", _float(0.1, 86400), "60",
                                       "Seconds between orphan collector passes")
    claim_idle: float = _setting("CLAIM_IDLE", _float(0.5, 3600), "15",
                                 "Seconds a queued job may sit claimed by a silent worker before another takes it")
    transition_timeout: int = _setting("TRANSITION_TIMEOUT", _int(10, 86400), "300",
                                       "Seconds a VM may stay provisioning, starting or destroying before it is"
                                       " settled by the collector (stopping gets STOP_TIMEOUT more)")
    orphan_grace: int = _setting("ORPHAN_GRACE", _int(0, 86400), "120",
                                 "Minimum age, seconds, of a file or process before the collector removes it")
    idle_suspend_after: int = _setting("IDLE_SUSPEND_AFTER", _int(0, 30 * 86400), "900",
                                       "Seconds without a console connection or API request on a running VM before"
                                       " it is suspended (memory saved to its disk); 0 never. A template's"
                                       " idle_suspend_after in images/catalog.json wins")
    file_transfer_max_mb: int = _setting("FILE_TRANSFER_MAX_MB", _int(0, 4096), "64",
                                         "Largest file uploaded into or downloaded from a VM, MiB (an upload also"
                                         " needs room in the storage quota); 0 turns file transfers off")
    vm_network: str = _setting("VM_NETWORK", _choice("outbound", "none"), "outbound",
                               "outbound: VMs may reach the internet (a network namespace each, NAT, nothing in;"
                               " a VM gets its template's network unless its create says none); none: no VM"
                               " gets a network (docs/NETWORK.md)")
    vm_net_pool: ipaddress.IPv4Network = _setting("VM_NET_POOL", _pool, "10.237.0.0/16",
                                                  "Host-side addresses of the VMs' namespaces, a /30 each (/16 to"
                                                  " /24); must not overlap a network this host uses")
    vm_dns: tuple[ipaddress.IPv4Address, ...] = _setting("VM_DNS", _ipv4_addresses, "", "Resolvers the VMs' DNS"
        " forwards to, comma-separated; empty: this host's /etc/resolv.conf (not loopback ones); reachable on port 53")
    egress_allow: tuple[ipaddress.IPv4Network, ...] = _setting(
        "EGRESS_ALLOW", _ipv4_networks, "",
        "CIDRs VMs may reach although they are private (a package mirror), comma-separated; never the host")
    egress_deny: tuple[ipaddress.IPv4Network, ...] = _setting(
        "EGRESS_DENY", _ipv4_networks, "", "CIDRs VMs may never reach, comma-separated; wins over EGRESS_ALLOW")
    vm_bandwidth_mbit: int = _setting("VM_BANDWIDTH_MBIT", _int(0, 100_000), "100",
                                      "Each VM's bandwidth each way, Mbit/s; 0: no limit")
    vm_conn_rate: int = _setting("VM_CONN_RATE", _int(0, 100_000), "50",
                                 "New outbound connections per second per VM (bursts of twice that); 0: no limit")
    vm_conn_max: int = _setting("VM_CONN_MAX", _int(0, 1_000_000), "1024",
                                "Outbound connections one VM may have open at once; 0: no limit")
    snapshot_quota: int = _setting("SNAPSHOT_QUOTA", _int(0, 10000), "10", "Default per-user snapshot count")
    snapshot_keep: int = _setting("SNAPSHOT_KEEP", _int(0, 10000), "5",
                                  "Snapshots kept per VM: the collector deletes the oldest beyond these; 0 keeps all")
    snapshot_max_age: int = _setting("SNAPSHOT_MAX_AGE", _int(0, 10 * 365 * 86400), "2592000",
                                     "Seconds after which the collector deletes a snapshot; 0 keeps them")
    quota_max_vms: int = _setting("QUOTA_MAX_VMS", _int(0, 10000), "3", "Default per-user VM count")
    quota_vcpus: int = _setting("QUOTA_VCPUS", _int(0, 100000), "4", "Default per-user vCPUs")
    quota_memory_mb: int = _setting("QUOTA_MEMORY_MB", _int(0, 10**8), "2048", "Default per-user memory, MB")
    quota_disk_gb: int = _setting("QUOTA_DISK_GB", _int(0, 10**6), "20", "Default per-user disk, GB")
    quota_storage_gb: int = _setting("QUOTA_STORAGE_GB", _int(0, 10**6), "40",
                                     "Default per-user storage, GB: what the user's overlays, snapshots and saved"
                                     " memory take on disk, measured")
    prometheus_url: str = _setting("PROMETHEUS_URL", _url(("http", "https"), optional=True), "",
                                   "Prometheus the admin page's objectives come from; empty: the one make run starts"
                                   " (127.0.0.1:PROMETHEUS_PORT), or none")
    otlp_endpoint: str = _setting("OTEL_EXPORTER_OTLP_ENDPOINT", _url(("http", "https"), optional=True), "",
                                  "OTLP/HTTP collector traces are sent to (…/v1/traces); empty: no traces")
    otel_service_name: str = _setting("OTEL_SERVICE_NAME", _str, "vmgate-gateway", "service.name of the traces")

    def __post_init__(self) -> None:
        # Derived default: frozen dataclass, so set through object.__setattr__.
        if not self.vnc_public_url:
            parts = urlsplit(self.public_url)
            scheme = "wss" if parts.scheme == "https" else "ws"
            object.__setattr__(self, "vnc_public_url", f"{scheme}://{parts.netloc}{parts.path}/vnc")

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    @classmethod
    def load(cls, environ: dict[str, str] | None = None, dotenv: Path | None = None,
             **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default os.environ) over ``dotenv`` (default REPO_ROOT/.env)."""
        values = read_dotenv(dotenv if dotenv is not None else REPO_ROOT / ".env")
        values.update(os.environ if environ is None else environ)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in overrides:
                kwargs[f.name] = overrides[f.name]
                continue
            meta = f.metadata
            raw = values.get(meta["env"])
            if raw is None:
                raw = meta["default"]
            if raw is None:
                raise ConfigError(meta["env"], "is required (see .env.example)")
            if f.name in DERIVED_PATHS and raw == "":
                continue
            kwargs[f.name] = meta["parse"](meta["env"], raw)
        for name, sub in DERIVED_PATHS.items():
            kwargs.setdefault(name, kwargs["data_dir"] / sub)
        return cls(**kwargs)


def describe() -> list[tuple[str, str | None, str]]:
    """Return (key, default, description) for every setting, for docs and `.env.example` checks."""
    return [(f.metadata["env"], f.metadata["default"], f.metadata["doc"]) for f in fields(Settings)]
