#!/usr/bin/env bash
# bench/batch: fw_complete_batch over N prompts (default 1,000) that each
# take 100 ms at the simulator ([fwsim:slow=100], --time-scale 0, so the
# latency is exactly the directive's), at concurrency 32 and 64.  Reports
# wall time against the ideal N x latency / concurrency (target: at most
# 1.15x of ideal) and against sequential fw_complete, measured in the same
# run over SEQ rows (default 100) and extrapolated to N.  Also: how long a
# pg_cancel_backend takes to end a batch with 64 requests in flight
# (target: under 100 ms).  Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-1000}
SEQ=${SEQ:-100}
LAT_MS=${LAT_MS:-100}
ROUNDS=${ROUNDS:-3}
. bench/lib.sh

make -s fwsim >/dev/null
test/fwsim/fwsim --port 0 --port-file "$BENCH_WORK/fwsim.port" --time-scale 0 --quiet >/dev/null &
FWSIM_PID=$!
for _ in $(seq 1 100); do [ -s "$BENCH_WORK/fwsim.port" ] && break; sleep 0.05; done
SIM="http://127.0.0.1:$(cat "$BENCH_WORK/fwsim.port")"
start_cluster "fw_tier.base_url = '$SIM/inference/v1'
fw_tier.api_key = 'bench'
fw_tier.max_concurrency_cap = 1024"

# seconds one SQL statement takes, measured inside the server
timed() {
	bpsql -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); n bigint;
	  BEGIN $1; RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - t0); END \$\$" 2>&1 |
		sed -n 's/^NOTICE: *//p'
}

seq_s=$(timed "SELECT count(fw_complete('[fwsim:slow=$LAT_MS] s' || i, 'batch')) INTO n FROM generate_series(1, $SEQ) i")
seq_n=$(echo "$seq_s $N $SEQ" | awk '{printf "%.2f", $1 * $2 / $3}')
echo "sequential fw_complete: $SEQ calls in $seq_s s -> $seq_n s for $N (extrapolated)"

for c in 32 64; do
	ideal=$(echo "$N $LAT_MS $c" | awk '{printf "%.3f", $1 * $2 / 1000 / $3}')
	best=
	for r in $(seq 1 "$ROUNDS"); do
		curl -s -X POST "$SIM/control/stats/reset" >/dev/null
		t=$(timed "SET LOCAL fw_tier.max_concurrency = $c;
		  SELECT count(a) INTO n FROM unnest((SELECT fw_complete_batch(array_agg('[fwsim:slow=$LAT_MS] b' || i))
		                                        FROM generate_series(1, $N) i)) a;
		  IF n <> $N THEN RAISE EXCEPTION 'only % answers', n; END IF")
		peak=$(curl -s "$SIM/control/stats" | sed -n 's/.*"peak_in_flight":\([0-9]*\).*/\1/p')
		echo "c=$c round $r: $t s (ideal $ideal s, simulator peak in flight $peak)"
		best=$(echo "$t ${best:-$t}" | awk '{print ($1 < $2) ? $1 : $2}')
	done
	ratio=$(echo "$best $ideal" | awk '{printf "%.2f", $1 / $2}')
	speedup=$(echo "$seq_n $best" | awk '{printf "%.1f", $1 / $2}')
	echo "RESULT batch c=$c: ${ratio}x of ideal (target <= 1.15; best of $ROUNDS: $best s vs ideal $ideal s; ${speedup}x faster than sequential fw_complete)"
done

# cancel latency: 64 requests hanging at the simulator, then pg_cancel_backend
cat > "$BENCH_WORK/cancel.sql" <<SQL
SET fw_tier.max_concurrency = 64;
SELECT fw_complete_batch(array_agg('[fwsim:hang] h' || i)) FROM generate_series(1, 200) i;
SQL
chown fwtest "$BENCH_WORK/cancel.sql"
bpsql -f "$BENCH_WORK/cancel.sql" >/dev/null 2>&1 &
CPID=$!
for _ in $(seq 1 200); do
	inf=$(curl -s "$SIM/control/stats" | sed -n 's/.*"in_flight":\([0-9]*\),.*/\1/p')
	[ "${inf:-0}" -ge 64 ] && break
	sleep 0.05
done
bpid=$(bpsql -c "SELECT pid FROM fw_tier.progress WHERE in_flight > 0 LIMIT 1")
t0=$(date +%s.%N)
bpsql -c "SELECT pg_cancel_backend($bpid)" >/dev/null
for _ in $(seq 1 5000); do
	inf=$(curl -s "$SIM/control/stats" | sed -n 's/.*"in_flight":\([0-9]*\),.*/\1/p')
	[ "${inf:-1}" = 0 ] && break
done
t1=$(date +%s.%N)
wait $CPID || true
ms=$(echo "$t0 $t1" | awk '{printf "%.0f", ($2 - $1) * 1000}')
echo "RESULT batch cancel: ${ms} ms from pg_cancel_backend until the simulator saw all 64 requests released (target < 100; includes one psql start and curl polling)"
