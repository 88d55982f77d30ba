#!/usr/bin/env bash
# bench/escalation: an interactive workload through a congestion spike.
#
# The simulator (capacity C per model) gets a background load of C slots on
# Standard for SPIKE_MS in the middle of each run, so every Standard request
# is shed with 503 Overloaded while it lasts; Priority is still admitted.
# The same workload (CLIENTS concurrent psql sessions calling fw_complete in
# a loop for RUN_S seconds, at most MAX_CALLS each) runs three times in the
# same spike schedule:
#   escalation       on_overload = 'priority', priority_window = WINDOW
#   always-standard  on_overload = 'retry' (backoff, max_attempts)
#   always-priority  path = 'priority'
# Success = calls that returned an answer; cost = sum(cost_usd) from
# fw_tier.calls with Priority priced 1.5x Standard.
# Target: escalation succeeds as often as always-priority, at <= 1.10x the
# cost of always-standard.  Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLIENTS=${CLIENTS:-8}
RUN_S=${RUN_S:-15}
MAX_CALLS=${MAX_CALLS:-20000}
CAPACITY=${CAPACITY:-16}
SPIKE_AT_MS=${SPIKE_AT_MS:-5000}
SPIKE_MS=${SPIKE_MS:-1500}
WINDOW=${WINDOW:-1 second}
TIME_SCALE=${TIME_SCALE:-0.05}
MODEL=accounts/fireworks/models/kimi-k2p6
. bench/lib.sh

make -s fwsim >/dev/null
test/fwsim/fwsim --port 0 --port-file "$BENCH_WORK/fwsim.port" --quiet \
	--time-scale "$TIME_SCALE" --capacity "$CAPACITY" >/dev/null &
FWSIM_PID=$!
for _ in $(seq 1 100); do [ -s "$BENCH_WORK/fwsim.port" ] && break; sleep 0.05; done
SIM="http://127.0.0.1:$(cat "$BENCH_WORK/fwsim.port")"

start_cluster "fw_tier.base_url = '$SIM/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.flush_interval = '200ms'
max_connections = 50"

bpsql -c "INSERT INTO fw_tier.prices VALUES
	('$MODEL', 'standard', 1.00, 0.50, 4.00),
	('$MODEL', 'priority', 1.50, 0.75, 6.00);
INSERT INTO fw_tier.workloads (workload, path, on_overload, priority_window) VALUES
	('b_escalation', 'standard', 'priority', '$WINDOW'),
	('b_standard', 'standard', 'retry', NULL),
	('b_priority', 'priority', 'retry', NULL);" >/dev/null

# client_sql WORKLOAD CLIENT: one client's loop (psql does not expand
# variables inside a dollar-quoted block, so the values are written in)
client_sql() {
	cat <<SQL
SET statement_timeout = '120s';
DO \$\$
DECLARE
  t_end timestamptz := clock_timestamp() + make_interval(secs => $RUN_S);
  ok int := 0;
  failed int := 0;
  i int := 0;
BEGIN
  WHILE clock_timestamp() < t_end AND i < $MAX_CALLS LOOP
    i := i + 1;
    BEGIN
      PERFORM fw_complete('question ' || i || ' of client $2', '$1');
      ok := ok + 1;
    EXCEPTION WHEN OTHERS THEN
      failed := failed + 1;
    END;
  END LOOP;
  RAISE NOTICE 'RESULT % %', ok, failed;
END \$\$;
SQL
}

# run_mode WORKLOAD: CLIENTS clients for RUN_S s, the spike at SPIKE_AT_MS
run_mode() {
	local wl=$1 c ok=0 failed=0
	curl -s -XPOST "$SIM/control/reset" >/dev/null
	curl -s "$SIM/control/config" -d "{\"capacity\":$CAPACITY,\"time_scale\":$TIME_SCALE}" >/dev/null
	bpsql -c "SELECT fw_deescalate('$wl')" >/dev/null
	for c in $(seq 1 "$CLIENTS"); do
		client_sql "$wl" "$c" > "$BENCH_WORK/client.$wl.$c.sql"
		chown fwtest "$BENCH_WORK/client.$wl.$c.sql"
		bpsql -f "$BENCH_WORK/client.$wl.$c.sql" > "$BENCH_WORK/out.$wl.$c" 2>&1 &
	done
	(sleep "$(awk "BEGIN {print $SPIKE_AT_MS / 1000}")"
	 curl -s "$SIM/control/load" -d "{\"model\":\"$MODEL\",\"load\":$CAPACITY,\"duration_ms\":$SPIKE_MS}" >/dev/null) &
	wait
	for c in $(seq 1 "$CLIENTS"); do
		read -r o f < <(sed -n 's/.*RESULT \([0-9]*\) \([0-9]*\).*/\1 \2/p' "$BENCH_WORK/out.$wl.$c")
		ok=$((ok + ${o:-0})); failed=$((failed + ${f:-0}))
	done
	echo "$ok $failed"
}

declare -A OK FAIL COST PRI ATT
for wl in b_escalation b_standard b_priority; do
	read -r o f < <(run_mode $wl)
	OK[$wl]=$o; FAIL[$wl]=$f
	bpsql -c "SELECT fw_flush()" >/dev/null
	read -r cost pri att logged_ok < <(bpsql -F ' ' -c "SELECT coalesce(sum(cost_usd), 0),
		count(*) FILTER (WHERE path = 'priority'), count(*),
		count(*) FILTER (WHERE outcome = 'ok')
		FROM fw_tier.calls WHERE workload = '$wl'")
	COST[$wl]=$cost; PRI[$wl]=$pri; ATT[$wl]=$att
	stats=$(curl -s "$SIM/control/stats")
	echo "$wl: calls $((o + f)), answered $o, failed $f; attempts $att (priority $pri); answered in the log $logged_ok; cost \$$cost"
	echo "  simulator: $stats"
done
bpsql -c "SELECT workload, trigger, windows_in_row, round(extract(epoch FROM priority_until - started)::numeric, 2) AS window_s
	FROM fw_tier.escalations ORDER BY id" | sed 's/^/  window: /'

pct() { awk "BEGIN {t = $1 + $2; printf \"%.2f\", (t > 0 ? 100 * $1 / t : 0)}"; }
s_esc=$(pct "${OK[b_escalation]}" "${FAIL[b_escalation]}")
s_std=$(pct "${OK[b_standard]}" "${FAIL[b_standard]}")
s_pri=$(pct "${OK[b_priority]}" "${FAIL[b_priority]}")
# cost per answered call, so that modes that made a different number of
# calls in RUN_S compare fairly; the totals are printed above
per_call() { awk "BEGIN {printf \"%.12f\", ($2 > 0 ? $1 / $2 : 0)}"; }
c_esc=$(per_call "${COST[b_escalation]}" "${OK[b_escalation]}")
c_std=$(per_call "${COST[b_standard]}" "${OK[b_standard]}")
c_pri=$(per_call "${COST[b_priority]}" "${OK[b_priority]}")
ratio=$(awk "BEGIN {printf \"%.3f\", $c_esc / $c_std}")
ratio_pri=$(awk "BEGIN {printf \"%.3f\", $c_pri / $c_std}")
ratio_total=$(awk "BEGIN {printf \"%.3f\", ${COST[b_escalation]} / ${COST[b_standard]}}")
echo "always-standard: success $s_std%; always-priority: cost ${ratio_pri} x always-standard per answered call"
echo "RESULT escalation: success $s_esc% (always-priority $s_pri%), cost $ratio x always-standard (per answered call; total spend $ratio_total x) (target: success = always-priority, cost <= 1.10x)"
