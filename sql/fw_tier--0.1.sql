/* fw_tier--0.1.sql */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION fw_tier" to load this file. \quit

/*
 * Tables and views live in schema fw_tier; functions live in the
 * extension's schema (public by default) so they are callable unqualified.
 */
CREATE SCHEMA fw_tier;
GRANT USAGE ON SCHEMA fw_tier TO PUBLIC;

-- ---------------------------------------------------------------------
-- Workloads: static routing and overload policy
-- ---------------------------------------------------------------------
CREATE TABLE fw_tier.workloads (
	workload		text PRIMARY KEY
					CHECK (workload <> '' AND octet_length(workload) < 64),
	path			text NOT NULL DEFAULT 'standard'
					CHECK (path IN ('standard', 'priority', 'fast')),
	model			text CHECK (octet_length(model) < 160),	-- NULL = fw_tier.default_model
	fast_model		text CHECK (octet_length(fast_model) < 160),	-- model id used on the Fast path
	on_overload		text NOT NULL DEFAULT 'priority'
					CHECK (on_overload IN ('priority', 'retry', 'fail')),
	priority_window	interval CHECK (priority_window > interval '0'),	-- NULL = fw_tier.priority_window
	CONSTRAINT fast_path_needs_fast_model CHECK (path <> 'fast' OR fast_model IS NOT NULL)
);
COMMENT ON TABLE fw_tier.workloads IS
	'fw_tier routing: one row per workload; edits apply to running sessions at once';

INSERT INTO fw_tier.workloads (workload, path, model, fast_model, on_overload) VALUES
	('default',		'standard', NULL, NULL, 'priority'),
	('interactive', 'standard', NULL, NULL, 'priority'),
	('agent',		'standard', NULL, NULL, 'priority'),
	('batch',		'standard', NULL, NULL, 'retry'),
	('fast',		'fast', 'accounts/fireworks/models/kimi-k2p6',
					'accounts/fireworks/routers/kimi-k2p6-turbo', 'retry');

SELECT pg_catalog.pg_extension_config_dump('fw_tier.workloads', '');

-- Row changes do not invalidate caches by themselves: this trigger tells
-- every session's workload cache to reload.
CREATE FUNCTION fw_tier.workloads_changed() RETURNS trigger
AS 'MODULE_PATHNAME', 'fw_workloads_changed' LANGUAGE C;
CREATE TRIGGER workloads_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON fw_tier.workloads
	FOR EACH STATEMENT EXECUTE FUNCTION fw_tier.workloads_changed();
GRANT SELECT ON fw_tier.workloads TO PUBLIC;

-- ---------------------------------------------------------------------
-- Prices, per model and path (USD per million tokens)
-- ---------------------------------------------------------------------
CREATE TABLE fw_tier.prices (
	model						text NOT NULL,
	path						text NOT NULL CHECK (path IN ('standard', 'priority', 'fast')),
	input_usd_per_mtok			numeric NOT NULL CHECK (input_usd_per_mtok >= 0),
	cached_input_usd_per_mtok	numeric NOT NULL CHECK (cached_input_usd_per_mtok >= 0),
	output_usd_per_mtok			numeric NOT NULL CHECK (output_usd_per_mtok >= 0),
	PRIMARY KEY (model, path)
);
COMMENT ON TABLE fw_tier.prices IS
	'fw_tier prices in USD per million tokens; the Fireworks pricing page is the truth';
SELECT pg_catalog.pg_extension_config_dump('fw_tier.prices', '');
GRANT SELECT ON fw_tier.prices TO PUBLIC;

-- ---------------------------------------------------------------------
-- The call log: one row per HTTP attempt, written by the background worker
-- ---------------------------------------------------------------------
CREATE TABLE fw_tier.calls (
	call_id					bigint NOT NULL,
	attempt					integer NOT NULL,
	started_at				timestamptz NOT NULL,
	database				name NOT NULL,
	username				name NOT NULL,
	workload				text NOT NULL,
	path					text NOT NULL,
	model					text NOT NULL,
	service_tier			text,			-- as sent: 'priority' or NULL
	escalated				boolean NOT NULL DEFAULT false,
	http_status				integer,
	outcome					text NOT NULL,
	prompt_tokens			integer,
	cached_prompt_tokens	integer,
	completion_tokens		integer,
	latency_ms				double precision,
	ttfb_ms					double precision,
	cost_usd				numeric,
	request_id				text,
	error					text,
	prompt					text,			-- only with fw_tier.log_content
	answer					text,			-- only with fw_tier.log_content
	PRIMARY KEY (call_id, attempt)
);
CREATE INDEX calls_started_at_idx ON fw_tier.calls (started_at);
REVOKE ALL ON fw_tier.calls FROM PUBLIC;
ALTER TABLE fw_tier.calls ENABLE ROW LEVEL SECURITY;
-- Own rows for whoever was granted SELECT; every row for pg_read_all_stats.
CREATE POLICY calls_own_rows ON fw_tier.calls FOR SELECT
	USING (username = current_user
		   OR pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER'));

-- ---------------------------------------------------------------------
-- Escalation history, one row per Priority window
-- ---------------------------------------------------------------------
CREATE TABLE fw_tier.escalations (
	id				bigserial PRIMARY KEY,
	workload		text NOT NULL,
	started			timestamptz NOT NULL,
	priority_until	timestamptz NOT NULL,
	ended			timestamptz,		-- NULL while the window is open
	trigger			text NOT NULL,		-- 'overloaded' or 'manual'
	windows_in_row	integer NOT NULL
);
CREATE UNIQUE INDEX escalations_open_idx ON fw_tier.escalations (workload) WHERE ended IS NULL;
REVOKE ALL ON fw_tier.escalations FROM PUBLIC;

-- ---------------------------------------------------------------------
-- Record / replay fixtures
-- ---------------------------------------------------------------------
CREATE TABLE fw_tier.fixtures (
	fingerprint		text NOT NULL,		-- SHA-256 of what decides the answer
	path			text NOT NULL DEFAULT 'any'
					CHECK (path IN ('any', 'standard', 'priority', 'fast')),
	attempt			integer NOT NULL DEFAULT 0	-- 0: every attempt; n: the call's n-th
					CHECK (attempt >= 0),
	request			jsonb NOT NULL,		-- model and messages, for people to read
	http_status		integer NOT NULL CHECK (http_status BETWEEN 100 AND 599),
	response		text NOT NULL,		-- the body as the provider sent it
	retry_after		integer CHECK (retry_after >= 0),	-- seconds, for 429 fixtures
	recorded_at		timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (fingerprint, path, attempt)
);
SELECT pg_catalog.pg_extension_config_dump('fw_tier.fixtures', '');
REVOKE ALL ON fw_tier.fixtures FROM PUBLIC;

-- ---------------------------------------------------------------------
-- SQL-callable functions
-- ---------------------------------------------------------------------
CREATE FUNCTION fw_complete(prompt text, workload text DEFAULT 'default')
RETURNS text
AS 'MODULE_PATHNAME', 'fw_complete'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

CREATE FUNCTION fw_chat(messages jsonb, workload text DEFAULT 'default',
						options jsonb DEFAULT '{}')
RETURNS jsonb
AS 'MODULE_PATHNAME', 'fw_chat'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

CREATE FUNCTION fw_complete_batch(prompts text[], workload text DEFAULT 'batch',
								  options jsonb DEFAULT '{}')
RETURNS text[]
AS 'MODULE_PATHNAME', 'fw_complete_batch'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

REVOKE EXECUTE ON FUNCTION fw_complete(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_complete_batch(text[], text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_chat(jsonb, text, jsonb) FROM PUBLIC;

-- ---------------------------------------------------------------------
-- Batch enrichment
-- ---------------------------------------------------------------------
CREATE FUNCTION fw_tier_progress(
	OUT pid integer, OUT workload text, OUT statement_start timestamptz,
	OUT total bigint, OUT done bigint, OUT in_flight integer, OUT failed bigint,
	OUT concurrency_limit integer)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'fw_tier_progress'
LANGUAGE C VOLATILE;

-- Per backend: the calls of its current (or last) statement that used fw_tier.
CREATE VIEW fw_tier.progress AS
	SELECT * FROM fw_tier_progress();
GRANT SELECT ON fw_tier.progress TO PUBLIC;

/*
 * Enrich a big table in chunks, committing after each one, so a failure at
 * row 9,000 keeps the answers already paid for and a rerun continues with
 * the rows still missing a value.  Rows whose call fails stay NULL (their
 * log rows say why) and are skipped for the rest of the run.
 *
 *   CALL fw_enrich('docs', 'id', 'body', 'summary');
 */
CREATE PROCEDURE fw_enrich(tbl regclass, id_column name, prompt_column name,
						   answer_column name, workload text DEFAULT 'batch',
						   chunk_size integer DEFAULT 500,
						   options jsonb DEFAULT '{"on_error": "null"}')
LANGUAGE plpgsql AS $$
DECLARE
	id_type text;
	last_id text;
	ids text[];
	prompts text[];
	answers text[];
	chunk integer := 0;
	answered bigint := 0;
	attempted bigint := 0;
	n bigint;
BEGIN
	IF chunk_size < 1 THEN
		RAISE EXCEPTION 'chunk_size must be positive' USING ERRCODE = '22023';
	END IF;
	SELECT format_type(a.atttypid, a.atttypmod) INTO id_type
	  FROM pg_attribute a
	 WHERE a.attrelid = tbl AND a.attname = id_column AND NOT a.attisdropped;
	IF id_type IS NULL THEN
		RAISE EXCEPTION 'column "%" does not exist in %', id_column, tbl USING ERRCODE = '42703';
	END IF;
	LOOP
		EXECUTE format(
			'SELECT array_agg(%1$I::text ORDER BY %1$I), array_agg(%2$I ORDER BY %1$I)'
			' FROM (SELECT %1$I, %2$I FROM %3$s'
			'  WHERE %4$I IS NULL AND %2$I IS NOT NULL AND ($1 IS NULL OR %1$I > $1::%5$s)'
			'  ORDER BY %1$I LIMIT %6$s) chunk',
			id_column, prompt_column, tbl, answer_column, id_type, chunk_size)
		INTO ids, prompts USING last_id;
		EXIT WHEN ids IS NULL;

		answers := fw_complete_batch(prompts, workload, options);
		EXECUTE format(
			'UPDATE %1$s t SET %2$I = a.answer'
			' FROM unnest($1, $2) AS a(id, answer)'
			' WHERE t.%3$I = a.id::%4$s AND a.answer IS NOT NULL',
			tbl, answer_column, id_column, id_type)
		USING ids, answers;
		GET DIAGNOSTICS n = ROW_COUNT;
		chunk := chunk + 1;
		answered := answered + n;
		attempted := attempted + cardinality(ids);
		last_id := ids[cardinality(ids)];
		COMMIT;
		RAISE NOTICE 'fw_enrich: chunk %: % of % rows answered so far', chunk, answered, attempted;
	END LOOP;
END $$;
REVOKE EXECUTE ON PROCEDURE fw_enrich(regclass, name, name, name, text, integer, jsonb) FROM PUBLIC;

-- ==== shared state, call log, escalation (status.c / worker.c) ====

-- Per-workload state in shared memory (one row per workload used since
-- startup); the fw_tier.status view is the friendly face of it.
CREATE FUNCTION fw_tier_workload_state(
	OUT workload text,
	OUT priority_until timestamptz,
	OUT window_started timestamptz,
	OUT last_overloaded timestamptz,
	OUT escalations bigint,
	OUT windows_in_row integer,
	OUT alert boolean,
	OUT attempts bigint,
	OUT ok bigint,
	OUT overloaded_503 bigint,
	OUT rate_limited_429 bigint,
	OUT unavailable_503 bigint,
	OUT standard_attempts bigint,
	OUT priority_attempts bigint,
	OUT fast_attempts bigint,
	OUT priority_overloaded_503 bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'fw_tier_workload_state'
LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

-- The call-log ring: its size, what is in it, what went through it.
CREATE FUNCTION fw_tier_log_state(
	OUT ring_size bigint,
	OUT bytes_used bigint,
	OUT records_pushed bigint,
	OUT records_flushed bigint,
	OUT writer_waits bigint,
	OUT records_skipped bigint,
	OUT worker_pid integer,
	OUT head_position bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'fw_tier_log_state'
LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

-- Operator: put a workload on Priority now (NULL duration: the workload's
-- priority_window, else fw_tier.priority_window); returns the window's end.
CREATE FUNCTION fw_escalate(workload text, duration interval DEFAULT NULL)
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'fw_escalate'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- Operator: end a workload's Priority window now.
CREATE FUNCTION fw_deescalate(workload text)
RETURNS void
AS 'MODULE_PATHNAME', 'fw_deescalate'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

REVOKE EXECUTE ON FUNCTION fw_escalate(text, interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_deescalate(text) FROM PUBLIC;

-- Returns once every call record pushed before the call is in
-- fw_tier.calls.  Waits for the background worker; when the worker is not
-- running it waits until the worker is back (statement_timeout applies).
CREATE FUNCTION fw_flush()
RETURNS void
AS 'MODULE_PATHNAME', 'fw_flush'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- What a NEW request of each workload does right now.
CREATE VIEW fw_tier.status AS
SELECT w.workload,
	   CASE WHEN w.path = 'fast' THEN 'fast'
			WHEN w.path = 'priority' THEN 'priority'
			WHEN s.priority_until > clock_timestamp() THEN 'priority'
			ELSE 'standard' END AS path,
	   w.path AS configured_path,
	   w.on_overload,
	   s.priority_until,
	   s.window_started,
	   s.last_overloaded,
	   coalesce(s.escalations, 0) AS escalations,
	   coalesce(s.windows_in_row, 0) AS windows_in_row,
	   coalesce(s.alert, false) AS alert,
	   coalesce(s.attempts, 0) AS attempts,
	   coalesce(s.ok, 0) AS ok,
	   coalesce(s.overloaded_503, 0) AS overloaded_503,
	   coalesce(s.unavailable_503, 0) AS unavailable_503,
	   coalesce(s.rate_limited_429, 0) AS rate_limited_429,
	   coalesce(s.standard_attempts, 0) AS standard_attempts,
	   coalesce(s.priority_attempts, 0) AS priority_attempts,
	   coalesce(s.fast_attempts, 0) AS fast_attempts,
	   coalesce(s.priority_overloaded_503, 0) AS priority_overloaded_503
FROM fw_tier.workloads w
	 LEFT JOIN fw_tier_workload_state() s ON s.workload = w.workload;
GRANT SELECT ON fw_tier.status TO PUBLIC;

CREATE VIEW fw_tier.log_status AS
SELECT ring_size, bytes_used, records_pushed, records_flushed,
	   writer_waits, records_skipped, worker_pid
FROM fw_tier_log_state();
GRANT SELECT ON fw_tier.log_status TO PUBLIC;

-- Analytics over fw_tier.calls.  security_invoker: the caller's privileges
-- and the row-level policy of fw_tier.calls apply, not the owner's.

-- Spend by day, workload, path and model.
CREATE VIEW fw_tier.spend_daily WITH (security_invoker = true) AS
SELECT date_trunc('day', c.started_at) AS day,
	   c.workload, c.path, c.model,
	   count(DISTINCT c.call_id) AS calls,
	   count(*) AS attempts,
	   sum(c.prompt_tokens) AS prompt_tokens,
	   sum(c.cached_prompt_tokens) AS cached_prompt_tokens,
	   sum(c.completion_tokens) AS completion_tokens,
	   sum(c.cost_usd) AS cost_usd,
	   count(*) FILTER (WHERE c.cost_usd IS NULL) AS unpriced_attempts
FROM fw_tier.calls c
GROUP BY 1, 2, 3, 4;

-- Failure-signal rates per path and hour: 503 Overloaded, 429, 503
-- Unavailable are three different things and are never summed.
CREATE VIEW fw_tier.error_rates_hourly WITH (security_invoker = true) AS
SELECT date_trunc('hour', c.started_at) AS hour,
	   c.path,
	   count(*) AS attempts,
	   count(*) FILTER (WHERE c.outcome = 'overloaded') AS overloaded_503,
	   count(*) FILTER (WHERE c.outcome = 'rate_limited') AS rate_limited_429,
	   count(*) FILTER (WHERE c.outcome = 'unavailable') AS unavailable_503,
	   round(count(*) FILTER (WHERE c.outcome = 'overloaded')::numeric / count(*), 6) AS overloaded_rate,
	   round(count(*) FILTER (WHERE c.outcome = 'rate_limited')::numeric / count(*), 6) AS rate_limited_rate,
	   round(count(*) FILTER (WHERE c.outcome = 'unavailable')::numeric / count(*), 6) AS unavailable_rate
FROM fw_tier.calls c
GROUP BY 1, 2;

-- What Priority cost beyond the Standard price of the same tokens, per day
-- and workload, split by escalated (window) and configured Priority.
CREATE VIEW fw_tier.priority_premium WITH (security_invoker = true) AS
SELECT date_trunc('day', c.started_at) AS day,
	   c.workload,
	   c.escalated,
	   count(*) AS attempts,
	   sum(c.cost_usd) AS priority_cost_usd,
	   sum(((coalesce(c.prompt_tokens, 0) - coalesce(c.cached_prompt_tokens, 0)) * ps.input_usd_per_mtok
			+ coalesce(c.cached_prompt_tokens, 0) * ps.cached_input_usd_per_mtok
			+ coalesce(c.completion_tokens, 0) * ps.output_usd_per_mtok) / 1000000) AS standard_cost_usd,
	   sum(c.cost_usd)
	   - sum(((coalesce(c.prompt_tokens, 0) - coalesce(c.cached_prompt_tokens, 0)) * ps.input_usd_per_mtok
			  + coalesce(c.cached_prompt_tokens, 0) * ps.cached_input_usd_per_mtok
			  + coalesce(c.completion_tokens, 0) * ps.output_usd_per_mtok) / 1000000) AS premium_usd
FROM fw_tier.calls c
	 JOIN fw_tier.prices ps ON ps.model = c.model AND ps.path = 'standard'
WHERE c.path = 'priority' AND c.cost_usd IS NOT NULL
GROUP BY 1, 2, 3;

-- Each Priority window with what happened in it.
CREATE VIEW fw_tier.escalation_timeline WITH (security_invoker = true) AS
SELECT e.id, e.workload, e.trigger, e.started, e.priority_until, e.ended,
	   e.windows_in_row,
	   coalesce(e.ended, greatest(e.priority_until, now())) - e.started AS duration,
	   count(c.call_id) AS attempts,
	   count(c.call_id) FILTER (WHERE c.path = 'priority') AS priority_attempts,
	   count(c.call_id) FILTER (WHERE c.outcome = 'overloaded') AS overloaded_503,
	   sum(c.cost_usd) AS cost_usd,
	   sum(c.cost_usd) FILTER (WHERE c.path = 'priority')
	   - sum(((coalesce(c.prompt_tokens, 0) - coalesce(c.cached_prompt_tokens, 0)) * ps.input_usd_per_mtok
			  + coalesce(c.cached_prompt_tokens, 0) * ps.cached_input_usd_per_mtok
			  + coalesce(c.completion_tokens, 0) * ps.output_usd_per_mtok) / 1000000)
		 FILTER (WHERE c.path = 'priority' AND c.cost_usd IS NOT NULL) AS premium_usd
FROM fw_tier.escalations e
	 LEFT JOIN fw_tier.calls c
	 ON c.workload = e.workload
		AND c.started_at >= e.started
		AND c.started_at < coalesce(e.ended, greatest(e.priority_until, now()))
	 LEFT JOIN fw_tier.prices ps ON ps.model = c.model AND ps.path = 'standard'
GROUP BY e.id;

-- Retention: delete calls older than older_than, batch_size rows at a
-- time (bounded memory per statement); returns the number deleted.
CREATE FUNCTION fw_tier.purge_calls(older_than interval, batch_size integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	total	bigint := 0;
	n		bigint;
	cutoff	timestamptz := now() - older_than;
BEGIN
	IF older_than IS NULL OR batch_size IS NULL OR batch_size < 1 THEN
		RAISE EXCEPTION 'older_than must not be null and batch_size must be positive'
			USING ERRCODE = '22023';
	END IF;
	LOOP
		DELETE FROM fw_tier.calls
		WHERE ctid = ANY (ARRAY(SELECT ctid FROM fw_tier.calls
								WHERE started_at < cutoff
								LIMIT batch_size));
		GET DIAGNOSTICS n = ROW_COUNT;
		total := total + n;
		EXIT WHEN n < batch_size;
	END LOOP;
	RETURN total;
END;
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.purge_calls(interval, integer) FROM PUBLIC;

-- security_invoker views: granting them is harmless, the caller still needs
-- SELECT on fw_tier.calls / fw_tier.escalations and sees only its rows.
GRANT SELECT ON fw_tier.spend_daily, fw_tier.error_rates_hourly,
	fw_tier.priority_premium, fw_tier.escalation_timeline TO PUBLIC;

-- ==== record / replay (fixtures.c) ====

/*
 * Fixtures are test data: every role may read them (replay needs that),
 * writing them takes a grant from the owner:
 *   GRANT INSERT, UPDATE ON fw_tier.fixtures TO ci;	-- record mode, fw_fixture()
 *   GRANT INSERT ON fw_tier.fixtures_import TO ci;	-- \copy ... FROM
 * Record in test databases only: fixtures hold prompts and answers.
 */
GRANT SELECT ON fw_tier.fixtures TO PUBLIC;

-- The key the engine uses for a request and the model it stands for,
-- resolved like a call: options' model and path, the workload's model,
-- fw_tier.default_model, the Fast model on the Fast path.
CREATE FUNCTION fw_tier.fixture_key(messages jsonb, workload text, options jsonb,
									OUT fingerprint text, OUT model text)
RETURNS record
AS 'MODULE_PATHNAME', 'fw_fixture_key_sql'
LANGUAGE C STABLE PARALLEL RESTRICTED;

-- The fixture key of fw_chat(messages, workload, options); fw_complete(p, w)
-- is fw_chat('[{"role": "user", "content": p}]', w).
CREATE FUNCTION fw_fingerprint(messages jsonb, workload text DEFAULT 'default',
							   options jsonb DEFAULT '{}')
RETURNS text
LANGUAGE sql STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $$ SELECT k.fingerprint FROM fw_tier.fixture_key(messages, workload, options) k $$;

/*
 * Write one fixture by hand for fw_chat(messages, workload, options);
 * returns its fingerprint.  response is the body verbatim when it starts
 * with '{'; otherwise, for a 2xx, the answer text of a canonical
 * completion, and for an error the message of a canonical error body
 * (NULL: the provider's usual message; a 503 without a message is
 * "Service Overloaded", a 503 whose message lacks "overload" is
 * Unavailable).  path: 'any', 'standard', 'priority' or 'fast'; attempt 0
 * answers every attempt, n only the call's n-th.
 */
CREATE FUNCTION fw_fixture_chat(messages jsonb, workload text, http_status integer,
								response text DEFAULT NULL, path text DEFAULT 'any',
								options jsonb DEFAULT '{}', attempt integer DEFAULT 0,
								retry_after integer DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	k		record;
	body	text;
	etype	text;
BEGIN
	IF http_status IS NULL OR path IS NULL OR attempt IS NULL THEN
		RAISE EXCEPTION 'http_status, path and attempt must not be NULL'
			USING ERRCODE = '22004';
	END IF;
	SELECT * INTO k FROM fw_tier.fixture_key(messages, workload, options);

	IF left(ltrim(response), 1) = '{' THEN
		body := response;
	ELSIF http_status BETWEEN 200 AND 299 THEN
		IF response IS NULL THEN
			RAISE EXCEPTION 'a % fixture needs the answer text', http_status
				USING ERRCODE = '22004';
		END IF;
		body := jsonb_build_object(
			'id', 'fixture-' || left(k.fingerprint, 12),
			'object', 'chat.completion', 'created', 0, 'model', k.model,
			'choices', jsonb_build_array(jsonb_build_object(
				'index', 0, 'finish_reason', 'stop',
				'message', jsonb_build_object('role', 'assistant', 'content', response))),
			'usage', jsonb_build_object('prompt_tokens', 0, 'completion_tokens', 0,
										'total_tokens', 0))::text;
	ELSE
		IF http_status = 503 AND (response IS NULL OR response ILIKE '%overload%') THEN
			etype := 'service_overloaded';
			response := coalesce(response, 'Service Overloaded: the serverless fleet is at capacity; retry with backoff or use service_tier priority');
		ELSE
			etype := CASE http_status
				WHEN 400 THEN 'invalid_request_error'
				WHEN 401 THEN 'authentication_error'
				WHEN 403 THEN 'permission_denied'
				WHEN 404 THEN 'not_found'
				WHEN 429 THEN 'rate_limit_exceeded'
				WHEN 503 THEN 'service_unavailable'
				ELSE CASE WHEN http_status >= 500 THEN 'server_error' ELSE 'client_error' END
			END;
			response := coalesce(response, CASE http_status
				WHEN 400 THEN 'Invalid request'
				WHEN 429 THEN 'Rate limit exceeded, please retry later'
				WHEN 503 THEN 'Service Unavailable'
				ELSE 'HTTP ' || http_status END);
		END IF;
		body := jsonb_build_object('error', jsonb_build_object(
			'object', 'error', 'type', etype, 'code', etype, 'message', response))::text;
	END IF;

	INSERT INTO fw_tier.fixtures AS f
		(fingerprint, path, attempt, request, http_status, response, retry_after)
	VALUES (k.fingerprint, fw_fixture_chat.path, fw_fixture_chat.attempt,
			jsonb_build_object('model', k.model, 'messages', messages),
			fw_fixture_chat.http_status, body, fw_fixture_chat.retry_after)
	ON CONFLICT ON CONSTRAINT fixtures_pkey DO UPDATE
		SET request = EXCLUDED.request, http_status = EXCLUDED.http_status,
			response = EXCLUDED.response, retry_after = EXCLUDED.retry_after,
			recorded_at = EXCLUDED.recorded_at;
	RETURN k.fingerprint;
END
$$;

-- The same for fw_complete(prompt, workload) (and one prompt of
-- fw_complete_batch(prompts, workload, options)).
CREATE FUNCTION fw_fixture(prompt text, workload text, http_status integer,
						   response text DEFAULT NULL, path text DEFAULT 'any',
						   options jsonb DEFAULT '{}', attempt integer DEFAULT 0,
						   retry_after integer DEFAULT NULL)
RETURNS text
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT @extschema@.fw_fixture_chat(
		jsonb_build_array(jsonb_build_object('role', 'user', 'content', prompt)),
		workload, http_status, response, path, options, attempt, retry_after)
$$;

/*
 * Fixtures as a file in the user's repository: one line per fixture,
 * stable order and column list, no timestamps.
 *   \copy (SELECT * FROM fw_tier.fixtures_export) TO 'fixtures.tsv'
 *   \copy fw_tier.fixtures_import FROM 'fixtures.tsv'
 * Import upserts on (fingerprint, path, attempt); TRUNCATE
 * fw_tier.fixtures first to replace the set.  Export, import, export gives
 * the same bytes.
 */
-- Record mode writes a failed call's answers again after its statement
-- rolled back, at the next call; this writes them now (returns how many).
-- Reading fw_tier.fixtures_export does it first.
CREATE FUNCTION fw_fixture_flush()
RETURNS integer
AS 'MODULE_PATHNAME', 'fw_fixture_flush'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

CREATE FUNCTION fw_tier.fixtures_export_rows()
RETURNS TABLE (fingerprint text, path text, attempt integer, http_status integer,
			   retry_after integer, request jsonb, response text)
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
	SELECT @extschema@.fw_fixture_flush();
	SELECT f.fingerprint, f.path, f.attempt, f.http_status, f.retry_after, f.request, f.response
	  FROM fw_tier.fixtures f
	 ORDER BY f.fingerprint COLLATE "C", f.path COLLATE "C", f.attempt;
$$;

CREATE VIEW fw_tier.fixtures_export AS
SELECT fingerprint, path, attempt, http_status, retry_after, request, response
  FROM fw_tier.fixtures_export_rows()
 ORDER BY fingerprint COLLATE "C", path COLLATE "C", attempt;
GRANT SELECT ON fw_tier.fixtures_export TO PUBLIC;

CREATE VIEW fw_tier.fixtures_import AS
SELECT fingerprint, path, attempt, http_status, retry_after, request, response
  FROM fw_tier.fixtures;
ALTER VIEW fw_tier.fixtures_import ALTER COLUMN path SET DEFAULT 'any';
ALTER VIEW fw_tier.fixtures_import ALTER COLUMN attempt SET DEFAULT 0;

CREATE FUNCTION fw_tier.fixtures_import_row() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	INSERT INTO fw_tier.fixtures
		(fingerprint, path, attempt, http_status, retry_after, request, response)
	VALUES (NEW.fingerprint, NEW.path, NEW.attempt, NEW.http_status,
			NEW.retry_after, NEW.request, NEW.response)
	ON CONFLICT ON CONSTRAINT fixtures_pkey DO UPDATE
		SET request = EXCLUDED.request, http_status = EXCLUDED.http_status,
			response = EXCLUDED.response, retry_after = EXCLUDED.retry_after,
			recorded_at = EXCLUDED.recorded_at;
	RETURN NEW;
END
$$;
CREATE TRIGGER fixtures_import_row
	INSTEAD OF INSERT ON fw_tier.fixtures_import
	FOR EACH ROW EXECUTE FUNCTION fw_tier.fixtures_import_row();
