#!/usr/bin/env bash
# bench/calllog: what the call log costs, and how fast the ring + worker
# move records into fw_tier.calls.  Against nginx returning a fixed answer
# (bench/lib.sh), loopback only.  Run as root from the repository root.
#
# (a) logging cost.  Sequential fw_complete calls in one backend, in the
#     same run: with the worker running (the call log as shipped) and with
#     the drain paused (launcher stopped, flusher gone idle; the ring holds every
#     record: logging reduced to the push alone), plus the libcurl loop of
#     bench/overhead as the reference.  Then perf samples the whole machine
#     while one backend calls: the share of CPU time spent in the push
#     (fw_log_attempt and what it calls) and in the worker, of all the CPU
#     the calls cost (backend + worker).  Target: logging < 5%.
# (c) CPU per logged call, BEFORE (OLD_REV) and AFTER in one run (first;
#     CPU_ONLY=1 stops after it): see below.
# (b) ring + worker throughput.  CLIENTS backends call fw_complete at once;
#     rows/s landing in fw_tier.calls and count(*) = attempts (no loss).
#     Then the worker alone: stopped, the ring filled with DRAIN_N records,
#     resumed; rows/s it drains.  Target >= 20,000 rows/s.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20000}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-8}
PER_CLIENT=${PER_CLIENT:-5000}
DRAIN_N=${DRAIN_N:-100000}
PERF_S=${PERF_S:-5}
. bench/lib.sh

start_reference
# a ring that holds every record of a stopped-worker round
start_cluster "fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.log_buffer = '128MB'
max_connections = 50"

trap 'resume_drain; _bench_cleanup' EXIT

# ---- (c) CPU per logged call: getrusage of the backend and the flusher ----
# The backend makes $N calls with the drain paused (its CPU: the call and
# the push), then the flusher drains exactly those records (its CPU: the
# insert, start-up included).  Both from /proc/PID/stat (utime + stime,
# what getrusage reports), the libcurl loop's from the shell's `times`.
# logging share = flusher / (backend + flusher), the push being in the
# backend's part (perf in (a) shows it); total = (backend + flusher) / N
# against the loop's CPU per call.  Lowest of $ROUNDS rounds.  With
# OLD_REV (e.g. OLD_REV=ba360a5) that revision is built into a private
# PostgreSQL copy (as bench/overhead/compare.sh does) and measured in the
# same rounds, the order alternating: BEFORE and AFTER in one run.
clk=$(getconf CLK_TCK)
# median of the arguments
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
proc_cpu() { awk -v c="$clk" '{printf "%.3f", ($14 + $15) / c}' "/proc/$1/stat"; }
# cpu_round: "backend flusher" seconds for $N calls, on the cluster that
# BINDIR / PGPORT_BENCH name
cpu_round() {
	local b f fpid
	pause_drain
	# the backend reads its own /proc/self/stat before and after the calls
	cat > "$BENCH_WORK/cpu.sql" <<SQL
SELECT count(fw_complete('x', 'batch')) FROM generate_series(1, 1000);
SELECT 'B0 ' || (split_part(s, ' ', 14)::bigint + split_part(s, ' ', 15)::bigint) FROM pg_read_file('/proc/self/stat') s;
SELECT count(fw_complete('x', 'batch')) FROM generate_series(1, $N);
SELECT 'B1 ' || (split_part(s, ' ', 14)::bigint + split_part(s, ' ', 15)::bigint) FROM pg_read_file('/proc/self/stat') s;
SQL
	chmod 644 "$BENCH_WORK/cpu.sql"
	b=$(bpsql -f "$BENCH_WORK/cpu.sql" | awk -v c="$clk" '/^B0 / {b0 = $2} /^B1 / {b1 = $2} END {printf "%.3f", (b1 - b0) / c}')
	resume_drain
	bpsql -c "SET statement_timeout = '300s'; SELECT fw_flush()" >/dev/null
	fpid=$(fw_worker_pid flusher)
	f=$([ -n "$fpid" ] && proc_cpu "$fpid" 2>/dev/null || echo 0)
	# the flusher drained the warm-up's 1,000 records too
	echo "$b $f $N" | awk '{printf "%.3f %.3f\n", $1, $2 * $3 / ($3 + 1000)}'
}
NEW_BIN=$BINDIR; NEW_PORT=$PGPORT_BENCH
if [ -n "${OLD_REV:-}" ]; then
	OLD_BIN=$(build_copy old "$OLD_REV")
	OLD_PORT=$((PGPORT_BENCH + 2))
	cluster old "$OLD_BIN" "$OLD_PORT" "fw_tier.log_buffer = '128MB'"
	SIDES="new old"
else
	SIDES="new"
fi
declare -A best_b best_f ratios shares
best_l=""
for r in $(seq 1 "$ROUNDS"); do
	l=$( { bash -c "'$BENCH_WORK/curl_loop' '$URL/inference/v1/chat/completions' $N >/dev/null; times" | tail -1; } |
		awk '{split($1, u, "m"); split($2, s, "m"); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2]}')
	best_l=$(echo "$l ${best_l:-$l}" | awk '{print ($1 < $2) ? $1 : $2}')
	order=$SIDES
	[ $((r % 2)) -eq 0 ] && order=$(echo "$SIDES" | awk '{for (i = NF; i > 0; i--) printf "%s ", $i}')
	line="round $r: libcurl loop ${l} s CPU for $N calls"
	for side in $order; do
		if [ "$side" = new ]; then BINDIR=$NEW_BIN; PGPORT_BENCH=$NEW_PORT; else BINDIR=$OLD_BIN; PGPORT_BENCH=$OLD_PORT; fi
		read -r b f < <(cpu_round)
		line="$line; $side: backend ${b} s, flusher ${f} s"
		ratios[$side]="${ratios[$side]:-} $(echo "$b $f $l" | awk '{printf "%.3f", ($1 + $2) / $3}')"
		shares[$side]="${shares[$side]:-} $(echo "$b $f" | awk '{printf "%.2f", 100 * $2 / ($1 + $2)}')"
		best_b[$side]=$(echo "$b ${best_b[$side]:-$b}" | awk '{print ($1 < $2) ? $1 : $2}')
		best_f[$side]=$(echo "$f ${best_f[$side]:-$f}" | awk '{print ($1 < $2) ? $1 : $2}')
	done
	echo "$line"
done
BINDIR=$NEW_BIN; PGPORT_BENCH=$NEW_PORT
for side in $SIDES; do
	label=$side; [ "$side" = new ] && label="after (working tree)"; [ "$side" = old ] && label="before ($OLD_REV)"
	echo "${best_b[$side]} ${best_f[$side]} $best_l $N" | awk -v who="$label" '{
		printf "RESULT calllog-cpu %s: %.1f us CPU per logged call (backend %.1f, flusher %.1f); libcurl loop %.1f us; flusher share %.1f%% of a call'"'"'s CPU (with the push: target <= 5%%); total/loop %.2f (target <= 1.10)\n",
			who, 1e6 * ($1 + $2) / $4, 1e6 * $1 / $4, 1e6 * $2 / $4, 1e6 * $3 / $4, 100 * $2 / ($1 + $2), ($1 + $2) / $3}'
	# the machine's load moves the lowest of each side apart: the ratios
	# of each round (loop and sides measured within seconds) are steadier
	echo "$(median ${ratios[$side]}) $(median ${shares[$side]}) $(echo ${ratios[$side]} | tr ' ' '\n' | sort -n | sed -n '1p;$p' | tr '\n' ' ')" |
		awk -v n="$ROUNDS" -v who="$label" '{printf "RESULT calllog-cpu-median %s: total/loop %.2f (median of %d rounds, range %.2f-%.2f); flusher share %.1f%% (median)\n",
			who, $1, n, $3, $4, $2}'
done
[ -n "${CPU_ONLY:-}" ] && exit 0

# ---- (a) logging cost ----
best_ref=0; best_on=0; best_off=0
for r in $(seq 1 "$ROUNDS"); do
	ref=$("$BENCH_WORK/curl_loop" "$URL/inference/v1/chat/completions" "$N")
	on=$(fw_rate)
	pause_drain
	off=$(fw_rate)
	resume_drain
	bpsql -c "SELECT fw_flush()" >/dev/null
	echo "round $r: libcurl loop $ref calls/s; fw_complete, worker running $on calls/s; worker stopped $off calls/s"
	best_ref=$(best "$ref" "$best_ref"); best_on=$(best "$on" "$best_on"); best_off=$(best "$off" "$best_off")
done
share_worker=$(echo "$best_on $best_off" | awk '{printf "%.1f", 100 * (1 / $1 - 1 / $2) / (1 / $1)}')
echo "RESULT calllog-rate: fw_complete $best_on calls/s with the worker, $best_off without (the worker's draining costs $share_worker% of per-call time); libcurl loop $best_ref calls/s; fw/loop = $(echo "$best_on $best_ref" | awk '{printf "%.2f", $1 / $2}')"

# perf: where the CPU of a stream of calls goes, with the worker running
if command -v perf >/dev/null; then
	bpsql -c "SET application_name = 'calllog-perf';
	  SELECT count(fw_complete('x', 'batch')) FROM generate_series(1, 1000000)" >/dev/null 2>&1 &
	CALLER=$!
	sleep 1
	WPID=$(fw_worker_pid flusher)
	BPID=$(bpsql -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'calllog-perf'")
	perf record -q -a -g -F 999 -o "$BENCH_WORK/perf.data" -- sleep "$PERF_S" >/dev/null 2>&1
	bpsql -c "SELECT pg_cancel_backend($BPID)" >/dev/null
	wait $CALLER 2>/dev/null || true
	perf report -i "$BENCH_WORK/perf.data" --children --sort pid,sym --stdio -q -g none 2>/dev/null \
		> "$BENCH_WORK/perf.txt" || true
	perf report -i "$BENCH_WORK/perf.data" --no-children --sort pid --stdio -q -g none 2>/dev/null \
		> "$BENCH_WORK/perf.pid.txt" || true
	# self time per process: the calling backend, the worker
	b_all=$(awk -v p=" $BPID:" '$0 ~ p {gsub("%", "", $1); s += $1} END {print s + 0}' "$BENCH_WORK/perf.pid.txt")
	w_all=$(awk -v p=" $WPID:" '$0 ~ p {gsub("%", "", $1); s += $1} END {print s + 0}' "$BENCH_WORK/perf.pid.txt")
	# children time of the push inside the backend (fw_log_attempt is
	# inlined; fw_calllog_push is what it calls, and it may be no more
	# than a jump to fw_calllog_push_internal: the larger of the two)
	push=$(awk -v p=" $BPID:" '$0 ~ p && / fw_calllog_push(_internal)?$/ {gsub("%", "", $1); if ($1 > m) m = $1} END {print m + 0}' "$BENCH_WORK/perf.txt")
	push=${push:-0}
	echo "perf ($PERF_S s, all CPUs): calling backend $b_all% of samples (fw_calllog_push with children: $push%), fw_tier worker $w_all%"
	{ grep -E " ($BPID|$WPID):" "$BENCH_WORK/perf.txt" |
		grep -E "fw_calllog_push|fw_flusher_main|SPI_execute_plan|standard_ExecutorStart|CommitTransactionCommand|fw_parse_completion|fw_http" |
		head -12 | sed 's/^/  /'; } || true
	echo "RESULT calllog-cost: logging = $(echo "$push $w_all $b_all" | awk '{printf "%.1f", ($3 + $2 > 0) ? 100 * ($1 + $2) / ($3 + $2) : 0}')% of the CPU time of a call (push $(echo "$push $w_all $b_all" | awk '{printf "%.1f", ($3 + $2 > 0) ? 100 * $1 / ($3 + $2) : 0}')%, worker $(echo "$w_all $b_all" | awk '{printf "%.1f", ($2 + $1 > 0) ? 100 * $1 / ($2 + $1) : 0}')%) (target < 5%)"
fi

# ---- (b1) several backends at once: rows/s landing in fw_tier.calls ----
bpsql -c "SELECT fw_flush()" >/dev/null
bpsql -c "TRUNCATE fw_tier.calls" >/dev/null
pushed0=$(bpsql -c "SELECT records_pushed FROM fw_tier.log_status")
t0=$(date +%s.%N)
for c in $(seq 1 "$CLIENTS"); do
	bpsql -c "SET statement_timeout = '300s'; SELECT count(fw_complete('client $c call ' || i, 'batch')) FROM generate_series(1, $PER_CLIENT) i" >/dev/null &
done
wait
t_calls=$(date +%s.%N)
bpsql -c "SELECT fw_flush()" >/dev/null
t1=$(date +%s.%N)
read -r rows pushed waits < <(bpsql -F ' ' -c "SELECT (SELECT count(*) FROM fw_tier.calls), records_pushed - $pushed0, writer_waits FROM fw_tier.log_status")
expect=$((CLIENTS * PER_CLIENT))
rate=$(echo "$rows $t0 $t1" | awk '{printf "%.0f", $1 / ($3 - $2)}')
echo "$CLIENTS clients x $PER_CLIENT calls: $rows rows in fw_tier.calls (attempts made $expect, records pushed $pushed); calls took $(echo "$t0 $t_calls" | awk '{printf "%.2f", $2 - $1}') s, flushed $(echo "$t_calls $t1" | awk '{printf "%.3f", $2 - $1}') s later; writer waits so far $waits"
echo "RESULT calllog-concurrent: $rate rows/s landed with $CLIENTS backends calling; loss: $((expect - rows)) rows (target: 0 lost; throughput bound by the calls, see drain)"

# ---- (b2) the worker alone: drain a ring filled while it was stopped ----
bpsql -c "TRUNCATE fw_tier.calls" >/dev/null
pause_drain
per=$((DRAIN_N / CLIENTS))
for c in $(seq 1 "$CLIENTS"); do
	bpsql -c "SELECT count(fw_complete('fill $c ' || i, 'batch')) FROM generate_series(1, $per) i" >/dev/null &
done
wait
read -r flushed0 used < <(bpsql -F ' ' -c "SELECT records_flushed, bytes_used FROM fw_tier.log_status")
t0=$(date +%s.%N)
resume_drain
bpsql -c "SELECT fw_flush()" >/dev/null
t1=$(date +%s.%N)
read -r rows flushed < <(bpsql -F ' ' -c "SELECT (SELECT count(*) FROM fw_tier.calls), records_flushed - $flushed0 FROM fw_tier.log_status")
drain=$(echo "$rows $t0 $t1" | awk '{printf "%.0f", $1 / ($3 - $2)}')
echo "drain: $rows rows ($used bytes of ring, $((used / (rows > 0 ? rows : 1))) bytes a record) written in $(echo "$t0 $t1" | awk '{printf "%.2f", $2 - $1}') s"
echo "RESULT calllog-drain: $drain rows/s (ring -> fw_tier.calls by the worker), $rows of $((per * CLIENTS)) rows landed (target >= 20000 rows/s, no loss)"
