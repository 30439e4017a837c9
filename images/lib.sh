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
	if [ "${FORCE:-0}" != 1 ] && [ -f "$OUTDIR/manifest.json" ] && "$PY" "$HERE/manifest.py" check "$OUTDIR" 2>/dev/null
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
