#!/usr/bin/env bash
# make down: stop everything make run started (the supervisor and its children, nginx, Redis,
# Postgres) and every local VM. Idempotent: what is not running is skipped.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings

# 1. The supervisor first, so the gateway cannot start or re-adopt VMs while they are being stopped.
sup=$RUN_DIR/supervise.pid
# run.sh writes this pid before it execs the supervisor, so it also catches a make run still starting.
if [ -f "$sup" ] && { pid_matches "$(cat "$sup")" supervise.py || pid_matches "$(cat "$sup")" deploy/run.sh; }; then
    say "run: stopping make run (pid $(cat "$sup"))"
    terminate_pids 30 "$(cat "$sup")"
fi
rm -f "$sup"
# Children left behind by a supervisor that was killed outright. Their pid files hold process group leaders.
for name in gateway websockify prometheus nginx; do
    f=$RUN_DIR/$name.pid
    case $name in gateway) word="-m gateway" ;; websockify) word="-m console.proxy" ;; *) word=$name ;; esac
    if [ -f "$f" ] && pid_matches "$(cat "$f")" "$word"; then
        say "$name: stopping leftover process $(cat "$f")"
        terminate_pids 10 "$(cat "$f")"
    fi
    rm -f "$f"
done

# 2. Every VM of the local driver.
vms=()
for f in "$VMS_ROOT"/tasks/*/qemu.pid; do
    [ -f "$f" ] || continue
    pid=$(tr -dc 0-9 < "$f")
    pid_matches "$pid" qemu-system && vms+=("$pid")
done
if [ ${#vms[@]} -gt 0 ]; then
    say "vms: stopping ${#vms[@]} QEMU process(es): ${vms[*]}"
    terminate_pids 10 "${vms[@]}"
else
    say "vms: none running"
fi

# 3. Their network namespaces, links and the host's nftables table (docs/NETWORK.md), once no QEMU is left.
if [ -x .venv/bin/python ]; then
    .venv/bin/python -c 'from drivers.local import network; network.main()' || say "network: could not remove everything (see above)"
fi

# 4. The servers.
deploy/services.sh down all
