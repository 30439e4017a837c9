#!/usr/bin/env bash
# Run a command with .env loaded into its environment (variables already set win) and DATA_DIR,
# VMS_ROOT and IMAGES_DIR made absolute. usage: deploy/with-env.sh COMMAND [ARGS...]
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings
exec "$@"
