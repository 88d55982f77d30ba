#!/usr/bin/env bash
# bench/chaos/writeahead_cost.sh: what the write-ahead of attempts (issue
# 18) costs per call, as a share of the calling backend's CPU.  One
# backend calls fw_complete in a loop against nginx's fixed answer
# (bench/lib.sh); perf samples that backend for PERF_S seconds; the
# share of samples under fw_intend_attempt (claim a slot, fill the
# record, CRC) and fw_intent_end (free it), children included, is the
# write-ahead's cost.  Less noisy on a shared machine than comparing
# rates (bench/overhead/compare.sh OLD NEW): a
# share of one process's own samples does not move with other load.
# Target: <= 2%.  Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
PERF_S=${PERF_S:-10}
. bench/lib.sh
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 2; }

start_reference
start_cluster "fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'"

bpsql -c "SET application_name = 'writeahead-perf';
  SELECT count(fw_complete('x', 'batch')) FROM generate_series(1, 10000000)" >/dev/null 2>&1 &
CALLER=$!
sleep 2
BPID=$(bpsql -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'writeahead-perf'")
perf record -q -g -F 1999 -p "$BPID" -o "$BENCH_WORK/perf.data" -- sleep "$PERF_S" >/dev/null 2>&1
bpsql -c "SELECT pg_cancel_backend($BPID)" >/dev/null
wait "$CALLER" 2>/dev/null || true

perf report -i "$BENCH_WORK/perf.data" --children --stdio --no-demangle -g none \
	> "$BENCH_WORK/report" 2>/dev/null || true
# the "Children" column of a symbol's line
share() {
	awk -v s="$1" '!done && $NF == s && $1 ~ /%$/ { gsub("%", "", $1); print $1; done = 1 }' "$BENCH_WORK/report"
}
total=$(sed -n 's/^# Samples: \([^ ]*\).*/\1/p' "$BENCH_WORK/report" | head -1)
intend=$(share fw_intend_attempt); intend=${intend:-0}
ended=$(share fw_intent_end); ended=${ended:-0}
echo "perf: $total samples of the calling backend in $PERF_S s"
echo "fw_intend_attempt (children included): $intend%; fw_intent_end: $ended%"
echo "RESULT writeahead: $(echo "$intend $ended" | awk '{printf "%.2f", $1 + $2}')% of the backend's CPU per call (target <= 2%)"
