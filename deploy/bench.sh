#!/usr/bin/env bash
# make bench, after the setup steps (packages, venv, .env, images, Postgres and Redis up): run
# `python -m bench` with .env in the environment. It starts its own gateway, websockify and VMs on free
# ports, on the database vmgate_bench and Redis db 10, and removes them when it ends (docs/BENCHMARKS.md).
# BENCH_QUICK=1 runs a little of each; BENCH_ONLY=api,relay,console,resume,throughput,density picks some.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings
load_db_settings
[ -x .venv/bin/python ] || die ".venv is missing; run make venv"
[ -f "$IMAGES_DIR/tiny/manifest.json" ] || die "the tiny image is not built in $IMAGES_DIR; run make images"
exec .venv/bin/python -m bench "$@"
