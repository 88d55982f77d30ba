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
-- (section C)

-- ---------------------------------------------------------------------
-- Section D: issue 13, budgets
-- ---------------------------------------------------------------------
-- (section D)

-- ---------------------------------------------------------------------
-- Section L: issue 15, prices a newcomer can see (unpriced_models)
-- ---------------------------------------------------------------------
-- (section L)
