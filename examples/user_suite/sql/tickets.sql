-- tickets: a user's own test of SQL that calls fw_complete.  It runs
-- against fixtures.tsv (replay): no key, no network, same output every run.
CREATE SCHEMA app;
CREATE TABLE app.tickets (id integer PRIMARY KEY, body text NOT NULL, category text);
INSERT INTO fw_tier.workloads (workload, on_overload) VALUES ('triage', 'priority');
CREATE FUNCTION app.triage(body text) RETURNS text LANGUAGE sql
	AS $$ SELECT fw_complete('Classify this support ticket: ' || body, 'triage') $$;
-- the app's fallback when the provider cannot answer
CREATE FUNCTION app.triage_or_unknown(body text) RETURNS text LANGUAGE sql
	AS $$ SELECT coalesce(fw_chat(jsonb_build_array(jsonb_build_object(
			'role', 'user', 'content', 'Classify this support ticket: ' || body)),
			'triage', '{"on_error": "null"}')->'choices'->0->'message'->>'content',
		  'unknown') $$;

INSERT INTO app.tickets (id, body) VALUES (1, 'My invoice is wrong'), (2, 'The app crashes on start');
UPDATE app.tickets SET category = app.triage(body);
SELECT id, category FROM app.tickets ORDER BY id;

-- How the app behaves when Fireworks sheds load.  These answers are
-- written by hand (fw_fixture) and always replayed, even when recording.
SET fw_tier.mode = 'replay';
SELECT fw_fixture('Classify this support ticket: Printer on fire', 'triage', 503, path => 'standard') IS NOT NULL AS shed_on_standard,
       fw_fixture('Classify this support ticket: Printer on fire', 'triage', 200, 'hardware') IS NOT NULL AS served_on_priority,
       fw_fixture('Classify this support ticket: Refund please', 'triage', 429) IS NOT NULL AS always_rate_limited;
-- 503 Overloaded: the workload moves to Priority and the ticket is answered
SELECT app.triage('Printer on fire');
SELECT path FROM fw_tier.status WHERE workload = 'triage';
SELECT fw_deescalate('triage');
-- 429 on every attempt: the app falls back
SELECT app.triage_or_unknown('Refund please');
SELECT fw_flush();
SELECT attempt, path, http_status, outcome FROM fw_tier.calls
 WHERE workload = 'triage' AND http_status <> 200 ORDER BY call_id, attempt;
RESET fw_tier.mode;
