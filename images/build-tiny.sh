#!/usr/bin/env bash
# Build the "tiny" base image from Debian packages only:
#   a Debian cloud kernel, a busybox initramfs and a busybox ext4 root file system (qcow2).
#
# Usage: images/build-tiny.sh OUTDIR [WORKDIR]
#   OUTDIR   where boot.bin (GRUB, images/lib.sh), disk.qcow2 and manifest.json end up (read-only files);
#            the kernel and the initramfs are in the disk: /vmlinuz and /initrd.img, as on Debian
#   WORKDIR  download cache and scratch space (default: ~/.cache/vmgate/build/tiny)
#   FORCE=1  rebuild even when OUTDIR/manifest.json matches the files
#   TINY_DISK_MB  size of the root file system in the base image (default 128; VMs grow it at boot)
#
# Runs on Debian 12 (amd64) after apt-get update; downloads with apt-get download (no root needed
# for that), builds without root, mounts nothing and uses no loop devices.
# Beyond the project's base packages (qemu-utils, busybox-static, e2fsprogs, cpio, zstd, xz-utils)
# it uses only programs from essential packages (dpkg, apt, coreutils, gzip, util-linux) and python3.
# needs: python3
set -euo pipefail
umask 022

NAME=tiny
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=python3

die() { echo "build-tiny: $*" >&2; exit 1; }
say() { echo "build-tiny: $*" >&2; }

if [ $# -lt 1 ] || [ $# -gt 2 ]; then die "usage: $0 OUTDIR [WORKDIR]"; fi
DISK_MB="${TINY_DISK_MB:-128}"
case "$DISK_MB" in '' | *[!0-9]*) die "TINY_DISK_MB must be a number of MiB" ;; esac
[ "$DISK_MB" -ge 32 ] || die "TINY_DISK_MB must be at least 32"

for tool in apt-cache apt-get dpkg-deb cpio gzip mkfs.ext4 debugfs qemu-img flock sha256sum cmp grub-mkimage "$PY"; do
	command -v "$tool" >/dev/null || die "$tool is missing (install: qemu-utils busybox-static e2fsprogs cpio python3)"
done

# shellcheck source=lib.sh
. "$HERE/lib.sh"
image_begin "$1" "${2:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/vmgate/build/$NAME}"

# ---------------------------------------------------------------- 1. packages
# The real kernel package behind the linux-image-cloud-amd64 meta package.
KPKG="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
[ -n "$KPKG" ] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update)"
# The guest's resize2fs (grows / to the VM's disk size) and the libraries it links against.
PACKAGES=("$KPKG" busybox-static e2fsprogs libext2fs2 libcom-err2 libc6)

declare -A VERSION DEB
for pkg in "${PACKAGES[@]}"; do
	ver="$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ { print $2; exit }')"
	[ -n "$ver" ] || die "no installable version of $pkg (run apt-get update)"
	VERSION[$pkg]="$ver"
	file=""
	for candidate in "$WORKDIR/debs/${pkg}_"*.deb; do
		[ -f "$candidate" ] || continue
		if [ "$(dpkg-deb -f "$candidate" Package 2>/dev/null)" = "$pkg" ] &&
			[ "$(dpkg-deb -f "$candidate" Version 2>/dev/null)" = "$ver" ]; then
			file="$candidate"
			break
		fi
	done
	if [ -z "$file" ]; then
		say "downloading $pkg $ver"
		# apt warns when its _apt user cannot write here; the download itself is fine.
		(cd "$WORKDIR/debs" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' >&2) || true
		for candidate in "$WORKDIR/debs/${pkg}_"*.deb; do
			[ -f "$candidate" ] && [ "$(dpkg-deb -f "$candidate" Version)" = "$ver" ] && file="$candidate"
		done
		[ -n "$file" ] || die "apt-get download $pkg=$ver failed"
	else
		say "using cached $(basename "$file")"
	fi
	DEB[$pkg]="$file"
	# Keep one version per package in the cache.
	for candidate in "$WORKDIR/debs/${pkg}_"*.deb; do
		[ "$candidate" = "$file" ] || [ "$(dpkg-deb -f "$candidate" Package 2>/dev/null)" != "$pkg" ] || rm -f "$candidate"
	done
done

mkdir -p "$STAGE/kernel" "$STAGE/busybox" "$STAGE/userland"
dpkg-deb -x "${DEB[$KPKG]}" "$STAGE/kernel"
dpkg-deb -x "${DEB[busybox-static]}" "$STAGE/busybox"
for pkg in e2fsprogs libext2fs2 libcom-err2 libc6; do
	dpkg-deb -x "${DEB[$pkg]}" "$STAGE/userland"
done

MODROOT="$(find "$STAGE/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
[ -n "$MODROOT" ] || die "$KPKG has no /lib/modules"
KREL="$(basename "$MODROOT")"
VMLINUZ="$STAGE/kernel/boot/vmlinuz-$KREL"
[ -f "$VMLINUZ" ] || die "$KPKG has no /boot/vmlinuz-$KREL"
BUSYBOX="$STAGE/busybox/bin/busybox"
[ -x "$BUSYBOX" ] || die "busybox-static has no /bin/busybox"
say "kernel $KREL ($KPKG ${VERSION[$KPKG]}), busybox ${VERSION[busybox-static]}"

# Timestamps inside the image: the kernel's, unless SOURCE_DATE_EPOCH says otherwise.
EPOCH="${SOURCE_DATE_EPOCH:-$(stat -c %Y "$VMLINUZ")}"

# Install busybox at ROOT/bin/busybox with a symlink for every applet it has.
install_busybox() {
	local root="$1" applet
	install -D -m 0755 "$BUSYBOX" "$root/bin/busybox"
	while read -r applet; do
		case "$applet" in "" | bin/busybox | linuxrc) continue ;; esac
		mkdir -p "$root/$(dirname "$applet")"
		[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
	done < <("$BUSYBOX" --list-full)
}

# ---------------------------------------------------------------- 2. initramfs
INITRAMFS="$STAGE/initramfs"
mkdir -p "$INITRAMFS"/{dev,proc,sys,newroot,tmp}
install_busybox "$INITRAMFS"
install -m 0755 "$HERE/tiny/initramfs/init" "$INITRAMFS/init"
# virtio_pci + virtio_blk for /dev/vda; ext4 is built into Debian's cloud kernel (kmods.py says so).
"$PY" "$HERE/kmods.py" "$MODROOT" "$INITRAMFS" virtio_pci virtio_blk ext4 >/dev/null
find "$INITRAMFS" -exec touch -h -d "@$EPOCH" {} +
(cd "$INITRAMFS" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --quiet --null -o -H newc --owner=0:0 --reproducible) | gzip -9 -n >"$STAGE/initrd.img"

# ---------------------------------------------------------------- 3. root file system
ROOTFS="$STAGE/rootfs"
mkdir -p "$ROOTFS"/{dev,proc,sys,tmp,run,root,mnt,home,etc,var/log,var/lib/vmgate,usr/share/udhcpc}
install_busybox "$ROOTFS"
cp -R "$HERE/tiny/rootfs/." "$ROOTFS/"
chmod 0755 "$ROOTFS/etc/init.d/rcS" "$ROOTFS/etc/init.d/rcK" "$ROOTFS/etc/acpi/PWRF/00000080" \
	"$ROOTFS/sbin/vmgate-growfs" "$ROOTFS/sbin/vmgate-userdata" "$ROOTFS/usr/share/udhcpc/default.script" \
	"$ROOTFS/sbin/vmgate-set-identity" "$ROOTFS/sbin/vmgate-clone-watch" "$ROOTFS/sbin/vmgate-clone"
# RNDRESEEDCRNG for clones of a warm template (no busybox applet issues ioctls; reseed.py says how).
"$PY" "$HERE/reseed.py" "$ROOTFS/sbin/vmgate-reseed"
chmod 0640 "$ROOTFS/etc/shadow"
chmod 0700 "$ROOTFS/root"
chmod 1777 "$ROOTFS/tmp"
ln -s /proc/self/mounts "$ROOTFS/etc/mtab"
ln -s /run "$ROOTFS/var/run"
echo "$NAME" >"$ROOTFS/etc/hostname"
# The kernel and initramfs the boot loader reads, laid out as Debian does.
install -D -m 0644 "$VMLINUZ" "$ROOTFS/boot/vmlinuz-$KREL"
install -m 0644 "$STAGE/initrd.img" "$ROOTFS/boot/initrd.img-$KREL"
ln -s "boot/vmlinuz-$KREL" "$ROOTFS/vmlinuz"
ln -s "boot/initrd.img-$KREL" "$ROOTFS/initrd.img"
# Everything the root needs: the disk modules again (so lsmod/modprobe know them), the ACPI power
# button and its input events (acpid), fw_cfg in sysfs (user data, the VM's name), virtio-net (the NIC
# Nomad's port_map adds), virtio-rng (the host's entropy, which clones of a warm template reseed from).
# The cloud kernel has no driver for QEMU's default e1000 NIC, so that one stays unused.
"$PY" "$HERE/kmods.py" "$MODROOT" "$ROOTFS" virtio_pci virtio_blk button evdev qemu_fw_cfg virtio_net \
	virtio_rng >/dev/null
"$PY" "$HERE/elfdeps.py" "$STAGE/userland" "$ROOTFS" sbin/resize2fs >/dev/null
find "$ROOTFS" -exec touch -h -d "@$EPOCH" {} +

# ext4 straight from the directory (mkfs.ext4 -d): no mounting, no loop device, no root needed.
# 4 KiB blocks so the file system stays sensible once a VM grows it to gigabytes.
FSUUID="$(printf '%s' "$NAME $KPKG ${VERSION[$KPKG]} ${VERSION[busybox-static]}" | sha256sum |
	sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')"
E2FSPROGS_FAKE_TIME="$EPOCH" mkfs.ext4 -q -F -t ext4 -b 4096 -L vmgate-tiny -U "$FSUUID" \
	-E "root_owner=0:0,hash_seed=$FSUUID" -d "$ROOTFS" "$STAGE/rootfs.ext4" "${DISK_MB}M" >/dev/null
# mkfs.ext4 -d copies each file's ctime (the time of this build) and owner (the builder): pin the
# ctimes so a rebuild from the same packages gives the same disk.qcow2, and make root own everything.
BUILDER_UID="$(id -u)"
(cd "$ROOTFS" && find . | LC_ALL=C sort | sed -e 's|^\.||' -e 's|^$|/|') | while IFS= read -r path; do
	printf 'sif "%s" ctime @%s\n' "$path" "$EPOCH"
	[ "$BUILDER_UID" = 0 ] || printf 'sif "%s" uid 0\nsif "%s" gid 0\n' "$path" "$path"
done | E2FSPROGS_FAKE_TIME="$EPOCH" debugfs -w -f - "$STAGE/rootfs.ext4" >"$STAGE/debugfs.log" 2>&1 || die "debugfs failed: $(tail -n 3 "$STAGE/debugfs.log")"
qemu-img convert -f raw -O qcow2 "$STAGE/rootfs.ext4" "$NEWOUT/disk.qcow2"

# ---------------------------------------------------------------- 4. boot loader, manifest, move into place
image_bootloader "$NEWOUT/boot.bin"
SOURCES=()
for pkg in "${PACKAGES[@]}"; do SOURCES+=("$pkg=${VERSION[$pkg]}"); done
"$PY" "$HERE/manifest.py" write "$NEWOUT" "$NAME" "$KREL" boot.bin,disk.qcow2 "${SOURCES[@]}"
image_install
say "built $OUTDIR: $(cd "$OUTDIR" && du -b boot.bin disk.qcow2 | awk '{ printf "%s %d KiB  ", $2, $1 / 1024 }')"
