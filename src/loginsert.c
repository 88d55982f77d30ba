/*-------------------------------------------------------------------------
 *
 * loginsert.c
 *		Rows of fw_tier.calls from drained call records: the batch insert,
 *		the row-by-row fallback and the dead letters.
 *
 * The flusher (flusher.c) copies a batch of records out of the ring or the
 * spill, opens a transaction and hands the batch to fw_loginsert_batch();
 * it commits and moves the tail afterwards.  Here: one statement for the
 * batch; when it fails with an error that may be about a row, row by row
 * (a subtransaction each), and the rows that still fail go to
 * fw_tier.calls_dead_letter (or, if even that fails, the dead-letter file)
 * while the rest lands.  An error about the environment (or the same error
 * for every row: the table, not the rows) is raised again: the flusher
 * keeps the records and backs off.  A batch written again after a crash
 * between COMMIT and the tail moving on is absorbed by ON CONFLICT.
 *
 * Every value from the record is untrusted (another process wrote it, the
 * ring file may be damaged): strings are terminated, text in another
 * encoding is made safe, enums are checked.
 *
 * Locking: none of its own; called inside the flusher's transaction, with
 * SPI connected, holding no LWLock.
 *
 * Called by: flusher.c only (fw_loginsert_batch; fw_loginsert_reset after
 * an aborted transaction).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/string.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "worker.h"

static SPIPlanPtr fw_insert_plan = NULL;
static FwDrainedRecord *fw_batch = NULL;	/* the batch being written */

/*
 * The call-log insert: one statement per batch.  Each column of the batch
 * travels as one array parameter; unnest() turns them back into rows, so
 * executor start-up, the prices lookup plan and the ON CONFLICT machinery
 * are paid once per batch instead of once per record.
 */
#define FW_INSERT_NARGS 22

static const Oid fw_insert_elemtypes[FW_INSERT_NARGS] = {
	INT8OID, INT4OID, TIMESTAMPTZOID, NAMEOID, NAMEOID,
	TEXTOID, TEXTOID, TEXTOID, TEXTOID, BOOLOID, INT4OID, TEXTOID,
	INT4OID, INT4OID, INT4OID, FLOAT8OID, FLOAT8OID,
	TEXTOID, TEXTOID, TEXTOID, TEXTOID, BOOLOID
};

/*
 * Runs as the bootstrap superuser: every operator and function is pinned
 * to pg_catalog (OPERATOR(pg_catalog.x), pg_catalog.f), on top of the
 * search_path the worker pins at start, so that no operator a role defines
 * (an int4 * numeric in public, say) can be picked by an implicit cast.
 * OPERATOR() has the precedence of "any other operator": hence the
 * parentheses around every arithmetic step.
 */
static const char *fw_insert_sql =
"INSERT INTO fw_tier.calls (call_id, attempt, started_at, database, username,"
"  workload, path, model, service_tier, escalated, http_status, outcome,"
"  prompt_tokens, cached_prompt_tokens, completion_tokens, latency_ms, ttfb_ms,"
"  cost_usd, request_id, error, prompt, answer, replayed)"
" SELECT u.call_id, u.attempt, u.started_at, u.database, u.username,"
"  u.workload, u.path, u.model, u.service_tier, u.escalated, u.http_status,"
"  u.outcome, u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens,"
"  u.latency_ms, u.ttfb_ms,"
"  CASE WHEN u.replayed THEN 0::pg_catalog.numeric"
"       WHEN u.prompt_tokens IS NULL AND u.completion_tokens IS NULL"
"            AND u.outcome OPERATOR(pg_catalog.<>) 'ok'::pg_catalog.text"
"         THEN 0::pg_catalog.numeric"
"       WHEN p.model IS NULL THEN NULL::pg_catalog.numeric"
"       ELSE ((((coalesce(u.prompt_tokens, 0) OPERATOR(pg_catalog.-)"
"                coalesce(u.cached_prompt_tokens, 0))::pg_catalog.numeric"
"               OPERATOR(pg_catalog.*) p.input_usd_per_mtok)"
"             OPERATOR(pg_catalog.+)"
"              (coalesce(u.cached_prompt_tokens, 0)::pg_catalog.numeric"
"               OPERATOR(pg_catalog.*) p.cached_input_usd_per_mtok)"
"             OPERATOR(pg_catalog.+)"
"              (coalesce(u.completion_tokens, 0)::pg_catalog.numeric"
"               OPERATOR(pg_catalog.*) p.output_usd_per_mtok))"
"            OPERATOR(pg_catalog./) 1000000::pg_catalog.numeric) END,"
"  u.request_id, u.error, u.prompt, u.answer, u.replayed"
" FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3),"
"   pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6),"
"   pg_catalog.unnest($7), pg_catalog.unnest($8), pg_catalog.unnest($9),"
"   pg_catalog.unnest($10), pg_catalog.unnest($11), pg_catalog.unnest($12),"
"   pg_catalog.unnest($13), pg_catalog.unnest($14), pg_catalog.unnest($15),"
"   pg_catalog.unnest($16), pg_catalog.unnest($17), pg_catalog.unnest($18),"
"   pg_catalog.unnest($19), pg_catalog.unnest($20), pg_catalog.unnest($21),"
"   pg_catalog.unnest($22))"
"   AS u(call_id, attempt, started_at, database, username, workload, path,"
"        model, service_tier, escalated, http_status, outcome, prompt_tokens,"
"        cached_prompt_tokens, completion_tokens, latency_ms, ttfb_ms,"
"        request_id, error, prompt, answer, replayed)"
" LEFT JOIN fw_tier.prices p ON p.model OPERATOR(pg_catalog.=) u.model"
"   AND p.path OPERATOR(pg_catalog.=) u.path"
" ON CONFLICT (call_id, attempt) DO NOTHING";

/* The batch, column by column, before it becomes the array parameters. */
typedef struct FwInsertColumns
{
	Datum		values[FW_INSERT_NARGS][FW_BATCH_MAX];
	bool		nulls[FW_INSERT_NARGS][FW_BATCH_MAX];
} FwInsertColumns;

static FwInsertColumns *fw_cols = NULL;

/*
 * Text safe to store in this database: the writer's database may use
 * another encoding; non-ASCII bytes we cannot vouch for become '?'.
 */
static Datum
fw_text_datum(const char *s, int encoding, bool empty_is_null, bool *isnull)
{
	int			len;
	char	   *copy;

	*isnull = false;
	if (s == NULL || (empty_is_null && s[0] == '\0'))
	{
		*isnull = true;
		return (Datum) 0;
	}
	len = strlen(s);
	if (pg_is_ascii(s) ||
		(encoding == GetDatabaseEncoding() &&
		 pg_verify_mbstr(encoding, s, len, true)))
		return CStringGetTextDatum(s);

	copy = pstrdup(s);
	for (char *p = copy; *p; p++)
		if (IS_HIGHBIT_SET(*p))
			*p = '?';
	return CStringGetTextDatum(copy);
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

static Datum
fw_int_datum(int32 v, bool *isnull)
{
	*isnull = (v < 0);
	return Int32GetDatum(v);
}

static void
fw_worker_prepare_insert(void)
{
	Oid			argtypes[FW_INSERT_NARGS];

	if (fw_insert_plan != NULL)
		return;
	for (int i = 0; i < FW_INSERT_NARGS; i++)
		argtypes[i] = get_array_type(fw_insert_elemtypes[i]);

	/*
	 * Generic plan at once: a custom plan would copy the batch's arrays into
	 * the plan as constants, and replan, for every batch.
	 */
	fw_insert_plan = SPI_prepare_cursor(fw_insert_sql, FW_INSERT_NARGS, argtypes,
										CURSOR_OPT_GENERIC_PLAN);
	if (fw_insert_plan == NULL)
		elog(ERROR, "SPI_prepare failed for the fw_tier call-log insert: %s",
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(fw_insert_plan);
}

/* Record d becomes row "row" of the batch's columns. */
static void
fw_worker_fill_row(FwDrainedRecord *d, int row)
{
	FwCallRecord *r = &d->rec;
	Datum		values[FW_INSERT_NARGS];
	bool		isnull[FW_INSERT_NARGS];
	FwPath		path = (r->path >= 0 && r->path < FW_NUM_PATHS) ?
		(FwPath) r->path : FW_PATH_STANDARD;
	FwOutcome	outcome = (r->outcome >= 0 && r->outcome < FW_NUM_OUTCOMES) ?
		(FwOutcome) r->outcome : FW_BAD_RESPONSE;

	/* fixed-size strings from another process: terminate them */
	r->dbname.data[NAMEDATALEN - 1] = '\0';
	r->username.data[NAMEDATALEN - 1] = '\0';
	r->workload[FW_NAMELEN - 1] = '\0';
	r->model[FW_MODELLEN - 1] = '\0';
	r->request_id[FW_REQIDLEN - 1] = '\0';
	r->error[FW_ERRLEN - 1] = '\0';

	memset(isnull, 0, sizeof(isnull));
	values[0] = Int64GetDatum(r->call_id);
	values[1] = Int32GetDatum(r->attempt);
	values[2] = TimestampTzGetDatum(r->started_at);
	values[3] = fw_name_datum(&r->dbname, d->encoding);
	values[4] = fw_name_datum(&r->username, d->encoding);
	values[5] = fw_text_datum(r->workload, d->encoding, false, &isnull[5]);
	values[6] = CStringGetTextDatum(fw_path_name(path));
	values[7] = fw_text_datum(r->model, d->encoding, false, &isnull[7]);
	if (r->priority_sent)
		values[8] = CStringGetTextDatum("priority");
	else
	{
		values[8] = (Datum) 0;
		isnull[8] = true;
	}
	values[9] = BoolGetDatum(r->escalated);
	values[10] = Int32GetDatum(r->http_status);
	isnull[10] = (r->http_status <= 0);
	values[11] = CStringGetTextDatum(fw_outcome_name(outcome));
	values[12] = fw_int_datum(r->prompt_tokens, &isnull[12]);
	values[13] = fw_int_datum(r->cached_prompt_tokens, &isnull[13]);
	values[14] = fw_int_datum(r->completion_tokens, &isnull[14]);
	values[15] = Float8GetDatum(r->latency_us / 1000.0);
	isnull[15] = (r->latency_us < 0);
	values[16] = Float8GetDatum(r->ttfb_us / 1000.0);
	isnull[16] = (r->ttfb_us < 0);
	values[17] = fw_text_datum(r->request_id, d->encoding, true, &isnull[17]);
	values[18] = fw_text_datum(r->error, d->encoding, true, &isnull[18]);
	values[19] = fw_text_datum(d->prompt, d->encoding, false, &isnull[19]);
	values[20] = fw_text_datum(d->answer, d->encoding, false, &isnull[20]);
	values[21] = BoolGetDatum(r->replayed);
	/* NOT NULL columns: never leave them empty-handed */
	if (isnull[5])
	{
		values[5] = CStringGetTextDatum("");
		isnull[5] = false;
	}
	if (isnull[7])
	{
		values[7] = CStringGetTextDatum("");
		isnull[7] = false;
	}

	for (int i = 0; i < FW_INSERT_NARGS; i++)
	{
		fw_cols->values[i][row] = values[i];
		fw_cols->nulls[i][row] = isnull[i];
	}
}

/*
 * Insert the n records of fw_batch with one statement.  Returns the rows
 * inserted; the others were already in the table (a batch written again
 * after a crash between COMMIT and the tail moving on).
 */
static uint64
fw_worker_insert_batch(int first, int n)
{
	Datum		args[FW_INSERT_NARGS];
	char		argnulls[FW_INSERT_NARGS];
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int			ret;

	for (int i = 0; i < n; i++)
		fw_worker_fill_row(&fw_batch[first + i], i);

	for (int c = 0; c < FW_INSERT_NARGS; c++)
	{
		int16		elmlen;
		bool		elmbyval;
		char		elmalign;

		get_typlenbyvalalign(fw_insert_elemtypes[c], &elmlen, &elmbyval, &elmalign);
		args[c] = PointerGetDatum(construct_md_array(fw_cols->values[c],
													 fw_cols->nulls[c],
													 1, dims, lbs,
													 fw_insert_elemtypes[c],
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
		Oid			types[5] = {INT8OID, INT4OID, TEXTOID, TEXTOID, TEXTOID};
		Datum		args[5];
		int			ret;

		args[0] = Int64GetDatum(d->rec.call_id);
		args[1] = Int32GetDatum(d->rec.attempt);
		args[2] = CStringGetTextDatum(json);
		args[3] = CStringGetTextDatum(state);
		args[4] = CStringGetTextDatum(edata->message ? edata->message : "");
		ret = SPI_execute_with_args("INSERT INTO fw_tier.calls_dead_letter"
									" (call_id, attempt, record, sqlstate, error)"
									" VALUES ($1, $2, $3::pg_catalog.jsonb, $4, $5)"
		/* written again after a crash between COMMIT and the tail moving */
									" ON CONFLICT (call_id, attempt) DO NOTHING",
									5, types, args, NULL, false, 0);
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

/*
 * Insert rows [first, first + n) of fw_batch in a subtransaction; NULL on
 * success, else the error (the subtransaction rolled back).
 */
static ErrorData *
fw_worker_try_insert(int first, int n)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	ErrorData  *edata = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		(void) fw_worker_insert_batch(first, n);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
	}
	PG_END_TRY();
	return edata;
}

/*
 * Write the n records of fw_batch in the current transaction.  One
 * statement for the batch; when it fails with an error that may be about
 * a row, row by row (a subtransaction each), and the rows that still fail
 * go to the dead letters while the rest lands.  An error about the
 * environment (or the same error for every row: the table, not the rows)
 * is raised again: the caller keeps the records and backs off.
 */
static void
fw_worker_write_batch(int n)
{
	ErrorData  *edata;
	ErrorData **row_err;
	int			nfailed = 0;
	int			first_fail = 0;
	bool		same = true;

	edata = fw_worker_try_insert(0, n);
	if (edata == NULL)
		return;
	if (!fw_error_is_row_specific(edata->sqlerrcode))
		ReThrowError(edata);

	row_err = palloc0(sizeof(ErrorData *) * n);
	for (int i = 0; i < n; i++)
	{
		row_err[i] = fw_worker_try_insert(i, 1);
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
		return;					/* the batch error did not come back */
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
}

/*
 * The flusher's entry: write the n records of batch in its transaction
 * (SPI connected).
 */
void
fw_loginsert_batch(FwDrainedRecord *batch, int n)
{
	if (fw_cols == NULL)
		fw_cols = MemoryContextAllocZero(TopMemoryContext, sizeof(FwInsertColumns));
	fw_batch = batch;
	fw_worker_prepare_insert();
	fw_worker_write_batch(n);
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
