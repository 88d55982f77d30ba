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
-- itself; the defaults serve rows inserted by hand.  origin_node is
-- COLLATE "C" (issue 15): the key starts with it, so every insert's
-- descent and uniqueness check compares it, and node names (identifiers,
-- origin.c) need byte order only; equality, hence uniqueness, is the same
-- under any deterministic collation.
ALTER TABLE fw_tier.calls
	ADD COLUMN origin_sysid bigint NOT NULL DEFAULT (fw_tier.local_origin()).origin_sysid,
	ADD COLUMN origin_node text COLLATE "C" NOT NULL DEFAULT (fw_tier.local_origin()).origin_node;
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
	ADD COLUMN origin_node text COLLATE "C" NOT NULL DEFAULT (fw_tier.local_origin()).origin_node;
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
	origin_node text COLLATE "C" NOT NULL,	-- as in fw_tier.calls
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
/*
 * Continuous enrichment (src/enrich.c says how the workers use these).
 *
 * fw_tier.enrichments is the registry (dumped: pg_extension_config_dump).
 * fw_tier.enrich_queue is ONE queue shared by every enrichment of the
 * database, keyed by (enrichment, pk): pk is the row's primary key as a
 * jsonb object {"col": value, ...} (the worker casts ->> back to the
 * key's own type, which is a built-in scalar type, so the lookup uses the
 * table's primary key index and no user code runs).  One table, not one per
 * enrichment: the triggers and the workers run fixed SQL against fixed
 * names, an enrichment is created and dropped without DDL on fw_tier, and
 * the status views are one scan.  A row is enqueued at most once (the
 * key): a row updated twice before it is answered is sent once.
 *
 * Not dumped: the queue (a restore re-enqueues nothing by itself; the
 * rows it would hold have a NULL target, and fw_enrich_resume(name)
 * enqueues those again) and the done counters.
 */
CREATE TABLE fw_tier.enrichments (
	id				integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
	name			text NOT NULL UNIQUE
					CHECK (pg_catalog.octet_length(name) OPERATOR(pg_catalog.>) 0
						   AND pg_catalog.octet_length(name) OPERATOR(pg_catalog.<) 64),
	source			regclass NOT NULL,
	target_column	name NOT NULL,
	prompt			text NOT NULL,
	columns			name[] NOT NULL,	-- referenced by the prompt, in order
	key_columns		name[] NOT NULL,	-- the source's primary key
	workload		text NOT NULL,
	options			jsonb NOT NULL,		-- as given to fw_enrich_create
	kind			text NOT NULL
					CHECK (kind OPERATOR(pg_catalog.=) ANY (ARRAY['complete', 'json', 'embed']::pg_catalog.text[])),
	max_attempts	integer NOT NULL
					CHECK (max_attempts OPERATOR(pg_catalog.>=) 1 AND max_attempts OPERATOR(pg_catalog.<=) 100),
	owner			regrole NOT NULL,	-- the creating role: the worker writes as it (dumped by name)
	paused			boolean NOT NULL DEFAULT false,
	created_at		timestamptz NOT NULL DEFAULT pg_catalog.now()
);
SELECT pg_catalog.pg_extension_config_dump('fw_tier.enrichments', '');
SELECT pg_catalog.pg_extension_config_dump('fw_tier.enrichments_id_seq', '');
-- the sequence too: a database owner who is no superuser dumps them (README)
GRANT SELECT ON fw_tier.enrichments, fw_tier.enrichments_id_seq TO PUBLIC;

CREATE TABLE fw_tier.enrich_queue (
	enrichment		integer NOT NULL REFERENCES fw_tier.enrichments (id) ON DELETE CASCADE,
	pk				jsonb NOT NULL,
	state			text NOT NULL DEFAULT 'queued'
					CHECK (state OPERATOR(pg_catalog.=) ANY (ARRAY['queued', 'in_flight', 'dead']::pg_catalog.text[])),
	queued_at		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	not_before		timestamptz NOT NULL DEFAULT '-infinity',
	attempts		integer NOT NULL DEFAULT 0,
	last_error		text,
	claimed_by		integer,			-- in_flight: the worker's pid
	claimed_at		timestamptz,
	answer			text,				-- paid for, not yet written back
	answer_md5		text,				-- md5 of the prompt it answers
	PRIMARY KEY (enrichment, pk)
);

-- answers written, in 10-second buckets (done, rate_per_min)
CREATE TABLE fw_tier.enrich_done (
	enrichment		integer NOT NULL REFERENCES fw_tier.enrichments (id) ON DELETE CASCADE,
	bucket			timestamptz NOT NULL,
	n				bigint NOT NULL,
	PRIMARY KEY (enrichment, bucket)
);

-- {column} placeholders of a prompt template, in order, each once (C)
CREATE FUNCTION fw_tier.enrich_template_columns(template text)
RETURNS name[]
AS 'MODULE_PATHNAME', 'fw_enrich_template_columns'
LANGUAGE C IMMUTABLE STRICT;

-- the commit of a transaction that enqueued wakes the database's worker
CREATE FUNCTION fw_tier.enrich_notify()
RETURNS void
AS 'MODULE_PATHNAME', 'fw_enrich_notify'
LANGUAGE C VOLATILE;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_notify() FROM PUBLIC;

-- the triggers' check that the columns they were given (by name, in
-- TG_ARGV) still exist: a rename warns and queues nothing, never failing
-- the writer's statement
CREATE FUNCTION fw_tier.enrich_columns_gone(enrichment text, rel oid, cols text[])
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF EXISTS (SELECT 1 FROM pg_catalog.unnest(cols) c
				WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
								   WHERE a.attrelid OPERATOR(pg_catalog.=) rel
									 AND a.attname OPERATOR(pg_catalog.=) c
									 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped)) THEN
		RAISE WARNING 'fw_tier: enrichment % of "%" names a column that no longer exists; nothing queued',
			enrichment, (SELECT r.relname FROM pg_catalog.pg_class r WHERE r.oid OPERATOR(pg_catalog.=) rel)
			USING HINT = 'A column was renamed: fw_enrich_drop and fw_enrich_create it again.';
		RETURN true;
	END IF;
	RETURN false;
END
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_columns_gone(text, oid, text[]) FROM PUBLIC;

/*
 * The triggers only enqueue.  INSERT: a statement trigger over the
 * transition table.  With a one-column key that has min/max (int, bigint,
 * text, ...: mode 'range') it enqueues ONE item per statement, the key
 * range [min, max] of the rows inserted with a NULL target, as a jsonb
 * array (a row's key is an object, so the two never collide); a worker
 * expands it into one item per row of that range whose target is still
 * NULL (src/enrich.c), so a COPY of 100,000 rows costs the writer one scan
 * of its transition table and one queue row.  Other keys (mode 'rows'):
 * one INSERT ... SELECT of the rows' keys per statement.  Rows inserted
 * with a target already set are not enqueued (a restore of an enriched
 * table pays nothing).  UPDATE: a row trigger, AFTER UPDATE OF the
 * referenced columns with a WHEN clause comparing them, so an UPDATE that
 * changes none of them (the workers' own write-back among them) never
 * calls the function.  SECURITY DEFINER: writers of the table cannot
 * write the queue themselves; so they read only the key columns (built-in
 * types: no user cast or CHECK runs) and the target's IS NULL.  TG_ARGV: enrichment id, target column,
 * (INSERT only) the mode, then the key columns.
 */
CREATE FUNCTION fw_tier.enrich_enqueue_insert()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	keyexpr	text;
	lo		jsonb;
	hi		jsonb;
	n		bigint;
BEGIN
	-- a column the enrichment names was renamed: never fail the writer
	IF fw_tier.enrich_columns_gone(TG_ARGV[0], TG_RELID, TG_ARGV[1:1] || TG_ARGV[3:]) THEN
		RETURN NULL;
	END IF;
	IF TG_ARGV[2] = 'range' THEN
		EXECUTE pg_catalog.format(
			'SELECT pg_catalog.to_jsonb(pg_catalog.min(n.%1$I)), pg_catalog.to_jsonb(pg_catalog.max(n.%1$I))
			   FROM fw_enrich_new n WHERE n.%2$I IS NULL',
			TG_ARGV[3], TG_ARGV[1])
		  INTO lo, hi;
		IF lo IS NULL THEN
			RETURN NULL;
		END IF;
		INSERT INTO fw_tier.enrich_queue AS q (enrichment, pk)
		VALUES (TG_ARGV[0]::integer,
				pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(TG_ARGV[3], lo),
											 pg_catalog.jsonb_build_object(TG_ARGV[3], hi)))
		ON CONFLICT (enrichment, pk) DO NOTHING;
		PERFORM fw_tier.enrich_notify();
		RETURN NULL;
	END IF;
	SELECT pg_catalog.string_agg(pg_catalog.format('%L, n.%I', k, k), ', ')
	  INTO keyexpr
	  FROM pg_catalog.unnest(TG_ARGV[3:]) k;
	EXECUTE pg_catalog.format(
		'INSERT INTO fw_tier.enrich_queue (enrichment, pk)
		 SELECT $1, pg_catalog.jsonb_build_object(%s) FROM fw_enrich_new n WHERE n.%I IS NULL
		 ON CONFLICT (enrichment, pk) DO UPDATE
		   SET state = CASE WHEN fw_tier.enrich_queue.state = ''in_flight'' THEN ''in_flight'' ELSE ''queued'' END,
		       attempts = 0, not_before = ''-infinity'', last_error = NULL',
		keyexpr, TG_ARGV[1])
	  USING TG_ARGV[0]::integer;
	GET DIAGNOSTICS n = ROW_COUNT;
	IF n > 0 THEN
		PERFORM fw_tier.enrich_notify();
	END IF;
	RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_enqueue_insert() FROM PUBLIC;

CREATE FUNCTION fw_tier.enrich_enqueue_update()
RETURNS trigger
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	k	jsonb;
BEGIN
	-- a key column was renamed: never fail the writer
	IF fw_tier.enrich_columns_gone(TG_ARGV[0], TG_RELID, TG_ARGV[2:]) THEN
		RETURN NULL;
	END IF;
	-- the key columns only (built-in types, enrich_install): never
	-- to_jsonb(NEW), which would run a cast of any other column's type
	EXECUTE (SELECT pg_catalog.format('SELECT pg_catalog.jsonb_build_object(%s)',
									  pg_catalog.string_agg(pg_catalog.format('%L, ($1).%I', c, c), ', '))
			   FROM pg_catalog.unnest(TG_ARGV[2:]) c)
	  INTO k USING NEW;
	INSERT INTO fw_tier.enrich_queue AS q (enrichment, pk)
	VALUES (TG_ARGV[0]::integer, k)
	ON CONFLICT (enrichment, pk) DO UPDATE
	  SET state = CASE WHEN q.state = 'in_flight' THEN 'in_flight' ELSE 'queued' END,
		  attempts = 0, not_before = '-infinity', last_error = NULL;
	PERFORM fw_tier.enrich_notify();
	RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_enqueue_update() FROM PUBLIC;

-- enqueue the rows whose target is NULL (create, resume); ONLY: the
-- triggers are on this table, not its children (a child may be a foreign
-- table, whose FDW must not run as the extension's owner); it reads the
-- key (built-in types) and the target's nullness, nothing else
CREATE FUNCTION fw_tier.enrich_backfill(e fw_tier.enrichments)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	keyexpr	text;
	n		bigint;
BEGIN
	SELECT pg_catalog.string_agg(pg_catalog.format('%L, t.%I', k, k), ', ')
	  INTO keyexpr
	  FROM pg_catalog.unnest(e.key_columns) k;
	EXECUTE pg_catalog.format(
		'INSERT INTO fw_tier.enrich_queue (enrichment, pk)
		 SELECT $1, pg_catalog.jsonb_build_object(%s) FROM ONLY %s t WHERE t.%I IS NULL
		 ON CONFLICT (enrichment, pk) DO NOTHING',
		keyexpr, e.source, e.target_column)
	  USING e.id;
	GET DIAGNOSTICS n = ROW_COUNT;
	IF n > 0 THEN
		PERFORM fw_tier.enrich_notify();
	END IF;
	RETURN n;
END
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_backfill(fw_tier.enrichments) FROM PUBLIC;

/*
 * fw_enrich_create's body, run as the extension's owner by the C entry
 * point, which passes the calling role (GetUserId()) as caller.  Checks
 * everything before it writes; names are quoted with %I, values are
 * parameters; the prompt is never part of any SQL text.
 */
CREATE FUNCTION fw_tier.enrich_install(caller oid, ename text, src regclass,
									   target name, template text,
									   wl text, opts jsonb)
RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	rel		pg_catalog.pg_class;
	cols	name[];
	keys	name[];
	c		name;
	k		text;
	maxatt	integer;
	e		fw_tier.enrichments;
	ttype	oid;
	atype	oid;
	watched	name[];
BEGIN
	IF ename IS NULL OR src IS NULL OR target IS NULL OR template IS NULL
	   OR wl IS NULL OR opts IS NULL THEN
		RAISE EXCEPTION 'fw_enrich_create: no argument may be NULL' USING ERRCODE = '22004';
	END IF;
	IF pg_catalog.octet_length(ename) NOT BETWEEN 1 AND 63 THEN
		RAISE EXCEPTION 'enrichment name must be 1 to 63 bytes' USING ERRCODE = '22023';
	END IF;
	IF pg_catalog.jsonb_typeof(opts) <> 'object' THEN
		RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = '22023';
	END IF;
	SELECT * INTO rel FROM pg_catalog.pg_class WHERE oid = src;
	IF rel.relkind <> 'r' THEN
		RAISE EXCEPTION 'enrichment source "%" is not a table', src
			USING ERRCODE = '42809', DETAIL = 'Only ordinary tables take an enrichment.';
	END IF;
	-- a worker cannot see another session's temporary table
	IF rel.relpersistence = 't' THEN
		RAISE EXCEPTION 'enrichment source "%" is a temporary table', src
			USING ERRCODE = '42809', DETAIL = 'The workers cannot read another session''s temporary tables.';
	END IF;
	cols := fw_tier.enrich_template_columns(template);	-- 22023 on bad syntax
	IF pg_catalog.cardinality(cols) = 0 THEN
		RAISE EXCEPTION 'the prompt template names no column'
			USING ERRCODE = '22023', HINT = 'Write {column} where a column''s value goes, {{ and }} for literal braces.';
	END IF;
	SELECT pg_catalog.array_agg(a.attname ORDER BY x.n) INTO keys
	  FROM pg_catalog.pg_index i,
		   pg_catalog.unnest(i.indkey) WITH ORDINALITY x(attnum, n),
		   pg_catalog.pg_attribute a
	 WHERE i.indrelid = src AND i.indisprimary
	   AND a.attrelid = src AND a.attnum = x.attnum;
	IF keys IS NULL THEN
		RAISE EXCEPTION 'enrichment source "%" has no primary key', src
			USING ERRCODE = '55000',
				  DETAIL = 'The queue names rows by their primary key.',
				  HINT = 'Add a primary key to the table.';
	END IF;
	/*
	 * The key's values are turned into jsonb (triggers, backfill) and back
	 * (worker) by the extension's owner: only built-in scalar types, whose
	 * conversions and operators run no user code (a user type's cast to
	 * json, an enum's, a domain's CHECK would run as a superuser).
	 */
	SELECT a.attname, a.atttypid::regtype INTO c, atype
	  FROM pg_catalog.pg_attribute a, pg_catalog.pg_type t
	 WHERE a.attrelid = src AND a.attname = ANY (keys) AND t.oid = a.atttypid
	   AND NOT (t.oid < 16384 AND t.typtype = 'b' AND t.typcategory <> 'A'
				AND t.typnamespace = 'pg_catalog'::regnamespace)
	 LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'primary key column "%" of "%" has type %, which an enrichment cannot key on', c, src, atype::regtype
			USING ERRCODE = '0A000',
				  DETAIL = 'The key columns must be of built-in scalar types (no domain, enum, array, composite or extension type).';
	END IF;
	FOREACH c IN ARRAY cols || ARRAY[target] LOOP
		IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
						WHERE attrelid = src AND attname = c AND attnum > 0 AND NOT attisdropped) THEN
			RAISE EXCEPTION 'column "%" of relation "%" does not exist', c, src
				USING ERRCODE = '42703';
		END IF;
	END LOOP;
	IF target = ANY (cols) OR target = ANY (keys) THEN
		RAISE EXCEPTION 'the target column "%" must not be named by the prompt or be part of the primary key', target
			USING ERRCODE = '22023';
	END IF;
	SELECT atttypid INTO ttype FROM pg_catalog.pg_attribute WHERE attrelid = src AND attname = target;

	-- privileges: the table's owner, or UPDATE on the target and SELECT on what is read
	IF NOT pg_catalog.pg_has_role(caller, rel.relowner, 'USAGE') THEN
		IF NOT pg_catalog.has_column_privilege(caller, src, target::text, 'UPDATE') THEN
			RAISE EXCEPTION 'permission denied to enrich column "%" of "%"', target, src
				USING ERRCODE = '42501',
					  DETAIL = 'Creating an enrichment takes ownership of the table, or UPDATE on the target column and SELECT on the columns the prompt and the primary key name.';
		END IF;
		FOREACH c IN ARRAY cols || keys LOOP
			IF NOT pg_catalog.has_column_privilege(caller, src, c::text, 'SELECT') THEN
				RAISE EXCEPTION 'permission denied to read column "%" of "%"', c, src
					USING ERRCODE = '42501';
			END IF;
		END LOOP;
	END IF;

	-- no DDL under us from here; taken after the checks, so that a role
	-- without rights never queues for a lock on someone else's table
	EXECUTE pg_catalog.format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', src);

	k := coalesce(opts ->> 'kind', 'complete');
	IF k NOT IN ('complete', 'json', 'embed') THEN
		RAISE EXCEPTION 'unsupported enrichment kind "%"', k
			USING ERRCODE = '22023', HINT = 'Use "complete", "json" or "embed".';
	END IF;
	-- the answer is assigned to the target: the type must take it
	atype := CASE k WHEN 'json' THEN 'jsonb'::regtype WHEN 'embed' THEN 'real[]'::regtype
					ELSE 'text'::regtype END;
	IF NOT (ttype = atype
			OR (SELECT typcategory FROM pg_catalog.pg_type WHERE oid = ttype) = 'S'
			OR EXISTS (SELECT 1 FROM pg_catalog.pg_cast
						WHERE castsource = atype AND casttarget = ttype AND castcontext IN ('a', 'i'))) THEN
		RAISE EXCEPTION 'kind "%" cannot write column "%" of type %', k, target, ttype::regtype
			USING ERRCODE = '42804',
				  HINT = 'complete writes text, json jsonb, embed real[] (or pgvector''s vector).';
	END IF;
	IF k = 'json' THEN
		IF NOT opts ? 'schema' THEN
			RAISE EXCEPTION 'kind "json" needs options.schema' USING ERRCODE = '22023';
		END IF;
		PERFORM fw_tier.json_options(opts -> 'schema');	-- checks the schema
	END IF;
	BEGIN
		maxatt := coalesce((opts ->> 'max_attempts')::integer, 5);
	EXCEPTION WHEN others THEN
		RAISE EXCEPTION 'options.max_attempts must be an integer' USING ERRCODE = '22023';
	END;
	IF maxatt NOT BETWEEN 1 AND 100 THEN
		RAISE EXCEPTION 'options.max_attempts must be between 1 and 100' USING ERRCODE = '22023';
	END IF;
	-- the worker reads these as int4: checked here, not at every claim
	FOREACH c IN ARRAY ARRAY['chunk', 'concurrency']::name[] LOOP
		IF opts ? c THEN
			BEGIN
				maxatt := (opts ->> c)::integer;
			EXCEPTION WHEN others THEN
				maxatt := NULL;
			END;
			IF maxatt IS NULL OR maxatt NOT BETWEEN 1 AND 10000 THEN
				RAISE EXCEPTION 'options.% must be an integer between 1 and 10000', c USING ERRCODE = '22023';
			END IF;
		END IF;
	END LOOP;
	maxatt := coalesce((opts ->> 'max_attempts')::integer, 5);
	IF NOT EXISTS (SELECT 1 FROM fw_tier.workloads w WHERE w.workload = wl) THEN
		RAISE EXCEPTION 'workload "%" does not exist', wl USING ERRCODE = '22023';
	END IF;
	IF EXISTS (SELECT 1 FROM fw_tier.enrichments x WHERE x.name = ename) THEN
		RAISE EXCEPTION 'enrichment "%" already exists', ename USING ERRCODE = '42710';
	END IF;

	INSERT INTO fw_tier.enrichments (name, source, target_column, prompt, columns,
									 key_columns, workload, options, kind,
									 max_attempts, owner)
	VALUES (ename, src, target, template, cols, keys, wl, opts, k, maxatt, caller::regrole)
	RETURNING * INTO e;

	EXECUTE pg_catalog.format(
		'CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS fw_enrich_new
		 FOR EACH STATEMENT EXECUTE FUNCTION fw_tier.enrich_enqueue_insert(%L, %L, %L, %s)',
		'fw_enrich_' || e.id || '_insert', src, e.id, target,
		CASE WHEN pg_catalog.cardinality(keys) = 1 AND EXISTS (
				SELECT 1 FROM pg_catalog.pg_proc p, pg_catalog.pg_attribute a
				 WHERE a.attrelid = src AND a.attname = keys[1]
				   AND p.proname = 'min' AND p.prokind = 'a'
				   AND p.pronamespace = 'pg_catalog'::regnamespace
				   AND p.proargtypes[0] = a.atttypid)
			 THEN 'range' ELSE 'rows' END,
		(SELECT pg_catalog.string_agg(pg_catalog.quote_literal(x), ', ') FROM pg_catalog.unnest(keys) x));
	-- what the trigger watches: the prompt's columns and the key, each once
	watched := ARRAY(SELECT DISTINCT x FROM pg_catalog.unnest(cols || keys) x ORDER BY x);
	EXECUTE pg_catalog.format(
		'CREATE TRIGGER %I AFTER UPDATE OF %s ON %s FOR EACH ROW
		 WHEN (ROW(%s)::pg_catalog.text IS DISTINCT FROM ROW(%s)::pg_catalog.text)
		 EXECUTE FUNCTION fw_tier.enrich_enqueue_update(%L, %L, %s)',
		'fw_enrich_' || e.id || '_update',
		(SELECT pg_catalog.string_agg(pg_catalog.quote_ident(x), ', ') FROM pg_catalog.unnest(watched) x),
		src,
		(SELECT pg_catalog.string_agg('OLD.' || pg_catalog.quote_ident(x), ', ') FROM pg_catalog.unnest(watched) x),
		(SELECT pg_catalog.string_agg('NEW.' || pg_catalog.quote_ident(x), ', ') FROM pg_catalog.unnest(watched) x),
		e.id, target,
		(SELECT pg_catalog.string_agg(pg_catalog.quote_literal(x), ', ') FROM pg_catalog.unnest(keys) x));
	PERFORM fw_tier.enrich_backfill(e);
	RETURN e.id;
END
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_install(oid, text, regclass, name, text, text, jsonb) FROM PUBLIC;

-- drop, pause, resume, retry: run as the extension's owner by the C entry
-- points, for the enrichment's owner, the table's owner or a superuser
CREATE FUNCTION fw_tier.enrich_manage(caller oid, action text, ename text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	e		fw_tier.enrichments;
	n		bigint := 0;
	present	boolean;
BEGIN
	IF ename IS NULL THEN
		RAISE EXCEPTION 'enrichment name must not be NULL' USING ERRCODE = '22004';
	END IF;
	-- no row lock yet: the rights first (nobody queues for someone else's
	-- locks), then the table before the registry row, the order a writer
	-- takes them (its trigger's queue insert takes FOR KEY SHARE of it)
	SELECT * INTO e FROM fw_tier.enrichments WHERE name = ename;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'enrichment "%" does not exist', ename USING ERRCODE = '42704';
	END IF;
	IF NOT (pg_catalog.pg_has_role(caller, e.owner, 'USAGE')
			OR pg_catalog.pg_has_role(caller, (SELECT relowner FROM pg_catalog.pg_class WHERE oid = e.source), 'USAGE')) THEN
		RAISE EXCEPTION 'must be the owner of enrichment "%" or of its table', ename
			USING ERRCODE = '42501';
	END IF;
	IF action = 'drop' THEN
		-- a table gone without an event trigger (a temporary table at the
		-- end of its session) leaves a dangling regclass: no triggers to drop
		present := EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = e.source);
		IF present THEN
			EXECUTE pg_catalog.format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', e.source);	-- DROP TRIGGER's
		END IF;
	END IF;
	-- NO KEY UPDATE: compatible with the FOR KEY SHARE of writers' queue inserts
	SELECT * INTO e FROM fw_tier.enrichments WHERE id = e.id FOR NO KEY UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'enrichment "%" does not exist', ename USING ERRCODE = '42704';
	END IF;
	IF action = 'drop' THEN
		IF present THEN
			EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', 'fw_enrich_' || e.id || '_insert', e.source);
			EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', 'fw_enrich_' || e.id || '_update', e.source);
		END IF;
		DELETE FROM fw_tier.enrichments WHERE id = e.id;	-- the queue goes with it
	ELSIF action = 'pause' THEN
		UPDATE fw_tier.enrichments SET paused = true WHERE id = e.id;
	ELSIF action = 'resume' THEN
		UPDATE fw_tier.enrichments SET paused = false WHERE id = e.id;
		n := fw_tier.enrich_backfill(e);
		PERFORM fw_tier.enrich_notify();
	ELSIF action = 'retry' THEN
		UPDATE fw_tier.enrich_queue
		   SET state = 'queued', attempts = 0, not_before = '-infinity'
		 WHERE enrichment = e.id AND state = 'dead';
		GET DIAGNOSTICS n = ROW_COUNT;
		PERFORM fw_tier.enrich_notify();
	ELSE
		RAISE EXCEPTION 'unknown action "%"', action USING ERRCODE = '22023';
	END IF;
	RETURN n;
END
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_manage(oid, text, text) FROM PUBLIC;

CREATE FUNCTION fw_enrich_create(name text, source regclass, target_column name,
								 prompt text, workload text DEFAULT 'batch',
								 options jsonb DEFAULT '{}')
RETURNS integer
AS 'MODULE_PATHNAME', 'fw_enrich_create'
LANGUAGE C VOLATILE;
CREATE FUNCTION fw_enrich_drop(name text) RETURNS void
AS 'MODULE_PATHNAME', 'fw_enrich_drop' LANGUAGE C VOLATILE;
CREATE FUNCTION fw_enrich_pause(name text) RETURNS void
AS 'MODULE_PATHNAME', 'fw_enrich_pause' LANGUAGE C VOLATILE;
CREATE FUNCTION fw_enrich_resume(name text) RETURNS bigint
AS 'MODULE_PATHNAME', 'fw_enrich_resume' LANGUAGE C VOLATILE;
CREATE FUNCTION fw_enrich_retry(name text) RETURNS bigint
AS 'MODULE_PATHNAME', 'fw_enrich_retry' LANGUAGE C VOLATILE;
REVOKE EXECUTE ON FUNCTION fw_enrich_create(text, regclass, name, text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_enrich_drop(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_enrich_pause(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_enrich_resume(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION fw_enrich_retry(text) FROM PUBLIC;

-- a dropped source table (or one of its columns an enrichment names)
-- takes its enrichments along, queue included
CREATE FUNCTION fw_tier.enrich_sql_drop()
RETURNS event_trigger
LANGUAGE plpgsql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	e	record;
BEGIN
	FOR e IN
		SELECT x.id, x.source, d.objsubid = 0 AS table_gone
		  FROM fw_tier.enrichments x,
			   pg_catalog.pg_event_trigger_dropped_objects() d
		 WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = x.source
		   AND (d.objsubid = 0 OR EXISTS (
				SELECT 1 FROM pg_catalog.unnest(x.columns || x.key_columns || x.target_column) c
				 WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
									WHERE a.attrelid = x.source AND a.attname = c
									  AND NOT a.attisdropped)))
	LOOP
		IF NOT e.table_gone THEN
			-- a column it names is gone: its triggers must not enqueue for nobody
			EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', 'fw_enrich_' || e.id || '_insert', e.source);
			EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', 'fw_enrich_' || e.id || '_update', e.source);
		END IF;
		DELETE FROM fw_tier.enrichments WHERE id = e.id;
	END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION fw_tier.enrich_sql_drop() FROM PUBLIC;
CREATE EVENT TRIGGER fw_enrich_sql_drop ON sql_drop
	EXECUTE FUNCTION fw_tier.enrich_sql_drop();

CREATE VIEW fw_tier.enrich_status AS
SELECT e.name,
	   e.source,
	   e.target_column,
	   coalesce(q.queued, 0) AS queued,
	   coalesce(q.in_flight, 0) AS in_flight,
	   coalesce(d.done, 0) AS done,
	   coalesce(q.failed, 0) AS failed,
	   coalesce(d.last_minute, 0) AS rate_per_min,
	   pg_catalog.now() OPERATOR(pg_catalog.-) q.oldest AS oldest_queued_age,
	   e.paused
FROM fw_tier.enrichments e
	 LEFT JOIN LATERAL (
		SELECT pg_catalog.count(*) FILTER (WHERE x.state OPERATOR(pg_catalog.=) 'queued') AS queued,
			   pg_catalog.count(*) FILTER (WHERE x.state OPERATOR(pg_catalog.=) 'in_flight') AS in_flight,
			   pg_catalog.count(*) FILTER (WHERE x.state OPERATOR(pg_catalog.=) 'dead') AS failed,
			   pg_catalog.min(x.queued_at) FILTER (WHERE x.state OPERATOR(pg_catalog.<>) 'dead') AS oldest
		  FROM fw_tier.enrich_queue x
		 WHERE x.enrichment OPERATOR(pg_catalog.=) e.id) q ON true
	 LEFT JOIN LATERAL (
		SELECT pg_catalog.sum(y.n) AS done,
			   pg_catalog.sum(y.n) FILTER (WHERE y.bucket OPERATOR(pg_catalog.>=)
						(pg_catalog.now() OPERATOR(pg_catalog.-) '60 seconds'::pg_catalog.interval)) AS last_minute
		  FROM fw_tier.enrich_done y
		 WHERE y.enrichment OPERATOR(pg_catalog.=) e.id) d ON true;
GRANT SELECT ON fw_tier.enrich_status TO PUBLIC;

-- items that failed max_attempts times, for their owners (and members)
CREATE VIEW fw_tier.enrich_dead_letters AS
SELECT e.name, q.pk, q.attempts, q.last_error, q.queued_at
FROM fw_tier.enrich_queue q
	 JOIN fw_tier.enrichments e ON e.id OPERATOR(pg_catalog.=) q.enrichment
WHERE q.state OPERATOR(pg_catalog.=) 'dead'
  AND pg_catalog.pg_has_role(e.owner, 'USAGE');
GRANT SELECT ON fw_tier.enrich_dead_letters TO PUBLIC;

-- ---------------------------------------------------------------------
-- Section P: issue 15, the call log's CPU
-- ---------------------------------------------------------------------
-- (section P)
-- fw_tier.calls.origin_node and calls_dead_letter.origin_node are
-- COLLATE "C", declared where section R adds them: spend_daily (section R)
-- depends on the column, and ALTER COLUMN ... TYPE refuses a column a view
-- uses.
