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
DROP INDEX fw_tier.calls_started_at_idx;
CREATE INDEX calls_started_at_idx ON fw_tier.calls USING brin (started_at);

-- The flusher prices rows from a cache of fw_tier.prices (src/prices.c);
-- row changes do not invalidate it by themselves, this trigger does (the
-- same C function as workloads_changed).  ENABLE ALWAYS: a replication
-- apply (session_replication_role = replica) changes prices too.
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

-- ---------------------------------------------------------------------
-- Section C: issue 16, window policy probe
-- ---------------------------------------------------------------------
-- (section C)

-- ---------------------------------------------------------------------
-- Section D: issue 13, budgets
-- ---------------------------------------------------------------------
-- (section D)

-- ---------------------------------------------------------------------
-- Section L: issue 15, prices a newcomer can see (unpriced_models)
-- ---------------------------------------------------------------------
-- (section L)
