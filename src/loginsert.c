/*-------------------------------------------------------------------------
 *
 * loginsert.c
 *		Rows of fw_tier.calls from drained call records: the columns, the
 *		multi-insert, the SQL insert it falls back to, the row-by-row
 *		retry and the dead letters.
 *
 * The flusher (flusher.c) copies a batch of records out of the ring or the
 * spill, opens a transaction and hands the batch to fw_loginsert_batch();
 * it commits and moves the tail afterwards.
 *
 * Columns.  fw_call_columns[] below is the one list of fw_tier.calls'
 * columns, in table order: name, type, and how the value comes from the
 * record.  Both insert paths are driven by it.  Adding a column: add it at
 * the end of the table (ALTER TABLE ... ADD COLUMN in the version's SQL
 * script) and one line at the end of fw_call_columns (with its fill
 * function); nothing else.
 *
 * Two ways into the table, chosen per batch:
 *	- the multi-insert (fw_fast_insert), as COPY FROM does it: the rows are
 *	  formed in C, NOT NULL and CHECK constraints enforced (ExecConstraints),
 *	  heap_multi_insert through table_multi_insert, then every index's
 *	  entries (ExecInsertIndexTuples; the primary key's uniqueness is
 *	  checked there).  No SQL, no planner, no executor start-up per batch.
 *	  Only for a table it cannot get wrong (fw_fast_refusal): a plain heap
 *	  whose descriptor is exactly fw_call_columns, with no trigger (a
 *	  user's trigger, a foreign key, a deferrable key all are triggers), no
 *	  rule, and no row-level security that applies to the flusher (it runs
 *	  as the bootstrap superuser, which bypasses RLS in SQL too, so the
 *	  shipped SELECT policy does not stop it).
 *	- the SQL insert (fw_sql_insert): one INSERT ... SELECT FROM ROWS FROM
 *	  (unnest($1), ...) ON CONFLICT (origin_sysid, origin_node, call_id,
 *	  attempt) DO NOTHING, built
 *	  from fw_call_columns, with every function pinned to pg_catalog.
 *	  Used where the multi-insert is not safe (the table changed: the
 *	  SQL insert names its columns, so an added column takes its default
 *	  and triggers fire as for any INSERT), and for every batch that may
 *	  hold rows already written (below).
 *
 * Duplicates.  The primary key (origin_sysid, origin_node, call_id,
 * attempt) is unique (issue 11: the origin makes it unique across servers,
 * origin.c): a row written
 * twice is a unique violation.  Where can a record already be in the
 * table?  The flusher moves the ring's tail only after COMMIT, and (issue
 * 15) a ring batch commits with synchronous_commit off, its tail move
 * waiting until the WAL is flushed past its commit record: a crash leaves
 * in the ring both committed records (durable, the move not yet made) and
 * records whose commit was lost with the WAL not yet flushed; the next
 * flusher reads all of them again from the same tail.  The flusher
 * decides (flusher.c, at the may_repeat of fw_flusher_drain_batch) and
 * passes may_repeat:
 *	- records the ring held when this flusher process started (below the
 *	  head it saw then) were read by earlier processes: they may be in the
 *	  table, until a batch of them, written with the conflict check, has
 *	  inserted a row.  The records in the table are a prefix of the ring's
 *	  order: batches are contiguous from the tail and commit in order, and
 *	  the WAL is flushed in order, so what a crash keeps of the commits
 *	  (those flushed) is a prefix of them.  After the first record not yet
 *	  in the table, none is.  Every record whose tail move was waiting at
 *	  the crash is at or above the tail, below that head: covered.  After
 *	  a process crash the check may span the batches whose moves waited;
 *	  after an operating-system crash the tail on disk may lag by more,
 *	  hence the rule;
 *	- records pushed after the flusher started were never read by another
 *	  process; this one writes each once (it reads the next batch after
 *	  the moves that wait, never the same records again), unless an error
 *	  hit between a COMMIT and the batch being queued for its tail move
 *	  (fw_advance_pending in flusher.c): then the next batch, read from the
 *	  same place, is checked;
 *	- the spill: its read position (spill.read) is written after the
 *	  commit and may lag or be missing after a crash (the oldest segment
 *	  is then read from its start): spill batches are checked, by the
 *	  same prefix rule, until one has inserted a row.
 * A batch that may repeat takes the SQL insert, whose ON CONFLICT skips
 * what is there.  Should the multi-insert still meet a unique violation
 * (a row inserted by hand, a ring file set back by a restore), the batch
 * is written again the SQL way: a duplicate costs a retry, never a dead
 * letter or a lost row.
 *
 * Failures.  When a batch fails with an error that may be about a row, it
 * is retried row by row (a subtransaction each), and the rows that still
 * fail go to fw_tier.calls_dead_letter (or, if even that fails, the
 * dead-letter file) while the rest lands.  An error about the environment
 * (or the same error for every row: the table, not the rows) is raised
 * again: the flusher keeps the records and backs off.
 *
 * Every value from the record is untrusted (another process wrote it, the
 * ring file may be damaged): strings are terminated, text in another
 * encoding is made safe, enums are checked.
 *
 * Locking: RowExclusiveLock on fw_tier.calls (taken under the flusher's
 * lock_timeout, held to COMMIT), which also keeps the table's definition
 * from changing between the refusal check and the insert; no LWLock.
 *
 * Origin (issue 11).  The flusher's rows are this server's: origin_sysid
 * and origin_node come from origin.c.  fw_tier.ingest_calls (shipper.c)
 * writes a standby's records through the same path, after
 * fw_loginsert_set_origin() named the standby.
 *
 * Called by: flusher.c (fw_loginsert_batch; fw_loginsert_reset after
 * an aborted transaction); shipper.c's fw_tier.ingest_calls on a primary
 * (fw_loginsert_set_origin, then fw_loginsert_batch).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_type.h"
#include "common/string.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "nodes/makefuncs.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "worker.h"

/* One record on its way to a row: what the fill functions read. */
typedef struct FwRow
{
	FwDrainedRecord *d;
	FwCallRecord *r;
	FwPath		path;			/* checked */
	FwOutcome	outcome;		/* checked */
	char	   *model;			/* the model column's text (cleaned) */
} FwRow;

typedef Datum (*FwColFill) (FwRow *row, bool *isnull);

typedef struct FwCallColumn
{
	const char *name;			/* attribute of fw_tier.calls */
	Oid			typid;			/* its type */
	FwColFill	fill;			/* its value for a record */
} FwCallColumn;

static FwDrainedRecord *fw_batch = NULL;	/* the batch being written */
/* issue 11: the batch's origin (fw_loginsert_set_origin; unset = local) */
static bool fw_origin_set = false;
static int64 fw_origin_set_sysid = 0;
static char fw_origin_set_node[FW_NODELEN];
static int64 fw_batch_sysid = 0;
static Datum fw_batch_node = (Datum) 0;
static SPIPlanPtr fw_insert_plan = NULL;
static Datum *fw_col_values = NULL; /* [column][row], for the SQL insert */
static bool *fw_col_nulls = NULL;
static char fw_refusal_said[FW_ERRLEN];	/* why the multi-insert is not
										 * used, as last logged */

/*
 * The multi-insert's slots, made once: a slot of the relation's own
 * descriptor pins it in the transaction's resource owner, a thousand pins
 * and releases per batch.  Their descriptor is a copy (not reference
 * counted) of the table's, which fw_fast_refusal has found to be exactly
 * fw_call_columns (names, types, no typmod), so any copy is the same.
 */
static TupleDesc fw_slot_desc = NULL;
static TupleTableSlot *fw_slots[FW_BATCH_MAX];


/*
 * Text for a column: the writer's database may use another encoding;
 * non-ASCII bytes we cannot vouch for become '?'.  s itself when it can
 * be stored as is, else a cleaned copy.
 */
static char *
fw_clean_text(const char *s, int encoding)
{
	char	   *copy;

	if (pg_is_ascii(s) ||
		(encoding == GetDatabaseEncoding() &&
		 pg_verify_mbstr(encoding, s, strlen(s), true)))
		return unconstify(char *, s);
	copy = pstrdup(s);
	for (char *p = copy; *p; p++)
		if (IS_HIGHBIT_SET(*p))
			*p = '?';
	return copy;
}

static Datum
fw_text_datum(const char *s, int encoding, bool empty_is_null, bool *isnull)
{
	*isnull = false;
	if (s == NULL || (empty_is_null && s[0] == '\0'))
	{
		*isnull = true;
		return (Datum) 0;
	}
	return CStringGetTextDatum(fw_clean_text(s, encoding));
}

/*
 * A name column (database, username) from the writer's bytes, cleaned as
 * fw_text_datum cleans text: a name in another encoding (or damaged)
 * must not become an invalid string in this database.
 */
static Datum
fw_name_datum(const NameData *src, int encoding)
{
	NameData   *dst = palloc0(sizeof(NameData));
	const char *s = NameStr(*src);
	int			len = strnlen(s, NAMEDATALEN - 1);

	memcpy(NameStr(*dst), s, len);
	if (!(pg_is_ascii(NameStr(*dst)) ||
		  (encoding == GetDatabaseEncoding() &&
		   pg_verify_mbstr(encoding, NameStr(*dst), len, true))))
	{
		for (char *p = NameStr(*dst); *p; p++)
			if (IS_HIGHBIT_SET(*p))
				*p = '?';
	}
	return NameGetDatum(dst);
}

/*
 * Values that repeat from row to row, made once (issue 15: a text datum
 * is a palloc and a copy, a name a 64-byte palloc0 and a scan, for every
 * row): the enum columns' few texts, and the last database, user,
 * workload and model seen with their encoding (a batch is mostly the
 * calls of a few workloads).  In TopMemoryContext; a replaced value is
 * freed only when the next insert starts, the rows before it having been
 * formed (the slots and the SQL insert's arrays copy what they point to).
 */
typedef struct FwLastDatum
{
	bool		valid;
	int			encoding;
	char		key[FW_MODELLEN];	/* the record's bytes; every string
									 * field is at most this long */
	Datum		value;
} FwLastDatum;

static FwLastDatum fw_last_dbname;
static FwLastDatum fw_last_username;
static FwLastDatum fw_last_workload;
static FwLastDatum fw_last_model;
static List *fw_last_retired = NIL;	/* replaced values, freed by the next
										 * insert (fw_last_release) */

/* Free replaced values: called before an insert forms its rows. */
static void
fw_last_release(void)
{
	list_free_deep(fw_last_retired);
	fw_last_retired = NIL;
}

/* a constant text, made on first use */
static Datum
fw_const_text(Datum *cache, const char *s)
{
	if (*cache == (Datum) 0)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		*cache = CStringGetTextDatum(s);
		MemoryContextSwitchTo(old);
	}
	return *cache;
}

/*
 * The datum of record string s (terminated, shorter than FW_MODELLEN):
 * the last one made when s and its encoding are the same, else a new one
 * (is_name: a name column, else text).
 */
static Datum
fw_last_datum(FwLastDatum *c, const char *s, int encoding, bool is_name)
{
	MemoryContext old;
	Datum		v;

	if (c->valid && c->encoding == encoding && strcmp(c->key, s) == 0)
		return c->value;
	old = MemoryContextSwitchTo(TopMemoryContext);
	if (is_name)
		v = fw_name_datum((const NameData *) s, encoding);
	else
	{
		char	   *clean;

		MemoryContextSwitchTo(old);
		clean = fw_clean_text(s, encoding);
		MemoryContextSwitchTo(TopMemoryContext);
		v = CStringGetTextDatum(clean);
	}
	/* earlier rows of this insert may still point at the value it had */
	if (c->valid)
		fw_last_retired = lappend(fw_last_retired, DatumGetPointer(c->value));
	MemoryContextSwitchTo(old);
	c->value = v;
	c->encoding = encoding;
	strlcpy(c->key, s, sizeof(c->key));
	c->valid = true;
	return v;
}

/* -1 (and any negative) is unknown: NULL */
static Datum
fw_int_datum(int32 v, bool *isnull)
{
	*isnull = (v < 0);
	return Int32GetDatum(v);
}

/* microseconds as milliseconds; negative is unknown */
static Datum
fw_ms_datum(int32 us, bool *isnull)
{
	*isnull = (us < 0);
	return Float8GetDatum(us / 1000.0);
}

/* the fill functions, one per column */
static Datum
fw_col_call_id(FwRow *w, bool *isnull)
{
	return Int64GetDatum(w->r->call_id);
}
static Datum
fw_col_attempt(FwRow *w, bool *isnull)
{
	return Int32GetDatum(w->r->attempt);
}
static Datum
fw_col_started_at(FwRow *w, bool *isnull)
{
	return TimestampTzGetDatum(w->r->started_at);
}
static Datum
fw_col_database(FwRow *w, bool *isnull)
{
	return fw_last_datum(&fw_last_dbname, NameStr(w->r->dbname), w->d->encoding, true);
}
static Datum
fw_col_username(FwRow *w, bool *isnull)
{
	return fw_last_datum(&fw_last_username, NameStr(w->r->username), w->d->encoding, true);
}
static Datum
fw_col_workload(FwRow *w, bool *isnull)
{
	return fw_last_datum(&fw_last_workload, w->r->workload, w->d->encoding, false);
}
static Datum
fw_col_path(FwRow *w, bool *isnull)
{
	static Datum texts[FW_NUM_PATHS];

	return fw_const_text(&texts[w->path], fw_path_name(w->path));
}
static Datum
fw_col_model(FwRow *w, bool *isnull)
{
	/* w->model is r->model cleaned, as fw_last_datum cleans it */
	return fw_last_datum(&fw_last_model, w->r->model, w->d->encoding, false);
}
static Datum
fw_col_service_tier(FwRow *w, bool *isnull)
{
	static Datum priority;

	*isnull = !w->r->priority_sent;
	return *isnull ? (Datum) 0 : fw_const_text(&priority, "priority");
}
static Datum
fw_col_escalated(FwRow *w, bool *isnull)
{
	return BoolGetDatum(w->r->escalated);
}
static Datum
fw_col_http_status(FwRow *w, bool *isnull)
{
	*isnull = (w->r->http_status <= 0);
	return Int32GetDatum(w->r->http_status);
}
static Datum
fw_col_outcome(FwRow *w, bool *isnull)
{
	static Datum texts[FW_NUM_OUTCOMES];

	return fw_const_text(&texts[w->outcome], fw_outcome_name(w->outcome));
}
static Datum
fw_col_prompt_tokens(FwRow *w, bool *isnull)
{
	return fw_int_datum(w->r->prompt_tokens, isnull);
}
static Datum
fw_col_cached_prompt_tokens(FwRow *w, bool *isnull)
{
	return fw_int_datum(w->r->cached_prompt_tokens, isnull);
}
static Datum
fw_col_completion_tokens(FwRow *w, bool *isnull)
{
	return fw_int_datum(w->r->completion_tokens, isnull);
}
static Datum
fw_col_latency_ms(FwRow *w, bool *isnull)
{
	return fw_ms_datum(w->r->latency_us, isnull);
}
static Datum
fw_col_ttfb_ms(FwRow *w, bool *isnull)
{
	return fw_ms_datum(w->r->ttfb_us, isnull);
}
static Datum
fw_col_cost_usd(FwRow *w, bool *isnull)
{
	FwCallRecord *r = w->r;

	return fw_price_cost(w->path, w->model, w->outcome, r->replayed,
						 r->prompt_tokens, r->cached_prompt_tokens,
						 r->completion_tokens, isnull);
}
static Datum
fw_col_request_id(FwRow *w, bool *isnull)
{
	return fw_text_datum(w->r->request_id, w->d->encoding, true, isnull);
}
static Datum
fw_col_error(FwRow *w, bool *isnull)
{
	return fw_text_datum(w->r->error, w->d->encoding, true, isnull);
}
static Datum
fw_col_prompt(FwRow *w, bool *isnull)
{
	return fw_text_datum(w->d->prompt, w->d->encoding, false, isnull);
}
static Datum
fw_col_answer(FwRow *w, bool *isnull)
{
	return fw_text_datum(w->d->answer, w->d->encoding, false, isnull);
}
static Datum
fw_col_replayed(FwRow *w, bool *isnull)
{
	return BoolGetDatum(w->r->replayed);
}

/* issue 16: a Standard probe sent during a window */
static Datum
fw_col_probe(FwRow *w, bool *isnull)
{
	return BoolGetDatum(w->r->probe);
}

/* issue 11: the server the call was made on (the batch's origin) */
static Datum
fw_col_origin_sysid(FwRow *w, bool *isnull)
{
	return Int64GetDatum(fw_batch_sysid);
}
static Datum
fw_col_origin_node(FwRow *w, bool *isnull)
{
	return fw_batch_node;
}

/* issue 12: an unknown kind from another process is logged as chat */
static Datum
fw_col_kind(FwRow *w, bool *isnull)
{
	static Datum texts[FW_NUM_KINDS];
	int			k = w->r->kind;

	if (k <= 0 || k >= FW_NUM_KINDS)
		k = FW_KIND_CHAT;
	return fw_const_text(&texts[k], fw_kind_name((FwCallKind) k));
}

/*
 * fw_tier.calls, column by column, in table order.  New columns go at the
 * end, here and in the table (see the header comment).
 */
static const FwCallColumn fw_call_columns[] = {
	{"call_id", INT8OID, fw_col_call_id},
	{"attempt", INT4OID, fw_col_attempt},
	{"started_at", TIMESTAMPTZOID, fw_col_started_at},
	{"database", NAMEOID, fw_col_database},
	{"username", NAMEOID, fw_col_username},
	{"workload", TEXTOID, fw_col_workload},
	{"path", TEXTOID, fw_col_path},
	{"model", TEXTOID, fw_col_model},
	{"service_tier", TEXTOID, fw_col_service_tier},
	{"escalated", BOOLOID, fw_col_escalated},
	{"http_status", INT4OID, fw_col_http_status},
	{"outcome", TEXTOID, fw_col_outcome},
	{"prompt_tokens", INT4OID, fw_col_prompt_tokens},
	{"cached_prompt_tokens", INT4OID, fw_col_cached_prompt_tokens},
	{"completion_tokens", INT4OID, fw_col_completion_tokens},
	{"latency_ms", FLOAT8OID, fw_col_latency_ms},
	{"ttfb_ms", FLOAT8OID, fw_col_ttfb_ms},
	{"cost_usd", NUMERICOID, fw_col_cost_usd},
	{"request_id", TEXTOID, fw_col_request_id},
	{"error", TEXTOID, fw_col_error},
	{"prompt", TEXTOID, fw_col_prompt},
	{"answer", TEXTOID, fw_col_answer},
	{"replayed", BOOLOID, fw_col_replayed},
	/* 0.3: new columns here, in the order of the SQL script */
	{"kind", TEXTOID, fw_col_kind},	/* issue 12 */
	{"probe", BOOLOID, fw_col_probe},	/* issue 16 */
	/* 0.4 */
	{"origin_sysid", INT8OID, fw_col_origin_sysid},	/* issue 11 */
	{"origin_node", TEXTOID, fw_col_origin_node},	/* issue 11 */
};

#define FW_NCOLS	lengthof(fw_call_columns)

/* The values of record d's row, in fw_call_columns order. */
static void
fw_row_values(FwDrainedRecord *d, Datum *values, bool *isnull)
{
	FwCallRecord *r = &d->rec;
	FwRow		w;

	/* fixed-size strings from another process: terminate them */
	r->dbname.data[NAMEDATALEN - 1] = '\0';
	r->username.data[NAMEDATALEN - 1] = '\0';
	r->workload[FW_NAMELEN - 1] = '\0';
	r->model[FW_MODELLEN - 1] = '\0';
	r->request_id[FW_REQIDLEN - 1] = '\0';
	r->error[FW_ERRLEN - 1] = '\0';

	w.d = d;
	w.r = r;
	w.path = (r->path >= 0 && r->path < FW_NUM_PATHS) ?
		(FwPath) r->path : FW_PATH_STANDARD;
	w.outcome = (r->outcome >= 0 && r->outcome < FW_NUM_OUTCOMES) ?
		(FwOutcome) r->outcome : FW_BAD_RESPONSE;
	w.model = fw_clean_text(r->model, d->encoding);

	for (int c = 0; c < FW_NCOLS; c++)
	{
		isnull[c] = false;
		values[c] = fw_call_columns[c].fill(&w, &isnull[c]);
	}
}

/* ---- the multi-insert ---- */

/*
 * Why the multi-insert must not write into rel, or NULL when it may.
 * Caller holds RowExclusiveLock on rel: none of this can change before
 * COMMIT (triggers, rules, RLS and columns all need a stronger lock).
 */
static const char *
fw_fast_refusal(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);

	if (rel->rd_rel->relkind != RELKIND_RELATION ||
		rel->rd_rel->relam != HEAP_TABLE_AM_OID)
		return "it is not a plain heap table";
	if (rel->trigdesc != NULL)
		return "it has triggers (a trigger, a foreign key or a deferrable key)";
	if (rel->rd_rules != NULL)
		return "it has rules";
	if (check_enable_rls(RelationGetRelid(rel), InvalidOid, true) == RLS_ENABLED)
		return "row-level security applies to the flusher";
	if (desc->natts != FW_NCOLS)
		return "its columns are not the ones this library writes";
	for (int c = 0; c < FW_NCOLS; c++)
	{
		Form_pg_attribute a = TupleDescAttr(desc, c);

		/* an identity column: the SQL insert's OVERRIDING SYSTEM VALUE */
		if (a->attisdropped || a->attgenerated != '\0' || a->attidentity != '\0' ||
			a->atttypid != fw_call_columns[c].typid || a->atttypmod != -1 ||
			strcmp(NameStr(a->attname), fw_call_columns[c].name) != 0)
			return "its columns are not the ones this library writes";
	}
	return NULL;
}

/* Says once (per flusher, per change) which way the rows go, and why. */
static void
fw_fast_report(const char *refusal)
{
	const char *now = refusal ? refusal : "";

	if (strcmp(now, fw_refusal_said) == 0)
		return;
	if (refusal)
		ereport(LOG,
				(errmsg("fw_tier flusher: fw_tier.calls is written with SQL INSERT, not the multi-insert: %s",
						refusal),
				 errdetail("Triggers and rules fire as for any INSERT; the call log costs more CPU per row.")));
	else if (fw_refusal_said[0] != '\0')
		ereport(LOG,
				(errmsg("fw_tier flusher: fw_tier.calls is written with the multi-insert again")));
	strlcpy(fw_refusal_said, now, sizeof(fw_refusal_said));
}

/*
 * Empty the slots: after a failed multi-insert they may still hold
 * tuples formed in TopMemoryContext (up to FW_BATCH_MAX rows, with
 * log_content their prompts and answers) until the next full batch.
 */
static void
fw_fast_clear(void)
{
	if (fw_slot_desc == NULL)
		return;
	for (int i = 0; i < FW_BATCH_MAX; i++)
		ExecClearTuple(fw_slots[i]);
}

/*
 * Rows [first, first + n) of fw_batch into rel, COPY FROM's way: a
 * ResultRelInfo of its own (no range table: nothing here checks
 * permissions, the flusher is the bootstrap superuser), constraints,
 * table_multi_insert, then the index entries.  Returns n.
 */
static uint64
fw_fast_insert(Oid relid, int first, int n)
{
	Relation	rel = table_open(relid, NoLock);	/* locked by the caller */
	EState	   *estate = CreateExecutorState();
	ResultRelInfo *rri = makeNode(ResultRelInfo);
	TupleTableSlot **slots = fw_slots;
	bool		check = (RelationGetDescr(rel)->constr != NULL);

	fw_last_release();
	if (fw_slot_desc == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		fw_slot_desc = CreateTupleDescCopy(RelationGetDescr(rel));
		for (int i = 0; i < FW_BATCH_MAX; i++)
			fw_slots[i] = MakeSingleTupleTableSlot(fw_slot_desc, &TTSOpsHeapTuple);
		MemoryContextSwitchTo(old);
	}

	estate->es_snapshot = GetActiveSnapshot();
	InitResultRelInfo(rri, rel, 0, NULL, 0);
	CheckValidResultRel(rri, CMD_INSERT);
	ExecOpenIndices(rri, false);

	for (int i = 0; i < n; i++)
	{
		TupleTableSlot *slot = slots[i];

		ExecClearTuple(slot);
		fw_row_values(&fw_batch[first + i], slot->tts_values, slot->tts_isnull);
		ExecStoreVirtualTuple(slot);
		/* NOT NULL and CHECK: a violation is the row's error (23xxx) */
		if (check)
			ExecConstraints(rri, slot, estate);
	}

	table_multi_insert(rel, slots, n, GetCurrentCommandId(true), 0, NULL);

	if (rri->ri_NumIndices > 0)
	{
		for (int i = 0; i < n; i++)
		{
			List	   *recheck;

			/* the primary key's uniqueness is checked here (23505) */
			recheck = ExecInsertIndexTuples(rri, slots[i], estate,
											false, false, NULL, NIL);
			/* only deferrable keys ask for a recheck: they are triggers */
			Assert(recheck == NIL);
			list_free(recheck);
			ResetPerTupleExprContext(estate);
		}
	}

	/* the formed tuples live in TopMemoryContext: free them now */
	fw_fast_clear();
	ExecCloseIndices(rri);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
	return n;
}

/* ---- the SQL insert ---- */

/*
 * INSERT INTO fw_tier.calls (the columns) SELECT FROM ROWS FROM
 * (pg_catalog.unnest($1), ...) ON CONFLICT (origin_sysid, origin_node,
 * call_id, attempt) DO NOTHING,
 * one array parameter per column.  Runs as the bootstrap superuser: the
 * only functions are pg_catalog's (and the search_path is pinned too).  A
 * generic plan at once: a custom plan would copy the batch's arrays into
 * the plan as constants, and replan, for every batch.
 */
static void
fw_sql_prepare(void)
{
	StringInfoData sql;
	Oid			argtypes[FW_NCOLS];

	if (fw_insert_plan != NULL)
		return;
	initStringInfo(&sql);
	appendStringInfoString(&sql, "INSERT INTO fw_tier.calls (");
	for (int c = 0; c < FW_NCOLS; c++)
		appendStringInfo(&sql, "%s%s", c ? ", " : "",
						 quote_identifier(fw_call_columns[c].name));
	/*
	 * The record's call_id and attempt are the row's identity even if a
	 * DBA made one of them GENERATED ALWAYS AS IDENTITY (without a
	 * generated column, the clause changes nothing).
	 */
	appendStringInfoString(&sql, ") OVERRIDING SYSTEM VALUE SELECT * FROM ROWS FROM (");
	for (int c = 0; c < FW_NCOLS; c++)
	{
		appendStringInfo(&sql, "%spg_catalog.unnest($%d)", c ? ", " : "", c + 1);
		argtypes[c] = get_array_type(fw_call_columns[c].typid);
	}
	appendStringInfoString(&sql, ") ON CONFLICT (origin_sysid, origin_node, call_id, attempt) DO NOTHING");

	fw_insert_plan = SPI_prepare_cursor(sql.data, FW_NCOLS, argtypes,
										CURSOR_OPT_GENERIC_PLAN);
	if (fw_insert_plan == NULL)
		elog(ERROR, "SPI_prepare failed for the fw_tier call-log insert: %s",
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(fw_insert_plan);
	pfree(sql.data);
}

/*
 * Rows [first, first + n) of fw_batch with one statement.  Returns the
 * rows inserted; the others were already in the table.
 */
static uint64
fw_sql_insert(int first, int n)
{
	Datum		args[FW_NCOLS];
	char		argnulls[FW_NCOLS];
	Datum		values[FW_NCOLS];
	bool		isnull[FW_NCOLS];
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int			ret;

	fw_sql_prepare();
	fw_last_release();
	if (fw_col_values == NULL)
	{
		fw_col_values = MemoryContextAlloc(TopMemoryContext,
										   sizeof(Datum) * FW_NCOLS * FW_BATCH_MAX);
		fw_col_nulls = MemoryContextAlloc(TopMemoryContext,
										  sizeof(bool) * FW_NCOLS * FW_BATCH_MAX);
	}
	for (int i = 0; i < n; i++)
	{
		fw_row_values(&fw_batch[first + i], values, isnull);
		for (int c = 0; c < FW_NCOLS; c++)
		{
			fw_col_values[c * FW_BATCH_MAX + i] = values[c];
			fw_col_nulls[c * FW_BATCH_MAX + i] = isnull[c];
		}
	}
	for (int c = 0; c < FW_NCOLS; c++)
	{
		Oid			typid = fw_call_columns[c].typid;
		int16		elmlen;
		bool		elmbyval;
		char		elmalign;

		get_typlenbyvalalign(typid, &elmlen, &elmbyval, &elmalign);
		args[c] = PointerGetDatum(construct_md_array(&fw_col_values[c * FW_BATCH_MAX],
													 &fw_col_nulls[c * FW_BATCH_MAX],
													 1, dims, lbs, typid,
													 elmlen, elmbyval, elmalign));
		argnulls[c] = ' ';
	}

	ret = SPI_execute_plan(fw_insert_plan, args, argnulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "fw_tier call-log insert failed: %s",
			 SPI_result_code_string(ret));
	return SPI_processed;
}

/*
 * Is this error about the environment (table locked or missing, read-only,
 * out of resources, cancelled ...) rather than about the row?  Only data
 * and constraint errors, and errors raised on purpose (a trigger's RAISE),
 * can be a poison row; anything else keeps the records and backs off.
 */
static bool
fw_error_is_row_specific(int sqlerrcode)
{
	char		class[3];

	class[0] = PGUNSIXBIT(sqlerrcode);
	class[1] = PGUNSIXBIT(sqlerrcode >> 6);
	class[2] = '\0';
	return strcmp(class, "22") == 0 ||	/* data exception */
		strcmp(class, "23") == 0 || /* integrity constraint violation */
		strcmp(class, "44") == 0 || /* with check option violation */
		strcmp(class, "P0") == 0;	/* PL/pgSQL raise (a trigger) */
}

/* The record as JSON, for the dead letters. */
static char *
fw_worker_record_json(FwDrainedRecord *d)
{
	FwCallRecord *r = &d->rec;
	StringInfoData buf;
	bool		isnull;
	const char *strs[][2] = {
		{"database", NameStr(r->dbname)},
		{"username", NameStr(r->username)},
		{"workload", r->workload},
		{"model", r->model},
		{"path", fw_path_name((FwPath) r->path)},
		{"outcome", fw_outcome_name((FwOutcome) r->outcome)},
		{"request_id", r->request_id},
		{"error", r->error},
		{"prompt", d->prompt},
		{"answer", d->answer},
	};

	initStringInfo(&buf);
	appendStringInfo(&buf, "{\"call_id\": " INT64_FORMAT ", \"attempt\": %d, \"started_at\": ",
					 r->call_id, r->attempt);
	escape_json(&buf, timestamptz_to_str(r->started_at));
	for (int i = 0; i < lengthof(strs); i++)
	{
		appendStringInfo(&buf, ", \"%s\": ", strs[i][0]);
		if (strs[i][1] == NULL)
			appendStringInfoString(&buf, "null");
		else
			escape_json(&buf, TextDatumGetCString(fw_text_datum(strs[i][1], d->encoding,
																 false, &isnull)));
	}
	appendStringInfo(&buf, ", \"service_tier\": %s, \"escalated\": %s, \"http_status\": %d,"
					 " \"prompt_tokens\": %d, \"cached_prompt_tokens\": %d,"
					 " \"completion_tokens\": %d, \"latency_us\": %d, \"ttfb_us\": %d}",
					 r->priority_sent ? "\"priority\"" : "null",
					 r->escalated ? "true" : "false", r->http_status,
					 r->prompt_tokens, r->cached_prompt_tokens,
					 r->completion_tokens, r->latency_us, r->ttfb_us);
	return buf.data;
}

/*
 * A row fw_tier.calls refused: into fw_tier.calls_dead_letter, in a
 * subtransaction of its own; if even that fails, into the dead-letter
 * file.  Counted either way, and said once per batch by the caller.
 */
static void
fw_worker_dead_letter(FwDrainedRecord *d, ErrorData *edata)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	char	   *json = fw_worker_record_json(d);
	const char *state = unpack_sql_state(edata->sqlerrcode);

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		Oid			types[7] = {INT8OID, INT4OID, TEXTOID, TEXTOID, TEXTOID,
		INT8OID, TEXTOID};
		Datum		args[7];
		int			ret;

		args[0] = Int64GetDatum(d->rec.call_id);
		args[1] = Int32GetDatum(d->rec.attempt);
		args[2] = CStringGetTextDatum(json);
		args[3] = CStringGetTextDatum(state);
		args[4] = CStringGetTextDatum(edata->message ? edata->message : "");
		args[5] = Int64GetDatum(fw_batch_sysid);	/* issue 11 */
		args[6] = fw_batch_node;
		ret = SPI_execute_with_args("INSERT INTO fw_tier.calls_dead_letter"
									" (call_id, attempt, record, sqlstate, error,"
									" origin_sysid, origin_node)"
									" VALUES ($1, $2, $3::pg_catalog.jsonb, $4, $5, $6, $7)"
		/* written again after a crash between COMMIT and the tail moving */
									" ON CONFLICT (origin_sysid, origin_node, call_id, attempt)"
									" DO NOTHING",
									7, types, args, NULL, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "fw_tier: dead-letter insert failed: %s",
				 SPI_result_code_string(ret));
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		ErrorData  *e2;
		StringInfoData line;

		MemoryContextSwitchTo(oldcontext);
		e2 = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;

		initStringInfo(&line);
		appendStringInfoString(&line, "{\"failed_at\": ");
		escape_json(&line, timestamptz_to_str(GetCurrentTimestamp()));
		appendStringInfo(&line, ", \"sqlstate\": \"%s\", \"error\": ", state);
		escape_json(&line, edata->message ? edata->message : "");
		appendStringInfoString(&line, ", \"dead_letter_table_error\": ");
		escape_json(&line, e2->message ? e2->message : "");
		appendStringInfo(&line, ", \"record\": %s}", json);
		fw_dead_letter_file(line.data);
		FreeErrorData(e2);
	}
	PG_END_TRY();
	pg_atomic_fetch_add_u64(&fw_shared->dead_letters, 1);
}

/* ---- the batch ---- */

/*
 * Rows [first, first + n) of fw_batch in a subtransaction, the SQL way
 * when *sql, else by the multi-insert into relid; NULL on success (*rows
 * grows by the rows inserted), else the error (the subtransaction rolled
 * back).  A unique violation of the multi-insert is a row that is already
 * there where none was expected: the rows are written again the SQL way,
 * and *sql says so to the caller.
 */
static ErrorData *
fw_try_insert(Oid relid, int first, int n, bool *sql, uint64 *rows)
{
	for (;;)
	{
		MemoryContext oldcontext = CurrentMemoryContext;
		ResourceOwner oldowner = CurrentResourceOwner;
		ErrorData  *edata = NULL;

		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(oldcontext);
		PG_TRY();
		{
			uint64		done;

			done = *sql ? fw_sql_insert(first, n) : fw_fast_insert(relid, first, n);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
			*rows += done;
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(oldcontext);
			edata = CopyErrorData();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(oldcontext);
			CurrentResourceOwner = oldowner;
			if (!*sql)
				fw_fast_clear();
		}
		PG_END_TRY();

		if (edata == NULL || *sql || edata->sqlerrcode != ERRCODE_UNIQUE_VIOLATION)
			return edata;
		FreeErrorData(edata);
		*sql = true;
	}
}

/*
 * Write the n records of fw_batch in the current transaction.  One
 * statement for the batch; when it fails with an error that may be about
 * a row, row by row (a subtransaction each), and the rows that still fail
 * go to the dead letters while the rest lands.  An error about the
 * environment (or the same error for every row: the table, not the rows)
 * is raised again: the caller keeps the records and backs off.  Returns
 * the rows inserted into fw_tier.calls.
 */
static uint64
fw_write_batch(Oid relid, int n, bool sql)
{
	ErrorData  *edata;
	ErrorData **row_err;
	int			nfailed = 0;
	int			first_fail = 0;
	bool		same = true;
	uint64		rows = 0;

	edata = fw_try_insert(relid, 0, n, &sql, &rows);
	if (edata == NULL)
		return rows;
	if (!fw_error_is_row_specific(edata->sqlerrcode))
		ReThrowError(edata);

	row_err = palloc0(sizeof(ErrorData *) * n);
	for (int i = 0; i < n; i++)
	{
		bool		row_sql = sql;

		row_err[i] = fw_try_insert(relid, i, 1, &row_sql, &rows);
		if (row_err[i] != NULL)
		{
			if (nfailed == 0)
				first_fail = i;
			else if (row_err[i]->sqlerrcode != row_err[first_fail]->sqlerrcode)
				same = false;
			nfailed++;
		}
	}
	if (nfailed == 0)
		return rows;			/* the batch error did not come back */
	if (nfailed == n && n > 1 && same)
		ReThrowError(row_err[first_fail]);	/* every row, the same way */

	for (int i = 0; i < n; i++)
	{
		if (row_err[i] == NULL)
			continue;
		if (!fw_error_is_row_specific(row_err[i]->sqlerrcode))
			ReThrowError(row_err[i]);
	}
	for (int i = 0; i < n; i++)
		if (row_err[i] != NULL)
			fw_worker_dead_letter(&fw_batch[i], row_err[i]);
	ereport(WARNING,
			(errcode(row_err[first_fail]->sqlerrcode),
			 errmsg("fw_tier flusher: %d of %d call-log records were refused by fw_tier.calls and went to fw_tier.calls_dead_letter",
					nfailed, n),
			 errdetail("The first refusal: %s",
					   row_err[first_fail]->message ? row_err[first_fail]->message : ""),
			 errhint("Inspect fw_tier.calls_dead_letter; a constraint or trigger on fw_tier.calls rejects these rows.")));
	return rows;
}

/*
 * The flusher's entry: write the n records of batch in its transaction
 * (SPI connected, a snapshot active).  may_repeat: some may be in the
 * table already (header comment, "Duplicates"): the SQL insert's ON
 * CONFLICT skips those.  Returns the rows inserted into fw_tier.calls.
 */
uint64
fw_loginsert_batch(FwDrainedRecord *batch, int n, bool may_repeat)
{
	Oid			relid;
	Relation	rel;
	const char *refusal;

	fw_batch = batch;
	/* issue 11: whose rows these are */
	fw_batch_sysid = fw_origin_set ? fw_origin_set_sysid : fw_origin_sysid();
	fw_batch_node = CStringGetTextDatum(fw_origin_set ? fw_origin_set_node :
										fw_origin_node_name());
	/* under lock_timeout; held to COMMIT */
	relid = RangeVarGetRelid(makeRangeVar("fw_tier", "calls", -1),
							 RowExclusiveLock, false);
	rel = table_open(relid, NoLock);
	refusal = fw_fast_refusal(rel);
	table_close(rel, NoLock);
	fw_fast_report(refusal);
	return fw_write_batch(relid, n, may_repeat || refusal != NULL);
}

/*
 * Issue 11: the origin of the next batches (fw_tier.ingest_calls: a
 * standby's records); node NULL = this server again.
 */
void
fw_loginsert_set_origin(int64 sysid, const char *node)
{
	fw_origin_set = (node != NULL);
	fw_origin_set_sysid = sysid;
	strlcpy(fw_origin_set_node, node ? node : "", sizeof(fw_origin_set_node));
}

/* After an aborted transaction: the plan may refer to a dropped table. */
void
fw_loginsert_reset(void)
{
	if (fw_insert_plan)
	{
		SPI_freeplan(fw_insert_plan);
		fw_insert_plan = NULL;
	}
}
