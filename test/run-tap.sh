#!/usr/bin/env bash
# TAP suite (PostgreSQL::Test::Cluster): what SQL alone cannot show.
set -euo pipefail
cd "$(dirname "$0")/.."
bindir=$(pg_config --bindir)
pgxs=$(dirname "$(pg_config --pgxs)")/..
export PATH="$bindir:$PATH"
export TESTDIR="$(pwd)" PG_REGRESS="$pgxs/test/regress/pg_regress"
export FWSIM="$(pwd)/test/fwsim/fwsim"
rm -rf tmp_check && mkdir -p tmp_check
# With arguments, only those files (e.g. t/050_hostile_sql.pl).
if [ $# -gt 0 ]; then files=("$@"); else files=(t/*.pl); fi
exec prove -I "$pgxs/test/perl" -I t ${PROVE_FLAGS:-} "${files[@]}"
