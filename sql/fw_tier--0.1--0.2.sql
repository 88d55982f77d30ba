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

-- (section B)

-- ---------------------------------------------------------------------
-- Section C: the engine
-- ---------------------------------------------------------------------

-- (section C)

-- ---------------------------------------------------------------------
-- Section D: per-database escalation state, per-role keys, fixtures
-- ---------------------------------------------------------------------

-- (section D)
