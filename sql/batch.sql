-- batch: fw_complete_batch keeps the prompts' order with NULL prompts and
-- failures mixed in (on_error 'null' and 'raise'), respects
-- fw_tier.max_concurrency, rides out a 429 storm, and reports progress;
-- the README's one-statement UPDATE; fw_enrich commits per chunk, keeps
-- what it paid for when a chunk fails, and a rerun sends only the missing
-- rows.  Faults come from [fwsim:...] directives and simulator rules;
-- request counts come from the simulator's log.
SELECT sim.reset();

-- order kept; a NULL prompt gives NULL and sends nothing; a failed prompt
-- gives NULL with on_error 'null' and the rest succeed
SELECT fw_complete_batch(ARRAY['one', NULL, '[fwsim:status=400] two', 'three', NULL, 'four'],
                         'batch', '{"on_error": "null"}') AS answers;
SELECT status, count(*) FROM sim.log GROUP BY status ORDER BY status;
-- the failed prompt's log row says why
SELECT fw_flush();
SELECT http_status, outcome, error IS NOT NULL AS has_error
  FROM fw_tier.calls WHERE http_status = 400 AND workload = 'batch'
 ORDER BY call_id DESC LIMIT 1;

-- the default workload is 'batch', lower bounds are kept, empty and NULL
-- arrays pass through, and so does an all-NULL array (no request)
SELECT sim.reset();
SELECT fw_complete_batch('[0:1]={a,b}'::text[]) AS answers,
       fw_complete_batch('{}'::text[]) AS empty,
       fw_complete_batch(NULL::text[]) AS null_array,
       fw_complete_batch(ARRAY[NULL, NULL]::text[]) AS all_null;
SELECT count(*) AS requests FROM sim.log;

-- 200 prompts at 16 in flight: every answer at its own position
SELECT sim.reset();
SET fw_tier.max_concurrency = 16;
WITH b AS (
  SELECT fw_complete_batch(array_agg(CASE WHEN i % 10 = 0 THEN NULL
                                          WHEN i % 7 = 0 THEN '[fwsim:status=422] p' || i
                                          ELSE 'p' || i END ORDER BY i),
                           'batch', '{"on_error": "null"}') AS a
    FROM generate_series(1, 200) i)
SELECT count(*) FILTER (WHERE a[i] = 'Echo: p' || i) AS answered,
       count(*) FILTER (WHERE a[i] IS NULL AND i % 10 = 0) AS null_prompts,
       count(*) FILTER (WHERE a[i] IS NULL AND i % 10 <> 0 AND i % 7 = 0) AS failed,
       count(*) FILTER (WHERE a[i] IS DISTINCT FROM 'Echo: p' || i
                          AND i % 10 <> 0 AND i % 7 <> 0) AS wrong
  FROM b, generate_series(1, 200) i;
SELECT count(*) AS requests, count(*) FILTER (WHERE status = 422) AS rejected FROM sim.log;
-- fw_tier.progress: this backend's last statement
SELECT workload, total, done, in_flight, failed
  FROM fw_tier.progress WHERE pid = pg_backend_pid();

-- at most fw_tier.max_concurrency in flight (simulator's peak)
SELECT sim.reset();
SET fw_tier.max_concurrency = 3;
SELECT cardinality(fw_complete_batch(array_agg('[fwsim:slow=30] q' || i))) AS answers
  FROM generate_series(1, 12) i;
SELECT (sim.http('GET', '/control/stats')->>'peak_in_flight')::int BETWEEN 1 AND 3 AS peak_within_limit;
-- the superuser's cap bounds it too
SET fw_tier.max_concurrency_cap = 2;
-- a value above the cap is stored as the cap, with a NOTICE: SHOW tells the truth
SET fw_tier.max_concurrency = 100;
SHOW fw_tier.max_concurrency;
SELECT sim.reset();
SELECT cardinality(fw_complete_batch(array_agg('[fwsim:slow=30] q' || i))) AS answers
  FROM generate_series(1, 8) i;
SELECT (sim.http('GET', '/control/stats')->>'peak_in_flight')::int BETWEEN 1 AND 2 AS peak_within_cap;
RESET fw_tier.max_concurrency_cap;
RESET fw_tier.max_concurrency;

-- on_error 'raise' (the default): the statement fails with the failed
-- prompt's SQLSTATE
SELECT fw_complete_batch(ARRAY['fine', '[fwsim:status=404] missing', 'also fine']);
SELECT sim.try($$SELECT fw_complete_batch(ARRAY['a', '[fwsim:status=401] b'])$$, true) AS sqlstate;
SELECT fw_complete_batch(ARRAY['a'], 'batch', '{"on_error": "maybe"}');
SELECT fw_complete_batch(ARRAY['a'], 'no_such_workload');
SELECT fw_complete_batch('{{a},{b}}'::text[]);

-- a 429 storm: six 429s, every prompt still answered, in order
SELECT sim.reset();
SELECT sim.rule('{"fault": "ratelimit", "retry_after": 1, "count": 6}');
SET fw_tier.max_attempts = 10;
SELECT fw_complete_batch(array_agg('r' || i ORDER BY i)) = array_agg('Echo: r' || i ORDER BY i) AS in_order
  FROM generate_series(1, 20) i;
SELECT count(*) FILTER (WHERE status = 429) AS rate_limited,
       count(*) FILTER (WHERE status = 200) AS ok FROM sim.log;
RESET fw_tier.max_attempts;

-- README: enrich a table in one statement (aggregate, call once, join back)
CREATE TABLE docs (id int PRIMARY KEY, body text, summary text);
INSERT INTO docs SELECT i, CASE WHEN i = 3 THEN NULL
                                WHEN i = 5 THEN '[fwsim:status=400] doc ' || i
                                ELSE 'doc ' || i END
  FROM generate_series(1, 10) i;
UPDATE docs SET summary = 'kept' WHERE id = 7;
SELECT sim.reset();
WITH todo AS (
  SELECT array_agg(id ORDER BY id) AS ids, array_agg(body ORDER BY id) AS bodies
    FROM docs WHERE summary IS NULL AND body IS NOT NULL
)
UPDATE docs d SET summary = a.answer
  FROM todo, unnest(todo.ids, fw_complete_batch(todo.bodies, 'batch', '{"on_error": "null"}'))
       AS a(id, answer)
 WHERE d.id = a.id AND a.answer IS NOT NULL;
SELECT * FROM docs ORDER BY id;
SELECT count(*) AS requests FROM sim.log;

-- fw_enrich: chunks of 4, a bad prompt stays NULL, the others are filled
CREATE TABLE articles (id bigint PRIMARY KEY, body text, summary text);
INSERT INTO articles SELECT i, CASE WHEN i IN (6, 11) THEN '[fwsim:status=400] art ' || i
                                    ELSE 'art ' || i END
  FROM generate_series(1, 14) i;
SELECT sim.reset();
CALL fw_enrich('articles', 'id', 'body', 'summary', 'batch', 4);
SELECT count(*) AS requests FROM sim.log;
SELECT id, summary FROM articles WHERE summary IS DISTINCT FROM 'Echo: art ' || id ORDER BY id;
-- fault cleared: the rerun sends only the two missing rows
UPDATE articles SET body = 'art ' || id WHERE id IN (6, 11);
SELECT sim.reset();
CALL fw_enrich('articles', 'id', 'body', 'summary', 'batch', 4);
SELECT count(*) AS requests FROM sim.log;
SELECT count(*) FILTER (WHERE summary = 'Echo: art ' || id) AS answered, count(*) AS total FROM articles;

-- on_error 'raise': a row of the third chunk fails; the first two chunks
-- and the third chunk's other answers stay committed, then the error is
-- raised; a rerun continues where it stopped
UPDATE articles SET summary = NULL;
UPDATE articles SET body = '[fwsim:status=400] art 10' WHERE id = 10;
SELECT sim.reset();
CALL fw_enrich('articles', 'id', 'body', 'summary', 'batch', 4, '{"on_error": "raise"}');
SELECT count(summary) AS kept FROM articles;
UPDATE articles SET body = 'art 10' WHERE id = 10;
SELECT sim.reset();
CALL fw_enrich('articles', 'id', 'body', 'summary', 'batch', 4, '{"on_error": "raise"}');
SELECT count(*) AS requests FROM sim.log;
SELECT count(*) FILTER (WHERE summary = 'Echo: art ' || id) AS answered, count(*) AS total FROM articles;
-- nothing left: no request at all
SELECT sim.reset();
CALL fw_enrich('articles', 'id', 'body', 'summary');
SELECT count(*) AS requests FROM sim.log;
-- bad arguments
CALL fw_enrich('articles', 'nope', 'body', 'summary');
CALL fw_enrich('articles', 'id', 'body', 'summary', 'batch', 0);

DROP TABLE docs, articles;
