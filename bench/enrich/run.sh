#!/usr/bin/env bash
# bench/enrich: continuous enrichment (issue 14), against the simulator on
# loopback.  Run as root from the repository root.
#
# (a) lag: ROWS rows (default 5,000) whose prompt takes LAT_MS (default
#     100 ms) at the simulator ([fwsim:slow=LAT_MS], --time-scale 0) are
#     COPYed into a table with an enrichment at concurrency C (default 64);
#     the time from the end of the COPY to the last answer written (a
#     BEFORE UPDATE trigger stamps each row as the worker writes it)
#     against the ideal ROWS x LAT_MS / C.  Target: at most 1.2x.
# (b) the writers' cost: COPY of COPY_ROWS rows (default 100,000) into a
#     table with the enrichment's triggers (the enrichment paused, so only
#     the enqueueing is measured) and into the same table without, in the
#     same run, rounds alternating the order, best of ROUNDS (default 6)
#     and the median of the per-round ratios.  Target: at most 1.3x.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROWS=${ROWS:-5000}
LAT_MS=${LAT_MS:-100}
C=${C:-64}
COPY_ROWS=${COPY_ROWS:-100000}
ROUNDS=${ROUNDS:-6}
. bench/lib.sh

make -s fwsim >/dev/null
test/fwsim/fwsim --port 0 --port-file "$BENCH_WORK/fwsim.port" --time-scale 0 --quiet >/dev/null &
FWSIM_PID=$!
for _ in $(seq 1 100); do [ -s "$BENCH_WORK/fwsim.port" ] && break; sleep 0.05; done
SIM="http://127.0.0.1:$(cat "$BENCH_WORK/fwsim.port")"
start_cluster "fw_tier.base_url = '$SIM/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.max_concurrency_cap = 1024"

# ---- (a) lag from the last COPY row to the last answer ---------------------
seq 1 "$ROWS" | awk -v l="$LAT_MS" '{print $1 "\t[fwsim:slow=" l "] row " $1}' > "$BENCH_WORK/lag.tsv"
chown fwtest "$BENCH_WORK/lag.tsv"
bpsql -c "CREATE TABLE lag (id int PRIMARY KEY, body text, summary text, done_at timestamptz);
CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN NEW.done_at := clock_timestamp(); RETURN NEW; END \$\$;
CREATE TRIGGER stamp BEFORE UPDATE OF summary ON lag FOR EACH ROW EXECUTE FUNCTION stamp();
SELECT fw_enrich_create('lag', 'lag', 'summary', '{body}', 'batch', '{\"concurrency\": $C}');" >/dev/null
curl -s -X POST "$SIM/control/stats/reset" >/dev/null
t0=$(bpsql -c "COPY lag (id, body) FROM '$BENCH_WORK/lag.tsv'" -c "SELECT extract(epoch FROM clock_timestamp())")
ideal=$(echo "$ROWS $LAT_MS $C" | awk '{printf "%.3f", $1 * $2 / 1000 / $3}')
deadline=$(( $(date +%s) + 600 ))
until [ "$(bpsql -c "SELECT queued = 0 AND in_flight = 0 FROM fw_tier.enrich_status WHERE name = 'lag'")" = t ]; do
	[ "$(date +%s)" -lt "$deadline" ] || { echo "enrichment did not finish in 600 s" >&2; exit 1; }
	sleep 0.2
done
read -r t1 done_n wrong <<<"$(bpsql -F ' ' -c "SELECT extract(epoch FROM max(done_at)), count(done_at),
	count(*) FILTER (WHERE summary IS DISTINCT FROM 'Echo: row ' || id) FROM lag")"
peak=$(curl -s "$SIM/control/stats" | sed -n 's/.*"peak_in_flight":\([0-9]*\).*/\1/p')
lag=$(echo "$t1 $t0" | awk '{printf "%.3f", $1 - $2}')
echo "lag: $ROWS rows at $LAT_MS ms, concurrency $C: last answer $lag s after the COPY (ideal $ideal s); $done_n written, $wrong wrong; simulator peak in flight $peak"
echo "RESULT lag_vs_ideal $(echo "$lag $ideal" | awk '{printf "%.2f", $1 / $2}') (target <= 1.2)"

# ---- (b) COPY with the triggers vs without ---------------------------------
seq 1 "$COPY_ROWS" | awk '{print $1 "\tdocument number " $1 " with a few more words of text"}' > "$BENCH_WORK/copy.tsv"
chown fwtest "$BENCH_WORK/copy.tsv"
bpsql -c "CREATE TABLE plain (id int PRIMARY KEY, body text, summary text);
CREATE TABLE enriched (id int PRIMARY KEY, body text, summary text);
SELECT fw_enrich_create('copy', 'enriched', 'summary', 'Summarise: {body}');
SELECT fw_enrich_pause('copy');" >/dev/null
copy_s() {
	bpsql -c "TRUNCATE $1; DELETE FROM fw_tier.enrich_queue; CHECKPOINT" >/dev/null
	bpsql -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp();
	  BEGIN COPY $1 (id, body) FROM '$BENCH_WORK/copy.tsv';
	  RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - t0); END \$\$" 2>&1 | sed -n 's/^NOTICE: *//p'
}
best_p= best_e= ratios=
for r in $(seq 1 "$ROUNDS"); do
	if [ $((r % 2)) -eq 1 ]; then p=$(copy_s plain); e=$(copy_s enriched); else e=$(copy_s enriched); p=$(copy_s plain); fi
	q=$(bpsql -c "SELECT count(*) FROM fw_tier.enrich_queue")
	echo "copy round $r: plain $p s, with the enrichment's triggers $e s ($q queued)"
	ratios="$ratios $(echo "$e $p" | awk '{printf "%.3f", $1 / $2}')"
	best_p=$(echo "$p ${best_p:-$p}" | awk '{print ($1 < $2) ? $1 : $2}')
	best_e=$(echo "$e ${best_e:-$e}" | awk '{print ($1 < $2) ? $1 : $2}')
done
median=$(echo $ratios | tr ' ' '\n' | sort -n | awk '{a[NR] = $1} END {printf "%.2f", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
echo "RESULT copy_with_trigger_vs_plain $(echo "$best_e $best_p" | awk '{printf "%.2f", $1 / $2}') (best of $ROUNDS: $best_e s vs $best_p s for $COPY_ROWS rows; median of the rounds' ratios $median; target <= 1.3)"
