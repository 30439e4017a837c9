#!/usr/bin/env bash
# Build the tiny base image into IMAGES_DIR/tiny, then the warm layers of the warm templates into
# IMAGES_DIR/warm (python -m images.warm: boot once, save the memory state; docs/IMAGES.md).
# images/build-tiny.sh skips the work itself when the output matches its manifest; this script adds
# FORCE=1 when a build input under images/ changed since the last successful build here, so edited
# build scripts take effect. images.warm skips a template whose layer matches its inputs (base files,
# QEMU arguments, sizes, QEMU version).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings

script=images/build-tiny.sh
out=$IMAGES_DIR/tiny
work=$DATA_DIR/build/tiny
stamp=$IMAGES_DIR/.tiny.built  # outside the work dir, so make clean keeps a built image
[ -f "$script" ] || die "$script is missing"

force=${FORCE:-0}  # FORCE=1 make images rebuilds regardless
if [ -f "$stamp" ] && [ -n "$(find images -type f ! -name catalog.json ! -name '*.md' ! -name '*.pyc' ! -name warm.py \
        -newer "$stamp" -print -quit)" ]; then
    say "images: build inputs under images/ changed since the last build; rebuilding tiny"
    force=1
fi
mkdir -p "$work" "$IMAGES_DIR"
FORCE=$force bash "$script" "$out" "$work"
touch "$stamp"
.venv/bin/python -m images.warm
