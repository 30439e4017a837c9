# vmgate: `make run` sets up a fresh Debian 12 machine and starts everything; `make help` lists targets.
# Recipes stay short: the logic lives in deploy/*.sh (see docs/DEPLOYMENT.md).

SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
VENV_STAMP := .venv/.requirements-installed
NOVNC_STAMP := node_modules/.package-lock.json
CSS_OUT := gateway/web/static/build/app.css
export PYTEST_ARGS

.PHONY: help deps venv novnc css env images images-tiny services status migrate admin backup restore prune-layers rotate run down test test-fast bench lint typecheck clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install missing Debian packages (apt-get; sudo when not root)
	@deploy/deps.sh

venv: $(VENV_STAMP) ## create .venv from requirements-dev.txt and install vmgate editable (pip install -e .)
# --no-deps: the pinned requirements are already in; pyproject.toml reads its dependencies from requirements.txt.
$(VENV_STAMP): requirements.txt requirements-dev.txt pyproject.toml | deps
	@[ -x $(PY) ] || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

novnc: $(NOVNC_STAMP) ## install noVNC 1.7.0 and Tailwind CSS from npm into node_modules (pinned by package-lock.json)
# npm install, not npm ci: the lock cannot list Tailwind's native builds for other platforms that the
# registry here does not serve, and npm ci refuses such a lock. npm install installs what the lock pins.
$(NOVNC_STAMP): package.json package-lock.json | deps
	npm install --no-audit --no-fund
	@touch $@

css: $(CSS_OUT) ## build the web console's stylesheet with Tailwind (generated, not committed)
$(CSS_OUT): $(NOVNC_STAMP) gateway/web/static/tailwind.css $(wildcard gateway/web/templates/*.html gateway/web/static/*.js console/static/*.js)
	node_modules/.bin/tailwindcss --input gateway/web/static/tailwind.css --output $@ --minify

env: ## create .env with random secrets if it does not exist
	@deploy/ensure-env.sh

images: deps venv env ## build the base images (tiny, debian-12, debian-12-desktop) and warm layers into IMAGES_DIR (skipped when up to date)
	@deploy/images.sh

images-tiny: deps venv env # what make run builds: tiny and its warm layer
	@deploy/images.sh tiny

services: deps env ## start Postgres and Redis (reuses running ones; they stay up)
	@deploy/services.sh up postgres redis

status: ## say which servers, make run and VMs are running
	@deploy/status.sh

migrate: services venv ## apply the database migrations
	deploy/with-env.sh $(PY) -m gateway.cli migrate

admin: services venv ## create an admin: make admin EMAIL=you@example.com [ADMIN_ARGS=--promote] (asks the password)
	@[ -n "$(EMAIL)" ] || { echo "usage: make admin EMAIL=you@example.com [ADMIN_ARGS='--promote|--generate-password']"; exit 2; }
	@deploy/with-env.sh $(PY) -m gateway.cli create-admin --email "$(EMAIL)" $(ADMIN_ARGS)

backup: services venv ## copy the database, the VMs' disks and their images to DATA_DIR/backups/vmgate-<time> [OUT=dir]
	@deploy/with-env.sh $(PY) -m gateway.cli backup $(if $(OUT),--out "$(OUT)")

restore: services venv ## restore a backup onto this machine's empty state: make restore BACKUP=folder [FORCE=1]
	@[ -n "$(BACKUP)" ] || { echo "usage: make restore BACKUP=data/backups/vmgate-<time> [FORCE=1]"; exit 2; }
	@deploy/with-env.sh $(PY) -m gateway.cli restore $(if $(FORCE),--force) "$(BACKUP)"

prune-layers: services venv ## remove the warm layers no VM uses and that are not current [DRY_RUN=1: only say which]
	@deploy/with-env.sh $(PY) -m gateway.cli prune-layers $(if $(DRY_RUN),--dry-run)

rotate: services venv ## replace a secret on its server and in .env: make rotate SECRET=jwt|redis|postgres [ROTATE_ARGS=--drop-old]
	@[ -n "$(SECRET)" ] || { echo "usage: make rotate SECRET=jwt|redis|postgres [ROTATE_ARGS=--drop-old]"; exit 2; }
	@deploy/with-env.sh $(PY) -m gateway.cli rotate-secret "$(SECRET)" $(ROTATE_ARGS)

run: deps venv novnc css env images-tiny ## start everything in the foreground and print the URL; Ctrl-C stops it (VMs keep running)
	@deploy/run.sh

down: ## stop what make run started, the servers and every VM
	@deploy/down.sh

test: deps venv novnc css env images services ## ruff, mypy and pytest (PYTEST_ARGS='-k foo' passes arguments)
	@deploy/test.sh

# No images, noVNC or stylesheet: the tests that would need them are the ones this tier leaves out.
test-fast: deps venv env services ## ruff, mypy and the tests that boot no VM, no Chromium, no Nomad (seconds)
	@deploy/test.sh --fast

bench: deps venv env images services ## measure console start, throughput, density, API and relay (BENCH_QUICK=1: short)
	@deploy/bench.sh

lint: venv ## ruff check
	$(PY) -m ruff check .

typecheck: venv ## mypy
	$(PY) -m mypy

clean: ## remove caches, node_modules and build leftovers (keeps .env, .venv, data and images)
	@deploy/clean.sh
