-- enrich: a table with an enrichment under replay (issue 14).  Pins: the
-- worker answers from fw_tier.fixtures (fw_tier.mode from the database's
-- settings, read when the worker starts), so the enriched column is the
-- same on every run and nothing reaches the network; a row without a
-- fixture is a dead letter (replay miss, 42704) and does not stop the
-- others; the template's {{ }} are literal braces; create's checks; a
-- dropped column or table takes the enrichment along (event trigger).
\set VERBOSITY terse
CREATE TABLE enr (id int PRIMARY KEY, body text, summary text, n int);
SELECT fw_fixture('Summarise {one}: one', 'batch', 200, 'the first') IS NOT NULL AS fixture;
SELECT fw_fixture('Summarise {one}: two', 'batch', 200, 'the second') IS NOT NULL AS fixture;
DO $$ BEGIN
	EXECUTE format('ALTER DATABASE %I SET fw_tier.mode = %L', current_database(), 'replay');
END $$;

-- what create refuses
SELECT fw_enrich_create('bad', 'enr', 'summary', 'Summarise {body');
SELECT fw_enrich_create('bad', 'enr', 'summary', 'Summarise {nosuch}');
SELECT fw_enrich_create('bad', 'enr', 'summary', 'no column at all');
SELECT fw_enrich_create('bad', 'enr', 'summary', '{body}', 'batch', '{"kind": "rerank"}');
SELECT fw_enrich_create('bad', 'enr', 'n', '{body}', 'batch', '{"kind": "embed"}');

SELECT fw_enrich_create('enr_sum', 'enr', 'summary', 'Summarise {{one}}: {body}', 'batch',
						'{"max_attempts": 1}') > 0 AS created;
INSERT INTO enr (id, body) VALUES (1, 'one'), (2, 'two'), (3, 'three'), (4, NULL);

CREATE FUNCTION pg_temp.wait_enriched(e text DEFAULT 'enr_sum') RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
	FOR i IN 1 .. 300 LOOP
		IF (SELECT queued = 0 AND in_flight = 0 FROM fw_tier.enrich_status WHERE name = e) THEN
			RETURN true;
		END IF;
		PERFORM pg_sleep(0.1);
	END LOOP;
	RETURN false;
END $$;
SELECT pg_temp.wait_enriched();
SELECT id, body, summary FROM enr ORDER BY id;
SELECT name, pk, attempts, last_error ~ '^error: no fw_tier fixture for request ' AS replay_miss FROM fw_tier.enrich_dead_letters;
SELECT name, queued, in_flight, done, failed, paused FROM fw_tier.enrich_status;

SELECT fw_enrich_drop('enr_sum');

-- a two-column key: the INSERT trigger queues each row's key (no range)
CREATE TABLE enr2 (a int, b text, body text, summary text, PRIMARY KEY (a, b));
SELECT fw_fixture('K: x', 'batch', 200, 'kx') IS NOT NULL AS fixture;
SELECT fw_enrich_create('enr2', 'enr2', 'summary', 'K: {body}') > 0 AS created;
INSERT INTO enr2 VALUES (1, 'p', 'x', NULL), (2, 'q', 'x', NULL), (3, 'r', 'x', 'given');
SELECT pg_temp.wait_enriched('enr2');
SELECT a, b, summary FROM enr2 ORDER BY a;
SELECT fw_enrich_drop('enr2');
DROP TABLE enr2;
-- dropping a column it names, or the table, drops the enrichment and its triggers
SELECT fw_enrich_create('again', 'enr', 'summary', '{body}') > 0 AS created;
ALTER TABLE enr DROP COLUMN n;		-- not one it names
SELECT count(*) AS enrichments FROM fw_tier.enrichments;
ALTER TABLE enr DROP COLUMN summary;
SELECT count(*) AS enrichments FROM fw_tier.enrichments;
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'enr'::regclass;
INSERT INTO enr VALUES (10, 'after the drop');
SELECT fw_enrich_create('again', 'enr', 'body', 'x{id}') > 0 AS created;
DROP TABLE enr;
DO $$ BEGIN
	EXECUTE format('ALTER DATABASE %I RESET fw_tier.mode', current_database());
END $$;
SELECT count(*) AS enrichments, (SELECT count(*) FROM fw_tier.enrich_queue) AS queued
  FROM fw_tier.enrichments;
