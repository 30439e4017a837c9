#!/usr/bin/env bash
# make run, after the build steps: start Postgres and Redis (reusing running ones), migrate, then hand
# over to deploy/supervise.py, which runs the gateway, websockify and nginx in the foreground.
# Ctrl-C stops those and the servers this script started; VMs keep running (make down stops them).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings
load_db_settings
export DATA_DIR VMS_ROOT IMAGES_DIR GATEWAY_HOST GATEWAY_PORT NGINX_PORT NGINX_HTTP_PORT NGINX_TLS WEBSOCKIFY_PORT PUBLIC_URL
export WEBSOCKIFY_METRICS_PORT PROMETHEUS_PORT

# The admin page's objectives come from the Prometheus this starts, unless .env names another.
if [ -z "${PROMETHEUS_URL:-}" ] && [ "$PROMETHEUS_PORT" != 0 ]; then
    export PROMETHEUS_URL=http://127.0.0.1:$PROMETHEUS_PORT
fi

[ -x .venv/bin/python ] || die ".venv is missing; run make venv (make run does it)"

# This pid stays the supervisor's (exec below), so make down finds make run in every phase.
mkdir -p "$RUN_DIR"
pidfile=$RUN_DIR/supervise.pid
if [ -f "$pidfile" ] && [ "$(cat "$pidfile")" != $$ ] \
        && { pid_matches "$(cat "$pidfile")" supervise.py || pid_matches "$(cat "$pidfile")" deploy/run.sh; }; then
    die "make run is already running (pid $(cat "$pidfile")); make down stops it"
fi
echo $$ > "$pidfile"

started=()
for s in postgres redis; do
    deploy/services.sh status "$s" >/dev/null 2>&1 || started+=("$s")
done
cleanup() {
    [ ${#started[@]} -eq 0 ] || deploy/services.sh down "${started[@]}"
    rm -f "$pidfile"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

deploy/services.sh up postgres redis
say "migrate: applying database migrations"
.venv/bin/python -m gateway.cli migrate

# An nginx daemon from `deploy/services.sh up nginx` is reused; otherwise nginx runs supervised.
nginx_args=()
if deploy/services.sh status nginx >/dev/null 2>&1; then
    deploy/services.sh up nginx
else
    nginx_args=(--nginx-conf "$(deploy/services.sh render-nginx)")
fi

trap - EXIT INT TERM HUP
exec python3 deploy/supervise.py "${nginx_args[@]}" --stop-services "${started[*]}"
