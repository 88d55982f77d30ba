#!/usr/bin/env bash
# bench/overhead/compare.sh OLD_REV [NEW_REV]: per-call speed of two
# versions of fw_tier in the same run.  Each revision is built into a
# private relocated copy of PostgreSQL (nothing is installed into the
# system one), both clusters run side by side against the same nginx
# endpoint, and the rounds alternate between them so that machine noise
# hits both alike.  Prints both rates, the plain libcurl loop, and
# NEW/OLD.  NEW_REV defaults to the working tree.  Run as root from the
# repository root.  Target of the hardening release: NEW/OLD >= 0.97.
# The order within a round alternates as well.
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD_REV=${1:?usage: compare.sh OLD_REV [NEW_REV]}
NEW_REV=${2:-}
N=${N:-20000}
ROUNDS=${ROUNDS:-5}
root=$(pwd)
. bench/lib.sh

# build_copy NAME REV: PostgreSQL copy with fw_tier of REV installed;
# prints its bindir
build_copy() {
	local name=$1 rev=$2 pg="$BENCH_WORK/pg-$1" src="$BENCH_WORK/src-$1"
	mkdir -p "$pg/usr/lib" "$pg/usr/share" "$pg/usr/include"
	cp -a /usr/lib/postgresql "$pg/usr/lib/"
	cp -a /usr/share/postgresql "$pg/usr/share/"
	cp -a /usr/include/postgresql "$pg/usr/include/"
	mkdir -p "$src"
	if [ -n "$rev" ]; then
		git -C "$root" archive "$rev" | tar -x -C "$src"
	else
		(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$src")
	fi
	local bin="$pg/usr/lib/postgresql/15/bin"
	(cd "$src" && PATH="$bin:$PATH" make -s >/dev/null && PATH="$bin:$PATH" make -s install >/dev/null)
	echo "$bin"
}

# cluster NAME BINDIR PORT: start a cluster of that copy
cluster() {
	local name=$1 bin=$2 port=$3 data="$BENCH_WORK/data-$1"
	su fwtest -s /bin/bash -c "'$bin/initdb' -D '$data' -A trust -U postgres" >/dev/null
	cat >> "$data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$BENCH_WORK'
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'
CONF
	BENCH_CLUSTERS="$BENCH_CLUSTERS
$bin $data"
	su fwtest -s /bin/bash -c "'$bin/pg_ctl' -D '$data' -l '$BENCH_WORK/pg-$name.log' -w start" >/dev/null
	su fwtest -s /bin/bash -c "'$bin/psql' -X -q -h '$BENCH_WORK' -p $port -U postgres -d postgres -c 'CREATE EXTENSION fw_tier'" >/dev/null
}

# rate PORT BINDIR: sequential fw_complete calls/s ($N calls after a warm-up)
rate() {
	local q="DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); n bigint;
	  BEGIN SELECT count(fw_complete('x', 'batch')) INTO n FROM generate_series(1, 1000);
	  t0 := clock_timestamp();
	  SELECT count(fw_complete('x', 'batch')) INTO n FROM generate_series(1, $N);
	  RAISE NOTICE '%', round($N / extract(epoch FROM clock_timestamp() - t0), 1); END \$\$"
	su fwtest -s /bin/bash -c "$(printf '%q ' "$2/psql" -X -q -h "$BENCH_WORK" -p "$1" -U postgres -d postgres -c "$q")" 2>&1 |
		sed -n 's/^NOTICE: *//p'
}

start_reference
old_bin=$(build_copy old "$OLD_REV")
new_bin=$(build_copy new "$NEW_REV")
cluster old "$old_bin" $((PGPORT_BENCH + 2))
cluster new "$new_bin" $((PGPORT_BENCH + 3))

best_old=0; best_new=0; best_ref=0; ratios=""
for r in $(seq 1 "$ROUNDS"); do
	ref=$("$BENCH_WORK/curl_loop" "$URL/inference/v1/chat/completions" "$N")
	# who goes first alternates too
	if [ $((r % 2)) -eq 1 ]; then
		o=$(rate $((PGPORT_BENCH + 2)) "$old_bin")
		n=$(rate $((PGPORT_BENCH + 3)) "$new_bin")
	else
		n=$(rate $((PGPORT_BENCH + 3)) "$new_bin")
		o=$(rate $((PGPORT_BENCH + 2)) "$old_bin")
	fi
	echo "round $r: libcurl loop $ref, old ($OLD_REV) $o, new (${NEW_REV:-working tree}) $n calls/s"
	best_ref=$(best "$ref" "$best_ref"); best_old=$(best "$o" "$best_old"); best_new=$(best "$n" "$best_new")
	ratios="$ratios $(echo "$n $o" | awk '{printf "%.4f", $1 / $2}')"
done
# the median of the per-round ratios: each round's two runs are seconds
# apart, so it shrugs off load that comes and goes better than best-of
median=$(echo $ratios | tr ' ' '\n' | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
echo "RESULT compare: median of per-round new/old = $median (rounds:$ratios)"
echo "$best_new $best_old $best_ref" | awk -v R="$ROUNDS" '{printf "RESULT compare: new/old = %.3f (best of %d: %s vs %s calls/s); new/libcurl-loop = %.2f, old/libcurl-loop = %.2f\n", $1/$2, R, $1, $2, $1/$3, $2/$3}'
