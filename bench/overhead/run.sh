#!/usr/bin/env bash
# bench/overhead: sequential fw_complete calls in one backend against a
# fixed-answer local endpoint (nginx) vs a plain C libcurl loop reusing one
# handle against the same endpoint, in the same run.  Target: fw_tier at
# least 0.85x of the loop.  Also: backend RSS growth across 50,000 calls
# (target: under 2 MB).  Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20000}
ROUNDS=${ROUNDS:-3}
RSS_CALLS=${RSS_CALLS:-50000}
. bench/lib.sh

start_reference
start_cluster "fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'"

best_ref=0; best_fw=0
for r in $(seq 1 "$ROUNDS"); do
	ref=$("$BENCH_WORK/curl_loop" "$URL/inference/v1/chat/completions" "$N")
	fw=$(fw_rate)
	echo "round $r: libcurl loop $ref calls/s, fw_complete $fw calls/s"
	best_ref=$(best "$ref" "$best_ref")
	best_fw=$(best "$fw" "$best_fw")
done
ratio=$(echo "$best_fw $best_ref" | awk '{printf "%.2f", $1 / $2}')
echo "RESULT overhead: fw_complete/libcurl-loop = $ratio (best of $ROUNDS: $best_fw vs $best_ref calls/s; target >= 0.85)"

# RSS of one backend across RSS_CALLS calls, after a warm-up long enough
# to touch every page of the shared call-log ring (shared pages count in RSS)
cat > "$BENCH_WORK/rss.sql" <<SQL
SELECT pg_backend_pid() AS pid \gset
\setenv BACKEND_PID :pid
SELECT count(fw_complete('warm up', 'batch')) FROM generate_series(1, 10000);
\! grep -E 'VmRSS|RssAnon' /proc/\$BACKEND_PID/status | awk '{print \$1, "before", \$2}'
SELECT count(fw_complete('call ' || i, 'batch')) FROM generate_series(1, $RSS_CALLS) i;
\! grep -E 'VmRSS|RssAnon' /proc/\$BACKEND_PID/status | awk '{print \$1, "after", \$2}'
SQL
chown fwtest "$BENCH_WORK/rss.sql"
out=$(bpsql -f "$BENCH_WORK/rss.sql")
before=$(echo "$out" | awk '/VmRSS: before/ {print $3}')
after=$(echo "$out" | awk '/VmRSS: after/ {print $3}')
anon_before=$(echo "$out" | awk '/RssAnon: before/ {print $3}')
anon_after=$(echo "$out" | awk '/RssAnon: after/ {print $3}')
echo "RESULT rss: backend RSS grew $((after - before)) kB across $RSS_CALLS calls after a 10,000-call warm-up ($before -> $after kB; private $anon_before -> $anon_after kB; target < 2048 kB)"
