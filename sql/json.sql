-- json: typed answers (issue 12), fw_complete_json and fw_complete_json_batch.
-- Pins the response_format sent (fw_tier.json_options), the answer as
-- jsonb, NULL inputs, the schema checked before any request (22023,
-- 54000, 0A000), the failure class bad_output (not JSON, cut off, each
-- schema rule: type, integer, null, type arrays, required, nested
-- properties, enum, items, additionalProperties) with its SQLSTATE and a
-- DETAIL naming the JSON path and the rule, the one retry, on_error null,
-- the attempts in fw_tier.calls, and record then replay.  Workloads js_*
-- are this file's own.
INSERT INTO fw_tier.workloads (workload, model, on_overload) VALUES
	('js_live', 'accounts/fireworks/models/json-live', 'retry'),
	('js_hand', 'accounts/fireworks/models/json-test', 'retry'),
	('js_rec', NULL, 'retry');
SET fw_tier.max_attempts = 3;
-- priced, so a bad answer's cost shows (it was paid)
INSERT INTO fw_tier.prices VALUES ('accounts/fireworks/models/json-live', 'standard', 1.00, 0.50, 4.00);

-- run q; its SQLSTATE, message and DETAIL, or 'ok'
CREATE FUNCTION sim.jtry(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  st text; msg text; det text;
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
  RETURN st || ' ' || msg || coalesce(' | ' || nullif(det, ''), '');
END $$;

-- not for PUBLIC, like fw_complete; json_options sends nothing
SELECT p.oid::regprocedure AS function, p.provolatile,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute,
       p.proconfig
  FROM pg_proc p
 WHERE p.proname IN ('fw_complete_json', 'fw_complete_json_batch', 'json_options')
 ORDER BY 1::text;

-- without EXECUTE: 42501 with a HINT naming the GRANT; with it, a call
CREATE ROLE js_app;
SET ROLE js_app;
SELECT fw_complete_json('x', '{"type": "string"}');
SELECT fw_complete_json_batch(ARRAY['x'], '{"type": "string"}');
SELECT fw_tier.json_options('{"type": "string"}') IS NOT NULL AS anyone_builds_options;
RESET ROLE;
GRANT EXECUTE ON FUNCTION fw_complete_json(text, jsonb, text, jsonb) TO js_app;
SET ROLE js_app;
SELECT fw_complete_json('now allowed', '{"type": "string"}') AS allowed;
RESET ROLE;
REVOKE EXECUTE ON FUNCTION fw_complete_json(text, jsonb, text, jsonb) FROM js_app;
DROP ROLE js_app;

\set person '{"type": "object", "required": ["name", "age"], "additionalProperties": false, "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}}, "score": {"type": ["number", "null"]}, "ok": {"type": "boolean"}}}'

-- what is sent: the caller's options plus the schema as response_format
SELECT fw_tier.json_options('{"type": "string"}', '{"temperature": 0, "schema_name": "reply"}');
SELECT fw_tier.json_options('{"type": "string"}');

-- happy path: the simulator answers a value of the schema; it is jsonb
SELECT sim.reset();
SELECT fw_complete_json('tell me about bob', :'person', 'js_live') AS person;
SELECT fw_complete_json('one two three', '{"type": "array", "items": {"type": "integer"}}', 'js_live') AS ints,
       fw_complete_json('x', '{"enum": ["red", "green"]}', 'js_live') AS colour,
       jsonb_typeof(fw_complete_json('x', '{"type": "number"}', 'js_live')) AS number,
       fw_complete_json('x', '{"type": "string", "title": "t", "description": "annotations are ignored"}',
                        'js_live', '{"schema_name": "reply", "temperature": 0}') AS string;
SELECT count(*) AS requests, string_agg(DISTINCT status::text, ',') AS statuses FROM sim.log;

-- NULLs: a NULL prompt gives NULL and sends nothing; a NULL schema or
-- workload is an error; NULL options are '{}'
SELECT sim.reset();
SELECT fw_complete_json(NULL, :'person', 'js_live') IS NULL AS null_prompt;
SELECT fw_complete_json('x', NULL);
SELECT fw_complete_json('x', :'person', NULL);
SELECT fw_complete_json('x', '{"type": "boolean"}', 'js_live', NULL) AS null_options;
SELECT fw_complete_json_batch(NULL, :'person', 'js_live') IS NULL AS null_batch;
SELECT count(*) AS requests FROM sim.log;

-- the schema is checked before anything is sent
SELECT sim.reset();
SELECT s AS schema, sim.jtry(format('SELECT fw_complete_json(%L, %L, %L)', 'x', s, 'js_live')) AS result
  FROM unnest(ARRAY[
	'"object"', '[]', 'true', '{"type": "text"}', '{"type": []}', '{"type": ["string", 5]}',
	'{"properties": {"a": 5}}', '{"properties": []}', '{"required": "a"}', '{"required": [1]}',
	'{"enum": []}', '{"properties": {"a": {"items": {"minimum": 0}}}}', '{"$ref": "#/x"}',
	'{"items": [{"type": "string"}]}', '{"additionalProperties": "no"}', '{"additionalProperties": []}']) s;
-- too deep, too large
SELECT sim.jtry(format('SELECT fw_complete_json(%L, %L, %L)', 'x',
                repeat('{"items": ', 40) || '{}' || repeat('}', 40), 'js_live')) AS too_deep;
SELECT sim.jtry(format('SELECT fw_complete_json(%L, %L, %L)', 'x',
                jsonb_build_object('description', repeat('x', 70000)), 'js_live')) AS too_large;
-- options: response_format is the schema's, schema_name is checked
SELECT sim.jtry($$SELECT fw_complete_json('x', '{}', 'js_live', '{"response_format": {"type": "text"}}')$$) AS own_format;
SELECT sim.jtry($$SELECT fw_complete_json('x', '{}', 'js_live', '{"schema_name": "no spaces"}')$$) AS bad_name;
SELECT sim.jtry($$SELECT fw_complete_json('x', '{}', 'js_live', '{"on_error": "maybe"}')$$) AS bad_on_error;
SELECT count(*) AS requests FROM sim.log;

-- bad_output from the simulator: not JSON, cut off, a schema violation;
-- each asked twice (one retry), then raised with its SQLSTATE
SELECT sim.reset();
SELECT fw_complete_json('bob [fwsim:json-invalid]', :'person', 'js_live');
SELECT fw_complete_json('bob [fwsim:json-cut]', :'person', 'js_live');
SELECT fw_complete_json('one two three four five', :'person', 'js_live', '{"max_tokens": 2}');
SELECT fw_complete_json('bob [fwsim:json-violate]', :'person', 'js_live');
SELECT fw_complete_json('bob [fwsim:json-violate]', '{"type": "integer"}', 'js_live');
SELECT count(*) AS requests, string_agg(DISTINCT status::text, ',') AS statuses FROM sim.log;
-- on_error null: NULL, still two attempts
SELECT sim.reset();
SELECT fw_complete_json('bob [fwsim:json-invalid]', :'person', 'js_live', '{"on_error": "null"}') IS NULL AS null_on_error;
SELECT count(*) AS requests FROM sim.log;
-- max_attempts 1: no retry
SET fw_tier.max_attempts = 1;
SELECT sim.jtry($$SELECT fw_complete_json('bob [fwsim:json-invalid]', '{}', 'js_live')$$) AS one_attempt;
RESET fw_tier.max_attempts;
-- the retry can succeed: a bad answer once, then a good one
SELECT sim.reset();
SELECT sim.rule('{"fault": "json-invalid", "count": 1}');
SELECT fw_complete_json('second try', :'person', 'js_live') AS retried;
SELECT count(*) AS requests FROM sim.log;

-- every attempt is in the call log: bad_output with what failed, tokens
-- counted (they were paid)
SELECT fw_flush();
SELECT dense_rank() OVER (ORDER BY call_id) AS call, attempt, outcome, http_status,
       completion_tokens > 0 AS tokens_logged, cost_usd > 0 AS costed, error
  FROM fw_tier.calls
 WHERE call_id IN (SELECT call_id FROM fw_tier.calls
                    WHERE workload = 'js_live' AND outcome = 'bad_output')
 ORDER BY call_id, attempt;

-- the batch form: answers in order, NULL for a NULL prompt and, under
-- on_error null, for a bad answer
SELECT sim.reset();
SELECT fw_complete_json_batch(ARRAY['ann', NULL, 'bob [fwsim:json-violate]', 'cy'],
                              '{"type": "object", "properties": {"n": {"type": "string"}}, "required": ["n"]}',
                              'js_live', '{"on_error": "null"}') AS answers;
SELECT count(*) AS requests FROM sim.log;
SELECT fw_complete_json_batch(ARRAY['ann', 'bob [fwsim:json-cut]'], '{"type": "string"}', 'js_live');
SELECT fw_complete_json_batch('{}', '{}', 'js_live') AS empty;

-- each schema rule, against hand-written answers replayed from fixtures
CREATE FUNCTION sim.answer(prompt text, schema jsonb, answer text, finish text DEFAULT 'stop')
RETURNS text LANGUAGE sql AS $$
  SELECT fw_fixture_chat(jsonb_build_array(jsonb_build_object('role', 'user', 'content', prompt)),
           'js_hand', 200,
           jsonb_build_object('object', 'chat.completion', 'model', 'accounts/fireworks/models/json-test',
             'choices', jsonb_build_array(jsonb_build_object('index', 0, 'finish_reason', finish,
               'message', jsonb_build_object('role', 'assistant', 'content', answer))),
             'usage', jsonb_build_object('prompt_tokens', 3, 'completion_tokens', 2, 'total_tokens', 5))::text,
           options => fw_tier.json_options(schema))
$$;
CREATE TABLE sim.cases (n int, schema jsonb, answer text, finish text DEFAULT 'stop');
INSERT INTO sim.cases (n, schema, answer) VALUES
	(1, '{"type": "string"}', '5'),
	(2, '{"type": "integer"}', '2.5'),
	(3, '{"type": "integer"}', '2.0'),
	(4, '{"type": "number"}', '2'),
	(5, '{"type": "null"}', '"x"'),
	(6, '{"type": ["string", "null"]}', 'null'),
	(7, '{"type": ["string", "integer"]}', 'true'),
	(8, '{"type": "boolean"}', '{"a": 1}'),
	(9, '{"type": "object", "required": ["name", "age"]}', '{"age": 1}'),
	(10, '{"properties": {"address": {"type": "object", "required": ["zip"], "properties": {"zip": {"type": "string"}}}}}',
	     '{"address": {"zip": 12345}}'),
	(11, '{"properties": {"address": {"required": ["zip"]}}}', '{"address": {"city": "Oslo"}}'),
	(12, '{"enum": ["red", "green"]}', '"blue"'),
	(13, '{"enum": [1, {"a": [true]}]}', '1.0'),
	(14, '{"enum": [1, {"a": [true]}]}', '{"a": [true]}'),
	(15, '{"type": "array", "items": {"type": "integer"}}', '[1, 2, "three"]'),
	(16, '{"items": {"properties": {"q": {"type": "integer"}}}}', '[{"q": 1}, {"q": 1.5}]'),
	(17, '{"properties": {"a": {}}, "additionalProperties": false}', '{"a": 1, "b c": 2}'),
	(18, '{"additionalProperties": {"type": "integer"}}', '{"x": 1, "y": "s"}'),
	(19, '{"properties": {"never": false}}', '{"never": 1}'),
	(20, '{"properties": {"name": {"type": "string"}}}', '"a string is no object, but properties only apply to objects"'),
	(21, '{"type": "object"}', 'Sure: {"a": 1}'),
	(22, '{"type": "object"}', ''),
	(23, :'person', '{"name": "bob", "age": 3, "tags": ["a", "c"]}'),
	(24, :'person', '{"name": "bob", "age": 3, "score": null, "tags": ["b"], "ok": false}');
INSERT INTO sim.cases VALUES (25, '{"type": "object"}', '{"a": 1}', 'length');
-- answers the database cannot hold, or nested too deeply: not JSON to us
INSERT INTO sim.cases (n, schema, answer) VALUES
	(26, '{"type": "number"}', '1e1000000'),
	(27, '{"type": "array"}', repeat('[', 300) || repeat(']', 300));
SELECT count(sim.answer('case ' || n, schema, answer, finish)) AS fixtures FROM sim.cases;
SELECT sim.reset();
SET fw_tier.mode = 'replay';
SELECT n, left(answer, 70) AS answer, sim.jtry(format('SELECT fw_complete_json(%L, %L, %L)', 'case ' || n, schema, 'js_hand')) AS result
  FROM sim.cases ORDER BY n;
SELECT fw_complete_json('case 24', :'person', 'js_hand') AS replayed;
RESET fw_tier.mode;
-- two attempts for each failing case, one for each good one, all replayed
SELECT fw_flush();
SELECT outcome, count(*) AS attempts, bool_and(replayed) AS replayed
  FROM fw_tier.calls WHERE workload = 'js_hand' GROUP BY outcome ORDER BY outcome;

-- the answer is network input: every prefix of a good answer, and the
-- answer with each byte replaced by a quote, a brace or a NUL-free control
-- byte, gives the answer or a bad_output SQLSTATE, nothing else (19 of
-- the 237 are still valid, as a reference validator in Python agrees)
CREATE TABLE sim.mutants AS
  SELECT row_number() OVER () AS n, m FROM (
    SELECT left(a, i) AS m FROM (SELECT '{"name": "bob", "age": 3, "score": 1.5, "tags": ["a", "b"]}'::text AS a) g,
           generate_series(0, length(a)) i
    UNION ALL
    SELECT overlay(a placing r from i for 1) FROM (SELECT '{"name": "bob", "age": 3, "score": 1.5, "tags": ["a", "b"]}'::text AS a) g,
           generate_series(1, length(a)) i, unnest(ARRAY['"', '}', E'\x01']) r) x;
SELECT count(sim.answer('mutant ' || n, :'person', m)) AS mutant_fixtures FROM sim.mutants;
SET fw_tier.mode = 'replay';
SELECT left(sim.jtry(format('SELECT fw_complete_json(%L, %L, %L)', 'mutant ' || n, :'person', 'js_hand')), 5) AS result,
       count(*) AS mutants
  FROM sim.mutants GROUP BY 1 ORDER BY 1;
RESET fw_tier.mode;
SELECT count(*) AS requests FROM sim.log;

-- record, then replay: the sequence "bad answer, then good" comes back
-- exactly, from fixtures, without the simulator
SELECT sim.reset();
SELECT sim.rule('{"fault": "json-violate", "count": 1}');
SET fw_tier.mode = 'record';
SELECT fw_complete_json('recorded answer', :'person', 'js_rec') AS recorded;
SET fw_tier.mode = 'replay';
SELECT fw_complete_json('recorded answer', :'person', 'js_rec') AS replayed;
RESET fw_tier.mode;
SELECT count(*) AS requests FROM sim.log;
SELECT path, attempt, http_status FROM fw_tier.fixtures
 WHERE request->'messages'->0->>'content' = 'recorded answer' ORDER BY path, attempt;
SELECT fw_flush();
SELECT replayed, attempt, outcome, error
  FROM fw_tier.calls WHERE workload = 'js_rec' ORDER BY call_id, attempt;

-- a hostile answer against a large schema: the work grows with the
-- answer alone, not answer x schema (items + a 4,000-value enum over
-- 200,000 elements; 2,000 properties against 200,000 empty objects),
-- memory per element is freed, and a statement_timeout cancels a long
-- check (57014, well within the bound).  Before the fix the first took
-- over 20 GB and never finished.
SELECT jsonb_build_object('items', jsonb_build_object('enum', jsonb_agg(i))) AS big_enum
  FROM generate_series(0, 3999) i \gset
SELECT jsonb_build_object('items', jsonb_build_object('properties', jsonb_object_agg('p' || i, '{}'::jsonb))) AS big_props
  FROM generate_series(1, 2000) i \gset
SELECT count(*) AS fixtures FROM (
  SELECT sim.answer('hostile enum', :'big_enum', '[' || string_agg('3999', ',') || ']') FROM generate_series(1, 200000)
  UNION ALL
  SELECT sim.answer('hostile enum miss', :'big_enum', '[' || string_agg('3999', ',') || ', 4000]') FROM generate_series(1, 200000)
  UNION ALL
  SELECT sim.answer('hostile props', :'big_props', '[' || string_agg('{}', ',') || ']') FROM generate_series(1, 200000)
  UNION ALL
  SELECT sim.answer('hostile long', :'big_enum', '[' || string_agg('3999', ',') || ']') FROM generate_series(1, 1000000)) f;
SET fw_tier.mode = 'replay';
SET fw_tier.max_attempts = 1;
SET statement_timeout = '20s';
SELECT jsonb_array_length(fw_complete_json('hostile enum', :'big_enum', 'js_hand')) AS enum_elements,
       jsonb_array_length(fw_complete_json('hostile props', :'big_props', 'js_hand')) AS props_elements;
SELECT sim.jtry(format('SELECT fw_complete_json(%L, %L, %L)', 'hostile enum miss', :'big_enum', 'js_hand')) AS enum_miss;
SET statement_timeout = '100ms';
CREATE FUNCTION sim.cancel_time(schema jsonb) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  t0 timestamptz := clock_timestamp();
BEGIN
  PERFORM fw_complete_json('hostile long', schema, 'js_hand');
  RETURN 'finished';
EXCEPTION WHEN query_canceled THEN
  RETURN 'cancelled, ' || CASE WHEN clock_timestamp() - t0 < interval '10 s' THEN 'within 10 s' ELSE 'late' END;
END $$;
SELECT sim.cancel_time(:'big_enum') AS long_check;
RESET statement_timeout;
RESET fw_tier.max_attempts;
RESET fw_tier.mode;
-- a "type" or "required" array naming something twice is refused
-- (JSON Schema's rule; a repeat would multiply the work per value)
SELECT s AS schema, sim.jtry(format('SELECT fw_complete_json(%L, %L, %L)', 'x', s, 'js_live')) AS result
  FROM unnest(ARRAY['{"type": ["string", "null", "string"]}', '{"required": ["a", "b", "a"]}',
                    '{"type": ["string", "null"], "required": ["a", "b"]}']) s;

-- a LATIN1 database: the answer is read in the database encoding (keys,
-- strings and paths in DETAIL included)
CREATE DATABASE js_latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
\c js_latin1
SET client_encoding = 'UTF8';
CREATE EXTENSION fw_tier;
SELECT fw_complete_json('café crème', '{"type": "object", "properties": {"clé": {"type": "string"}}}') AS latin1;
SELECT fw_complete_json('café [fwsim:json-violate]',
                        '{"type": "object", "required": ["clé"], "properties": {"clé": {"type": "string"}}}');
\c contrib_regression
DROP DATABASE js_latin1 WITH (FORCE);
DELETE FROM fw_tier.prices WHERE model = 'accounts/fireworks/models/json-live';
