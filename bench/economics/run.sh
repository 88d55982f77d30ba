#!/usr/bin/env bash
# bench/economics: what each window policy costs on realistic congestion.
#
# Each trace of bench/economics/traces (see its README: how each was
# derived) is replayed by fwsim (--schedule) in compressed time: one trace
# second lasts SCALE real seconds, the same SCALE for every latency fwsim
# simulates and for every fw_tier time setting (priority_window 30 min,
# probe_interval 10 s, backoff 250 ms .. 8 s), so the run is the trace,
# only faster.  The same client load (pgbench, CLIENTS clients, RATE calls
# a second in real time, on_error null) runs the trace under four
# policies:
#   always-standard  path standard, on_overload retry (backoff, max_attempts 3)
#   always-priority  path priority
#   fixed            on_overload priority, window_policy fixed
#   probe            on_overload priority, window_policy probe
# and the table has, per policy: calls, success (calls answered), p99 of
# a call's latency (real ms in the compressed run: relative only), total
# cost (fw_tier.calls.cost_usd, Priority priced 1.5x Standard), cost per
# answered call as a ratio to always-standard's, and the minutes of trace
# time the workload spent in Priority windows.  Targets, on every trace:
# probe answers as many calls as always-priority (within 0.1 percentage
# point) and costs at most 1.03x always-standard per answered call.
#
# Run as root from the repository root:  bash bench/economics/run.sh
# TRACES="burst day" limits the traces; RATE, CLIENTS change the load;
# POLICIES="always-standard probe" limits the policies (always-standard
# first: it is the reference); PROBE_SHARE=0.5 and PROBE_SUCCESSES=2 set
# fw_tier.probe_share and fw_tier.probe_successes.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRACES=${TRACES:-burst plateau flapping day}
RATE=${RATE:-100}
CLIENTS=${CLIENTS:-4}
MODEL=accounts/fireworks/models/kimi-k2p6
POLICIES=${POLICIES:-always-standard always-priority fixed probe}
PROBE_SHARE=${PROBE_SHARE:-}    # empty: fw_tier.probe_share's default
PROBE_SUCCESSES=${PROBE_SUCCESSES:-}    # empty: fw_tier.probe_successes's
. bench/lib.sh

# the real seconds a trace second lasts: each trace runs 30 to 96 s, and
# its 30-minute window is a whole number of seconds
scale_of() {
	case $1 in
		burst) echo "1/120" ;;      # 1 h   -> 30 s, window 15 s
		plateau) echo "1/360" ;;    # 3 h   -> 30 s, window 5 s
		flapping) echo "1/225" ;;   # 2 h   -> 32 s, window 8 s
		day) echo "1/900" ;;        # 24 h  -> 96 s, window 2 s
		*) echo "1/600" ;;
	esac
}
calc() { awk "BEGIN {printf \"%s\", $1}"; }
ms() { awk "BEGIN {v = int($1 + 0.5); print (v < 1 ? 1 : v)}"; }

make -s fwsim >/dev/null
SIM_PORT=$((PGPORT_BENCH + 2))
SIM="http://127.0.0.1:$SIM_PORT"

start_cluster "fw_tier.base_url = '$SIM/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.flush_interval = '100ms'
fw_tier.alert_windows = 1000
fw_tier.on_error = 'null'
max_connections = 50"
bpsql -c "INSERT INTO fw_tier.prices VALUES
	('$MODEL', 'standard', 1.00, 0.50, 4.00),
	('$MODEL', 'priority', 1.50, 0.75, 6.00)" >/dev/null

start_sim() {
	[ -n "${FWSIM_PID:-}" ] && { kill "$FWSIM_PID" 2>/dev/null || true; wait "$FWSIM_PID" 2>/dev/null || true; }
	rm -f "$BENCH_WORK/fwsim.port"
	test/fwsim/fwsim --port "$SIM_PORT" --port-file "$BENCH_WORK/fwsim.port" --quiet \
		--schedule "$1" --time-scale "$2" --capacity 100000 >/dev/null &
	FWSIM_PID=$!
	for _ in $(seq 1 100); do [ -s "$BENCH_WORK/fwsim.port" ] && break; sleep 0.05; done
	[ -s "$BENCH_WORK/fwsim.port" ] || { echo "fwsim did not start" >&2; exit 2; }
}

printf '%-9s %-16s %7s %9s %9s %12s %10s %9s %s\n' trace policy calls success p99_ms cost_usd per_call pri_min "probes/early closes"
RESULTS=""
for trace in $TRACES; do
	file=bench/economics/traces/$trace.sched
	scale=$(calc "$(scale_of "$trace")")
	dur=$(awk '!/^#/ && NF == 3 {t = $1} END {print t}' "$file")
	run_s=$(awk "BEGIN {print int($dur * $scale + 0.5)}")
	window_s=$(awk "BEGIN {print int(1800 * $scale + 0.5)}")
	start_sim "$file" "$scale"
	bpsql -c "ALTER SYSTEM SET fw_tier.probe_interval = '$(ms "10000 * $scale")ms'" >/dev/null
	[ -n "$PROBE_SHARE" ] && bpsql -c "ALTER SYSTEM SET fw_tier.probe_share = $PROBE_SHARE" >/dev/null
	[ -n "$PROBE_SUCCESSES" ] && bpsql -c "ALTER SYSTEM SET fw_tier.probe_successes = $PROBE_SUCCESSES" >/dev/null
	bpsql -c "ALTER SYSTEM SET fw_tier.backoff_base = '$(ms "250 * $scale")ms'" >/dev/null
	bpsql -c "ALTER SYSTEM SET fw_tier.backoff_cap = '$(ms "8000 * $scale")ms'" >/dev/null
	bpsql -c "SELECT pg_reload_conf()" >/dev/null
	sleep 0.5
	declare -A CPA=()
	for pol in $POLICIES; do
		wl="e_${trace}_${pol//-/_}"
		case $pol in
			always-standard) row="'standard', 'retry', 'fixed'" ;;
			always-priority) row="'priority', 'retry', 'fixed'" ;;
			fixed) row="'standard', 'priority', 'fixed'" ;;
			probe) row="'standard', 'priority', 'probe'" ;;
		esac
		bpsql -c "INSERT INTO fw_tier.workloads (workload, path, on_overload, window_policy, priority_window)
			VALUES ('$wl', $row, '$window_s seconds')" >/dev/null
		cat > "$BENCH_WORK/load.sql" <<SQL
\\set q random(1, 1000000000)
SELECT fw_complete('question ' || :q, '$wl');
SQL
		chown fwtest "$BENCH_WORK/load.sql"
		curl -s -XPOST "$SIM/control/reset" >/dev/null    # the trace starts now
		su fwtest -s /bin/bash -c "$(printf '%q ' "$BINDIR/pgbench" -n -h "$BENCH_WORK" -p "$PGPORT_BENCH" -U postgres \
			-c "$CLIENTS" -j 2 -R "$RATE" -T "$run_s" -f "$BENCH_WORK/load.sql" postgres)" \
			> "$BENCH_WORK/pgbench.$wl" 2>&1 || { cat "$BENCH_WORK/pgbench.$wl" >&2; exit 2; }
		pri_s=$(bpsql -c "SELECT CASE WHEN configured_path = 'priority' THEN $run_s
			ELSE priority_seconds END FROM fw_tier.status WHERE workload = '$wl'")
		bpsql -c "SELECT fw_flush()" >/dev/null
		read -r calls answered p99 cost probes early < <(bpsql -F ' ' -c "
			WITH c AS (
				SELECT call_id, bool_or(outcome = 'ok') AS ok,
					   extract(epoch FROM max(started_at + latency_ms * interval '1 ms') - min(started_at)) * 1000 AS ms
				FROM fw_tier.calls WHERE workload = '$wl' GROUP BY call_id)
			SELECT count(*), count(*) FILTER (WHERE ok),
				   round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1),
				   (SELECT coalesce(sum(cost_usd), 0) FROM fw_tier.calls WHERE workload = '$wl'),
				   (SELECT probes FROM fw_tier.status WHERE workload = '$wl'),
				   (SELECT closed_by_probes FROM fw_tier.status WHERE workload = '$wl')
			FROM c")
		CPA[$pol]=$(awk "BEGIN {printf \"%.12f\", ($answered > 0 ? $cost / $answered : 0)}")
		succ=$(awk "BEGIN {printf \"%.3f\", ($calls > 0 ? 100 * $answered / $calls : 0)}")
		ratio=$(awk "BEGIN {s = ${CPA[always-standard]:-0}; printf \"%.3f\", (s > 0 ? ${CPA[$pol]} / s : 1)}")
		pri_min=$(awk "BEGIN {printf \"%.1f\", $pri_s / $scale / 60}")
		extra=""
		[ "$pol" = probe ] && extra="$probes/$early"
		printf '%-9s %-16s %7s %8s%% %9s %12.6f %9sx %9s %s\n' "$trace" "$pol" "$calls" "$succ" "$p99" "$cost" "$ratio" "$pri_min" "$extra"
		RESULTS+="$trace $pol $succ $ratio"$'\n'
	done
	unset CPA
done

# the targets, trace by trace
status=0
for trace in $TRACES; do
	sp=$(awk -v t="$trace" '$1 == t && $2 == "always-priority" {print $3}' <<<"$RESULTS")
	sp=${sp:-100}
	read -r s r < <(awk -v t="$trace" '$1 == t && $2 == "probe" {print $3, $4}' <<<"$RESULTS")
	verdict=$(awk "BEGIN {print ($s >= $sp - 0.1 && $r <= 1.03) ? \"met\" : \"MISSED\"}")
	[ "$verdict" = met ] || status=1
	echo "RESULT $trace: probe success $s% (always-priority $sp%), cost per answered call ${r}x always-standard (targets: within 0.1 point, <= 1.03x): $verdict"
done
exit $status
