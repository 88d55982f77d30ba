-- rerank: fw_rerank (issue 12).  Pins the ranking (rows by descending
-- score, index into documents counting from 1, top_n), NULL query or
-- documents, the workload's rerank_model and the paths, every failure
-- class and the checks of the answer, the call log's kind, and record
-- then replay.  Workloads rr_* are this file's own.
INSERT INTO fw_tier.workloads (workload, rerank_model, on_overload) VALUES
	('rr_std', NULL, 'retry'),
	('rr_own', 'fireworks/qwen3-reranker-4b', 'retry'),
	('rr_esc', NULL, 'priority');
SET fw_tier.max_attempts = 3;
SHOW fw_tier.default_rerank_model;
SELECT sim.reset();

-- happy path: by descending score; ties by position; index into documents
SELECT index, round(score::numeric, 4) AS score
  FROM fw_rerank('red apple', ARRAY['a red car', 'green apple red', 'blue sky', 'apple pie'], NULL, 'rr_std');
SELECT index, round(score::numeric, 4) AS score
  FROM fw_rerank('red apple', ARRAY['a red car', 'green apple red', 'blue sky', 'apple pie'], 2, 'rr_std');
-- NULL documents are neither sent nor ranked; indexes stay the caller's
SELECT index, round(score::numeric, 4) AS score
  FROM fw_rerank('red apple', ARRAY[NULL, 'apple', NULL, 'red apple'], NULL, 'rr_std');
SELECT sim.reset();
SELECT count(*) AS null_query FROM fw_rerank(NULL, ARRAY['a'], NULL, 'rr_std');
SELECT count(*) AS null_docs FROM fw_rerank('q', NULL, NULL, 'rr_std');
SELECT count(*) AS only_nulls FROM fw_rerank('q', ARRAY[NULL, NULL]::text[], NULL, 'rr_std');
SELECT count(*) AS empty FROM fw_rerank('q', '{}', NULL, 'rr_std');
SELECT count(*) AS requests FROM sim.log;
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['a'], 0, 'rr_std')$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['a'], NULL, NULL)$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['a'], NULL, 'rr_std', '{"top_n": 3}')$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['a'], NULL, 'rr_std', '{"dimensions": 3}')$$);

-- models and paths
SELECT sim.reset();
SELECT count(*) AS own FROM fw_rerank('q', ARRAY['q'], NULL, 'rr_own');
SELECT count(*) AS priority FROM fw_rerank('q', ARRAY['q'], NULL, 'rr_std', '{"path": "priority"}');
SELECT model, path, service_tier, status FROM sim.log ORDER BY seq;
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['q'], NULL, 'fast')$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['q'], NULL, 'rr_std', '{"path": "fast"}')$$);

-- failure classes
SELECT sim.reset();
SELECT count(*) AS escalated FROM fw_rerank('q [fwsim:overload]', ARRAY['q'], NULL, 'rr_esc');
SELECT path, service_tier, status FROM sim.log ORDER BY seq;
SELECT fw_deescalate('rr_esc');
SELECT sim.try($$SELECT * FROM fw_rerank('q [fwsim:overload]', ARRAY['q'], NULL, 'rr_std')$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q [fwsim:ratelimit]', ARRAY['q'], NULL, 'rr_std')$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q [fwsim:unavailable]', ARRAY['q'], NULL, 'rr_std')$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q [fwsim:status=403]', ARRAY['q'], NULL, 'rr_std')$$);
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['q'], NULL, 'rr_std', '{"model": "accounts/fireworks/models/qwen3-embedding-8b"}')$$);
SELECT sim.why($$SELECT * FROM fw_rerank('q [fwsim:malformed]', ARRAY['q'], NULL, 'rr_std')$$);
SELECT sim.why($$SELECT * FROM fw_rerank('q [fwsim:dup-index]', ARRAY['q', 'r'], NULL, 'rr_std')$$);
SELECT sim.why($$SELECT * FROM fw_rerank('q [fwsim:bad-index]', ARRAY['q', 'r'], NULL, 'rr_std')$$);
SELECT sim.why($$SELECT * FROM fw_rerank('q [fwsim:overflow]', ARRAY['q', 'r'], NULL, 'rr_std')$$);
-- fewer results than documents is an answer (a provider may cut)
SELECT count(*) AS fewer_is_fine FROM fw_rerank('q [fwsim:drop-item]', ARRAY['q', 'r'], NULL, 'rr_std');
SELECT count(*) AS null_on_error
  FROM fw_rerank('q [fwsim:unavailable]', ARRAY['q'], NULL, 'rr_std', '{"on_error": "null"}');
SET fw_tier.base_url = 'http://127.0.0.1:1/v1';
SELECT sim.try($$SELECT * FROM fw_rerank('q', ARRAY['q'], NULL, 'rr_std')$$, true);
RESET fw_tier.base_url;

SELECT fw_flush();
SELECT kind, outcome, count(*)
  FROM fw_tier.calls WHERE workload LIKE 'rr\_%'
 GROUP BY kind, outcome ORDER BY kind, outcome;
SELECT kind, prompt_tokens, completion_tokens
  FROM fw_tier.calls WHERE workload = 'rr_own';

-- record, then replay without the simulator
TRUNCATE fw_tier.fixtures;
SET fw_tier.mode = 'record';
CREATE TEMP TABLE rec AS SELECT * FROM fw_rerank('big cat', ARRAY['a cat', 'big dog', 'big cat'], 2, 'rr_std');
RESET fw_tier.mode;
SELECT request->>'query' AS query, request->'documents' AS documents, request->'top_n' AS top_n
  FROM fw_tier.fixtures_export;
SELECT sim.reset();
SET fw_tier.mode = 'replay';
SELECT (SELECT array_agg(index ORDER BY score DESC, index) FROM rec)
       = (SELECT array_agg(index ORDER BY score DESC, index)
            FROM fw_rerank('big cat', ARRAY['a cat', 'big dog', 'big cat'], 2, 'rr_std')) AS replay_same;
SELECT sim.try($$SELECT * FROM fw_rerank('big cat', ARRAY['a cat'], 2, 'rr_std')$$);
RESET fw_tier.mode;
SELECT count(*) AS requests_during_replay FROM sim.log;
-- hostile answers, fed through replay (as in embed.sql)
TRUNCATE fw_tier.fixtures;
SET fw_tier.mode = 'record';
SELECT count(*) AS recorded FROM fw_rerank('hostile', ARRAY['a', 'b', 'c'], 2, 'rr_std');
RESET fw_tier.mode;
CREATE TEMP TABLE hostile (n serial, body text);
INSERT INTO hostile (body) VALUES
  ('{"data": [{"index": 2, "relevance_score": 0.5}, {"index": 0, "relevance_score": 0.9}]}'),
  ('{"data": [{"index": 2, "relevance_score": 0.5}, {"index": 0, "relevance_score": 0.9}, {"index": 1, "relevance_score": 0.1}]}'),
  ('{"data": [{"index": 2}]}'),
  ('{"data": [{"index": 2, "relevance_score": "0.5"}]}'),
  ('{"data": [{"index": 2, "relevance_score": 1e400}]}'),
  ('{"data": [{"index": 3, "relevance_score": 0.5}]}'),
  ('{"data": [{"relevance_score": 0.5}]}'),
  ('{"results": [{"index": 0, "relevance_score": 0.5}]}'),
  ('{"data": [{"index": 1, "relevance_score": 0.5, "document": {"text": "b", "nested": [[1]]}}]}');
CREATE FUNCTION pg_temp.hostile_run() RETURNS TABLE (n int, outcome text)
LANGUAGE plpgsql AS $$
DECLARE
  h record;
BEGIN
  FOR h IN SELECT * FROM hostile ORDER BY 1 LOOP
    UPDATE fw_tier.fixtures SET response = h.body;
    n := h.n;
    outcome := sim.why($q$SELECT * FROM fw_rerank('hostile', ARRAY['a', 'b', 'c'], 2, 'rr_std')$q$);
    RETURN NEXT;
  END LOOP;
END $$;
SET fw_tier.mode = 'replay';
SELECT * FROM pg_temp.hostile_run();
-- the first body's rows: by score, indexes counting from 1
UPDATE fw_tier.fixtures SET response = (SELECT body FROM hostile WHERE n = 1);
SELECT index, score FROM fw_rerank('hostile', ARRAY['a', 'b', 'c'], 2, 'rr_std');
RESET fw_tier.mode;
RESET fw_tier.max_attempts;
