/* fw_tier--0.1--0.2.sql: the hardening release (issue 10) */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION fw_tier UPDATE TO '0.2'" to load this file. \quit

-- ---------------------------------------------------------------------
-- Section A: SQL objects run for someone else pin their search_path;
-- purge_calls for its grantees
-- ---------------------------------------------------------------------

-- (section A: begin)

/*
 * Objects that run for someone else resolve nothing through the caller's
 * search_path.  A function pins search_path = pg_catalog, pg_temp; a view,
 * a CHECK constraint or a policy binds its operators when it is created
 * (an operator a role planted in public before CREATE EXTENSION or ALTER
 * EXTENSION UPDATE would be bound), so those below name pg_catalog's
 * operators explicitly.  OPERATOR() has the precedence of "any other
 * operator": every arithmetic step is parenthesised.
 */

-- Retention.  SECURITY DEFINER: the call log is written by the worker and
-- row level security lets a role see only its own rows, so a retention job
-- run by a non-owner deleted nothing.  A grantee of EXECUTE deletes every
-- row older than the cutoff, whoever made the call; nobody else may call it.
CREATE OR REPLACE FUNCTION fw_tier.purge_calls(older_than interval, batch_size integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	total	bigint := 0;
	n		bigint;
	cutoff	timestamptz;
BEGIN
	IF older_than IS NULL OR batch_size IS NULL OR batch_size OPERATOR(pg_catalog.<) 1 THEN
		RAISE EXCEPTION 'older_than must not be null and batch_size must be positive'
			USING ERRCODE = '22023';
	END IF;
	cutoff := pg_catalog.now() OPERATOR(pg_catalog.-) older_than;
	LOOP
		DELETE FROM fw_tier.calls
		WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
				SELECT ctid FROM fw_tier.calls
				 WHERE started_at OPERATOR(pg_catalog.<) cutoff
				 LIMIT batch_size));
		GET DIAGNOSTICS n = ROW_COUNT;
		total := total OPERATOR(pg_catalog.+) n;
		EXIT WHEN n OPERATOR(pg_catalog.<) batch_size;
	END LOOP;
	RETURN total;
END;
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.purge_calls(interval, integer) FROM PUBLIC;

/*
 * fw_enrich commits per chunk, and a procedure with a SET clause may not:
 * it cannot pin search_path, so every name it uses is qualified instead
 * (a role's public.cardinality(text[]) would otherwise be a better match
 * than pg_catalog.cardinality(anyarray) for whoever runs it).  The caller's
 * own table, column type and its operators are the caller's.
 */
-- (defined once, in "Issue 17: progress and costs" below)

-- Views whose arithmetic needs an implicit cast (int4 * numeric, numeric
-- / int4, numeric / int8), bound to pg_catalog's operators.
CREATE OR REPLACE VIEW fw_tier.error_rates_hourly WITH (security_invoker = true) AS
SELECT date_trunc('hour', c.started_at) AS hour,
	   c.path,
	   count(*) AS attempts,
	   count(*) FILTER (WHERE c.outcome = 'overloaded') AS overloaded_503,
	   count(*) FILTER (WHERE c.outcome = 'rate_limited') AS rate_limited_429,
	   count(*) FILTER (WHERE c.outcome = 'unavailable') AS unavailable_503,
	   round(count(*) FILTER (WHERE c.outcome = 'overloaded')::numeric
			 OPERATOR(pg_catalog./) count(*)::numeric, 6) AS overloaded_rate,
	   round(count(*) FILTER (WHERE c.outcome = 'rate_limited')::numeric
			 OPERATOR(pg_catalog./) count(*)::numeric, 6) AS rate_limited_rate,
	   round(count(*) FILTER (WHERE c.outcome = 'unavailable')::numeric
			 OPERATOR(pg_catalog./) count(*)::numeric, 6) AS unavailable_rate
FROM fw_tier.calls c
GROUP BY 1, 2;

-- fw_tier.priority_premium: in "Issue 17: progress and costs", which rounds it.

-- fw_tier.escalation_timeline: in "Issue 17: progress and costs".

-- The prices CHECKs compare numeric with an int4 literal: same class.
ALTER TABLE fw_tier.prices
	DROP CONSTRAINT prices_input_usd_per_mtok_check,
	DROP CONSTRAINT prices_cached_input_usd_per_mtok_check,
	DROP CONSTRAINT prices_output_usd_per_mtok_check,
	ADD CONSTRAINT prices_input_usd_per_mtok_check
		CHECK (input_usd_per_mtok OPERATOR(pg_catalog.>=) 0::numeric),
	ADD CONSTRAINT prices_cached_input_usd_per_mtok_check
		CHECK (cached_input_usd_per_mtok OPERATOR(pg_catalog.>=) 0::numeric),
	ADD CONSTRAINT prices_output_usd_per_mtok_check
		CHECK (output_usd_per_mtok OPERATOR(pg_catalog.>=) 0::numeric);

/*
 * pg_dump / pg_restore.  The call log and the escalation history are user
 * data: dumped with the database.  fw_tier.workloads is dumped except the
 * shipped rows still as shipped, which CREATE EXTENSION inserts again; an
 * edited shipped row is dumped, and the trigger below lets its restore
 * (a COPY) replace the freshly inserted original instead of failing on
 * the key.
 */
SELECT pg_catalog.pg_extension_config_dump('fw_tier.calls', '');
SELECT pg_catalog.pg_extension_config_dump('fw_tier.escalations', '');
SELECT pg_catalog.pg_extension_config_dump('fw_tier.escalations_id_seq', '');

-- Is this row a shipped workload exactly as shipped?
CREATE FUNCTION fw_tier.workload_is_shipped(workload text, path text, model text,
											fast_model text, on_overload text,
											priority_window interval)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT priority_window IS NULL
	   AND CASE workload
			WHEN 'default' THEN path = 'standard' AND model IS NULL AND fast_model IS NULL AND on_overload = 'priority'
			WHEN 'interactive' THEN path = 'standard' AND model IS NULL AND fast_model IS NULL AND on_overload = 'priority'
			WHEN 'agent' THEN path = 'standard' AND model IS NULL AND fast_model IS NULL AND on_overload = 'priority'
			WHEN 'batch' THEN path = 'standard' AND model IS NULL AND fast_model IS NULL AND on_overload = 'retry'
			WHEN 'fast' THEN path = 'fast' AND model = 'accounts/fireworks/models/kimi-k2p6'
				 AND fast_model = 'accounts/fireworks/routers/kimi-k2p6-turbo' AND on_overload = 'retry'
			ELSE false END IS TRUE
$$;

SELECT pg_catalog.pg_extension_config_dump('fw_tier.workloads',
	'WHERE NOT fw_tier.workload_is_shipped(workload, path, model, fast_model, on_overload, priority_window)');

-- A COPY into fw_tier.workloads (what pg_restore and psql run for the
-- dumped rows, and \copy) of a shipped workload's name replaces the
-- shipped row while that row is still as shipped.  INSERT keeps its usual
-- meaning: the key refuses a duplicate, ON CONFLICT works as always.
CREATE FUNCTION fw_tier.workloads_replace_shipped() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF pg_catalog.current_query() OPERATOR(pg_catalog.~*) '^\s*copy\s'
	   -- looked up first: only then does the copier need DELETE
	   AND EXISTS (SELECT FROM fw_tier.workloads w
				    WHERE w.workload OPERATOR(pg_catalog.=) NEW.workload
					  AND fw_tier.workload_is_shipped(w.workload, w.path, w.model,
													  w.fast_model, w.on_overload,
													  w.priority_window)) THEN
		DELETE FROM fw_tier.workloads w
		 WHERE w.workload OPERATOR(pg_catalog.=) NEW.workload;
	END IF;
	RETURN NEW;
END
$$;
CREATE TRIGGER workloads_replace_shipped
	BEFORE INSERT ON fw_tier.workloads
	FOR EACH ROW EXECUTE FUNCTION fw_tier.workloads_replace_shipped();

-- (section A: end)

-- ---------------------------------------------------------------------
-- Section B: the call-log ring, spill and dead letters; log_status
-- ---------------------------------------------------------------------

-- log_status: the spill, what was lost or refused, why the log does not
-- drain (the C function's OUT columns grow: drop and create again).
DROP VIEW fw_tier.log_status;
DROP FUNCTION fw_tier_log_state();
CREATE FUNCTION fw_tier_log_state(
	OUT ring_size bigint,
	OUT bytes_used bigint,
	OUT records_pushed bigint,
	OUT records_flushed bigint,
	OUT writer_waits bigint,
	OUT records_skipped bigint,
	OUT worker_pid integer,
	OUT head_position bigint,
	OUT spill_bytes bigint,
	OUT spill_records bigint,
	OUT records_spilled bigint,
	OUT records_dropped bigint,
	OUT records_corrupt bigint,
	OUT dead_letters bigint,
	OUT drain_state text)
RETURNS record
AS 'MODULE_PATHNAME', 'fw_tier_log_state'
LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

CREATE VIEW fw_tier.log_status AS
SELECT ring_size, bytes_used, records_pushed, records_flushed,
	   writer_waits, records_skipped, worker_pid,
	   spill_bytes, spill_records, records_spilled, records_dropped,
	   records_corrupt, dead_letters, drain_state
FROM fw_tier_log_state();
GRANT SELECT ON fw_tier.log_status TO PUBLIC;

-- Rows fw_tier.calls refused (a constraint or trigger rejected them): the
-- record as jsonb, with the error.  Readable by the owner only (no grant:
-- a record holds any role's prompts and answers, which fw_tier.calls shows
-- each role only for its own calls).  One row per attempt: the flusher's
-- insert does nothing for a row already there (a crash between COMMIT and
-- the ring's tail moving on writes the batch again).
CREATE TABLE fw_tier.calls_dead_letter (
	id			bigserial PRIMARY KEY,
	failed_at	timestamptz NOT NULL DEFAULT now(),
	call_id		bigint,
	attempt		integer,
	record		jsonb NOT NULL,
	sqlstate	text,
	error		text,
	UNIQUE (call_id, attempt)
);
REVOKE ALL ON fw_tier.calls_dead_letter FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('fw_tier.calls_dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('fw_tier.calls_dead_letter_id_seq', '');

-- ---------------------------------------------------------------------
-- Section C: the engine
-- ---------------------------------------------------------------------

-- (nothing: the engine changes no SQL object)

-- ---------------------------------------------------------------------
-- Section D: per-database escalation state, per-role keys, fixtures
-- ---------------------------------------------------------------------

-- Escalation windows are kept per (database, workload) in shared memory;
-- the worker records every database's windows here, in fw_tier.database,
-- each row naming its database.  Rows written by 0.1 (one window for every
-- database) are attributed to this database.
ALTER TABLE fw_tier.escalations ADD COLUMN database name;
UPDATE fw_tier.escalations SET database = pg_catalog.current_database();
ALTER TABLE fw_tier.escalations ALTER COLUMN database SET NOT NULL;
DROP INDEX fw_tier.escalations_open_idx;
CREATE UNIQUE INDEX escalations_open_idx ON fw_tier.escalations (database, workload)
	WHERE ended IS NULL;

-- fw_tier.escalation_timeline joins calls on their database: defined in
-- "Issue 17: progress and costs".

-- \copy fw_tier.fixtures_import FROM ...: the documented grant (INSERT on
-- the view) is all an importer needs.  The trigger writes the table as its
-- owner; it only upserts the row it is given, with its search_path pinned,
-- and only fires as the view's INSTEAD OF trigger (nobody else may attach
-- it: EXECUTE is revoked).
ALTER FUNCTION fw_tier.fixtures_import_row() SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION fw_tier.fixtures_import_row() FROM PUBLIC;

-- Keys stored by ALTER ROLE / ALTER DATABASE / ALTER FUNCTION ... SET
-- fw_tier.api_key (what 0.1's README recommended) are readable by every
-- role through pg_db_role_setting and pg_proc until they are reset: name
-- each one (never its value) so the DBA can move it to fw_tier.api_key_dir.
DO $fw_keys$
DECLARE
	r record;
BEGIN
	FOR r IN
		SELECT COALESCE(ro.rolname::pg_catalog.text, '(every role)') AS who,
			   COALESCE(d.datname::pg_catalog.text, '(every database)') AS db,
			   ro.rolname IS NOT NULL AS has_role,
			   d.datname IS NOT NULL AS has_db
		  FROM pg_catalog.pg_db_role_setting s
		  LEFT JOIN pg_catalog.pg_roles ro ON ro.oid OPERATOR(pg_catalog.=) s.setrole
		  LEFT JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.setdatabase
		 WHERE EXISTS (SELECT 1 FROM pg_catalog.unnest(s.setconfig) AS c(setting)
						WHERE pg_catalog.starts_with(pg_catalog.lower(c.setting),
													 'fw_tier.api_key='))
	LOOP
		RAISE WARNING 'fw_tier.api_key is stored for role % in database %', r.who, r.db
			USING DETAIL = 'Every role can read it in pg_db_role_setting until it is reset.',
				  HINT = pg_catalog.format('Give the role a key file in fw_tier.api_key_dir, then run ALTER %s RESET fw_tier.api_key.',
						CASE WHEN r.has_role AND r.has_db
							 THEN pg_catalog.format('ROLE %I IN DATABASE %I', r.who, r.db)
							 WHEN r.has_role THEN pg_catalog.format('ROLE %I', r.who)
							 WHEN r.has_db THEN pg_catalog.format('DATABASE %I', r.db)
							 ELSE 'ROLE ALL' END);
	END LOOP;
	FOR r IN
		SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text AS fn
		  FROM pg_catalog.pg_proc p
		 WHERE EXISTS (SELECT 1 FROM pg_catalog.unnest(p.proconfig) AS c(setting)
						WHERE pg_catalog.starts_with(pg_catalog.lower(c.setting),
													 'fw_tier.api_key='))
	LOOP
		RAISE WARNING 'fw_tier.api_key is stored in the settings of function %', r.fn
			USING DETAIL = 'Every role can read it in pg_proc.proconfig until it is reset.',
				  HINT = pg_catalog.format('Run ALTER FUNCTION %s RESET fw_tier.api_key.', r.fn);
	END LOOP;
END
$fw_keys$;

-- ---------------------------------------------------------------------
-- Issue 17: replay, settings, errors
-- ---------------------------------------------------------------------

-- Attempts answered from a fixture (fw_tier.mode = 'replay') are no spend
-- and no production event: the flusher writes them with replayed = true and
-- cost_usd = 0, so every cost view counts them as 0.
ALTER TABLE fw_tier.calls ADD COLUMN replayed boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN fw_tier.calls.replayed IS
	'Answered from a fixture in replay mode: cost 0, no shared window or counter.';

-- ---------------------------------------------------------------------
-- Issue 17: progress and costs
-- ---------------------------------------------------------------------

-- fw_tier.progress: a job's figures next to its current chunk's.
CREATE FUNCTION fw_tier.progress_job(total bigint, done bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'fw_tier_progress_job'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION fw_tier.progress_job(bigint, bigint) IS
	'fw_tier: set the calling backend''s job figures in fw_tier.progress (its own slot only)';

CREATE FUNCTION fw_tier.require_no_transaction_block(what text)
RETURNS void
AS 'MODULE_PATHNAME', 'fw_tier_require_no_xact_block'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

DROP VIEW fw_tier.progress;
DROP FUNCTION fw_tier_progress();
CREATE FUNCTION fw_tier_progress(
	OUT pid integer, OUT workload text, OUT statement_start timestamptz,
	OUT total bigint, OUT done bigint, OUT in_flight integer, OUT failed bigint,
	OUT concurrency_limit integer, OUT job_total bigint, OUT job_done bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'fw_tier_progress'
LANGUAGE C VOLATILE;

-- Per backend: the calls of its current (or last) statement that used
-- fw_tier.  Inside fw_enrich, total / done / failed are the current
-- chunk's and job_total / job_done the whole run's (NULL otherwise).
CREATE VIEW fw_tier.progress AS
	SELECT pid, workload, statement_start, total, done, in_flight, failed,
		   concurrency_limit, job_total, job_done
	  FROM fw_tier_progress();
GRANT SELECT ON fw_tier.progress TO PUBLIC;

/*
 * fw_enrich, again (see section A for why every name is qualified): the
 * extension's own functions through @extschema@, refused inside a
 * transaction block before any paid call, the whole run's figures in
 * fw_tier.progress, and a chunk's answers kept when one of its rows fails
 * under on_error 'raise': the chunk runs to its end with on_error 'null',
 * its answers are committed, then the error is raised.
 */
CREATE OR REPLACE PROCEDURE fw_enrich(tbl regclass, id_column name, prompt_column name,
						   answer_column name, workload text DEFAULT 'batch',
						   chunk_size integer DEFAULT 500,
						   options jsonb DEFAULT '{"on_error": "null"}')
LANGUAGE plpgsql AS $$
DECLARE
	id_type pg_catalog.text;
	last_id pg_catalog.text;
	ids pg_catalog.text[];
	prompts pg_catalog.text[];
	answers pg_catalog.text[];
	chunk pg_catalog.int4 := 0;
	answered pg_catalog.int8 := 0;
	attempted pg_catalog.int8 := 0;
	todo pg_catalog.int8;
	failed pg_catalog.int4;
	n pg_catalog.int8;
	raise_errors pg_catalog.bool;
	chunk_options pg_catalog.jsonb := options;
BEGIN
	-- it commits per chunk: refuse now, not at the first COMMIT after a
	-- paid chunk (the COMMIT catches an atomic CALL from a function or DO)
	PERFORM fw_tier.require_no_transaction_block('fw_enrich');
	COMMIT;
	IF chunk_size OPERATOR(pg_catalog.<) 1 THEN
		RAISE EXCEPTION 'chunk_size must be positive' USING ERRCODE = '22023';
	END IF;
	SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) INTO id_type
	  FROM pg_catalog.pg_attribute a
	 WHERE a.attrelid OPERATOR(pg_catalog.=) tbl::pg_catalog.oid AND a.attname OPERATOR(pg_catalog.=) id_column AND NOT a.attisdropped;
	IF id_type IS NULL THEN
		RAISE EXCEPTION 'column "%" does not exist in %', id_column, tbl USING ERRCODE = '42703';
	END IF;

	-- on_error 'raise' (the option, else fw_tier.on_error): run each chunk
	-- with 'null', keep what it answered, raise after the COMMIT
	raise_errors := pg_catalog.jsonb_typeof(options) OPERATOR(pg_catalog.=) 'object'
		AND coalesce(options OPERATOR(pg_catalog.->>) 'on_error',
					 pg_catalog.current_setting('fw_tier.on_error', true))
			OPERATOR(pg_catalog.=) 'raise';
	IF options IS NULL THEN
		raise_errors := pg_catalog.current_setting('fw_tier.on_error', true) OPERATOR(pg_catalog.=) 'raise';
		chunk_options := '{}';
	END IF;
	IF raise_errors THEN
		chunk_options := pg_catalog.jsonb_set(chunk_options, '{on_error}', '"null"');
	END IF;

	EXECUTE pg_catalog.format(
		'SELECT pg_catalog.count(*) FROM %1$s WHERE %2$I IS NULL AND %3$I IS NOT NULL',
		tbl, answer_column, prompt_column)
	INTO todo;
	PERFORM fw_tier.progress_job(todo, 0);

	LOOP
		EXECUTE pg_catalog.format(
			'SELECT pg_catalog.array_agg(%1$I::pg_catalog.text ORDER BY %1$I), pg_catalog.array_agg(%2$I ORDER BY %1$I)'
			' FROM (SELECT %1$I, %2$I FROM %3$s'
			'  WHERE %4$I IS NULL AND %2$I IS NOT NULL AND ($1 IS NULL OR %1$I > $1::%5$s)'
			'  ORDER BY %1$I LIMIT %6$s) chunk',
			id_column, prompt_column, tbl, answer_column, id_type, chunk_size)
		INTO ids, prompts USING last_id;
		EXIT WHEN ids IS NULL;

		answers := @extschema@.fw_complete_batch(prompts, workload, chunk_options);
		EXECUTE pg_catalog.format(
			'UPDATE %1$s t SET %2$I = a.answer'
			' FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2)) AS a(id, answer)'
			' WHERE t.%3$I = a.id::%4$s AND a.answer IS NOT NULL',
			tbl, answer_column, id_column, id_type)
		USING ids, answers;
		GET DIAGNOSTICS n = ROW_COUNT;
		chunk := chunk OPERATOR(pg_catalog.+) 1;
		answered := answered OPERATOR(pg_catalog.+) n;
		attempted := attempted OPERATOR(pg_catalog.+) pg_catalog.cardinality(ids);
		last_id := ids[pg_catalog.cardinality(ids)];
		failed := pg_catalog.cardinality(pg_catalog.array_positions(answers, NULL::pg_catalog.text));
		COMMIT;
		-- rows added meanwhile can make the run longer than counted
		IF attempted OPERATOR(pg_catalog.>) todo THEN
			todo := attempted;
		END IF;
		PERFORM fw_tier.progress_job(todo, attempted);
		RAISE NOTICE 'fw_enrich: chunk %: % of % rows answered so far', chunk, answered, attempted;
		IF raise_errors AND failed OPERATOR(pg_catalog.>) 0 THEN
			RAISE EXCEPTION 'fw_enrich: % of % rows of chunk % failed', failed, pg_catalog.cardinality(ids), chunk
				USING DETAIL = pg_catalog.format('The chunk''s other answers are committed; the first failed row is %s = %s, and each failed attempt is in fw_tier.calls.',
												 pg_catalog.quote_ident(id_column),
												 ids[pg_catalog.array_position(answers, NULL::pg_catalog.text)]),
					  HINT = 'Fix the failing rows and CALL fw_enrich again: it sends only the rows still missing an answer.';
		END IF;
	END LOOP;
END $$;

/*
 * Costs.  Full precision stays in fw_tier.calls.cost_usd; the views show
 * USD rounded to 6 decimals.  spend_daily's cost_usd is NULL (unknown)
 * when any attempt of the group is unpriced; priced_cost_usd sums what is
 * known.
 */
CREATE OR REPLACE VIEW fw_tier.spend_daily WITH (security_invoker = true) AS
SELECT date_trunc('day', c.started_at) AS day,
	   c.workload, c.path, c.model,
	   count(DISTINCT c.call_id) AS calls,
	   count(*) AS attempts,
	   sum(c.prompt_tokens) AS prompt_tokens,
	   sum(c.cached_prompt_tokens) AS cached_prompt_tokens,
	   sum(c.completion_tokens) AS completion_tokens,
	   CASE WHEN pg_catalog.bool_and(c.cost_usd IS NOT NULL)
			THEN pg_catalog.round(sum(c.cost_usd), 6) END AS cost_usd,
	   count(*) FILTER (WHERE c.cost_usd IS NULL) AS unpriced_attempts,
	   pg_catalog.round(sum(c.cost_usd), 6) AS priced_cost_usd
FROM fw_tier.calls c
GROUP BY 1, 2, 3, 4;

CREATE OR REPLACE VIEW fw_tier.priority_premium WITH (security_invoker = true) AS
SELECT date_trunc('day', c.started_at) AS day,
	   c.workload,
	   c.escalated,
	   count(*) AS attempts,
	   pg_catalog.round(sum(c.cost_usd), 6) AS priority_cost_usd,
	   pg_catalog.round(sum(((((coalesce(c.prompt_tokens, 0) - coalesce(c.cached_prompt_tokens, 0))::numeric
			  OPERATOR(pg_catalog.*) ps.input_usd_per_mtok)
			 OPERATOR(pg_catalog.+) (coalesce(c.cached_prompt_tokens, 0)::numeric
			  OPERATOR(pg_catalog.*) ps.cached_input_usd_per_mtok)
			 OPERATOR(pg_catalog.+) (coalesce(c.completion_tokens, 0)::numeric
			  OPERATOR(pg_catalog.*) ps.output_usd_per_mtok))
			OPERATOR(pg_catalog./) 1000000::numeric)), 6) AS standard_cost_usd,
	   pg_catalog.round(sum(c.cost_usd)
	   OPERATOR(pg_catalog.-)
	   sum(((((coalesce(c.prompt_tokens, 0) - coalesce(c.cached_prompt_tokens, 0))::numeric
			  OPERATOR(pg_catalog.*) ps.input_usd_per_mtok)
			 OPERATOR(pg_catalog.+) (coalesce(c.cached_prompt_tokens, 0)::numeric
			  OPERATOR(pg_catalog.*) ps.cached_input_usd_per_mtok)
			 OPERATOR(pg_catalog.+) (coalesce(c.completion_tokens, 0)::numeric
			  OPERATOR(pg_catalog.*) ps.output_usd_per_mtok))
			OPERATOR(pg_catalog./) 1000000::numeric)), 6) AS premium_usd
FROM fw_tier.calls c
	 JOIN fw_tier.prices ps ON ps.model = c.model AND ps.path = 'standard'
WHERE c.path = 'priority' AND c.cost_usd IS NOT NULL AND NOT c.replayed
GROUP BY 1, 2, 3;

CREATE OR REPLACE VIEW fw_tier.escalation_timeline WITH (security_invoker = true) AS
SELECT e.id, e.workload, e.trigger, e.started, e.priority_until, e.ended,
	   e.windows_in_row,
	   coalesce(e.ended, greatest(e.priority_until, now())) - e.started AS duration,
	   count(c.call_id) AS attempts,
	   count(c.call_id) FILTER (WHERE c.path = 'priority') AS priority_attempts,
	   count(c.call_id) FILTER (WHERE c.outcome = 'overloaded') AS overloaded_503,
	   pg_catalog.round(sum(c.cost_usd), 6) AS cost_usd,
	   pg_catalog.round(sum(c.cost_usd) FILTER (WHERE c.path = 'priority' AND NOT c.replayed)
	   OPERATOR(pg_catalog.-)
	   sum(((((coalesce(c.prompt_tokens, 0) - coalesce(c.cached_prompt_tokens, 0))::numeric
			  OPERATOR(pg_catalog.*) ps.input_usd_per_mtok)
			 OPERATOR(pg_catalog.+) (coalesce(c.cached_prompt_tokens, 0)::numeric
			  OPERATOR(pg_catalog.*) ps.cached_input_usd_per_mtok)
			 OPERATOR(pg_catalog.+) (coalesce(c.completion_tokens, 0)::numeric
			  OPERATOR(pg_catalog.*) ps.output_usd_per_mtok))
			OPERATOR(pg_catalog./) 1000000::numeric))
		 FILTER (WHERE c.path = 'priority' AND c.cost_usd IS NOT NULL AND NOT c.replayed), 6) AS premium_usd,
	   e.database
FROM fw_tier.escalations e
	 LEFT JOIN fw_tier.calls c
	 ON c.database = e.database
		AND c.workload = e.workload
		AND c.started_at >= e.started
		AND c.started_at < coalesce(e.ended, greatest(e.priority_until, now()))
	 LEFT JOIN fw_tier.prices ps ON ps.model = c.model AND ps.path = 'standard'
GROUP BY e.id;

/*
 * A price row is looked up by the model id the call log records: on the
 * Fast path that is the workload's fast_model (a ".../routers/..." id),
 * on Standard and Priority the base model.  A row that can never match
 * is accepted (pg_restore must not fail on it) with a WARNING.
 */
CREATE FUNCTION fw_tier.prices_check_model() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	fast pg_catalog.text;
BEGIN
	IF NEW.path OPERATOR(pg_catalog.=) 'fast' THEN
		IF NOT EXISTS (SELECT FROM fw_tier.workloads w
						WHERE w.fast_model OPERATOR(pg_catalog.=) NEW.model)
		   AND pg_catalog.strpos(NEW.model, '/routers/') OPERATOR(pg_catalog.=) 0 THEN
			SELECT pg_catalog.string_agg(DISTINCT w.fast_model, ', ') INTO fast
			  FROM fw_tier.workloads w
			 WHERE w.model OPERATOR(pg_catalog.=) NEW.model AND w.fast_model IS NOT NULL;
			RAISE WARNING 'fw_tier price for model "%" on path fast will never be used', NEW.model
				USING DETAIL = 'Fast calls are logged and priced under the Fast model id (a workload''s fast_model), not the base model.',
					  HINT = CASE WHEN fast IS NOT NULL
							 THEN pg_catalog.format('Price the Fast model id instead: %s.', fast)
							 ELSE 'Price the Fast model id (e.g. accounts/fireworks/routers/...) the workload''s fast_model names.' END;
		END IF;
	ELSIF EXISTS (SELECT FROM fw_tier.workloads w
				   WHERE w.fast_model OPERATOR(pg_catalog.=) NEW.model)
		  AND NOT EXISTS (SELECT FROM fw_tier.workloads w
						   WHERE w.model OPERATOR(pg_catalog.=) NEW.model) THEN
		RAISE WARNING 'fw_tier price for Fast model "%" on path % will never be used', NEW.model, NEW.path
			USING DETAIL = 'A Fast model id is only sent on the Fast path.',
				  HINT = 'Use path ''fast'' for this model, or the base model id for standard and priority.';
	END IF;
	RETURN NEW;
END
$$;
CREATE TRIGGER prices_check_model
	BEFORE INSERT OR UPDATE ON fw_tier.prices
	FOR EACH ROW EXECUTE FUNCTION fw_tier.prices_check_model();
