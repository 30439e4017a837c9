# Sourced by images/build-tiny.sh and images/build-debian.sh: what every base image build does the same way.
# The caller sets NAME (the image), PY (python3) and HERE (images/) and defines die/say first.

# image_begin OUTDIR WORKDIR: set OUTDIR (absolute) and WORKDIR; exit 0 when OUTDIR matches its manifest
# (unless FORCE=1); else take the work directory's lock (one build at a time) and make STAGE (scratch,
# removed on exit) and NEWOUT (the new image, next to OUTDIR so that image_install's rename is atomic).
image_begin() {
	OUTDIR="$1"
	WORKDIR="$2"
	mkdir -p "$(dirname "$OUTDIR")"
	OUTDIR="$(cd "$(dirname "$OUTDIR")" && pwd)/$(basename "$OUTDIR")"
	# boot.bin: images from before the boot loader (a kernel and initrd beside the disk) are rebuilt.
	if [ "${FORCE:-0}" != 1 ] && [ -f "$OUTDIR/manifest.json" ] && [ -f "$OUTDIR/boot.bin" ] &&
		"$PY" "$HERE/manifest.py" check "$OUTDIR" 2>/dev/null
	then
		echo "$NAME image up to date"
		exit 0
	fi
	mkdir -p "$WORKDIR/debs"
	WORKDIR="$(cd "$WORKDIR" && pwd)"
	exec 9>"$WORKDIR/.lock"
	flock 9
	STAGE="$(mktemp -d "$WORKDIR/stage.XXXXXX")"
	NEWOUT="$(mktemp -d "$(dirname "$OUTDIR")/.$NAME.new.XXXXXX")"
	trap 'rm -rf "$STAGE" "$NEWOUT"' EXIT
	trap "exit 1" INT TERM HUP
}

# image_install: make NEWOUT's files read-only and put NEWOUT in OUTDIR's place.
image_install() {
	chmod 0444 "$NEWOUT"/*
	chmod 0755 "$NEWOUT"
	if [ -f "$OUTDIR/disk.qcow2" ] && ! cmp -s "$OUTDIR/disk.qcow2" "$NEWOUT/disk.qcow2"; then
		say "warning: disk.qcow2 changed; overlays made on the previous $NAME image must be recreated"
	fi
	if [ -e "$OUTDIR" ]; then
		local old
		old="$(mktemp -d "$(dirname "$OUTDIR")/.$NAME.old.XXXXXX")"
		rmdir "$old"
		mv "$OUTDIR" "$old"
		mv "$NEWOUT" "$OUTDIR"
		rm -rf "$old"
	else
		mv "$NEWOUT" "$OUTDIR"
	fi
}

# image_bootloader OUT: write GRUB (BIOS build, from Debian's grub-pc-bin) as a Linux-bootable image to
# OUT, the file QEMU's -kernel loads. It boots the disk's /vmlinuz and /initrd.img with the command line
# QEMU gives as an SMBIOS OEM string (-smbios type=11,value=CMDLINE, jobspecs/render.py).
# Why not QEMU's -kernel vmlinuz: QEMU keeps a copy of the kernel it loads for as long as it runs (to
# serve it through fw_cfg again on a reboot), about 14 MiB of private memory in every VM, clones of a
# warm template included; GRUB is 140 KiB, and it reads the kernel into guest memory, which clones share.
image_bootloader() {
	local out="$1" cfg
	for tool in grub-mkimage; do
		command -v "$tool" >/dev/null || die "$tool is missing (install: grub-common grub-pc-bin)"
	done
	[ -f /usr/lib/grub/i386-pc/lnxboot.img ] || die "/usr/lib/grub/i386-pc is missing (install: grub-pc-bin)"
	cfg="$(mktemp "$STAGE/grub.XXXXXX")"
	# SMBIOS type 11's first field (offset 4) is its string count; with one string, --get-string 4 is
	# that string. eval splits it into the kernel's arguments (the renderer allows no GRUB syntax in it).
	cat >"$cfg" <<-'CFG'
		set root=(hd0)
		smbios --type 11 --get-string 4 --set cmdline
		if [ -z "$cmdline" ]; then echo "vmgate: no kernel command line (QEMU -smbios type=11,value=...)"; fi
		eval linux /vmlinuz $cmdline
		initrd /initrd.img
		boot
	CFG
	grub-mkimage -O i386-pc -o "$STAGE/core.img" -c "$cfg" -p '(hd0)/boot/grub' \
		biosdisk ext2 linux boot smbios eval test echo || die "grub-mkimage failed"
	cat /usr/lib/grub/i386-pc/lnxboot.img "$STAGE/core.img" >"$out"
}
