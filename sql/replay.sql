-- replay: record / replay (fw_tier.mode) and fixtures.  Pins what keys a
-- fixture (fw_fingerprint), fw_fixture's canonical bodies, replay sending
-- nothing to the simulator, a miss (42704 with the fingerprint and the
-- start of the prompt), replayed 503 Overloaded escalating and 429
-- retrying exactly like live ones, their attempts in the call log, record
-- then replay giving the same results, the file format of the export and
-- import views, and the privileges.  Workloads rp_* are this file's own.
INSERT INTO fw_tier.workloads (workload, model, on_overload) VALUES
	('rp_hand', 'accounts/fireworks/models/replay-test', 'priority'),
	('rp_other', 'accounts/fireworks/models/replay-test', 'retry'),
	('rp_rec', NULL, 'priority');
SET fw_tier.max_attempts = 3;

-- fixtures are readable by everyone, written by grant only
SELECT has_table_privilege('public', 'fw_tier.fixtures', 'SELECT') AS public_reads,
       has_table_privilege('public', 'fw_tier.fixtures', 'INSERT') AS public_writes,
       has_table_privilege('public', 'fw_tier.fixtures_export', 'SELECT') AS public_exports,
       has_table_privilege('public', 'fw_tier.fixtures_import', 'INSERT') AS public_imports;

-- the key: model, messages and generation options count; routing,
-- on_error, user and session affinity do not
SELECT fw_fingerprint('[{"role": "user", "content": "hi"}]', 'rp_hand') AS fp \gset
SELECT length(:'fp') AS fp_length,
       fw_fingerprint('[{"role": "user", "content": "hi"}]', 'rp_other') = :'fp' AS same_model_same_key,
       fw_fingerprint('[{"role": "user", "content": "hi"}]', 'rp_hand',
                      '{"path": "priority", "on_error": "null", "user": "u1", "session_affinity": "s1"}') = :'fp' AS routing_ignored,
       fw_fingerprint('[{"role": "user", "content": "hi"}]', 'rp_hand', '{"temperature": 0}') <> :'fp' AS options_count,
       fw_fingerprint('[{"role": "user", "content": "hi"}]', 'rp_hand', '{"model": "m2"}') <> :'fp' AS model_counts,
       fw_fingerprint('[{"role": "user", "content": "hi!"}]', 'rp_hand') <> :'fp' AS prompt_counts,
       fw_fingerprint('[{"role": "user", "content": "hi"}]', 'fast')
         <> fw_fingerprint('[{"role": "user", "content": "hi"}]', 'fast', '{"path": "standard"}') AS fast_model_counts;
-- the mistakes a call would raise
SELECT fw_fingerprint('[]', 'rp_hand');
SELECT fw_fingerprint('[{"role": "user", "content": "hi"}]', 'no_such_workload');
SELECT fw_fixture('hi', 'rp_hand', 200, NULL);

-- hand-written fixtures: fw_fixture keys them as the engine will
SELECT fw_fixture('hi', 'rp_hand', 200, 'Hello from a fixture') = :'fp' AS same_key;
SELECT fw_fixture('shed', 'rp_hand', 503, path => 'standard') IS NOT NULL AS overloaded_on_standard,
       fw_fixture('shed', 'rp_hand', 200, 'served on priority') IS NOT NULL AS ok_anywhere;
SELECT fw_fixture('busy', 'rp_hand', 429, attempt => 1, retry_after => 0) IS NOT NULL AS first_attempt_429,
       fw_fixture('busy', 'rp_hand', 200, 'served after a 429') IS NOT NULL AS then_ok;
SELECT fw_fixture('always busy', 'rp_other', 429) IS NOT NULL AS every_attempt_429,
       fw_fixture('down', 'rp_other', 503, 'Service Unavailable') IS NOT NULL AS unavailable,
       fw_fixture('bad', 'rp_other', 400) IS NOT NULL AS rejected,
       fw_fixture_chat('[{"role": "system", "content": "be terse"}, {"role": "user", "content": "as json"}]',
                       'rp_other', 200, '{"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "{}"}}]}',
                       options => '{"temperature": 0}') IS NOT NULL AS whole_body;
SELECT request->'messages'->-1->>'content' AS prompt, path, attempt, http_status, retry_after,
       response::jsonb->'error'->>'type' AS error_type,
       response::jsonb->'choices'->0->'message'->>'content' AS answer
  FROM fw_tier.fixtures_export
 WHERE request->>'model' = 'accounts/fireworks/models/replay-test'
 ORDER BY prompt, path, attempt;

-- replay: answers from fixtures only, nothing reaches the simulator
SELECT sim.reset();
SET fw_tier.mode = 'replay';
SELECT fw_complete('hi', 'rp_hand');
-- 503 Overloaded on Standard escalates; the retry on Priority gets 'any'.
-- The window is this session's only: no shared escalation is counted.
SELECT fw_complete('shed', 'rp_hand');
SELECT path, escalations FROM fw_tier.status WHERE workload = 'rp_hand';
SELECT fw_deescalate('rp_hand');
SELECT path FROM fw_tier.status WHERE workload = 'rp_hand';
-- 429 on the first attempt, retried, served on the second
SELECT fw_complete('busy', 'rp_hand');
-- failures raise what live ones raise, after as many attempts
SELECT fw_complete('always busy', 'rp_other');
SELECT fw_complete('down', 'rp_other');
SELECT fw_complete('bad', 'rp_other');
SELECT fw_chat('[{"role": "system", "content": "be terse"}, {"role": "user", "content": "as json"}]',
               'rp_other', '{"temperature": 0}')->'choices'->0->'message'->>'content' AS answer;
SELECT fw_complete_batch(ARRAY['hi', NULL, 'busy', 'bad'], 'rp_hand', '{"on_error": "null"}');
-- a miss: 42704, the fingerprint, the start of the prompt; on_error does
-- not hide it (it is a mistake in the test, not a provider failure)
SELECT fw_complete('never recorded: a prompt long enough to be cut short in the error detail', 'rp_hand');
SELECT sim.try($$SELECT fw_complete_batch(ARRAY['hi', 'not there'], 'rp_hand', '{"on_error": "null"}')$$, true);
SELECT (sim.http('GET', '/control/stats')->>'total')::int AS requests_sent;
RESET fw_tier.mode;

-- the replayed attempts are in the call log like live ones
SELECT fw_flush();
SELECT workload, dense_rank() OVER (ORDER BY call_id) AS call, attempt, path,
       service_tier, escalated, http_status, outcome
  FROM fw_tier.calls WHERE workload IN ('rp_hand', 'rp_other')
 ORDER BY call_id, attempt;

-- record against the simulator, then replay with the same results
SELECT sim.reset();
SET fw_tier.mode = 'record';
SELECT fw_complete('[rp] recorded once', 'rp_rec');
SELECT fw_complete('[fwsim:overload] [rp] shed while recording', 'rp_rec');
SELECT path FROM fw_tier.status WHERE workload = 'rp_rec';
SELECT fw_deescalate('rp_rec');
SELECT fw_complete('[fwsim:ratelimit] [rp] limited while recording', 'rp_rec');
SELECT fw_complete_batch(ARRAY['[rp] b1', '[rp] b2'], 'rp_rec');
SELECT count(*) AS requests_sent FROM sim.log;
RESET fw_tier.mode;
-- 2xx under ('any', 0), failures under their path and attempt
SELECT request->'messages'->-1->>'content' AS prompt, path, attempt, http_status, retry_after
  FROM fw_tier.fixtures WHERE request->'messages'->-1->>'content' LIKE '%[rp]%'
 ORDER BY prompt, path, attempt;

SELECT sim.reset();
SET fw_tier.mode = 'replay';
SELECT fw_complete('[rp] recorded once', 'rp_rec');
SELECT fw_complete('[fwsim:overload] [rp] shed while recording', 'rp_rec');
SELECT path FROM fw_tier.status WHERE workload = 'rp_rec';
SELECT fw_deescalate('rp_rec');
SELECT fw_complete('[fwsim:ratelimit] [rp] limited while recording', 'rp_rec');
SELECT fw_complete_batch(ARRAY['[rp] b1', '[rp] b2'], 'rp_rec');
SELECT count(*) AS requests_sent FROM sim.log;
RESET fw_tier.mode;
-- the same attempts, recorded and replayed
SELECT fw_flush();
SELECT r.attempt, r.path, r.http_status, r.outcome, count(*) AS calls
  FROM fw_tier.calls r WHERE r.workload = 'rp_rec'
 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4;

-- the file format: one line per fixture, tab-separated, stable order
COPY (SELECT * FROM fw_tier.fixtures_export
       WHERE request->>'model' = 'accounts/fireworks/models/replay-test'
         AND http_status <> 200) TO STDOUT;
-- import upserts; export, import, export is the same text
CREATE TEMP TABLE rp_file AS SELECT * FROM fw_tier.fixtures_export;
SELECT md5(string_agg(f::text, E'\n')) AS before FROM fw_tier.fixtures_export f \gset
TRUNCATE fw_tier.fixtures;
INSERT INTO fw_tier.fixtures_import SELECT * FROM rp_file;
INSERT INTO fw_tier.fixtures_import SELECT * FROM rp_file WHERE path = 'standard';
SELECT md5(string_agg(f::text, E'\n')) = :'before' AS round_trip FROM fw_tier.fixtures_export f;
COPY fw_tier.fixtures_import (fingerprint, http_status, request, response) FROM STDIN;
hand-made	200	{"model": "m", "messages": []}	{"choices": [{"message": {"content": "x"}}]}
\.
SELECT fingerprint, path, attempt, http_status, retry_after FROM fw_tier.fixtures WHERE fingerprint = 'hand-made';

-- leave nothing behind
DELETE FROM fw_tier.fixtures;
DELETE FROM fw_tier.workloads WHERE workload LIKE 'rp\_%';
