# Sourced by rcS and vmgate-clone-watch. vmgate_name sets $name to the name this VM should have:
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
