/* fw_tier--0.2--0.3.sql: the call log at the price of a memcpy (issue 15), typed answers (issue 12), spend limits (issue 13), early-ending windows (issue 16) */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION fw_tier UPDATE TO '0.3'" to load this file. \quit

/*
 * House rules (as in 0.1--0.2): every function pins search_path =
 * pg_catalog, pg_temp; views, constraints and policies name pg_catalog's
 * operators explicitly (OPERATOR(pg_catalog.=)); each object is defined
 * once in this file.
 */

-- ---------------------------------------------------------------------
-- Section A: issue 15, the call log's insert path (BRIN on started_at, ...)
-- ---------------------------------------------------------------------
-- The flusher writes fw_tier.calls by a multi-insert (src/loginsert.c).
-- started_at grows with the table (rows arrive in about the order the
-- calls were made): a BRIN index serves the time-range queries of the
-- views and purge_calls at a fraction of a btree's cost per row.
-- autosummarize: autovacuum summarizes each range once it is full, so
-- rows written since the last VACUUM (or into pages a purge freed) do
-- not stay unsummarized, read by every query.
DROP INDEX fw_tier.calls_started_at_idx;
CREATE INDEX calls_started_at_idx ON fw_tier.calls USING brin (started_at)
	WITH (autosummarize = on);

-- The flusher prices rows from a cache of fw_tier.prices (src/prices.c);
-- row changes do not invalidate it by themselves, this trigger does (the
-- same C function as workloads_changed).  ENABLE ALWAYS: it fires also in
-- a session with session_replication_role = replica.  Logical
-- replication's apply fires row triggers only, never statement triggers:
-- on a subscriber a replicated change reaches the cache only with the
-- next invalidation (a local change, DDL, the flusher's restart).
CREATE FUNCTION fw_tier.prices_changed() RETURNS trigger
AS 'MODULE_PATHNAME', 'fw_workloads_changed' LANGUAGE C;
CREATE TRIGGER prices_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON fw_tier.prices
	FOR EACH STATEMENT EXECUTE FUNCTION fw_tier.prices_changed();
ALTER TABLE fw_tier.prices ENABLE ALWAYS TRIGGER prices_changed;

-- ---------------------------------------------------------------------
-- Section B: issue 12, typed answers (JSON schema, embeddings, rerank)
-- ---------------------------------------------------------------------
-- (section B)

-- JSON answers: the answer as jsonb, checked against the caller's schema
-- (src/jsonschema.c).  Not executable by PUBLIC, like fw_complete.
CREATE FUNCTION fw_complete_json(prompt text, schema jsonb, workload text DEFAULT 'default',
								 options jsonb DEFAULT '{}')
RETURNS jsonb
AS 'MODULE_PATHNAME', 'fw_complete_json'
LANGUAGE C VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION fw_complete_json_batch(prompts text[], schema jsonb, workload text DEFAULT 'batch',
									   options jsonb DEFAULT '{}')
RETURNS jsonb[]
AS 'MODULE_PATHNAME', 'fw_complete_json_batch'
LANGUAGE C VOLATILE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp;

REVOKE EXECUTE ON FUNCTION fw_complete_json(text, jsonb, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_complete_json_batch(text[], jsonb, text, jsonb) FROM PUBLIC;

-- The options fw_complete_json sends (the schema as response_format), for
-- fw_fingerprint and fw_fixture_chat: sends nothing, so anyone may run it.
CREATE FUNCTION fw_tier.json_options(schema jsonb, options jsonb DEFAULT '{}')
RETURNS jsonb
AS 'MODULE_PATHNAME', 'fw_json_options_sql'
LANGUAGE C IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp;

-- ---------------------------------------------------------------------
-- Section E: issue 12, embeddings and rerank
-- ---------------------------------------------------------------------

-- Which kind of request a call-log row is (the ring record carries it).
ALTER TABLE fw_tier.calls ADD COLUMN kind text NOT NULL DEFAULT 'chat'
	CONSTRAINT calls_kind_check
	CHECK (kind OPERATOR(pg_catalog.=) ANY (ARRAY['chat', 'embed', 'rerank']::pg_catalog.text[]));

-- A workload's embedding and rerank models; NULL: fw_tier.default_embedding_model
-- and fw_tier.default_rerank_model.
ALTER TABLE fw_tier.workloads
	ADD COLUMN embedding_model text
		CONSTRAINT workloads_embedding_model_check
		CHECK (pg_catalog.octet_length(embedding_model) OPERATOR(pg_catalog.<) 160),
	ADD COLUMN rerank_model text
		CONSTRAINT workloads_rerank_model_check
		CHECK (pg_catalog.octet_length(rerank_model) OPERATOR(pg_catalog.<) 160);

-- A shipped row whose embedding or rerank model was set is the user's: dumped.
SELECT pg_catalog.pg_extension_config_dump('fw_tier.workloads',
	'WHERE NOT fw_tier.workload_is_shipped(workload, path, model, fast_model, on_overload, priority_window)'
	' OR embedding_model IS NOT NULL OR rerank_model IS NOT NULL');

CREATE FUNCTION fw_embed(input text, workload text DEFAULT 'default',
						 options jsonb DEFAULT '{}')
RETURNS real[]
AS 'MODULE_PATHNAME', 'fw_embed'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

CREATE FUNCTION fw_embed_batch(inputs text[], workload text DEFAULT 'batch',
							   options jsonb DEFAULT '{}')
RETURNS TABLE (ord integer, embedding real[])
AS 'MODULE_PATHNAME', 'fw_embed_batch'
LANGUAGE C VOLATILE PARALLEL RESTRICTED ROWS 1000;

CREATE FUNCTION fw_rerank(query text, documents text[], top_n integer DEFAULT NULL,
						  workload text DEFAULT 'default', options jsonb DEFAULT '{}')
RETURNS TABLE (index integer, score double precision)
AS 'MODULE_PATHNAME', 'fw_rerank'
LANGUAGE C VOLATILE PARALLEL RESTRICTED ROWS 10;

-- Paid calls, as fw_complete: granted by the owner (README "Privileges").
REVOKE EXECUTE ON FUNCTION fw_embed(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_embed_batch(text[], text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_rerank(text, text[], integer, text, jsonb) FROM PUBLIC;

-- ---------------------------------------------------------------------
-- Section C: issue 16, window policy probe
-- ---------------------------------------------------------------------
-- (section C: begin)

/*
 * How a Priority window ends.  'fixed' (the default, as before): at its
 * configured length.  'probe': also early, once fw_tier.probe_successes
 * Standard probes (one per fw_tier.probe_interval during the window) are
 * answered in a row (README "Escalation", escalation.c "Probes").
 */
ALTER TABLE fw_tier.workloads ADD COLUMN window_policy text NOT NULL DEFAULT 'fixed'
	CONSTRAINT workloads_window_policy_check
	CHECK (window_policy OPERATOR(pg_catalog.=) 'fixed'::pg_catalog.text
		   OR window_policy OPERATOR(pg_catalog.=) 'probe'::pg_catalog.text);
COMMENT ON COLUMN fw_tier.workloads.window_policy IS
	'fixed: a Priority window lasts its length; probe: Standard probes may end it early';

-- A shipped workload set to 'probe' is an edit: dumped, and never replaced
-- by a COPY of the shipped row.
SELECT pg_catalog.pg_extension_config_dump('fw_tier.workloads',
	'WHERE NOT (fw_tier.workload_is_shipped(workload, path, model, fast_model, on_overload, priority_window) AND window_policy OPERATOR(pg_catalog.=) ''fixed''::pg_catalog.text)');

CREATE OR REPLACE FUNCTION fw_tier.workloads_replace_shipped() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF pg_catalog.current_query() OPERATOR(pg_catalog.~*) '^\s*copy\s'
	   -- looked up first: only then does the copier need DELETE
	   AND EXISTS (SELECT FROM fw_tier.workloads w
				    WHERE w.workload OPERATOR(pg_catalog.=) NEW.workload
					  AND w.window_policy OPERATOR(pg_catalog.=) 'fixed'::pg_catalog.text
					  AND fw_tier.workload_is_shipped(w.workload, w.path, w.model,
													  w.fast_model, w.on_overload,
													  w.priority_window)) THEN
		DELETE FROM fw_tier.workloads w
		 WHERE w.workload OPERATOR(pg_catalog.=) NEW.workload;
	END IF;
	RETURN NEW;
END
$$;

-- The call log: which attempts were probes (Standard, during a window).
ALTER TABLE fw_tier.calls ADD COLUMN probe boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN fw_tier.calls.probe IS
	'A Standard probe sent during a Priority window (window_policy probe); a shed probe is retried on Priority as the next attempt.';

-- The escalation history: how each window ended, and its probes.
ALTER TABLE fw_tier.escalations
	ADD COLUMN ended_by text
		CONSTRAINT escalations_ended_by_check
		CHECK (ended_by OPERATOR(pg_catalog.=) 'expired'::pg_catalog.text
			   OR ended_by OPERATOR(pg_catalog.=) 'probes'::pg_catalog.text
			   OR ended_by OPERATOR(pg_catalog.=) 'deescalated'::pg_catalog.text),
	ADD COLUMN probes bigint NOT NULL DEFAULT 0,
	ADD COLUMN probes_shed bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN fw_tier.escalations.ended_by IS
	'expired: ran its length; probes: closed early by Standard probes; deescalated: fw_deescalate(); NULL: open, or not known';

-- fw_tier.status: the window policy, probes, early closes, Priority time.
DROP VIEW fw_tier.status;
DROP FUNCTION fw_tier_workload_state();
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
	OUT priority_overloaded_503 bigint,
	OUT probes bigint,
	OUT probes_shed bigint,
	OUT closed_by_probes bigint,
	OUT priority_seconds double precision)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'fw_tier_workload_state'
LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;

CREATE VIEW fw_tier.status AS
SELECT w.workload,
	   CASE WHEN w.path OPERATOR(pg_catalog.=) 'fast'::pg_catalog.text THEN 'fast'
			WHEN w.path OPERATOR(pg_catalog.=) 'priority'::pg_catalog.text THEN 'priority'
			WHEN s.priority_until OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp() THEN 'priority'
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
	   coalesce(s.priority_overloaded_503, 0) AS priority_overloaded_503,
	   w.window_policy,
	   coalesce(s.probes, 0) AS probes,
	   coalesce(s.probes_shed, 0) AS probes_shed,
	   coalesce(s.closed_by_probes, 0) AS closed_by_probes,
	   coalesce(s.priority_seconds, 0) AS priority_seconds
FROM fw_tier.workloads w
	 LEFT JOIN fw_tier_workload_state() s ON s.workload OPERATOR(pg_catalog.=) w.workload;
GRANT SELECT ON fw_tier.status TO PUBLIC;

-- (section C: end)

-- ---------------------------------------------------------------------
-- Section D: issue 13, budgets
-- ---------------------------------------------------------------------
-- (section D: begin)

/*
 * Spend limits.  A budget caps what the calls it applies to may cost per
 * UTC period (src/spend.c reserves each attempt's worst case in shared
 * memory before it is sent and settles it from usage afterwards).  NULL
 * workload or role = any; several budgets can apply to one call and all
 * must allow it.  Configuration like workloads and prices: everyone reads,
 * the owner writes (or grants), pg_dump keeps the rows.
 */
CREATE TABLE fw_tier.budgets (
	budget				text PRIMARY KEY
						CHECK (budget OPERATOR(pg_catalog.<>) ''::pg_catalog.text
							   AND pg_catalog.octet_length(budget) OPERATOR(pg_catalog.<) 64),
	workload			text CHECK (pg_catalog.octet_length(workload) OPERATOR(pg_catalog.<) 64),
	role				regrole,
	period				text NOT NULL DEFAULT 'day'
						CHECK (period OPERATOR(pg_catalog.=) ANY (ARRAY['hour', 'day', 'month']::pg_catalog.text[])),
	-- finite and at most $1e9 (spend.c counts nano-USD in int8); 'NaN'
	-- sorts above every number, so the upper bound refuses it too
	limit_usd			numeric NOT NULL CHECK (limit_usd OPERATOR(pg_catalog.>=) 0::numeric
											AND limit_usd OPERATOR(pg_catalog.<=) 1000000000::numeric),
	premium_limit_usd	numeric CHECK (premium_limit_usd OPERATOR(pg_catalog.>=) 0::numeric
									   AND premium_limit_usd OPERATOR(pg_catalog.<=) 1000000000::numeric),
	action				text NOT NULL DEFAULT 'refuse'
						CHECK (action OPERATOR(pg_catalog.=) ANY (ARRAY['refuse', 'standard_only', 'warn']::pg_catalog.text[]))
);
COMMENT ON TABLE fw_tier.budgets IS
	'fw_tier spend limits per UTC period; NULL workload or role = any; every budget that applies must allow a call';
SELECT pg_catalog.pg_extension_config_dump('fw_tier.budgets', '');
GRANT SELECT ON fw_tier.budgets TO PUBLIC;

-- Backends keep budgets and prices in a cache (src/spend.c): a statement
-- trigger invalidates it in every session, as for fw_tier.workloads (the
-- C function only invalidates the relcache of the table it fires on).
-- fw_tier.prices already has its trigger, prices_changed (section A).
CREATE TRIGGER budgets_changed
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON fw_tier.budgets
	FOR EACH STATEMENT EXECUTE FUNCTION fw_tier.workloads_changed();

-- A refused call is logged with outcome 'refused', no HTTP status, no
-- tokens and cost_usd 0 (the flusher's rule for an attempt without tokens
-- that is not 'ok'); the outcome CHECK is in section F.

-- A price is a finite number below $1e9 per million tokens: 'NaN' (which
-- sorts above every number) or 'Infinity' would make a budgeted call
-- free or its cost undefined.  NOT VALID: a database updated from 0.2
-- with such a row still updates; spend.c treats that row as no price.
ALTER TABLE fw_tier.prices
	ADD CONSTRAINT prices_finite CHECK (
		input_usd_per_mtok OPERATOR(pg_catalog.<) 1000000000::numeric
		AND cached_input_usd_per_mtok OPERATOR(pg_catalog.<) 1000000000::numeric
		AND output_usd_per_mtok OPERATOR(pg_catalog.<) 1000000000::numeric) NOT VALID;

-- A price row, inserted or replaced (the caller needs INSERT and UPDATE
-- on fw_tier.prices: it runs with the caller's rights).
CREATE FUNCTION fw_tier.set_price(model text, path text, input_usd_per_mtok numeric,
								  cached_input_usd_per_mtok numeric,
								  output_usd_per_mtok numeric)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO fw_tier.prices AS p (model, path, input_usd_per_mtok,
									 cached_input_usd_per_mtok, output_usd_per_mtok)
	VALUES ($1, $2, $3, $4, $5)
	ON CONFLICT (model, path) DO UPDATE
	   SET input_usd_per_mtok = EXCLUDED.input_usd_per_mtok,
		   cached_input_usd_per_mtok = EXCLUDED.cached_input_usd_per_mtok,
		   output_usd_per_mtok = EXCLUDED.output_usd_per_mtok;
$$;

-- The UTC period an instant falls in: what the budgets use (spend.c).
CREATE FUNCTION fw_tier.budget_period(period text, at timestamptz,
									  OUT period_start timestamptz,
									  OUT period_end timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'fw_tier_budget_period'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp;

-- The shared-memory state of this database's budgets.
CREATE FUNCTION fw_tier.budget_state(
	OUT budget text, OUT period_start timestamptz, OUT period_end timestamptz,
	OUT restored boolean, OUT spent_usd numeric, OUT reserved_usd numeric,
	OUT premium_spent_usd numeric, OUT refusals bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'fw_tier_budget_state'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;

-- Like pg_stat views: everyone reads.  A budget not used since the server
-- started has no state yet (spent NULL until its first call restores it
-- from fw_tier.calls).
CREATE VIEW fw_tier.budget_status AS
SELECT b.budget, b.workload, b.role, b.period,
	   coalesce(s.period_start, p.period_start) AS period_start,
	   coalesce(s.period_end, p.period_end) AS period_end,
	   b.limit_usd,
	   pg_catalog.round(s.spent_usd, 6) AS spent_usd,
	   pg_catalog.round(s.reserved_usd, 6) AS reserved_usd,
	   pg_catalog.round(GREATEST(b.limit_usd OPERATOR(pg_catalog.-) s.spent_usd
									OPERATOR(pg_catalog.-) s.reserved_usd, 0::numeric), 6) AS remaining_usd,
	   b.premium_limit_usd,
	   pg_catalog.round(s.premium_spent_usd, 6) AS premium_spent_usd,
	   coalesce(s.refusals, 0::bigint) AS refusals,
	   b.action
FROM fw_tier.budgets b
	 CROSS JOIN LATERAL fw_tier.budget_period(b.period, pg_catalog.now()) p
	 LEFT JOIN fw_tier.budget_state() s
	 ON s.budget OPERATOR(pg_catalog.=) b.budget AND s.restored
		AND s.period_start OPERATOR(pg_catalog.=) p.period_start;
GRANT SELECT ON fw_tier.budget_status TO PUBLIC;

-- (section D: end)

-- ---------------------------------------------------------------------
-- Section F: issue 18, write-ahead attempts
-- ---------------------------------------------------------------------

/*
 * 'unknown': an attempt that was in flight when its process died (a
 * crash-restart, an immediate stop).  It was written ahead to the intent
 * file before its first byte was sent, and recovery logs it with the
 * request id the headers brought (if any) and the worst case:
 * prompt_tokens over-estimated from the request bytes, completion_tokens
 * at max_tokens or fw_tier.max_output_tokens, priced at the path's input
 * and output prices.  A new outcome of fw_tier (fw_outcome_names in
 * fw_tier.c) must be added here too.
 */
ALTER TABLE fw_tier.calls ADD CONSTRAINT calls_outcome_check
	CHECK (outcome OPERATOR(pg_catalog.=) ANY
		   ('{ok,rate_limited,overloaded,unavailable,client_error,timeout,transport,cancelled,bad_response,bad_output,refused,unknown}'::pg_catalog.text[]));
COMMENT ON COLUMN fw_tier.calls.outcome IS
	'Class of the attempt (README "Failure classes"): ok, rate_limited, overloaded, unavailable, client_error, timeout, transport, cancelled, bad_response, bad_output (an answer that fails its JSON schema), refused (a budget refused it before anything was sent), unknown (in flight when its process died: tokens and cost at the worst case)';

-- ---------------------------------------------------------------------
-- Section L: issue 15, prices a newcomer can see (unpriced_models)
-- ---------------------------------------------------------------------
-- (section L: begin)

/*
 * Which models have calls but no price.  cost_usd is priced when the row
 * is written; an attempt of a (model, path) with no row in fw_tier.prices
 * keeps cost_usd NULL, and spend_daily's cost_usd is then NULL too.  This
 * view names those pairs, how many attempts they have, and what to do:
 * the INSERT to run, or, when a price row exists now, that the attempts
 * logged before it stay unpriced (a price change never rewrites history).
 * Replayed attempts are free and never unpriced.  security_invoker: a
 * role sees its own calls only, as in fw_tier.calls.
 */
CREATE VIEW fw_tier.unpriced_models WITH (security_invoker = true) AS
SELECT c.model, c.path,
	   count(*) AS unpriced_attempts,
	   pg_catalog.min(c.started_at) AS first_started_at,
	   pg_catalog.max(c.started_at) AS last_started_at,
	   (p.model IS NOT NULL) AS priced_now,
	   CASE WHEN p.model IS NOT NULL
			THEN 'priced since these attempts were logged; they stay unpriced'
			ELSE pg_catalog.format('no price: INSERT INTO fw_tier.prices VALUES (%L, %L, <input>, <cached input>, <output>), USD per million tokens from the Fireworks pricing page',
								   c.model, c.path)
	   END AS hint
FROM fw_tier.calls c
	 LEFT JOIN fw_tier.prices p
			ON p.model OPERATOR(pg_catalog.=) c.model
		   AND p.path OPERATOR(pg_catalog.=) c.path
WHERE c.cost_usd IS NULL AND NOT c.replayed
GROUP BY c.model, c.path, p.model;
COMMENT ON VIEW fw_tier.unpriced_models IS
	'fw_tier (model, path) pairs whose logged attempts have no price, and what to do';
GRANT SELECT ON fw_tier.unpriced_models TO PUBLIC;

-- (section L: end)
