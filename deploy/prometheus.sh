#!/usr/bin/env bash
# Prometheus for make run: render its configuration, or say how it would run.
#   deploy/prometheus.sh render   write DATA_DIR/prometheus/prometheus.yml (checked with promtool); print its path
#   deploy/prometheus.sh argv     print prometheus's command line, one argument a line (supervise.py runs it)
# PROMETHEUS_PORT=0 in .env turns it off (then `argv` prints nothing). Scrape and rule interval:
# PROMETHEUS_SCRAPE_INTERVAL (15s); kept for PROMETHEUS_RETENTION (15d). docs/OBSERVABILITY.md.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
load_settings

PROM_DIR=$DATA_DIR/prometheus
PROM_CONF=$PROM_DIR/prometheus.yml
SCRAPE_INTERVAL=${PROMETHEUS_SCRAPE_INTERVAL:-15s}
RETENTION=${PROMETHEUS_RETENTION:-15d}

render() {
    command -v promtool >/dev/null || die "promtool is missing (Debian's prometheus package; make deps installs it)"
    mkdir -p "$PROM_DIR/data"
    sed -e "s|@SCRAPE_INTERVAL@|$SCRAPE_INTERVAL|g" -e "s|@INSTANCE@|$(hostname)|g" \
        -e "s|@RULES@|$REPO_ROOT/deploy/prometheus/rules.yml|g" \
        -e "s|@GATEWAY_HOST@|$GATEWAY_HOST|g" -e "s|@GATEWAY_PORT@|$GATEWAY_PORT|g" \
        -e "s|@WEBSOCKIFY_METRICS_PORT@|$WEBSOCKIFY_METRICS_PORT|g" -e "s|@PROMETHEUS_PORT@|$PROMETHEUS_PORT|g" \
        "$REPO_ROOT/deploy/prometheus/prometheus.yml.in" > "$PROM_CONF.tmp"
    promtool check config --syntax-only "$PROM_CONF.tmp" >/dev/null \
        || { promtool check config --syntax-only "$PROM_CONF.tmp" >&2 || true; die "promtool rejected $PROM_CONF"; }
    mv "$PROM_CONF.tmp" "$PROM_CONF"
}

case ${1:-} in
    render) render; say "$PROM_CONF" ;;
    argv)
        [ "$PROMETHEUS_PORT" != 0 ] || exit 0
        render
        printf '%s\n' prometheus "--config.file=$PROM_CONF" "--storage.tsdb.path=$PROM_DIR/data" \
            "--storage.tsdb.retention.time=$RETENTION" "--web.listen-address=127.0.0.1:$PROMETHEUS_PORT" \
            "--web.enable-lifecycle"
        ;;
    *) die "usage: $0 render|argv" ;;
esac
