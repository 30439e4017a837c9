# shellcheck shell=bash
# Shared by the deploy/ scripts: repo root, settings from .env, derived paths.
# Source it; it defines functions and variables only. Environment variables win over .env,
# the same rule gateway/config.py follows.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '%s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Export KEY=VALUE lines from a dotenv file unless the key is already set in the environment.
load_dotenv() {
    local file=$1 line key val
    [ -f "$file" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line#"${line%%[![:space:]]*}"}"
        [ -z "$line" ] || [ "${line:0:1}" = "#" ] && continue
        line="${line#export }"
        case $line in *=*) ;; *) die "$file: expected KEY=VALUE, got: $line" ;; esac
        key="${line%%=*}"; key="${key%"${key##*[![:space:]]}"}"
        val="${line#*=}"; val="${val#"${val%%[![:space:]]*}"}"; val="${val%"${val##*[![:space:]]}"}"
        if [ ${#val} -ge 2 ] && { [ "${val:0:1}${val: -1}" = '""' ] || [ "${val:0:1}${val: -1}" = "''" ]; }; then
            val="${val:1:${#val}-2}"
        fi
        [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$file: bad key: $key"
        [ -n "${!key+x}" ] || export "$key=$val"
    done < "$file"
}

abspath() {  # relative paths are relative to the repo root, like gateway/config.py
    case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$REPO_ROOT/$1" ;; esac
}

# Print one part of a URL (user, password, host, port, path, origin), percent-decoded.
url_part() {
    python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import unquote, urlsplit
u = urlsplit(sys.argv[1])
part = {"user": u.username, "password": u.password, "host": u.hostname,
        "port": u.port, "path": u.path.lstrip("/"),
        "origin": f"{u.scheme}://{u.netloc.rpartition('@')[2]}"}[sys.argv[2]]
print(unquote(str(part)) if part is not None else "")
PY
}

# Load settings and derive everything the scripts use. Safe to call twice.
load_settings() {
    load_dotenv "$REPO_ROOT/.env"
    DATA_DIR=$(abspath "${DATA_DIR:-data}")
    VMS_ROOT=$(abspath "${VMS_ROOT:-$DATA_DIR/vms}")
    IMAGES_DIR=$(abspath "${IMAGES_DIR:-$DATA_DIR/images}")
    export DATA_DIR VMS_ROOT IMAGES_DIR
    GATEWAY_HOST=${GATEWAY_HOST:-127.0.0.1}
    GATEWAY_PORT=${GATEWAY_PORT:-8000}
    NGINX_PORT=${NGINX_PORT:-8443}
    NGINX_HTTP_PORT=${NGINX_HTTP_PORT:-8080}
    NGINX_TLS=${NGINX_TLS:-auto}
    case $NGINX_TLS in auto|off) ;; *) die "NGINX_TLS=$NGINX_TLS: expected auto or off" ;; esac
    WEBSOCKIFY_PORT=${WEBSOCKIFY_PORT:-6080}
    WEBSOCKIFY_METRICS_PORT=${WEBSOCKIFY_METRICS_PORT:-6081}
    PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
    TRUSTED_PROXIES=${TRUSTED_PROXIES:-127.0.0.1/32,::1/128}
    PUBLIC_URL=${PUBLIC_URL:-https://127.0.0.1:$NGINX_PORT}
    # shellcheck disable=SC2034  # used by the scripts that source this file
    RUN_DIR=$DATA_DIR/run
}

# Postgres and Redis settings come from their URLs; POSTGRES_PORT / REDIS_PORT must agree with them.
load_db_settings() {
    [ -n "${POSTGRES_URL:-}" ] || die "POSTGRES_URL is not set (run deploy/ensure-env.sh or make env)"
    [ -n "${REDIS_URL:-}" ] || die "REDIS_URL is not set (run deploy/ensure-env.sh or make env)"
    local p
    PG_USER=$(url_part "$POSTGRES_URL" user)
    PG_PASSWORD=$(url_part "$POSTGRES_URL" password)
    PG_DB=$(url_part "$POSTGRES_URL" path)
    p=$(url_part "$POSTGRES_URL" port); p=${p:-5432}
    POSTGRES_PORT=${POSTGRES_PORT:-$p}
    [ "$p" = "$POSTGRES_PORT" ] || die "POSTGRES_PORT=$POSTGRES_PORT but POSTGRES_URL uses port $p; make them agree in .env"
    if [ -z "$PG_USER" ] || [ -z "$PG_PASSWORD" ] || [ -z "$PG_DB" ]; then
        die "POSTGRES_URL must name a user, a password and a database"
    fi
    REDIS_PASSWORD=$(url_part "$REDIS_URL" password)
    p=$(url_part "$REDIS_URL" port); p=${p:-6379}
    REDIS_PORT=${REDIS_PORT:-$p}
    [ "$p" = "$REDIS_PORT" ] || die "REDIS_PORT=$REDIS_PORT but REDIS_URL uses port $p; make them agree in .env"
    [ -n "$REDIS_PASSWORD" ] || die "REDIS_URL must carry a password (redis://:PASSWORD@127.0.0.1:$REDIS_PORT/0)"
}

# True when PID is alive and its command line contains WORD.
pid_matches() {
    local pid=$1 word=$2
    [[ $pid =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$word"
}

# SIGTERM the PIDs, wait up to SECONDS for them to exit, then SIGKILL what is left.
terminate_pids() {
    local seconds=$1; shift
    local pid left i
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < seconds * 10; i++)); do
        left=""
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && left="$left $pid"; done
        [ -z "$left" ] && return 0
        sleep 0.1
    done
    say "  still running after ${seconds}s, sending SIGKILL:$left"
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
}
