#!/usr/bin/env bash
# bench/budget: the per-call cost of a spend limit (issue 13).  Sequential
# fw_complete calls in one backend against the fixed-answer nginx
# endpoint, with no budget and with one budget in force on the workload
# (reserve before, settle after each call), alternating block by block in
# the same session (the order flips every round).  Reports the backend's
# CPU time per call (utime + stime from /proc, less sensitive than wall
# time to the other tenants of a shared machine) and the wall rate, each
# as the median of the per-round with/without ratios.  Target: the budget
# costs no more than 3% (CPU per call ratio <= 1.03).  Run as root from the
# repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20000}
ROUNDS=${ROUNDS:-6}
. bench/lib.sh

start_reference
start_cluster "fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'"
bpsql -c "SELECT fw_tier.set_price('accounts/fireworks/models/kimi-k2p6', 'standard', 1, 0.5, 4)" >/dev/null

on="INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('bench', 'batch', 'month', 1000000) ON CONFLICT DO NOTHING;"
off="DELETE FROM fw_tier.budgets;"
{
	echo "SELECT pg_backend_pid() AS pid \\gset"
	echo "\\setenv BACKEND_PID :pid"
	echo "SELECT count(fw_complete('warm up', 'batch')) FROM generate_series(1, 2000);"
	for r in $(seq 1 "$ROUNDS"); do
		if [ $((r % 2)) = 1 ]; then order="none one"; else order="one none"; fi
		for what in $order; do
			if [ "$what" = one ]; then echo "$on"; else echo "$off"; fi
			echo "SELECT count(fw_complete('x', 'batch')) FROM generate_series(1, 500);"
			echo "\\! awk '{print \"MARK $r $what cpu0\", \$14 + \$15}' /proc/\$BACKEND_PID/stat"
			echo "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); n bigint;
  BEGIN SELECT count(fw_complete('x', 'batch')) INTO n FROM generate_series(1, $N);
  RAISE NOTICE 'MARK $r $what wall %', round(extract(epoch FROM clock_timestamp() - t0) * 1000, 1); END \$\$;"
			echo "\\! awk '{print \"MARK $r $what cpu1\", \$14 + \$15}' /proc/\$BACKEND_PID/stat"
		done
	done
	echo "$on"
	echo "SELECT 'MARK spent ' || spent_usd || ' refusals ' || refusals FROM fw_tier.budget_status WHERE budget = 'bench';"
} > "$BENCH_WORK/budget.sql"
chown fwtest "$BENCH_WORK/budget.sql"
out=$(bpsql -f "$BENCH_WORK/budget.sql" 2>&1 | grep -o 'MARK.*')

rows=$(echo "$out" | awk -v N="$N" '
	$1 == "MARK" && $4 == "cpu0" { c0[$2 " " $3] = $5 }
	$1 == "MARK" && $4 == "cpu1" { c1[$2 " " $3] = $5 }
	$1 == "MARK" && $4 == "wall" { w[$2 " " $3] = $5 }
	END {
		for (k in w) {
			split(k, a, " "); if (a[2] != "one") continue
			r = a[1]
			cn = c1[r " none"] - c0[r " none"]; co = c1[r " one"] - c0[r " one"]
			wn = w[r " none"]; wo = w[r " one"]
			printf "ROW %s %.1f %.0f %.1f %.0f %.4f %.4f\n", r, cn * 10000 / N, N / wn * 1000,
				co * 10000 / N, N / wo * 1000, (cn > 0) ? co / cn : 1, wn / wo
		}
	}' | sort -k2 -n)
echo "$rows" | awk '{printf "round %s: no budget %s us CPU/call, %s calls/s; one budget %s us CPU/call, %s calls/s\n", $2, $3, $4, $5, $6}'
median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
mc=$(echo "$rows" | awk '{print $7}' | median)
mw=$(echo "$rows" | awk '{print $8}' | median)
spent=$(echo "$out" | awk '$2 == "spent" {print $3 " spent, " $5 " refusals"}')
echo "RESULT budget: CPU per call with/without one budget = $mc, wall rate with/without = $mw (medians of $ROUNDS rounds of $N calls; target CPU ratio <= 1.03); budget: \$$spent"

# perf: the CPU share of the spend functions in a stream of budgeted calls
# (a figure the machine's other tenants disturb less than timings)
PERF_S=${PERF_S:-5}
if command -v perf >/dev/null; then
	bpsql -c "$on" >/dev/null
	bpsql -c "SET application_name = 'budget-perf';
	  SELECT count(fw_complete('x', 'batch')) FROM generate_series(1, 1000000)" >/dev/null 2>&1 &
	CALLER=$!
	sleep 1
	BPID=$(bpsql -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'budget-perf'")
	perf record -q -g -F 1999 -p "$BPID" -o "$BENCH_WORK/perf.data" -- sleep "$PERF_S" >/dev/null 2>&1
	bpsql -c "SELECT pg_cancel_backend($BPID)" >/dev/null
	wait $CALLER 2>/dev/null || true
	perf report -i "$BENCH_WORK/perf.data" --children --sort sym --stdio -q -g none 2>/dev/null \
		> "$BENCH_WORK/perf.txt" || true
	share=$(awk '/ fw_spend_(begin|reserve|settle|premium_blocked)$/ {gsub("%", "", $1); s += $1} END {printf "%.2f", s}' "$BENCH_WORK/perf.txt")
	grep -E " fw_spend_" "$BENCH_WORK/perf.txt" | head -8 | sed 's/^/  /' || true
	echo "RESULT budget-cpu: reserve + settle (fw_spend_* with children) = $share% of the calling backend's CPU samples (target <= 3%)"
fi
