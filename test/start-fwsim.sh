# Sourced by the test scripts: starts the simulator on an ephemeral port,
# exports FWSIM_URL and FWSIM_PID, and stops it on exit.
fwsim_portfile=$(mktemp)
rm -f "$fwsim_portfile"
test/fwsim/fwsim --port 0 --port-file "$fwsim_portfile" --quiet "$@" >/dev/null &
FWSIM_PID=$!
trap 'kill $FWSIM_PID 2>/dev/null; rm -f "$fwsim_portfile"' EXIT
for _ in $(seq 1 100); do
	[ -s "$fwsim_portfile" ] && break
	sleep 0.05
done
if [ ! -s "$fwsim_portfile" ]; then
	echo "fwsim did not start" >&2
	exit 1
fi
FWSIM_URL="http://127.0.0.1:$(cat "$fwsim_portfile")"
export FWSIM_URL FWSIM_PID
