#!/usr/bin/env bash
# Build a Debian base image from Debian packages only, booted like tiny by GRUB from QEMU's -kernel
# (boot.bin, images/lib.sh), which loads the disk's own /vmlinuz and /initrd.img (disk.qcow2):
#   debian-12          Debian 12 (bookworm) with systemd, a root login on tty1 and ttyS0, apt, cloud-init
#                      (NoCloud, seeded from QEMU's fw_cfg), the QEMU guest agent and OpenSSH
#   debian-12-desktop  the same plus X, IceWM, a terminal, a file manager, Firefox ESR and spice-vdagent
#                      (the clipboard), logged in to the desktop on the console (images/debian-12-desktop)
#
# Usage: images/build-debian.sh [--desktop] OUTDIR [WORKDIR]
#   --desktop  build debian-12-desktop (default: debian-12)
#   OUTDIR   where boot.bin, disk.qcow2 and manifest.json end up (read-only files)
#   WORKDIR  package cache and scratch space (default: ~/.cache/vmgate/build/<name>)
#   FORCE=1  rebuild even when OUTDIR/manifest.json matches the files
#   DEBIAN_DISK_MB  size of the root file system in the base image (default 2048, desktop 4096; VMs grow it)
#
# mmdebstrap builds the tree in a folder (root mode: it mounts /proc, /sys and /dev inside its chroot,
# so this runs as root), images/debian-12/customize.sh makes it a VM's root, and mkfs.ext4 -d makes the
# disk from the folder: no loop device, no partition table. About a minute from nothing here for debian-12
# (100 MB of packages from deb.debian.org), a few minutes for the desktop (about 400 MB); the downloaded
# packages are kept in WORKDIR for the next build.
set -euo pipefail
umask 022

NAME=debian-12
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python3
# The system, and what a person working in it expects to find.
PACKAGES=(systemd systemd-sysv udev dbus initramfs-tools zstd qemu-guest-agent cloud-init
	openssh-server sudo ca-certificates e2fsprogs iproute2 less nano login passwd)
# The cloud kernel has no graphics (DRM) or USB input drivers; the desktop needs Debian's generic kernel.
KERNEL=linux-image-cloud-amd64
DESKTOP=0
DISK_DEFAULT=2048
# The desktop: X on virtio-gpu (the screen follows the browser window: QEMU's VNC SetDesktopSize), IceWM
# (a task bar, a menu, no compositor: cheap under TCG), a terminal, a file manager, a web browser, and
# spice-vdagent, which shares the clipboard with QEMU's qemu-vdagent chardev (docs/CONSOLE.md).
DESKTOP_PACKAGES=(xserver-xorg-core xserver-xorg-input-libinput xserver-xorg-legacy xinit x11-xserver-utils
	x11-xkb-utils xauth icewm lxterminal pcmanfm firefox-esr spice-vdagent xclip fonts-dejavu-core
	dbus-x11 libpam-systemd keyboard-configuration adwaita-icon-theme)
if [ "${1:-}" = --desktop ]; then
	shift
	NAME=debian-12-desktop KERNEL=linux-image-amd64 DESKTOP=1 DISK_DEFAULT=4096
	PACKAGES+=("${DESKTOP_PACKAGES[@]}")
fi
PACKAGES+=("$KERNEL")

die() { echo "build-debian: $*" >&2; exit 1; }
say() { echo "build-debian: $*" >&2; }

if [ $# -lt 1 ] || [ $# -gt 2 ]; then die "usage: $0 [--desktop] OUTDIR [WORKDIR]"; fi
DISK_MB="${DEBIAN_DISK_MB:-$DISK_DEFAULT}"
case "$DISK_MB" in '' | *[!0-9]*) die "DEBIAN_DISK_MB must be a number of MiB" ;; esac
[ "$DISK_MB" -ge 1024 ] || die "DEBIAN_DISK_MB must be at least 1024"
[ "$(id -u)" = 0 ] || die "mmdebstrap's root mode needs root (make images runs this as root; make deps installs mmdebstrap)"
for tool in mmdebstrap mkfs.ext4 qemu-img flock sha256sum cmp "$PY"; do
	command -v "$tool" >/dev/null || die "$tool is missing (install: mmdebstrap e2fsprogs qemu-utils python3)"
done

# shellcheck source=lib.sh
. "$HERE/lib.sh"
image_begin "$1" "${2:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/vmgate/build/$NAME}"

# ---------------------------------------------------------------- 1. the tree
TREE="$STAGE/tree"
began=$(date +%s)
say "mmdebstrap $SUITE with ${#PACKAGES[@]} packages and their dependencies (cache: $WORKDIR/debs)"
(IFS=,; nice -n 10 mmdebstrap --mode=root --variant=apt --format=directory --include="${PACKAGES[*]}" \
	--aptopt='Acquire::Languages "none"' --skip=essential/unlink \
	--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
	--dpkgopt='path-include=/usr/share/locale/locale.alias' \
	--setup-hook="mkdir -p \"\$1/var/cache/apt/archives\"; find '$WORKDIR/debs' -name '*.deb' -exec cp -t \"\$1/var/cache/apt/archives\" {} +" \
	--customize-hook="find \"\$1/var/cache/apt/archives\" -name '*.deb' -exec cp -u -t '$WORKDIR/debs' {} +" \
	--customize-hook="'$HERE/debian-12/customize.sh' \"\$1\"" \
	--customize-hook="[ $DESKTOP = 0 ] || '$HERE/debian-12-desktop/customize.sh' \"\$1\"" \
	"$SUITE" "$TREE" \
	"deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
	"deb http://deb.debian.org/debian-security $SUITE-security main") >"$STAGE/mmdebstrap.log" 2>&1 ||
	die "mmdebstrap failed: $(tail -n 5 "$STAGE/mmdebstrap.log")"
say "tree built in $(($(date +%s) - began)) s: $(du -sm "$TREE" | cut -f1) MiB"
# Keep the cache to what this build used.
chroot "$TREE" dpkg-query -W -f '${Package}_${Version}\n' | sed 's/:/%3a/' | LC_ALL=C sort >"$STAGE/packages.txt"
for deb in "$WORKDIR/debs"/*.deb; do
	[ -f "$deb" ] || continue
	base="$(basename "$deb")"
	grep -qxF "${base%_*.deb}" "$STAGE/packages.txt" || rm -f "$deb"
done

# ---------------------------------------------------------------- 2. boot loader, disk
KREL="$(basename "$(readlink -f "$TREE/vmlinuz")" | sed 's/^vmlinuz-//')"
[ -e "$TREE/vmlinuz" ] && [ -e "$TREE/initrd.img" ] || die "the tree has no /vmlinuz or /initrd.img for the boot loader"
image_bootloader "$NEWOUT/boot.bin"
mkfs.ext4 -q -F -t ext4 -b 4096 -L vmgate-root -d "$TREE" "$STAGE/rootfs.ext4" "${DISK_MB}M" >/dev/null
qemu-img convert -f raw -O qcow2 "$STAGE/rootfs.ext4" "$NEWOUT/disk.qcow2"

# ---------------------------------------------------------------- 3. manifest, move into place
KPKG="$(chroot "$TREE" dpkg-query -W -f '${Package}=${Version}\n' 'linux-image-6*' | head -n 1)"
"$PY" "$HERE/manifest.py" write "$NEWOUT" "$NAME" "$KREL" boot.bin,disk.qcow2 "$KPKG" \
	"packages-sha256=$(sha256sum <"$STAGE/packages.txt" | cut -d' ' -f1)" \
	"packages=$(wc -l <"$STAGE/packages.txt")"
image_install
say "built $OUTDIR in $(($(date +%s) - began)) s: $(cd "$OUTDIR" && du -b boot.bin disk.qcow2 | awk '{ printf "%s %d KiB  ", $2, $1 / 1024 }')"
