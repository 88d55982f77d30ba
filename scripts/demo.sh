#!/usr/bin/env bash
# The main job: a throwaway PostgreSQL cluster with fw_tier, talking to the
# project's Fireworks simulator on 127.0.0.1 (or to Fireworks itself when
# FIREWORKS_API_KEY is set).  Shows calls, routing, escalation on 503
# Overloaded, and the call log.  Run as root (or through sudo, which it uses by itself); the cluster runs as fwtest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/root.sh
fw_require_root "$@"
bash scripts/setup.sh

work=$(mktemp -d /tmp/fw_tier-demo.XXXXXX)
chown fwtest "$work"
bindir=$(pg_config --bindir)
port=$((20000 + RANDOM % 20000))
sim_pid=
cleanup() {
	su fwtest -s /bin/bash -c "'$bindir/pg_ctl' -D '$work/data' -m fast stop" >/dev/null 2>&1 || true
	[ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

if [ -n "${FIREWORKS_API_KEY:-}" ]; then
	base_url=https://api.fireworks.ai/inference/v1
	echo "demo: using Fireworks itself (FIREWORKS_API_KEY is set)"
else
	# Latency scaled down 5x so the demo is quick but still looks real.
	test/fwsim/fwsim --port 0 --port-file "$work/simport" --time-scale 0.2 --quiet >/dev/null &
	sim_pid=$!
	for _ in $(seq 1 100); do [ -s "$work/simport" ] && break; sleep 0.05; done
	base_url="http://127.0.0.1:$(cat "$work/simport")/inference/v1"
	echo "demo: using the simulator at $base_url"
fi

su fwtest -s /bin/bash -c "'$bindir/initdb' -D '$work/data' -A trust -U postgres" >/dev/null
cat >> "$work/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$work'
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '$base_url'
fw_tier.flush_interval = '200ms'
CONF
# The key stays in the server's environment, never in a file or a GUC.
su fwtest -s /bin/bash -c "FIREWORKS_API_KEY='${FIREWORKS_API_KEY:-}' '$bindir/pg_ctl' -D '$work/data' -l '$work/log' -w start" >/dev/null

psql_demo() { su fwtest -s /bin/bash -c "'$bindir/psql' -X -h '$work' -p $port -U postgres -d postgres -v ON_ERROR_STOP=1 $*"; }
psql_demo -e <<'SQL'
CREATE EXTENSION fw_tier;
-- fw_tier ships no prices.  EXAMPLE FIGURES ONLY, not Fireworks' prices
-- (the pricing page is the truth): USD per million tokens, input, cached
-- input, output; Priority about 1.5x Standard, Fast about 2x.
INSERT INTO fw_tier.prices VALUES
  ('accounts/fireworks/models/kimi-k2p6',  'standard', 0.60, 0.30, 2.50),
  ('accounts/fireworks/models/kimi-k2p6',  'priority', 0.90, 0.45, 3.75),
  ('accounts/fireworks/routers/kimi-k2p6-turbo', 'fast', 1.20, 0.60, 5.00);
-- a call inside an ordinary query
SELECT fw_complete('Summarise PostgreSQL in one line.', 'interactive') AS answer;
-- the whole response, with generation options
SELECT fw_chat('[{"role": "user", "content": "Name three colours."}]', 'default',
               '{"max_tokens": 16}') -> 'usage' AS usage;
-- the Fast path: a separate model id, never service_tier
SELECT fw_complete('Quick: what is 2 + 2?', 'fast') AS fast_answer;
-- batch enrichment: many requests in flight from one statement
CREATE TABLE docs (id int PRIMARY KEY, body text, summary text);
INSERT INTO docs SELECT i, 'document number ' || i FROM generate_series(1, 20) i;
UPDATE docs d SET summary = s.answer
  FROM (SELECT unnest(array_agg(id ORDER BY id)) AS id,
               unnest(fw_complete_batch(array_agg(body ORDER BY id), 'batch')) AS answer
          FROM docs) s
 WHERE d.id = s.id;
SELECT id, summary FROM docs ORDER BY id LIMIT 3;
SQL

if [ -z "${FIREWORKS_API_KEY:-}" ]; then
	echo "demo: the simulator now sheds the next Standard request with 503 Service Overloaded"
	curl -s -o /dev/null -X POST -d '{"fault": "overloaded", "count": 1, "path": "standard"}' \
		"http://127.0.0.1:$(cat "$work/simport")/control/rules"
fi
psql_demo -e <<'SQL'
SELECT fw_complete('An interactive question during a spike.', 'interactive') AS answer;
SELECT workload, path, priority_until IS NOT NULL AS escalated FROM fw_tier.status ORDER BY workload;
SELECT fw_flush();
-- newest first: the shed Standard attempt, then its Priority retry
SELECT workload, attempt, path, service_tier, http_status, outcome, prompt_tokens, completion_tokens
  FROM fw_tier.calls ORDER BY call_id DESC, attempt LIMIT 6;
-- what it cost, at the example prices above
SELECT workload, path, calls, attempts, completion_tokens, cost_usd
  FROM fw_tier.spend_daily ORDER BY workload, path;
-- models with calls but no price (empty here: every model used is priced)
SELECT model, path, unpriced_attempts, hint FROM fw_tier.unpriced_models;
SQL
echo "demo: done"
