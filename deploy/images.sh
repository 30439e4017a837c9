#!/usr/bin/env bash
# Build base images into IMAGES_DIR/<name>, then the warm layers of the warm templates into
# IMAGES_DIR/warm (python -m images.warm: boot once, save the memory state; docs/IMAGES.md).
#
#   deploy/images.sh [NAME...]   NAME: tiny, debian-12, debian-12-desktop (default: all of them; make run
#                                builds tiny only)
#
# Each builder (images/build-tiny.sh, images/build-debian.sh) skips the work itself when its output matches
# its manifest; this script adds FORCE=1 when a build input under images/ changed since that image's last
# successful build here, so edited build scripts take effect. images.warm skips a template whose layer
# matches its inputs (base files, QEMU arguments, sizes, QEMU version).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
load_settings

ALL=(tiny debian-12 debian-12-desktop)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ALL[@]}")

build() {
    local name=$1 script inputs args=()
    case $name in
        tiny) script=images/build-tiny.sh; inputs=(images/build-tiny.sh images/lib.sh images/tiny images/kmods.py images/elfdeps.py
                                                    images/reseed.py images/manifest.py) ;;
        debian-12) script=images/build-debian.sh; inputs=(images/build-debian.sh images/lib.sh images/debian-12
                                                              images/manifest.py) ;;
        debian-12-desktop) script=images/build-debian.sh; args=(--desktop)
                           inputs=(images/build-debian.sh images/lib.sh images/debian-12 images/debian-12-desktop
                                   images/manifest.py) ;;
        *) die "images: no image named $name (known: ${ALL[*]})" ;;
    esac
    local out=$IMAGES_DIR/$name work=$DATA_DIR/build/$name
    local stamp=$IMAGES_DIR/.$name.built  # outside the work dir, so make clean keeps a built image
    local force=${FORCE:-0}  # FORCE=1 make images rebuilds regardless
    if [ -f "$stamp" ] && [ -n "$(find "${inputs[@]}" -type f ! -name '*.md' ! -name '*.pyc' -newer "$stamp" -print -quit)" ]
    then
        say "images: build inputs of $name changed since its last build; rebuilding it"
        force=1
    fi
    mkdir -p "$work" "$IMAGES_DIR"
    FORCE=$force bash "$script" "${args[@]}" "$out" "$work"
    touch "$stamp"
}

for name in "${names[@]}"; do
    build "$name"
done
for name in "${ALL[@]}"; do
    [ -f "$IMAGES_DIR/$name/manifest.json" ] || say "images: $name is not built (make images builds every image)"
done
# The warm layers of the images asked for only: make run builds tiny alone, and a template whose base is not
# built counts as a failure in images.warm.
.venv/bin/python -m images.warm "${names[@]/#/--template=}"
