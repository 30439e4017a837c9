#!/bin/sh
# mmdebstrap's customize hook for images/build-debian.sh: make the tree in $1 a VM's root file system.
set -eu
R="$1"
cp -R "$(dirname "$0")/rootfs/." "$R/"
chmod 0755 "$R/usr/local/sbin/vmgate-nocloud-seed" "$R/usr/local/sbin/vmgate-name" "$R/usr/local/sbin/vmgate-clone" \
	"$R/usr/local/sbin/vmgate-clone-watch"
echo debian >"$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
echo LANG=C.UTF-8 >"$R/etc/default/locale"
# The root file system is the whole virtio disk (direct kernel boot, no partition table).
echo 'LABEL=vmgate-root / ext4 rw,errors=remount-ro 0 1' >"$R/etc/fstab"
# The console is the product (as on tiny): root logs in on tty1 and ttyS0 without a password. No
# network reaches a VM yet, and sshd refuses empty passwords.
chroot "$R" passwd -d root >/dev/null
echo qemu_fw_cfg >"$R/etc/modules-load.d/qemu_fw_cfg.conf"
chroot "$R" systemctl enable -q vmgate-nocloud-seed.service vmgate-ready.service vmgate-clone-watch.service
mkdir -p "$R/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' >"$R/etc/systemd/network/80-dhcp.network"
chroot "$R" systemctl enable -q systemd-networkd.service
# What makes a TCG boot slow, or hang without a NIC: waiting for the network (about 2 minutes), and
# timers nobody on a console VM waits for.
chroot "$R" systemctl mask -q systemd-networkd-wait-online.service
chroot "$R" systemctl disable -q apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
	fstrim.timer 2>/dev/null || true
# Every VM its own machine id and SSH host keys, made at its first boot (systemd, cloud-init).
rm -f "$R"/etc/ssh/ssh_host_*
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
# mmdebstrap keeps its doc/man exclusions for later installs too; a VM's own apt installs them.
rm -f "$R/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
chroot "$R" update-initramfs -u -k all >/dev/null
