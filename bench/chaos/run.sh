#!/usr/bin/env bash
# bench/chaos: not one paid request missing from the log, whatever is
# killed (issue 18).  Run as root from the repository root.
#
# CLIENTS clients call fw_complete and fw_complete_batch in loops (a new
# connection after every failure) against the simulator (test/fwsim),
# while a killer sends kill -9 to a random process of the cluster (client
# backends, the fw_tier launcher and flusher, checkpointer, walwriter ...)
# at random intervals, and every IMMEDIATE_EVERY-th event is instead a
# `pg_ctl stop -m immediate` plus a restart.  Bounded by KILLS and
# TIME_LIMIT seconds.  Then the log is flushed and every request the
# simulator served is matched with fw_tier.calls: by the x-request-id the
# simulator issued (its /control/log, polled all along), and by count for
# those that have none (errors, a client gone before the answer, headers
# never read).
#
# Prints kills, restarts, requests served, rows, lost (target 0),
# duplicates (target 0), unknown rows, the longest stall a client saw
# (time between two answers, crash-restarts included), and whether every
# client got answers again after the last kill.  Exit 0 when lost = 0,
# duplicates = 0 and every client answers again; 1 otherwise.
#
#   KILLS=1000 TIME_LIMIT=3600 bash bench/chaos/run.sh
#
# Knobs: CLIENTS (4), KILLS (100), TIME_LIMIT (600 s), KILL_MIN_MS (50),
# KILL_MAX_MS (500), IMMEDIATE_EVERY (20; 0 = never), TIME_SCALE (0.1: the
# simulator's latency, 25 ms a call), SEED, SERVER_LOG (a file to keep
# the server log and the clients' answer times in).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLIENTS=${CLIENTS:-4}
KILLS=${KILLS:-100}
TIME_LIMIT=${TIME_LIMIT:-600}
KILL_MIN_MS=${KILL_MIN_MS:-50}
KILL_MAX_MS=${KILL_MAX_MS:-500}
IMMEDIATE_EVERY=${IMMEDIATE_EVERY:-20}
TIME_SCALE=${TIME_SCALE:-0.1}
SEED=${SEED:-$$}
RANDOM=$SEED
. bench/lib.sh

make -s fwsim >/dev/null
MODEL=accounts/fireworks/models/kimi-k2p6
test/fwsim/fwsim --port 0 --port-file "$BENCH_WORK/sim.port" --time-scale "$TIME_SCALE" --quiet >/dev/null 2>&1 &
FWSIM_PID=$!
for _ in $(seq 1 100); do [ -s "$BENCH_WORK/sim.port" ] && break; sleep 0.05; done
SIM="http://127.0.0.1:$(cat "$BENCH_WORK/sim.port")"

start_cluster "fw_tier.base_url = '$SIM/inference/v1'
fw_tier.flush_interval = '100ms'
fw_tier.request_timeout = '60s'
restart_after_crash = on
max_connections = 40"
bpsql -c "INSERT INTO fw_tier.prices VALUES ('$MODEL', 'standard', 1.0, 0.5, 2.0)"
curl -s -XPOST "$SIM/control/reset" >/dev/null
DATA="$BENCH_WORK/data"
PSQL="$BINDIR/psql -X -q -A -t -h $BENCH_WORK -p $PGPORT_BENCH -U postgres -d postgres"
STOP="$BENCH_WORK/stop"

# ---- clients: one answer per line of $BENCH_WORK/client.N (ms since epoch)
cat > "$BENCH_WORK/client.sh" <<EOF
#!/bin/bash
# client N: fw_complete, fw_complete_batch of 3, and a trickled answer
# (headers first, the body over 300 ms) in turn; 60 s is a hang
n=\$1; k=0
export PGOPTIONS='-c statement_timeout=60s'
while [ ! -e "$STOP" ]; do
	k=\$((k + 1))
	case \$((k % 3)) in
	0) sql="SELECT length(fw_complete('c\$n k\$k'))" ;;
	1) sql="SELECT array_length(fw_complete_batch(ARRAY['c\$n k\$k a', 'c\$n k\$k b', 'c\$n k\$k c'], 'default'), 1)" ;;
	2) sql="SELECT length(fw_complete('c\$n k\$k [fwsim:trickle=300]'))" ;;
	esac
	if timeout 90 $PSQL -c "\$sql" >/dev/null 2>&1; then
		echo \$(date +%s%3N) >> "$BENCH_WORK/client.\$n"
	else
		sleep 0.05
	fi
done
EOF
chmod +x "$BENCH_WORK/client.sh"

# ---- the simulator's log, polled so its 10,000-entry ring never wraps;
# merged by seq, written out once at the end
sim_poll() {
	python3 - "$SIM" "$STOP.poll" "$BENCH_WORK/simlog.jsonl" <<'PY'
import json, os, sys, time, urllib.request
sim, stop, out = sys.argv[1:4]
seen = {}
def poll():
    try:
        with urllib.request.urlopen(sim + "/control/log?limit=10000", timeout=30) as r:
            for e in json.load(r)["requests"]:
                seen[e["seq"]] = e
    except Exception:
        pass
while not os.path.exists(stop):
    poll()
    time.sleep(1)
poll()
with open(out, "w") as f:
    f.write(json.dumps({"requests": list(seen.values())}) + "\n")
PY
}
sim_poll &
POLL_PID=$!

server_up() { su fwtest -s /bin/bash -c "$PSQL -c 'SELECT 1'" >/dev/null 2>&1; }
wait_up() {
	for _ in $(seq 1 1200); do server_up && return 0; sleep 0.1; done
	echo "the server did not come back in 120 s" >&2
	return 1
}

CPIDS=""
for i in $(seq 1 "$CLIENTS"); do
	su fwtest -s /bin/bash -c "bash '$BENCH_WORK/client.sh' $i" &
	CPIDS="$CPIDS $!"
done

# ---- the killer
kills=0; restarts=0; events=0
t_start=$(date +%s)
declare -A killed_type
while [ "$kills" -lt "$KILLS" ] && [ $(( $(date +%s) - t_start )) -lt "$TIME_LIMIT" ]; do
	sleep "$(awk -v a="$KILL_MIN_MS" -v b="$KILL_MAX_MS" -v r="$RANDOM" 'BEGIN { printf "%.3f", (a + (b - a) * r / 32767) / 1000 }')"
	events=$((events + 1))
	if [ "$IMMEDIATE_EVERY" -gt 0 ] && [ $((events % IMMEDIATE_EVERY)) -eq 0 ]; then
		su fwtest -s /bin/bash -c "'$BINDIR/pg_ctl' -D '$DATA' -m immediate stop" >/dev/null 2>&1 || true
		su fwtest -s /bin/bash -c "'$BINDIR/pg_ctl' -D '$DATA' -l '$BENCH_WORK/pg.log' -w -t 120 start" >/dev/null
		restarts=$((restarts + 1))
	else
		PM=$(head -1 "$DATA/postmaster.pid" 2>/dev/null || true)
		[ -n "$PM" ] || { wait_up; continue; }
		mapfile -t kids < <(ps -o pid=,args= --ppid "$PM" 2>/dev/null | grep -v 'logger' || true)
		[ "${#kids[@]}" -gt 0 ] || continue
		pick=${kids[$((RANDOM % ${#kids[@]}))]}
		pid=$(echo "$pick" | awk '{print $1}')
		what=$(echo "$pick" | sed -E 's/^ *[0-9]+ +postgres: *//; s/^.*\[local\].*/client backend/; s/^(fw_tier [a-z]+).*/\1/; s/ +$//')
		kill -9 "$pid" 2>/dev/null || continue
		kills=$((kills + 1))
		killed_type[$what]=$(( ${killed_type[$what]:-0} + 1 ))
	fi
	echo $(date +%s%3N) > "$BENCH_WORK/last_kill"
	wait_up
done
t_kill_end=$(date +%s)

# ---- after the last kill: every client must get answers again
sleep 5
touch "$STOP"
for p in $CPIDS; do wait "$p" 2>/dev/null || true; done
for _ in $(seq 1 600); do
	[ "$(curl -s "$SIM/control/stats" | sed -E 's/.*"in_flight":([0-9]+).*/\1/')" = 0 ] && break
	sleep 0.1
done
touch "$STOP.poll"
wait "$POLL_PID" 2>/dev/null || true
wait_up
for _ in $(seq 1 10); do
	bpsql -c "SET statement_timeout = '120s'; SELECT fw_flush()" >/dev/null 2>&1 && break
	sleep 1
done
served=$(curl -s "$SIM/control/stats" | sed -E 's/^\{"total":([0-9]+).*/\1/')
bpsql -c "SELECT request_id FROM fw_tier.calls WHERE request_id IS NOT NULL" > "$BENCH_WORK/row_ids"
read -r rows unknown unknown_noid noid dup_ids <<<"$(bpsql -F ' ' -c "SELECT count(*),
	count(*) FILTER (WHERE outcome = 'unknown'),
	count(*) FILTER (WHERE outcome = 'unknown' AND request_id IS NULL),
	count(*) FILTER (WHERE request_id IS NULL),
	count(request_id) - count(DISTINCT request_id) FROM fw_tier.calls")"
last_kill=$(cat "$BENCH_WORK/last_kill" 2>/dev/null || echo 0)

python3 - "$BENCH_WORK" "$served" "$noid" "$dup_ids" "$last_kill" "$CLIENTS" <<'PY' > "$BENCH_WORK/result"
import json, sys, os
work, served, noid, dup_ids, last_kill, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
seen = {}
for line in open(os.path.join(work, "simlog.jsonl")):
    line = line.strip()
    if not line:
        continue
    try:
        for r in json.loads(line)["requests"]:
            seen[r["seq"]] = r
    except Exception:
        pass
ids = {r["request_id"] for r in seen.values() if r.get("request_id")}
without = sum(1 for r in seen.values() if not r.get("request_id"))
rows = set(l.strip() for l in open(os.path.join(work, "row_ids")) if l.strip())
unmatched = len(ids - rows)            # served with an id, no row with it
stray = len(rows - ids)                # a row with an id the sim never issued
lost = max(0, unmatched + without - noid) + (served - len(seen) if len(seen) < served else 0)
unsent = max(0, noid - unmatched - without)
stall = 0
answering = 0
for n in range(1, clients + 1):
    p = os.path.join(work, "client.%d" % n)
    ts = [int(x) for x in open(p)] if os.path.exists(p) else []
    for a, b in zip(ts, ts[1:]):
        stall = max(stall, b - a)
    if ts and ts[-1] > last_kill:
        answering += 1
print(len(seen), lost, stray, unsent, stall, answering, unmatched, without)
PY
read -r logged lost stray unsent stall answering unmatched without < "$BENCH_WORK/result"
dups=$((dup_ids + stray))

echo "kills: $kills ($(for k in "${!killed_type[@]}"; do printf '%s %s, ' "$k" "${killed_type[$k]}"; done | sed 's/, $//'))"
echo "restarts (pg_ctl stop -m immediate + start): $restarts"
echo "duration: $((t_kill_end - t_start)) s of kills"
echo "requests served: $served (in the simulator's log: $logged; $without without a request id)"
echo "rows: $rows"
echo "lost: $lost"
echo "duplicates: $dups"
echo "unknown rows: $unknown ($unknown_noid without a request id; $unsent written ahead but never reached the simulator)"
# what the recoveries said (calllog.c, fw_intents_recover)
read -r rec_inflight rec_unknown rec_found <<<"$(awk '
	/attempts were in flight when their processes died/ { for (i = 1; i <= NF; i++) { if ($i == "attempts") a += $(i - 1); if ($i == "are") u += $(i - 1) } }
	/had their record in the call log already/ { for (i = 1; i <= NF; i++) if ($i == "had") f += $(i - 1) }
	END { print a + 0, u + 0, f + 0 }' "$BENCH_WORK/pg.log")"
echo "recoveries: $rec_inflight attempts in flight at a crash, $rec_unknown logged as unknown, $rec_found whose own record had reached the ring (not written twice)"
echo "longest stall: $stall ms"
echo "clients answering after the last kill: $answering/$CLIENTS"
# SERVER_LOG=FILE keeps the server log (the work directory is removed)
[ -n "${SERVER_LOG:-}" ] && cp "$BENCH_WORK/pg.log" "$SERVER_LOG" && for n in $(seq 1 "$CLIENTS"); do cp "$BENCH_WORK/client.$n" "$SERVER_LOG.client.$n"; done
if [ "$lost" -eq 0 ] && [ "$dups" -eq 0 ] && [ "$answering" -eq "$CLIENTS" ]; then
	echo "RESULT chaos: PASS"
else
	echo "RESULT chaos: FAIL"
	exit 1
fi
