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
