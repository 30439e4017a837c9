#!/bin/sh
# mmdebstrap's customize hook for `images/build-debian.sh --desktop`, after images/debian-12/customize.sh:
# a desktop on the console. The user `user` (no password, sudo) is logged in on tty1, where X starts with
# IceWM; the clipboard goes through spice-vdagent, and the screen follows the console's size (a watcher
# in the session applies the size QEMU's virtio-gpu offers).
set -eu
R="$1"
HERE="$(dirname "$0")"
cp -R "$HERE/rootfs/." "$R/"
chmod 0755 "$R/usr/local/sbin/vmgate-resize" "$R/usr/local/sbin/vmgate-session"
chroot "$R" useradd --create-home --uid 1000 --shell /bin/bash --groups sudo,video,input,audio user
chroot "$R" passwd -d user >/dev/null
cp -R "$HERE/home/." "$R/home/user/"
chroot "$R" chown -R user:user /home/user
echo 'user ALL=(ALL) NOPASSWD: ALL' >"$R/etc/sudoers.d/vmgate-user"
chmod 0440 "$R/etc/sudoers.d/vmgate-user"
# X started by a user from the console, on virtio-gpu's KMS (no root rights needed, logind's session).
printf 'allowed_users=console\nneeds_root_rights=auto\n' >"$R/etc/X11/Xwrapper.config"
chroot "$R" systemctl enable -q vmgate-desktop-ready.path
# A warm clone gets a new name and SSH keys; the desktop session on tty1 stays (vmgate-clone).
mkdir -p "$R/etc/vmgate"
echo 'serial-getty@ttyS0.service spice-vdagentd.service' >"$R/etc/vmgate/clone-restart"
chroot "$R" update-initramfs -u -k all >/dev/null
