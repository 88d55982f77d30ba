#!/usr/bin/env bash
# bench/embed: N short texts (default 100,000) embedded into a pgvector
# column by one statement (README's UPDATE ... FROM fw_embed_batch), each
# request taking LAT_MS at the simulator (its --ttft-ms: an embeddings
# request generates nothing).  Reports the statement's wall time against
# the ideal requests x latency / concurrency (requests = ceil(N / 128), the
# default fw_tier.embed_batch_inputs; target: at most 1.15x), and against
# the row-by-row form UPDATE ... SET emb = fw_embed(body), measured over
# SEQ rows (default 40) and scaled to N (it would take days at N).  Without
# pgvector the same statement fills a real[] column (said in the output).
# C (default 16, fw_tier.max_concurrency's default) sets the concurrency.
# Also printed: the fw_embed_batch call alone, and the same UPDATE from
# stored vectors (what the statement costs beyond the requests).
# Run as root from the repository root; loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-100000}
SEQ=${SEQ:-40}
LAT_MS=${LAT_MS:-250}
C=${C:-16}
DIMS=${DIMS:-64}
ROUNDS=${ROUNDS:-2}
. bench/lib.sh

make -s fwsim >/dev/null
test/fwsim/fwsim --port 0 --port-file "$BENCH_WORK/fwsim.port" --time-scale 1 \
	--ttft-ms "$LAT_MS" --capacity 100000 --quiet >/dev/null &
FWSIM_PID=$!
for _ in $(seq 1 100); do [ -s "$BENCH_WORK/fwsim.port" ] && break; sleep 0.05; done
SIM="http://127.0.0.1:$(cat "$BENCH_WORK/fwsim.port")"
start_cluster "fw_tier.base_url = '$SIM/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.max_concurrency_cap = 1024"

if [ -f "$(pg_config --sharedir)/extension/vector.control" ]; then
	bpsql -c "CREATE EXTENSION vector" >/dev/null
	COLTYPE="vector($DIMS)"; CAST="::vector"
else
	echo "pgvector not installed: the column is real[] (the cast is the only difference)"
	COLTYPE="real[]"; CAST=""
fi
bpsql -c "CREATE TABLE docs (id bigint PRIMARY KEY, body text NOT NULL, emb $COLTYPE);
  INSERT INTO docs SELECT g, 'short text number ' || g || ' about ' || (g % 97), NULL
    FROM generate_series(1, $N) g" >/dev/null
bpsql -c "VACUUM ANALYZE docs" >/dev/null

timed() {
	bpsql -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); n bigint;
	  BEGIN $1; RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - t0); END \$\$" 2>&1 |
		sed -n 's/^NOTICE: *//p'
}

requests=$(( (N + 127) / 128 ))
ideal=$(echo "$requests $LAT_MS $C" | awk '{printf "%.3f", $1 * $2 / 1000 / $3}')
best=
for r in $(seq 1 "$ROUNDS"); do
	bpsql -c "UPDATE docs SET emb = NULL" >/dev/null
	bpsql -c "VACUUM docs" >/dev/null
	curl -s -X POST "$SIM/control/stats/reset" >/dev/null
	t=$(timed "SET LOCAL fw_tier.max_concurrency = $C;
	  WITH src AS (SELECT array_agg(id ORDER BY id) AS ids, array_agg(body ORDER BY id) AS bodies FROM docs)
	  UPDATE docs d SET emb = e.embedding$CAST
	    FROM src, fw_embed_batch(src.bodies, 'batch', '{\"dimensions\": $DIMS}') e
	   WHERE d.id = src.ids[e.ord];
	  GET DIAGNOSTICS n = ROW_COUNT;
	  IF n <> $N THEN RAISE EXCEPTION 'only % rows', n; END IF")
	sent=$(curl -s "$SIM/control/stats" | sed -n 's/.*"total":\([0-9]*\).*/\1/p')
	peak=$(curl -s "$SIM/control/stats" | sed -n 's/.*"peak_in_flight":\([0-9]*\),.*/\1/p')
	echo "round $r: $N rows in $t s ($sent requests, peak $peak in flight; ideal $ideal s)"
	best=$(echo "$t ${best:-$t}" | awk '{print ($1 < $2) ? $1 : $2}')
done
# where the time goes: the call alone, and the same UPDATE from stored vectors
t_call=$(timed "SET LOCAL fw_tier.max_concurrency = $C;
  SELECT count(e.embedding) INTO n
    FROM (SELECT array_agg(body ORDER BY id) AS bodies FROM docs) src,
         fw_embed_batch(src.bodies, 'batch', '{\"dimensions\": $DIMS}') e")
bpsql -c "CREATE TABLE stored AS SELECT id, emb FROM docs" >/dev/null
t_upd=$(timed "UPDATE docs d SET emb = s.emb FROM stored s WHERE d.id = s.id")
echo "fw_embed_batch alone: $t_call s; the UPDATE from stored vectors: $t_upd s"
[ "$(bpsql -c "SELECT count(emb) FROM docs")" = "$N" ] || { echo "not every row embedded" >&2; exit 1; }

seq_s=$(timed "UPDATE docs SET emb = fw_embed(body, 'batch', '{\"dimensions\": $DIMS}')$CAST WHERE id <= $SEQ")
seq_n=$(echo "$seq_s $N $SEQ" | awk '{printf "%.0f", $1 * $2 / $3}')
echo "row by row: $SEQ rows in $seq_s s -> $seq_n s for $N (scaled)"

ratio=$(echo "$best $ideal" | awk '{printf "%.2f", $1 / $2}')
speedup=$(echo "$seq_n $best" | awk '{printf "%.0f", $1 / $2}')
echo "RESULT embed: ${ratio}x of ideal (target <= 1.15; best of $ROUNDS: $best s vs ideal $ideal s = $requests requests x $LAT_MS ms / $C); ${speedup}x faster than row by row (scaled from $SEQ rows)"
