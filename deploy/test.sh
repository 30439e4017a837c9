#!/usr/bin/env bash
# make test / make test-fast, after the setup steps: ruff, mypy, then pytest with .env in the environment
# and VMGATE_TEST=1. PYTEST_ARGS is passed to pytest (shell quoting works: PYTEST_ARGS='-k "a or b"').
#   deploy/test.sh          the whole suite
#   deploy/test.sh --fast   only the tests that need no QEMU, Chromium or Nomad (docs/TESTING.md); a -m in
#                           PYTEST_ARGS comes later on the command line and so replaces the tier's
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings
export VMGATE_TEST=1
py=.venv/bin/python

tier=()
case ${1:-} in
    # On both cores, a module per worker (--dist loadfile): the fast tier's time is mostly tests waiting on
    # purpose (rate-limit windows, the engine's timers), which overlap well.
    --fast) tier=(-m "not qemu and not browser and not nomad" -n 2 --dist loadfile) ;;
    "") ;;
    *) die "usage: deploy/test.sh [--fast]" ;;
esac

say "== ruff check"
$py -m ruff check .
say "== mypy"
$py -m mypy
say "== pytest ${tier[*]} ${PYTEST_ARGS:-}"
eval "set -- ${PYTEST_ARGS:-}"
rc=0
$py -m pytest "${tier[@]}" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    die "pytest selected no tests (exit code 5): a test run that tests nothing is a failure.
  Check PYTEST_ARGS='${PYTEST_ARGS:-}', the tier's marks and the tests/ folder."
fi
exit "$rc"
