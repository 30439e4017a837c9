# The desktop on tty1 (the console): X with IceWM, started once per login. On any other terminal, a shell.
[ -f ~/.bashrc ] && . ~/.bashrc
if [ -z "${DISPLAY:-}" ] && [ "$(tty)" = /dev/tty1 ]; then
	exec /usr/local/sbin/vmgate-session
fi
