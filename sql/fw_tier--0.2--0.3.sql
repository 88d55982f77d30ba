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
-- (section A)

-- ---------------------------------------------------------------------
-- Section B: issue 12, typed answers (JSON schema, embeddings, rerank)
-- ---------------------------------------------------------------------
-- (section B)

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
-- (section D)

-- ---------------------------------------------------------------------
-- Section L: issue 15, prices a newcomer can see (unpriced_models)
-- ---------------------------------------------------------------------
-- (section L)
