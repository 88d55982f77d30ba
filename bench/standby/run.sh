#!/usr/bin/env bash
# bench/standby: a hot standby's calls and its shipped call log (issue 11).
# Against nginx returning a fixed answer (bench/lib.sh), loopback only.  Run
# as root from the repository root.
#
# (a) calls/s: sequential fw_complete calls in one backend on the primary
#     and on its streaming standby, alternating, same run (best of ROUNDS).
#     The standby's records are shipped meanwhile.
# (b) rows/s shipped: the standby's launcher stopped and its shipper
#     gone, CLIENTS backends fill the standby's ring with DRAIN_N records;
#     then the launcher resumes and fw_flush() on the standby returns once
#     the shipper has them all in the primary's fw_tier.calls AND replayed
#     back on the standby.  rows/s = rows / that time.  For comparison, the
#     same on the primary with its local flusher (as bench/calllog (b2)).
#     Target: shipped >= 20,000 rows/s.  Both checked for loss.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-10000}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-4}
DRAIN_N=${DRAIN_N:-100000}
. bench/lib.sh

start_reference
start_cluster "fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.log_buffer = '128MB'
max_connections = 50"
PRIMARY_PORT=$PGPORT_BENCH
STANDBY_PORT=$((PGPORT_BENCH + 2))
SDATA="$BENCH_WORK/standby"
su fwtest -s /bin/bash -c "'$BINDIR/pg_basebackup' -h '$BENCH_WORK' -p $PRIMARY_PORT -U postgres -D '$SDATA' -R -X stream" >/dev/null
echo "port = $STANDBY_PORT" >> "$SDATA/postgresql.conf"
BENCH_CLUSTERS="$BENCH_CLUSTERS
$BINDIR $SDATA"
su fwtest -s /bin/bash -c "'$BINDIR/pg_ctl' -D '$SDATA' -l '$BENCH_WORK/standby.log' -w start" >/dev/null

on() { PGPORT_BENCH=$1; shift; "$@"; }
trap 'kill -CONT ${SLAUNCHER:-0} 2>/dev/null || true; resume_drain; _bench_cleanup' EXIT

# ---- (a) calls/s on the primary and on the standby ----
best_p=0; best_s=0
for r in $(seq 1 "$ROUNDS"); do
	if [ $((r % 2)) -eq 1 ]; then
		p=$(on $PRIMARY_PORT fw_rate); s=$(on $STANDBY_PORT fw_rate)
	else
		s=$(on $STANDBY_PORT fw_rate); p=$(on $PRIMARY_PORT fw_rate)
	fi
	echo "round $r: primary $p calls/s; standby $s calls/s"
	best_p=$(best "$p" "$best_p"); best_s=$(best "$s" "$best_s")
done
on $STANDBY_PORT bpsql -c "SET statement_timeout = '300s'; SELECT fw_flush()" >/dev/null
echo "RESULT standby-rate: fw_complete $best_s calls/s on the standby, $best_p on the primary (standby/primary $(echo "$best_s $best_p" | awk '{printf "%.2f", $1 / $2}'))"

fill() {
	local tag=$1 per=$((DRAIN_N / CLIENTS))
	for c in $(seq 1 "$CLIENTS"); do
		bpsql -c "SELECT count(fw_complete('$tag $c ' || i, 'batch')) FROM generate_series(1, $per) i" >/dev/null &
	done
	wait
}

# ---- (b1) the primary's local flusher, for comparison ----
PGPORT_BENCH=$PRIMARY_PORT
bpsql -c "SET statement_timeout = '300s'; SELECT fw_flush()" >/dev/null
bpsql -c "TRUNCATE fw_tier.calls" >/dev/null
pause_drain
fill local
t0=$(date +%s.%N)
resume_drain
bpsql -c "SET statement_timeout = '300s'; SELECT fw_flush()" >/dev/null
t1=$(date +%s.%N)
lrows=$(bpsql -c "SELECT count(*) FROM fw_tier.calls")
local_rate=$(echo "$lrows $t0 $t1" | awk '{printf "%.0f", $1 / ($3 - $2)}')
echo "local flusher: $lrows rows in $(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}') s"
bpsql -c "TRUNCATE fw_tier.calls" >/dev/null

# ---- (b2) shipped by the standby ----
PGPORT_BENCH=$STANDBY_PORT
bpsql -c "SET statement_timeout = '300s'; SELECT fw_flush()" >/dev/null
SLAUNCHER=$(fw_worker_pid launcher)
[ -n "$SLAUNCHER" ] || { echo "no launcher on the standby" >&2; exit 1; }
kill -STOP "$SLAUNCHER"
bpsql -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'fw_tier shipper'" >/dev/null
for _ in $(seq 1 100); do [ -z "$(fw_worker_pid shipper)" ] && break; sleep 0.1; done
fill shipped
read -r used spilled < <(bpsql -F ' ' -c "SELECT bytes_used, spill_records FROM fw_tier.log_status")
t0=$(date +%s.%N)
kill -CONT "$SLAUNCHER"
bpsql -c "SET statement_timeout = '600s'; SELECT fw_flush()" >/dev/null
t1=$(date +%s.%N)
srows=$(on $PRIMARY_PORT bpsql -c "SELECT count(*) FROM fw_tier.calls")
sdistinct=$(on $PRIMARY_PORT bpsql -c "SELECT count(DISTINCT (origin_sysid, origin_node, call_id, attempt)) FROM fw_tier.calls")
ship_rate=$(echo "$srows $t0 $t1" | awk '{printf "%.0f", $1 / ($3 - $2)}')
echo "shipped: $srows rows ($sdistinct distinct; ring held $used bytes, spill $spilled records) in $(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}') s, replayed back on the standby"
echo "RESULT standby-ship: $ship_rate rows/s shipped to the primary over libpq (local flusher $local_rate rows/s, shipped/local $(echo "$ship_rate $local_rate" | awk '{printf "%.2f", $1 / $2}')); $((DRAIN_N / CLIENTS * CLIENTS - srows)) lost, $((srows - sdistinct)) duplicated (target >= 20000 rows/s, none lost)"
