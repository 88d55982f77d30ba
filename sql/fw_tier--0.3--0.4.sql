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
-- (section R)

-- ---------------------------------------------------------------------
-- Section N: issue 14, continuous enrichment
-- ---------------------------------------------------------------------
-- (section N)

-- ---------------------------------------------------------------------
-- Section P: issue 15, the call log's CPU
-- ---------------------------------------------------------------------
-- (section P)
