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
-- (section C)

-- ---------------------------------------------------------------------
-- Section D: issue 13, budgets
-- ---------------------------------------------------------------------
-- (section D)

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
		   ('{ok,rate_limited,overloaded,unavailable,client_error,timeout,transport,cancelled,bad_response,unknown}'::pg_catalog.text[]));
COMMENT ON COLUMN fw_tier.calls.outcome IS
	'Class of the attempt (README "Failure classes"); unknown = in flight when its process died, tokens and cost at the worst case';

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
