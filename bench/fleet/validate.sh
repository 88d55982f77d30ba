#!/usr/bin/env bash
# bench/fleet/validate.sh: one point of bench/fleet's simulation against
# the real thing.  N real clusters are too heavy for one machine, but
# fw_tier's escalation state is per (database, workload): N databases of
# one cluster, each with its own workload "fleet", are N servers as far
# as escalation goes (each learns of an overload by its own first 503).
#
# fwsim replays the burst trace (bench/economics/traces/burst.sched) in
# compressed time (SCALE real seconds per trace second, 1/120: the hour in
# 30 s, the 30-minute window in 15 s); every database gets CLIENTS pgbench
# clients sending RATE calls per trace second (RATE / SCALE real calls/s),
# under window_policy fixed.  The real figure is the number of attempts
# logged with outcome 'overloaded'; the simulation's is fleetsim's mean over
# 5 seeds for the same N, rate and the shed answers' measured latency (in
# trace seconds).
#
# Run as root from the repository root:  bash bench/fleet/validate.sh
# N=10 RATE=0.1 CLIENTS=2 (about 40 s, N x CLIENTS backends).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-10}
RATE=${RATE:-0.1}
CLIENTS=${CLIENTS:-2}
SCALE_INV=120
MODEL=accounts/fireworks/models/kimi-k2p6
. bench/lib.sh

make -s fwsim >/dev/null
cc -O2 -Wall -o "$BENCH_WORK/fleetsim" bench/fleet/fleetsim.c -lm
SIM_PORT=$((PGPORT_BENCH + 2))
SIM="http://127.0.0.1:$SIM_PORT"
window_s=$((1800 / SCALE_INV))
start_cluster "fw_tier.base_url = '$SIM/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.flush_interval = '100ms'
fw_tier.alert_windows = 1000
fw_tier.on_error = 'null'
fw_tier.backoff_base = '2ms'
fw_tier.backoff_cap = '67ms'
max_connections = $((N * CLIENTS + 20))"

test/fwsim/fwsim --port "$SIM_PORT" --port-file "$BENCH_WORK/fwsim.port" --quiet \
	--schedule bench/economics/traces/burst.sched --time-scale "$(awk "BEGIN {print 1 / $SCALE_INV}")" \
	--capacity 100000 >/dev/null &
FWSIM_PID=$!
for _ in $(seq 1 100); do [ -s "$BENCH_WORK/fwsim.port" ] && break; sleep 0.05; done
[ -s "$BENCH_WORK/fwsim.port" ] || { echo "fwsim did not start" >&2; exit 2; }

for i in $(seq 1 "$N"); do
	bpsql -c "CREATE DATABASE d$i" >/dev/null
	bpsql -d "d$i" -c "CREATE EXTENSION fw_tier;
		INSERT INTO fw_tier.workloads (workload, path, on_overload, window_policy, priority_window)
		VALUES ('fleet', 'standard', 'priority', 'fixed', '$window_s seconds')" >/dev/null
done
cat > "$BENCH_WORK/load.sql" <<'SQL'
\set q random(1, 1000000000)
SELECT fw_complete('question ' || :q, 'fleet');
SQL
chown fwtest "$BENCH_WORK/load.sql"

real_rate=$(awk "BEGIN {print $RATE * $SCALE_INV}")
run_s=$((3600 / SCALE_INV))
curl -s -XPOST "$SIM/control/reset" >/dev/null    # the trace starts now
pids=""
for i in $(seq 1 "$N"); do
	su fwtest -s /bin/bash -c "$(printf '%q ' "$BINDIR/pgbench" -n -h "$BENCH_WORK" -p "$PGPORT_BENCH" -U postgres \
		-c "$CLIENTS" -j 1 -R "$real_rate" -T "$run_s" -f "$BENCH_WORK/load.sql" "d$i")" \
		> "$BENCH_WORK/pgbench.d$i" 2>&1 &
	pids+=" $!"
done
for p in $pids; do wait "$p" || { cat "$BENCH_WORK"/pgbench.d* >&2; exit 2; }; done
bpsql -c "SELECT fw_flush()" >/dev/null

read -r calls shed dbs_shed lat_ms < <(bpsql -F ' ' -c "
	SELECT count(DISTINCT call_id), count(*) FILTER (WHERE outcome = 'overloaded'),
		   count(DISTINCT database) FILTER (WHERE outcome = 'overloaded'),
		   coalesce(round(avg(latency_ms) FILTER (WHERE outcome = 'overloaded')::numeric, 3), 0)
	FROM fw_tier.calls WHERE workload = 'fleet'")
shed_lat=$(awk "BEGIN {print $lat_ms / 1000 * $SCALE_INV}")
sim=$(for s in 1 2 3 4 5; do
	"$BENCH_WORK/fleetsim" --seed "$s" --trace bench/economics/traces/burst.sched --servers "$N" \
		--rate "$RATE" --policy fixed --signal local --shed-latency "$shed_lat"
done | awk '{for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] += kv[2] } n++}
	END {printf "%.1f %.1f %.1f", v["shed"] / n, v["shed_never_per_spike"] / n, v["calls"] / n}')
read -r sim_shed sim_never sim_calls <<<"$sim"
echo "N=$N databases x $CLIENTS clients, $RATE calls per trace second each ($real_rate real/s), burst trace at 1/$SCALE_INV"
echo "real: $calls calls, $shed shed (503 Overloaded) in $dbs_shed of $N databases; shed answer ${lat_ms} ms (${shed_lat} trace s)"
echo "simulation (5 seeds): $sim_calls calls, $sim_shed shed; a never-escalating fleet: $sim_never"
