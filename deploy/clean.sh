#!/usr/bin/env bash
# make clean: remove caches and rebuildable outputs. Keeps .env, .venv, the databases, built images
# and VMs; `make down && rm -rf data` starts from nothing.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings
rm -rf node_modules gateway/web/static/build .pytest_cache .mypy_cache .ruff_cache tests/artifacts "$DATA_DIR/build" \
    build dist ./*.egg-info
for d in gateway drivers jobspecs console images tests deploy; do
    [ -d "$d" ] && find "$d" -type d -name __pycache__ -prune -exec rm -rf {} +
done
say "clean: removed caches, node_modules, tests/artifacts, package build leftovers and $DATA_DIR/build"
