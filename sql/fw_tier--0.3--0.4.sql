/* fw_tier--0.3--0.4.sql: beyond one server (issue 11), continuous enrichment (issue 14), the call log's CPU (issue 15) */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION fw_tier UPDATE TO '0.4'" to load this file. \quit

/*
 * House rules (as in 0.1--0.2 and 0.2--0.3): every function pins
 * search_path = pg_catalog, pg_temp; views, constraints and policies name
 * pg_catalog's operators explicitly (OPERATOR(pg_catalog.=)); each object
 * is defined once in this file.
 */

-- ---------------------------------------------------------------------
-- Section R: issue 11, replicas and fleets (origin of a row, standby shipping)
-- ---------------------------------------------------------------------
-- The server a row comes from (src/origin.c): its system identifier and
-- its node name (fw_tier.node_name, else an id kept in pg_fw_tier/node; a
-- streaming standby shares its primary's system identifier, not its node
-- name).  (origin_sysid, origin_node) in the key
-- makes a row's key unique across servers: call_id is unique per server.
CREATE FUNCTION fw_tier.local_origin(OUT origin_sysid bigint, OUT origin_node text)
RETURNS record
AS 'MODULE_PATHNAME', 'fw_tier_local_origin'
LANGUAGE C STABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION fw_tier.local_origin() IS
	'this server''s origin_sysid and origin_node, as fw_tier.calls rows made here carry them';

-- Rows already there were made here: they get this server's identity (the
-- default evaluated once, for every row).  The flusher fills both columns
-- itself; the defaults serve rows inserted by hand.
ALTER TABLE fw_tier.calls
	ADD COLUMN origin_sysid bigint NOT NULL DEFAULT (fw_tier.local_origin()).origin_sysid,
	ADD COLUMN origin_node text NOT NULL DEFAULT (fw_tier.local_origin()).origin_node;
COMMENT ON COLUMN fw_tier.calls.origin_sysid IS
	'system identifier (pg_control_system()) of the server that made the call';
COMMENT ON COLUMN fw_tier.calls.origin_node IS
	'node name of the server that made the call (fw_tier.node_name or a generated id)';
ALTER TABLE fw_tier.calls DROP CONSTRAINT calls_pkey;
ALTER TABLE fw_tier.calls ADD CONSTRAINT calls_pkey
	PRIMARY KEY (origin_sysid, origin_node, call_id, attempt);

-- Dead letters: one per attempt of each origin, as in fw_tier.calls.
ALTER TABLE fw_tier.calls_dead_letter
	ADD COLUMN origin_sysid bigint NOT NULL DEFAULT (fw_tier.local_origin()).origin_sysid,
	ADD COLUMN origin_node text NOT NULL DEFAULT (fw_tier.local_origin()).origin_node;
ALTER TABLE fw_tier.calls_dead_letter DROP CONSTRAINT calls_dead_letter_call_id_attempt_key;
ALTER TABLE fw_tier.calls_dead_letter ADD CONSTRAINT calls_dead_letter_origin_key
	UNIQUE (origin_sysid, origin_node, call_id, attempt);

-- A standby's call log, shipped by its fw_tier shipper (src/shipper.c):
-- the records of one batch, checked byte by byte, written like the
-- flusher's (ON CONFLICT DO NOTHING on the key: a batch sent again adds
-- nothing).  Returns the rows inserted.  Whoever may execute it may write
-- call-log rows of any origin but this server's: EXECUTE is granted to
-- nobody; a superuser, or the role fw_tier.log_conninfo logs in as once a
-- superuser ran GRANT EXECUTE (README "Read replicas").
CREATE FUNCTION fw_tier.ingest_calls(origin_sysid bigint, origin_node text, records bytea)
RETURNS bigint
AS 'MODULE_PATHNAME', 'fw_tier_ingest_calls'
LANGUAGE C VOLATILE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION fw_tier.ingest_calls(bigint, text, bytea) FROM PUBLIC;

-- Which server ships under a name: fw_tier.ingest_calls records the node
-- id (pg_fw_tier/node) of the first standby that ships under an origin and
-- refuses another under the same name (two servers given one
-- fw_tier.node_name would otherwise lose rows to ON CONFLICT DO NOTHING).
CREATE TABLE fw_tier.origin_nodes (
	origin_sysid bigint NOT NULL,
	origin_node text NOT NULL,
	node_id text NOT NULL,
	first_shipped timestamptz NOT NULL DEFAULT pg_catalog.now(),
	PRIMARY KEY (origin_sysid, origin_node)
);
REVOKE ALL ON fw_tier.origin_nodes FROM PUBLIC;
-- Not dumped: after a restore the first standby to ship claims its name
-- again.
COMMENT ON TABLE fw_tier.origin_nodes IS
	'the node id that first shipped under each standby origin (fw_tier.ingest_calls refuses another)';

-- (section R, C: central analytics over logical replication)
-- A call is (origin, call_id): call ids of two servers may be equal, so a
-- central database that subscribes to many servers' fw_tier.calls (README
-- "Many servers: one place for spend and 503s") counts calls by origin.
-- Same columns as 0.2's spend_daily: only the calls count changes.
CREATE OR REPLACE VIEW fw_tier.spend_daily WITH (security_invoker = true) AS
SELECT date_trunc('day', c.started_at) AS day,
	   c.workload, c.path, c.model,
	   count(DISTINCT (c.origin_sysid, c.origin_node, c.call_id)) AS calls,
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

-- ---------------------------------------------------------------------
-- Section N: issue 14, continuous enrichment
-- ---------------------------------------------------------------------
-- (section N)

-- ---------------------------------------------------------------------
-- Section P: issue 15, the call log's CPU
-- ---------------------------------------------------------------------
-- (section P)
