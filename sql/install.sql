-- install: CREATE EXTENSION, the objects it makes, their privileges and
-- volatility, and the shipped workloads.
CREATE EXTENSION fw_tier;

SELECT extname, extversion, nspname AS schema
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE extname = 'fw_tier';

-- every calling function is VOLATILE and not executable by PUBLIC
SELECT p.proname, p.provolatile,
       has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'fw_tier'
 WHERE p.proname IN ('fw_complete', 'fw_chat', 'fw_complete_batch')
 ORDER BY 1;

SELECT workload, path, model, fast_model, on_overload, priority_window
  FROM fw_tier.workloads ORDER BY workload;

-- a Fast workload must name its Fast model; paths are checked
INSERT INTO fw_tier.workloads (workload, path) VALUES ('nofast', 'fast');
INSERT INTO fw_tier.workloads (workload, path) VALUES ('bogus', 'turbo');

-- Helpers for the rest of the suite: talk to the simulator's control API
-- (the server inherits FWSIM_URL from test/run-regress.sh).
CREATE SCHEMA sim;
CREATE UNLOGGED TABLE sim.out (line text);
CREATE FUNCTION sim.http(method text, path text, body text DEFAULT '{}')
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  out text;
BEGIN
  IF strpos(body, '''') > 0 OR strpos(path, '''') > 0 THEN
    RAISE EXCEPTION 'no single quotes in simulator requests';
  END IF;
  DELETE FROM sim.out;
  EXECUTE format('COPY sim.out FROM PROGRAM %L WITH (FORMAT csv, QUOTE E''\x01'', DELIMITER E''\x02'')',
                 format('curl -s -X %s -d ''%s'' "$FWSIM_URL%s"', method, body, path));
  SELECT string_agg(line, E'\n') INTO out FROM sim.out;
  RETURN out::jsonb;
END $$;
CREATE FUNCTION sim.reset() RETURNS void LANGUAGE sql
  AS $$ SELECT sim.http('POST', '/control/reset') $$;
CREATE FUNCTION sim.rule(rule text) RETURNS void LANGUAGE sql
  AS $$ SELECT sim.http('POST', '/control/rules', rule) $$;
-- the requests the simulator saw since the last reset, oldest first
CREATE VIEW sim.log AS
  SELECT (r->>'seq')::int AS seq, r->>'model' AS model, r->>'path' AS path,
         r->>'service_tier' AS service_tier, (r->>'status')::int AS status,
         r->>'outcome' AS outcome
    FROM jsonb_array_elements(sim.http('GET', '/control/log?limit=10000')->'requests') r;
-- run q; return 'ok' or its SQLSTATE and message (sqlstate_only: no message)
CREATE FUNCTION sim.try(q text, sqlstate_only bool DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN CASE WHEN sqlstate_only THEN SQLSTATE ELSE SQLSTATE || ' ' || SQLERRM END;
END $$;
-- run q; its SQLSTATE, message and DETAIL (why an answer was refused)
CREATE FUNCTION sim.why(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  d text;
BEGIN
  EXECUTE q;
  RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
  RETURN SQLSTATE || ' ' || SQLERRM || ' / ' || d;
END $$;
-- wait (at most 10 s) until a query returns true: the worker is asynchronous
CREATE FUNCTION sim.wait_until(q text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
  ok boolean;
BEGIN
  FOR i IN 1 .. 1000 LOOP
    EXECUTE q INTO ok;
    IF ok THEN
      RETURN true;
    END IF;
    PERFORM pg_sleep(0.01);
  END LOOP;
  RETURN false;
END $$;
SELECT sim.reset();
SELECT count(*) AS requests_seen FROM sim.log;
