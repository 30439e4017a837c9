#!/usr/bin/env bash
# Start, stop or report the local Postgres, Redis and nginx servers, all with their state under DATA_DIR.
# usage: deploy/services.sh up|down|status [postgres|redis|nginx|all ...]   (default: all)
# `up` reuses a server that already runs and returns once it answers.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
load_settings
# Stopping needs no URLs, so `down` works before .env exists.
[ "${1:-}" = down ] || load_db_settings

PG_BIN=/usr/lib/postgresql/15/bin
PG_ROOT=$DATA_DIR/postgres          # owned by the postgres user when we run as root
PGDATA=$PG_ROOT/data
PG_SOCKET_DIR=$PG_ROOT/run
PG_LOG=$PG_ROOT/postgres.log
REDIS_DIR=$DATA_DIR/redis
REDIS_PID=$REDIS_DIR/redis.pid
NGINX_DIR=$DATA_DIR/nginx
NGINX_CONF=$NGINX_DIR/nginx.conf
NGINX_PID=$NGINX_DIR/nginx.pid

# Postgres refuses to run as root: then it runs as the postgres system user.
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' system user (apt-get install postgresql)"
    as_pg() { runuser -u postgres -- "$@"; }
    PG_OWNER=postgres
else
    as_pg() { "$@"; }
    PG_OWNER=$(id -un)
fi

pg_answers() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -t 2; }
pg_ours() { [ -f "$PGDATA/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" status -D "$PGDATA" >/dev/null 2>&1; }
redis_cli() { REDISCLI_AUTH=$REDIS_PASSWORD redis-cli --no-auth-warning -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
redis_pong() { [ "$(redis_cli ping 2>/dev/null)" = PONG ]; }
redis_ours() { [ -f "$REDIS_PID" ] && pid_matches "$(cat "$REDIS_PID")" redis-server; }
nginx_ours() { [ -f "$NGINX_PID" ] && pid_matches "$(cat "$NGINX_PID")" nginx; }
# nginx serves TLS itself when PUBLIC_URL is https, unless NGINX_TLS=off (TLS ends in front of it).
nginx_tls() { [[ $PUBLIC_URL == https://* ]] && [ "$NGINX_TLS" != off ]; }
port_busy() { python3 -c 'import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)' "$1"; }

wait_for() {  # wait_for NAME SECONDS CMD...: poll CMD until it succeeds
    local name=$1 seconds=$2 i; shift 2
    for ((i = 0; i < seconds * 5; i++)); do "$@" && return 0; sleep 0.2; done
    die "$name did not answer within ${seconds}s"
}

# --- Postgres ---------------------------------------------------------------------------------------

pg_check_access() {
    # The server runs as $PG_OWNER and must reach $PG_ROOT through every parent directory.
    local d="" part parts
    IFS=/ read -ra parts <<< "${DATA_DIR#/}"
    for part in "${parts[@]}"; do
        d="$d/$part"
        as_pg test -x "$d" || die "the $PG_OWNER user cannot enter $d, so Postgres cannot use $PG_ROOT.
  Fix: chmod o+x $d  (or set DATA_DIR in .env to a folder whose parents all allow others to enter)"
    done
}

pg_init() {
    say "postgres: creating a cluster in $PGDATA (superuser $PG_USER, scram-sha-256)"
    local pwfile=$PG_ROOT/.initdb-pw
    printf '%s\n' "$PG_PASSWORD" > "$pwfile"
    chown "$PG_OWNER" "$pwfile"; chmod 600 "$pwfile"
    if ! as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$PG_USER" --pwfile="$pwfile" --auth=scram-sha-256 \
            -E UTF8 --locale=C.UTF-8 >"$PG_ROOT/initdb.log" 2>&1; then
        rm -f "$pwfile"
        cat "$PG_ROOT/initdb.log" >&2
        die "initdb failed (log: $PG_ROOT/initdb.log)"
    fi
    rm -f "$pwfile"
}

pg_up() {
    mkdir -p "$DATA_DIR"
    install -d -m 700 -o "$PG_OWNER" "$PG_ROOT"
    install -d -m 700 -o "$PG_OWNER" "$PG_SOCKET_DIR"
    pg_check_access
    if pg_ours; then
        say "postgres: already running on 127.0.0.1:$POSTGRES_PORT"
    else
        pg_answers && die "postgres: 127.0.0.1:$POSTGRES_PORT is answered by another server, not $PGDATA.
  Stop it, or change POSTGRES_PORT and the port in POSTGRES_URL in .env"
        [ -f "$PGDATA/PG_VERSION" ] || pg_init
        # Settings go on the command line so a changed .env applies at the next start.
        as_pg "$PG_BIN/pg_ctl" start -D "$PGDATA" -l "$PG_LOG" -s -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $POSTGRES_PORT -k $PG_SOCKET_DIR" \
            || { tail -n 20 "$PG_LOG" >&2; die "postgres did not start (log: $PG_LOG)"; }
        say "postgres: started on 127.0.0.1:$POSTGRES_PORT (data $PGDATA, log $PG_LOG)"
    fi
    wait_for postgres 30 pg_answers
    local q="SELECT 1 FROM pg_database WHERE datname = '$PG_DB'"
    if [ "$(PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$PG_USER" -d postgres -XtAc "$q")" != 1 ]; then
        PGPASSWORD=$PG_PASSWORD createdb -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$PG_USER" "$PG_DB"
        say "postgres: created database $PG_DB"
    fi
}

pg_down() {
    if pg_ours; then
        as_pg "$PG_BIN/pg_ctl" stop -D "$PGDATA" -s -m fast -w -t 60
        say "postgres: stopped"
    else
        say "postgres: not running"
    fi
}

pg_status() {
    if pg_ours && pg_answers; then say "postgres: running on 127.0.0.1:$POSTGRES_PORT (data $PGDATA)"
    elif pg_ours; then say "postgres: process up but not answering on 127.0.0.1:$POSTGRES_PORT"; return 1
    else say "postgres: not running"; return 1
    fi
}

# --- Redis ------------------------------------------------------------------------------------------

redis_up() {
    install -d -m 700 "$REDIS_DIR"
    if redis_ours; then
        say "redis: already running on 127.0.0.1:$REDIS_PORT"
    else
        port_busy "$REDIS_PORT" && die "redis: 127.0.0.1:$REDIS_PORT is taken by another process.
  Stop it, or change REDIS_PORT and the port in REDIS_URL in .env"
        # The password goes through stdin ("-" reads config from it) to keep it out of the process list.
        # shellcheck disable=SC2094  # redis-server appends to its log itself only after daemonizing
        printf 'requirepass "%s"\n' "$REDIS_PASSWORD" | redis-server - \
            --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" --appendonly yes \
            --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_DIR/redis.log" >>"$REDIS_DIR/redis.log" 2>&1 \
            || die "redis did not start (log: $REDIS_DIR/redis.log)"
        say "redis: started on 127.0.0.1:$REDIS_PORT (data $REDIS_DIR, log $REDIS_DIR/redis.log)"
    fi
    wait_for redis 30 redis_pong
}

redis_down() {
    if redis_ours; then
        terminate_pids 30 "$(cat "$REDIS_PID")"
        rm -f "$REDIS_PID"
        say "redis: stopped"
    else
        say "redis: not running"
    fi
}

redis_status() {
    if redis_ours && redis_pong; then say "redis: running on 127.0.0.1:$REDIS_PORT (pid $(cat "$REDIS_PID"))"
    elif redis_ours; then say "redis: process up but not answering on 127.0.0.1:$REDIS_PORT"; return 1
    else say "redis: not running"; return 1
    fi
}

# --- nginx ------------------------------------------------------------------------------------------

nginx_render() {
    local user_line="" temp=$NGINX_DIR/temp d
    mkdir -p "$NGINX_DIR" "$temp"
    for d in client_body proxy fastcgi uwsgi scgi; do mkdir -p "$temp/$d"; done
    if [ "$(id -u)" = 0 ]; then
        # Workers drop root; they only need to write their temp files.
        local worker=www-data
        id "$worker" >/dev/null 2>&1 || worker=nobody
        user_line="user $worker;"
        chown -R "$worker" "$temp"
    fi
    local real_ip="" net
    for net in ${TRUSTED_PROXIES//,/ }; do
        case $net in 127.*|::1|::1/*) continue ;; esac  # nginx itself is the loopback hop
        real_ip="$real_ip set_real_ip_from $net;"
    done
    [ -z "$real_ip" ] || real_ip="$real_ip real_ip_header X-Forwarded-For; real_ip_recursive on;"
    # The scheme of PUBLIC_URL decides: https serves TLS on NGINX_PORT (and redirects NGINX_HTTP_PORT),
    # http serves plain HTTP there as before. NGINX_TLS=off: TLS ends in front of nginx.
    local tls="# " ssl="" redirect="# " cert="" key="" origin
    origin=$(url_part "$PUBLIC_URL" origin)
    if nginx_tls; then
        local paths
        paths=$("$REPO_ROOT/deploy/tls.sh" "$(url_part "$PUBLIC_URL" host)") || die "no TLS certificate for nginx"
        cert=$(sed -n 1p <<< "$paths"); key=$(sed -n 2p <<< "$paths")
        tls="" ssl=" ssl"
        if [ "$NGINX_HTTP_PORT" != 0 ]; then
            [ "$NGINX_HTTP_PORT" != "$NGINX_PORT" ] || die "NGINX_HTTP_PORT and NGINX_PORT are both $NGINX_PORT; \
make them differ in .env (or NGINX_HTTP_PORT=0: no plain HTTP port)"
            redirect=""
        fi
    fi
    sed -e "s|@USER_LINE@|$user_line|" -e "s|@NGINX_DIR@|$NGINX_DIR|g" -e "s|@NGINX_PORT@|$NGINX_PORT|g" \
        -e "s|@REAL_IP@|$real_ip|" -e "s|@TLS@|$tls|" -e "s|@SSL@|$ssl|" -e "s|@REDIRECT@|$redirect|" \
        -e "s|@TLS_CERT@|$cert|" -e "s|@TLS_KEY@|$key|" -e "s|@PUBLIC_ORIGIN@|$origin|" \
        -e "s|@NGINX_HTTP_PORT@|$NGINX_HTTP_PORT|" \
        -e "s|@GATEWAY_HOST@|$GATEWAY_HOST|g" -e "s|@GATEWAY_PORT@|$GATEWAY_PORT|g" \
        -e "s|@WEBSOCKIFY_PORT@|$WEBSOCKIFY_PORT|g" \
        "$REPO_ROOT/deploy/nginx.conf.in" > "$NGINX_CONF.tmp"
    mv "$NGINX_CONF.tmp" "$NGINX_CONF"
    nginx -t -q -c "$NGINX_CONF" -p "$NGINX_DIR/" -e "$NGINX_DIR/error.log" \
        || die "nginx rejected $NGINX_CONF"
}

nginx_up() {
    nginx_render
    if nginx_ours; then
        nginx -s reload -c "$NGINX_CONF" -p "$NGINX_DIR/" -e "$NGINX_DIR/error.log"
        say "nginx: already running on 127.0.0.1:$NGINX_PORT (configuration reloaded)"
        return 0
    fi
    port_busy "$NGINX_PORT" && die "nginx: 127.0.0.1:$NGINX_PORT is taken by another process (is make run up?).
  Stop it, or change NGINX_PORT and PUBLIC_URL in .env"
    if nginx_tls && [ "$NGINX_HTTP_PORT" != 0 ] && port_busy "$NGINX_HTTP_PORT"; then
        die "nginx: 127.0.0.1:$NGINX_HTTP_PORT is taken by another process (is make run up?).
  Stop it, or change NGINX_HTTP_PORT in .env (0: no plain HTTP port)"
    fi
    nginx -c "$NGINX_CONF" -p "$NGINX_DIR/" -e "$NGINX_DIR/error.log" \
        || die "nginx did not start (log: $NGINX_DIR/error.log)"
    wait_for nginx 10 port_busy "$NGINX_PORT"
    say "nginx: started on 127.0.0.1:$NGINX_PORT (config $NGINX_CONF, logs $NGINX_DIR)"
}

nginx_down() {
    if nginx_ours; then
        terminate_pids 10 "$(cat "$NGINX_PID")"
        say "nginx: stopped"
    else
        say "nginx: not running"
    fi
}

nginx_status() {
    if nginx_ours; then say "nginx: running on 127.0.0.1:$NGINX_PORT (pid $(cat "$NGINX_PID"))"
    else say "nginx: not running"; return 1
    fi
}

# ----------------------------------------------------------------------------------------------------

action=${1:-}
[ $# -gt 0 ] && shift
targets=""
for target in "${@:-all}"; do
    case $target in
        all) targets="postgres redis nginx" ;;
        postgres|redis|nginx) targets="$targets $target" ;;
        *) die "unknown service '$target' (postgres, redis, nginx or all)" ;;
    esac
done
case $action in
    up|down|status) ;;
    render-nginx) nginx_render; say "$NGINX_CONF"; exit 0 ;;
    *) die "usage: $0 up|down|status|render-nginx [postgres|redis|nginx|all ...]" ;;
esac
read -ra order <<< "$targets"
[ "$action" = down ] && read -ra order <<< "$(printf '%s\n' "${order[@]}" | tac | tr '\n' ' ')"

rc=0
for t in "${order[@]}"; do
    case $t in postgres) svc=pg ;; *) svc=$t ;; esac
    # Only status may fail softly: `|| rc=1` would switch off set -e inside up and down.
    if [ "$action" = status ]; then "${svc}_status" || rc=1; else "${svc}_$action"; fi
done
exit $rc
