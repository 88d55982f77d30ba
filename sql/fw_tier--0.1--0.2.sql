/* fw_tier--0.1--0.2.sql: the hardening release (issue 10) */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION fw_tier UPDATE TO '0.2'" to load this file. \quit

-- ---------------------------------------------------------------------
-- Section A: SQL objects run for someone else pin their search_path;
-- purge_calls for its grantees
-- ---------------------------------------------------------------------

-- (section A)

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
-- record as jsonb, with the error.  Same audience as fw_tier.calls.
CREATE TABLE fw_tier.calls_dead_letter (
	id			bigserial PRIMARY KEY,
	failed_at	timestamptz NOT NULL DEFAULT now(),
	call_id		bigint,
	attempt		integer,
	record		jsonb NOT NULL,
	sqlstate	text,
	error		text
);
REVOKE ALL ON fw_tier.calls_dead_letter FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('fw_tier.calls_dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('fw_tier.calls_dead_letter_id_seq', '');

-- ---------------------------------------------------------------------
-- Section C: the engine
-- ---------------------------------------------------------------------

-- (section C)

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

-- A window's calls are those of its own database.
CREATE OR REPLACE VIEW fw_tier.escalation_timeline WITH (security_invoker = true) AS
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
		 FILTER (WHERE c.path = 'priority' AND c.cost_usd IS NOT NULL) AS premium_usd,
	   e.database
FROM fw_tier.escalations e
	 LEFT JOIN fw_tier.calls c
	 ON c.database = e.database
		AND c.workload = e.workload
		AND c.started_at >= e.started
		AND c.started_at < coalesce(e.ended, greatest(e.priority_until, now()))
	 LEFT JOIN fw_tier.prices ps ON ps.model = c.model AND ps.path = 'standard'
GROUP BY e.id;

-- \copy fw_tier.fixtures_import FROM ...: the documented grant (INSERT on
-- the view) is all an importer needs.  The trigger writes the table as its
-- owner; it only upserts the row it is given, with its search_path pinned,
-- and only fires as the view's INSTEAD OF trigger (nobody else may attach
-- it: EXECUTE is revoked).
ALTER FUNCTION fw_tier.fixtures_import_row() SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION fw_tier.fixtures_import_row() FROM PUBLIC;
