#!/usr/bin/env bash
# make status: which servers, which make run processes and how many VMs are running.
set -uo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT" || exit 1
load_settings
deploy/services.sh status
for name in supervise gateway websockify prometheus; do
    f=$RUN_DIR/$name.pid
    if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then say "$name: running (pid $(cat "$f"))"
    else say "$name: not running"
    fi
done
n=0
for f in "$VMS_ROOT"/tasks/*/qemu.pid; do
    [ -f "$f" ] && pid_matches "$(tr -dc 0-9 < "$f")" qemu-system && n=$((n + 1))
done
say "vms: $n QEMU process(es) running under $VMS_ROOT/tasks"
exit 0
