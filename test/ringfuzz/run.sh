#!/usr/bin/env bash
# The call-log ring fuzzer, for longer runs than t/051_ring.pl:
#   bash test/ringfuzz/run.sh SEED CASES [RING_SIZE]
# e.g. bash test/ringfuzz/run.sh 7 200 (as the user that runs the TAP suite).
# Damages pg_fw_tier/calllog.ring at random while the server is stopped and
# checks that it starts, never crashes and keeps the undamaged records.
set -euo pipefail
cd "$(dirname "$0")/../.."
seed=${1:-1}
cases=${2:-20}
bindir=$(pg_config --bindir)
pgxs=$(dirname "$(pg_config --pgxs)")/..
export PATH="$bindir:$PATH"
export TESTDIR="$(pwd)" PG_REGRESS="$pgxs/test/regress/pg_regress"
export FWSIM="$(pwd)/test/fwsim/fwsim"
export RINGFUZZ_SEED=$seed RINGFUZZ_CASES=$cases RINGFUZZ_RING=${3:-64kB}
mkdir -p tmp_check
exec prove -v -I "$pgxs/test/perl" -I t test/ringfuzz/ringfuzz.pl
