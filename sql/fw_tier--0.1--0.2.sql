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

-- (section D)
