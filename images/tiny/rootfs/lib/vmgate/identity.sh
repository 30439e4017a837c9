# Sourced by rcS, vmgate-clone-watch, vmgate-set-identity and vmgate-clone. Shell builtins and applets
# busybox runs without a new program only: a clone translates every guest instruction it runs anew
# (TCG's code is QEMU's own, per VM), and the first program a clone starts costs it about 10 000
# translated blocks, some 5 MiB of memory, for the kernel's exec paths alone (docs/IMAGES.md).
#
# vmgate_name sets $name to the name this VM should have:
# QEMU's -fw_cfg name=opt/vmgate/hostname,string=NAME (what a restored clone reads: its kernel command
# line is the template's), else vmgate.hostname=NAME on the kernel command line, else "tiny".
# A name that is not an RFC 1123 label becomes "tiny" and $bad_name holds it; $offered is the fw_cfg
# entry as read (empty without one).
# Shell builtins only: vmgate-clone-watch calls it five times a second without forking.
vmgate_name() {
	vmgate_offered
	name="$offered"
	bad_name=
	if [ -z "$name" ]; then
		read -r _cmdline </proc/cmdline
		for _arg in $_cmdline; do
			case "$_arg" in
			vmgate.hostname=*) name="${_arg#vmgate.hostname=}" ;;
			esac
		done
	fi
	case "$name" in
	'') name=tiny ;;
	-* | *- | *[!A-Za-z0-9-]*) bad_name="$name"; name=tiny ;;
	esac
	if [ "${#name}" -gt 63 ]; then bad_name="$name"; name=tiny; fi
}

# $offered: the fw_cfg entry as read. A restored clone reads it with the size the template's kernel
# saw at boot; the rest is NULs, which `read` drops.
vmgate_offered() {
	offered=
	[ -r /sys/firmware/qemu_fw_cfg/by_name/opt/vmgate/hostname/raw ] &&
		read -r offered </sys/firmware/qemu_fw_cfg/by_name/opt/vmgate/hostname/raw
}

# vmgate_set_identity NAME [new]: give this machine its name (hostname, /etc/hostname, /etc/hosts) and, when
# it has none yet or when asked to (a clone: "new"), a new /etc/machine-id: the kernel's random UUID
# without its dashes (what systemd makes too). /etc/hosts is read whole, then written in place: no rename
# without a program to do it.
vmgate_set_identity() {
	echo "$1" >/proc/sys/kernel/hostname
	echo "$1" >/etc/hostname
	_hosts=
	while IFS= read -r _line; do
		case "$_line" in
		"127.0.1.1 "* | "127.0.1.1	"*) ;;
		*) _hosts="$_hosts$_line
" ;;
		esac
	done </etc/hosts
	printf '%s127.0.1.1\t%s\n' "$_hosts" "$1" >/etc/hosts
	if [ "$2" = new ] || [ ! -s /etc/machine-id ]; then
		read -r _uuid </proc/sys/kernel/random/uuid
		# shellcheck disable=SC3060 # busybox ash has ${var//a/b}
		echo "${_uuid//-/}" >/etc/machine-id
	fi
}

# vmgate_clone NAME: make a clone restored from a warm template's memory state a machine of its own: the
# clock from the RTC (it follows the host; the system clock stopped when the state was saved), fresh
# entropy from the host (virtio-rng) mixed into the kernel's pool and the RNG reseeded at once, the VM's
# name, a new machine id; then the ready line. No program is started: `date` and `head` are applets busybox
# runs in a fork of this shell, and the reseeder (vmgate-reseed) has waited on fds 4 and 5 since the
# template's boot when $vmgate_reseeder is set (vmgate-clone-watch; otherwise it is started here). The
# serial console's shell is the one the template's boot started, still waiting at its prompt, which was
# printed before the save: the prompt is printed again after the ready line, as a new shell would.
vmgate_clone() {
	if ! { read -r _now </sys/class/rtc/rtc0/since_epoch && date -u -s "@$_now" >/dev/null; } 2>/dev/null; then
		vmgate_log "clone: cannot read the RTC; the clock may be wrong"
	fi
	if [ -c /dev/hwrng ] && head -c 64 /dev/hwrng >/dev/urandom 2>/dev/null; then
		_seeded=
		if [ -n "$vmgate_reseeder" ]; then
			echo >&4 && read -r -t 5 -n 1 _seeded <&5
		else
			_seeded=$(echo | /sbin/vmgate-reseed)
		fi
		[ "$_seeded" = 0 ] || vmgate_log "clone: reseeding the kernel RNG failed"
	else
		vmgate_log "clone: no hardware RNG; the kernel RNG reseeds on its own within a minute"
	fi
	vmgate_set_identity "$1" new
	sync
	vmgate_log "clone of a warm template is now $1"
	vmgate_log "ready"
	printf '~ # ' >/dev/ttyS0 2>/dev/null
}

vmgate_log() {
	echo "vmgate-tiny: $*" >/dev/ttyS0 2>/dev/null
}
