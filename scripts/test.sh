#!/usr/bin/env bash
# Every test of fw_tier, on a fresh Debian 12 machine: installs what it
# needs, builds, then runs the simulator's suite, the pg_regress suite and
# the TAP suite.  Run as root (or through sudo, which it uses by itself); the throwaway clusters run as user fwtest.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/root.sh
fw_require_root "$@"
root=$(pwd)

bash scripts/setup.sh || { echo "setup failed"; exit 1; }

# A private copy the unprivileged user can write in (results, tmp_check).
work=$(mktemp -d /tmp/fw_tier-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -a "$root/." "$work/"
chown -R fwtest "$work"
as_fwtest() { su fwtest -s /bin/bash -c "cd '$work' && $*"; }

passed=0; failed=0; failed_names=""
suite() {
	local name=$1; shift
	echo "=== suite: $name ==="
	local t0=$SECONDS
	if "$@"; then
		passed=$((passed + 1)); echo "=== $name: ok ($((SECONDS - t0)) s) ==="
	else
		failed=$((failed + 1)); failed_names="$failed_names $name"
		echo "=== $name: FAILED ($((SECONDS - t0)) s) ==="
	fi
}

suite fwsim bash test/fwsim/run-tests.sh
suite regress as_fwtest bash test/run-regress.sh
suite tap as_fwtest bash test/run-tap.sh

[ -n "$failed_names" ] && echo "failed suites:$failed_names"
echo "suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
