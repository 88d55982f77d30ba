-- embed: fw_embed and fw_embed_batch (issue 12).  Pins the vectors (unit
-- length, deterministic, options.dimensions), NULL in -> NULL out, order
-- and chunking of a batch, the workload's embedding_model, the paths
-- (Priority via service_tier, Fast refused with 22023), every failure
-- class and the checks of the answer (bad_response), the call log's kind,
-- tokens and cost, and record then replay.  Workloads em_* are this
-- file's own.
INSERT INTO fw_tier.workloads (workload, embedding_model, on_overload) VALUES
	('em_std', NULL, 'retry'),
	('em_own', 'accounts/fireworks/models/qwen3-embedding-0p6b', 'retry'),
	('em_esc', NULL, 'priority');
INSERT INTO fw_tier.prices VALUES
	('accounts/fireworks/models/qwen3-embedding-8b', 'standard', 0.1, 0.05, 0),
	('accounts/fireworks/models/qwen3-embedding-8b', 'priority', 0.15, 0.075, 0);
SET fw_tier.max_attempts = 3;
SHOW fw_tier.default_embedding_model;
SELECT sim.reset();

-- happy path: the model's native dimensions, unit length, deterministic
SELECT array_length(v, 1) AS dims,
       round(sqrt((SELECT sum(x * x) FROM unnest(v) x))::numeric, 4) AS norm
  FROM (SELECT fw_embed('hello world', 'em_std') AS v) s;
SELECT fw_embed('hello world', 'em_std', '{"dimensions": 8}') = fw_embed('hello world', 'em_std', '{"dimensions": 8}') AS deterministic,
       fw_embed('hello world', 'em_std', '{"dimensions": 8}') <> fw_embed('hello there', 'em_std', '{"dimensions": 8}') AS by_text,
       array_length(fw_embed('hello world', 'em_std', '{"dimensions": 8}'), 1) AS asked_dims,
       array_length(fw_embed('hello world', 'em_own'), 1) AS own_model_dims;
-- NULL in, NULL out, nothing sent
SELECT sim.reset();
SELECT fw_embed(NULL, 'em_std') IS NULL AS null_in_null_out,
       (SELECT count(*) FROM sim.log) AS requests;
SELECT sim.try($$SELECT fw_embed('x', NULL)$$);

-- batch: one row per input, ord from 1, order kept, NULLs skipped, the
-- same vectors as one at a time
SELECT sim.reset();
SELECT ord, embedding IS NULL AS is_null,
       embedding = fw_embed(t, 'em_std', '{"dimensions": 4}') AS same_as_single
  FROM fw_embed_batch(ARRAY['a b', 'c', NULL, 'd e f'], 'em_std', '{"dimensions": 4}') b
  LEFT JOIN LATERAL (SELECT (ARRAY['a b', 'c', NULL, 'd e f'])[b.ord] AS t) i ON true
 ORDER BY ord;
SELECT count(*) AS rows, count(embedding) AS vectors
  FROM fw_embed_batch(ARRAY[NULL, NULL]::text[], 'em_std');
SELECT count(*) AS rows FROM fw_embed_batch('{}'::text[], 'em_std');
SELECT count(*) AS rows FROM fw_embed_batch(NULL, 'em_std');
-- chunks: by count and by estimated tokens
SELECT sim.reset();
SET fw_tier.embed_batch_inputs = 2;
SELECT count(embedding) AS vectors FROM fw_embed_batch(ARRAY['1', '2', '3', '4', '5'], 'em_std', '{"dimensions": 2}');
SELECT count(*) AS requests FROM sim.log;
RESET fw_tier.embed_batch_inputs;
SELECT sim.reset();
SET fw_tier.embed_batch_tokens = 10;
SELECT count(embedding) AS vectors
  FROM fw_embed_batch(ARRAY[repeat('x', 30), 'y', repeat('z', 60), 'w'], 'em_std', '{"dimensions": 2}');
SELECT count(*) AS requests FROM sim.log;
RESET fw_tier.embed_batch_tokens;

-- models and paths: the workload's embedding_model, options.model,
-- Priority forced, Fast refused before any request
SELECT sim.reset();
SELECT array_length(fw_embed('m', 'em_own', '{"dimensions": 2}'), 1) AS own,
       array_length(fw_embed('m', 'em_std', '{"model": "fireworks/nomic-embed-text-v1.5"}'), 1) AS option_model,
       array_length(fw_embed('m', 'em_std', '{"path": "priority", "dimensions": 2}'), 1) AS priority;
SELECT model, path, service_tier, status FROM sim.log ORDER BY seq;
SELECT sim.try($$SELECT fw_embed('x', 'fast')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"path": "fast"}')$$);
SELECT sim.try($$SELECT * FROM fw_embed_batch(ARRAY['x'], 'fast')$$);
SELECT count(*) AS requests_after_refusals FROM sim.log;
-- options fw_tier refuses
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"input": ["y"]}')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"encoding_format": "base64"}')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"dimensions": 0}')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"dimensions": 2.5}')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"service_tier": "priority"}')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '[1]')$$);

-- failure classes, as for chat
SELECT sim.reset();
-- 503 Overloaded: an escalating workload retries at once on Priority
SELECT array_length(fw_embed('shed [fwsim:overload]', 'em_esc', '{"dimensions": 2}'), 1) AS escalated;
SELECT path, service_tier, status FROM sim.log ORDER BY seq;
SELECT fw_deescalate('em_esc');
-- ... a retry workload backs off and fails after max_attempts
SELECT sim.try($$SELECT fw_embed('shed [fwsim:overload]', 'em_std')$$);
-- 429: retried, never escalated
SELECT sim.try($$SELECT fw_embed('busy [fwsim:ratelimit]', 'em_esc')$$);
SELECT sim.try($$SELECT fw_embed('down [fwsim:unavailable]', 'em_std')$$);
SELECT sim.try($$SELECT fw_embed('bad [fwsim:status=400]', 'em_std')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"model": "accounts/fireworks/models/kimi-k2p6"}')$$);
SELECT sim.try($$SELECT fw_embed('x', 'em_std', '{"dimensions": 5000}')$$);
-- answers that fail the checks: bad_response, never retried
SELECT sim.why($$SELECT fw_embed('[fwsim:malformed]', 'em_std')$$);
SELECT sim.why($$SELECT fw_embed('[fwsim:html200]', 'em_std')$$);
SELECT sim.why($$SELECT fw_embed('[fwsim:empty-choices]', 'em_std')$$);
SELECT sim.why($$SELECT fw_embed('[fwsim:overflow]', 'em_std', '{"dimensions": 3}')$$);
SELECT sim.why($$SELECT * FROM fw_embed_batch(ARRAY['[fwsim:drop-item]', 'b'], 'em_std', '{"dimensions": 3}')$$);
SELECT sim.why($$SELECT * FROM fw_embed_batch(ARRAY['[fwsim:dup-index]', 'b'], 'em_std', '{"dimensions": 3}')$$);
SELECT sim.why($$SELECT * FROM fw_embed_batch(ARRAY['[fwsim:bad-index]', 'b'], 'em_std', '{"dimensions": 3}')$$);
SELECT sim.why($$SELECT * FROM fw_embed_batch(ARRAY['[fwsim:ragged]', 'b'], 'em_std', '{"dimensions": 3}')$$);
SELECT sim.why($$SELECT * FROM fw_embed_batch(ARRAY['[fwsim:ragged]', 'b'], 'em_std')$$);
SELECT sim.try($$SELECT * FROM fw_embed_batch(ARRAY['[fwsim:truncated]', 'b'], 'em_std', '{"dimensions": 3}')$$);
-- transport
SET fw_tier.base_url = 'http://127.0.0.1:1/v1';
SELECT sim.try($$SELECT fw_embed('x', 'em_std')$$, true);
RESET fw_tier.base_url;
-- on_error null: the failed request's inputs are NULL, the others answered
SET fw_tier.embed_batch_inputs = 1;
SELECT ord, embedding IS NULL AS is_null
  FROM fw_embed_batch(ARRAY['ok', 'down [fwsim:unavailable]', 'ok too'], 'em_std',
                      '{"on_error": "null", "dimensions": 2}') ORDER BY ord;
RESET fw_tier.embed_batch_inputs;
SELECT fw_embed('down [fwsim:status=500]', 'em_std', '{"on_error": "null"}') IS NULL AS null_on_error;

-- the call log: kind, tokens, cost priced per model and path
SELECT fw_flush();
SELECT kind, path, outcome, prompt_tokens, completion_tokens, cost_usd
  FROM fw_tier.calls
 WHERE workload = 'em_std' AND outcome = 'ok' AND model LIKE '%qwen3-embedding-8b'
 ORDER BY call_id, attempt LIMIT 3;
SELECT kind, outcome, count(*)
  FROM fw_tier.calls WHERE workload LIKE 'em\_%'
 GROUP BY kind, outcome ORDER BY kind, outcome;
SELECT bool_and(kind = 'chat') AS others_are_chat
  FROM fw_tier.calls WHERE workload NOT LIKE 'em\_%' AND workload NOT LIKE 'rr\_%';

-- record, then replay without the simulator
TRUNCATE fw_tier.fixtures;
SET fw_tier.mode = 'record';
CREATE TEMP TABLE rec AS
  SELECT ord, embedding FROM fw_embed_batch(ARRAY['r1', NULL, 'r2 r3'], 'em_std', '{"dimensions": 3}');
SELECT fw_embed('r4', 'em_std', '{"dimensions": 3}') AS single \gset
SELECT sim.try($$SELECT fw_embed('r5 [fwsim:status=400]', 'em_std')$$);
RESET fw_tier.mode;
SELECT request->'input' AS input, path, attempt, http_status
  FROM fw_tier.fixtures_export ORDER BY request->'input'::text, path;
SELECT sim.reset();
SET fw_tier.mode = 'replay';
SELECT bool_and(r.embedding IS NOT DISTINCT FROM b.embedding) AS replay_same, count(*) AS rows
  FROM rec r JOIN fw_embed_batch(ARRAY['r1', NULL, 'r2 r3'], 'em_std', '{"dimensions": 3}') b USING (ord);
SELECT fw_embed('r4', 'em_std', '{"dimensions": 3}') = :'single'::real[] AS replay_single;
SELECT sim.try($$SELECT fw_embed('r5 [fwsim:status=400]', 'em_std')$$);
SELECT sim.try($$SELECT fw_embed('never recorded', 'em_std')$$);
RESET fw_tier.mode;
SELECT count(*) AS requests_during_replay FROM sim.log;
SELECT fw_flush();
SELECT kind, replayed, count(*), sum(cost_usd) AS cost
  FROM fw_tier.calls WHERE workload = 'em_std' AND replayed GROUP BY kind, replayed;
-- hostile answers, fed through replay: the recorded answer of one request
-- replaced by each body in turn; every one is a bad_response, none raises
-- anything else (and the good body is accepted)
TRUNCATE fw_tier.fixtures;
SET fw_tier.mode = 'record';
SELECT array_length(fw_embed('hostile', 'em_std', '{"dimensions": 2}'), 1) AS recorded;
RESET fw_tier.mode;
CREATE TEMP TABLE hostile (n serial, body text);
INSERT INTO hostile (body) VALUES
  ('{"data": [{"index": 0, "embedding": [0.6, 0.8]}]}'),
  ('[{"index": 0, "embedding": [0.6, 0.8]}]'),
  ('"just a string"'),
  ('{"data": {"index": 0, "embedding": [0.6, 0.8]}}'),
  ('{"data": [{"index": 0, "embedding": "AAAA"}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, "0.8"]}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, [0.8]]}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, {"v": 0.8}]}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, 1e39]}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, -1e999]}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, null]}]}'),
  ('{"data": [{"index": -1, "embedding": [0.6, 0.8]}]}'),
  ('{"data": [{"index": 0.0, "embedding": [0.6, 0.8]}]}'),
  ('{"data": [{"index": "0", "embedding": [0.6, 0.8]}]}'),
  ('{"data": [{"index": 99999999999, "embedding": [0.6, 0.8]}]}'),
  ('{"data": [{"embedding": [0.6, 0.8]}]}'),
  ('{"data": [{"index": 0}]}'),
  ('{"data": [{"index": 0, "embedding": []}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, 0.8, 0.0]}]}'),
  ('{"data": [{"index": 0, "embedding": [0.6, 0.8]}, {"index": 0, "embedding": [0.6, 0.8]}]}'),
  ('{"data": [], "usage": {"prompt_tokens": 1}}'),
  ('{"usage": {"prompt_tokens": 1}}'),
  ('{"data": [{"index": 0, "embedding": [0.6, 0.8]}], "data": []}'),
  ('{"data": [{"index": 0, "embedding": [0.6, 0.8]}]'),
  (repeat('[', 300) || repeat(']', 300)),
  ('{"data": [{"index": 0, "embedding": [0.6, 0.8]}], "usage": {"prompt_tokens": -5, "total_tokens": 1e30}}');
CREATE FUNCTION pg_temp.hostile_run() RETURNS TABLE (n int, outcome text)
LANGUAGE plpgsql AS $$
DECLARE
  h record;
BEGIN
  FOR h IN SELECT * FROM hostile ORDER BY 1 LOOP
    UPDATE fw_tier.fixtures SET response = h.body;
    n := h.n;
    outcome := sim.why($q$SELECT fw_embed('hostile', 'em_std', '{"dimensions": 2}')$q$);
    RETURN NEXT;
  END LOOP;
END $$;
SET fw_tier.mode = 'replay';
SELECT * FROM pg_temp.hostile_run();
RESET fw_tier.mode;
DELETE FROM fw_tier.prices WHERE model LIKE '%qwen3-embedding%';
RESET fw_tier.max_attempts;
