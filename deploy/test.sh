#!/usr/bin/env bash
# make test, after the setup steps: ruff, mypy, then pytest with .env in the environment and
# VMGATE_TEST=1. PYTEST_ARGS is passed to pytest (shell quoting works: PYTEST_ARGS='-k "a or b"').
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings
export VMGATE_TEST=1
py=.venv/bin/python

say "== ruff check"
$py -m ruff check .
say "== mypy"
$py -m mypy
say "== pytest ${PYTEST_ARGS:-}"
eval "set -- ${PYTEST_ARGS:-}"
rc=0
$py -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    die "pytest collected no tests (exit code 5): a test run that tests nothing is a failure.
  Check PYTEST_ARGS='${PYTEST_ARGS:-}' and the tests/ folder."
fi
exit "$rc"
