/*-------------------------------------------------------------------------
 *
 * fixtures.c
 *		Record and replay of request/response pairs (fw_tier.mode).
 *
 * A fixture is keyed by the request's fingerprint (what decides the
 * answer: model, messages, generation options; never the key or the tier)
 * and a path: 'standard', 'priority' or 'fast' for an answer that only
 * that path gives (a recorded or hand-written 503 Overloaded on Standard),
 * 'any' for an answer every path gives.  Replay looks for the attempt's
 * own path first, then 'any', so a fixture pair "standard: 503 Overloaded"
 * + "any: 200" replays an escalation exactly as the fleet would play it.
 *
 * A fixture may also name the attempt it answers (attempt > 0): a call's
 * attempts are replayed in order, so "attempt 1: 429" + "any: 200" is a
 * rate limit that clears on the retry.  attempt 0 answers every attempt.
 * The most specific row wins: own attempt before every attempt, own path
 * before 'any'.  Recording stores a failure under its path and attempt
 * number, a 2xx under ('any', 0), so a recorded sequence replays exactly as
 * it happened.
 *
 * Replay never opens a connection.  A miss is an ERROR naming the
 * fingerprint and the start of the prompt, so the user knows what to
 * record.  Recording writes in the caller's transaction, and writes again
 * what a rollback took away (a failed call raises, and that failure is the
 * fixture a test of failures needs): see FwPendingFixture.  A fixture that
 * cannot be written is a WARNING, never the call's failure.
 *
 * The SQL side (fw_fingerprint, fw_fixture, the export and import views)
 * is in the extension script; fw_fixture_key() below is what it calls, so
 * a hand-written fixture is keyed exactly as the engine will look it up.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "fixtures.h"
#include "fwjson.h"

static int	fw_fixture_flush_pending(void);

static const char *
fw_fixture_model(FwCall *call)
{
	return call->path_sent == FW_PATH_FAST ? call->wl.fast_model : call->model;
}

static void
fw_fixture_key(FwCall *call)
{
	if (call->fingerprint == NULL)
		call->fingerprint = call->kind == FW_KIND_CHAT ?
			fw_fingerprint(fw_fixture_model(call), call->messages, call->options) :
			fw_fingerprint_fields(fw_fixture_model(call), call->fields, call->options);
}

#define FW_EXCERPT_CHARS	60

/*
 * A short excerpt of the prompt for the miss error: the last message's
 * content when it is a string (what fw_complete sent), else the messages
 * as JSON.
 */
static char *
fw_prompt_excerpt(FwCall *call)
{
	char	   *text = NULL;
	int			len;
	int			n;

	/* embeddings and rerank (issue 12): their fields as JSON */
	if (call->kind != FW_KIND_CHAT)
		text = JsonbToCString(NULL, &call->fields->root, VARSIZE(call->fields));
	else if (JB_ROOT_IS_ARRAY(call->messages) &&
			 (n = JB_ROOT_COUNT(call->messages)) > 0)
	{
		JsonbValue *last = getIthJsonbValueFromContainer(&call->messages->root, n - 1);
		JsonbValue	content;

		if (last && last->type == jbvBinary &&
			JsonContainerIsObject(last->val.binary.data) &&
			getKeyJsonValueFromContainer(last->val.binary.data, "content", 7, &content) &&
			content.type == jbvString)
			text = pnstrdup(content.val.string.val, content.val.string.len);
	}
	if (text == NULL)
		text = JsonbToCString(NULL, &call->messages->root, VARSIZE(call->messages));

	len = strlen(text);
	if (pg_mbstrlen_with_len(text, len) > FW_EXCERPT_CHARS)
	{
		len = pg_mbcharcliplen(text, len, FW_EXCERPT_CHARS - 3);
		return psprintf("\"%.*s...\"", len, text);
	}
	return psprintf("\"%s\"", text);
}

FwHttpResult *
fw_fixture_replay(FwCall *call)
{
	FwHttpResult *r = palloc0(sizeof(FwHttpResult));
	Oid			types[3] = {TEXTOID, TEXTOID, INT4OID};
	Datum		values[3];
	int			ret;

	fw_fixture_key(call);
	fw_fixture_flush_pending();
	values[0] = CStringGetTextDatum(call->fingerprint);
	values[1] = CStringGetTextDatum(fw_path_name(call->path_sent));
	values[2] = Int32GetDatum((int32) call->attempt);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("SELECT http_status, response, retry_after"
								" FROM fw_tier.fixtures"
								" WHERE fingerprint OPERATOR(pg_catalog.=) $1"
								" AND (path OPERATOR(pg_catalog.=) $2"
								" OR path OPERATOR(pg_catalog.=) 'any')"
								" AND (attempt OPERATOR(pg_catalog.=) $3"
								" OR attempt OPERATOR(pg_catalog.=) 0)"
								" ORDER BY attempt OPERATOR(pg_catalog.=) 0,"
								" path OPERATOR(pg_catalog.=) 'any' LIMIT 1",
								3, types, values, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read fw_tier.fixtures: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		char	   *fp = pstrdup(call->fingerprint);

		SPI_finish();
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no fw_tier fixture for request %s", fp),
				 errdetail("Workload \"%s\", model \"%s\", path %s, attempt %d, prompt %s.",
						   call->wl.name, fw_fixture_model(call),
						   fw_path_name(call->path_sent), call->attempt,
						   fw_prompt_excerpt(call)),
				 errhint("Record it with SET fw_tier.mode = 'record', or write it with fw_fixture().")));
	}
	else
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *status = SPI_getvalue(tup, desc, 1);
		char	   *retry = SPI_getvalue(tup, desc, 3);
		char	   *body = SPI_getvalue(tup, desc, 2);

		r->status = strtol(status, NULL, 10);
		r->retry_after_ms = retry ? (int) Min(strtol(retry, NULL, 10), INT_MAX / 1000) * 1000 : -1;
		/* SPI_palloc: out of SPI memory, which SPI_finish frees. */
		r->body = SPI_palloc(strlen(body) + 1);
		strcpy(r->body, body);
		r->body_len = strlen(body);
	}
	r->hdr_prompt_tokens = r->hdr_cached_tokens = -1;
	r->rl_prompt_per_s = r->rl_generated_per_s = -1;
	SPI_finish();
	return r;
}

/*
 * A recorded answer the engine has seen.  It is written at once in the
 * caller's transaction, and also kept here until that transaction
 * commits: a call that fails raises, and its statement's rollback would
 * take the recorded failure with it, which is exactly the fixture a test
 * of failures needs.  A rolled-back record is written again at the next
 * safe point: the next call in record or replay mode, fw_fixture_flush(),
 * a read of fw_tier.fixtures_export, or the end of the session.
 * Backend-local, in TopMemoryContext.
 */
typedef struct FwPendingFixture
{
	char	   *fingerprint;
	char	   *path;
	int32		attempt;
	char	   *model;
	Jsonb	   *messages;		/* chat; else the kind's fields (issue 12) */
	bool		chat;
	int32		http_status;
	char	   *response;
	int32		retry_after;	/* -1: none */
	bool		written;		/* in the current transaction, by subid */
	SubTransactionId subid;
} FwPendingFixture;

static List *fw_pending = NIL;
static bool fw_callbacks_registered = false;

/*
 * Issue 11: fw_tier.fixtures is read-only on a hot standby.  Record mode
 * refuses there before anything is sent (else every answer would be paid
 * for and its fixture dropped with a WARNING); replay works as anywhere.
 */
void
fw_fixture_check_writable(void)
{
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("fw_tier.mode = 'record' cannot record fixtures on a standby"),
				 errdetail("fw_tier.fixtures is read-only during recovery; nothing was sent."),
				 errhint("Record on the primary; on a standby use fw_tier.mode = 'live' or 'replay'.")));
}

static void
fw_fixture_write(FwPendingFixture *f)
{
	Oid			types[9] = {TEXTOID, TEXTOID, JSONBOID, INT4OID, TEXTOID, INT4OID, TEXTOID, INT4OID, BOOLOID};
	Datum		values[9];
	char		nulls[9] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
	int			ret;

	values[0] = CStringGetTextDatum(f->fingerprint);
	values[1] = CStringGetTextDatum(f->path);
	values[2] = PointerGetDatum(f->messages);
	values[3] = Int32GetDatum(f->http_status);
	values[4] = CStringGetTextDatum(f->response);
	values[5] = Int32GetDatum(f->retry_after);
	nulls[5] = f->retry_after >= 0 ? ' ' : 'n';
	values[6] = CStringGetTextDatum(f->model);
	values[7] = Int32GetDatum(f->attempt);
	values[8] = BoolGetDatum(f->chat);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute_with_args("INSERT INTO fw_tier.fixtures"
								" (fingerprint, path, attempt, request, http_status, response, retry_after)"
								" VALUES ($1, $2, $8, CASE WHEN $9"
								" THEN pg_catalog.jsonb_build_object('model', $7, 'messages', $3)"
								" ELSE pg_catalog.jsonb_build_object('model', $7) OPERATOR(pg_catalog.||) $3 END,"
								" $4, $5, $6)"
								" ON CONFLICT (fingerprint, path, attempt) DO UPDATE"
								" SET request = EXCLUDED.request, http_status = EXCLUDED.http_status,"
								" response = EXCLUDED.response, retry_after = EXCLUDED.retry_after,"
								" recorded_at = EXCLUDED.recorded_at",
								9, types, values, nulls, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not write fw_tier.fixtures: %s", SPI_result_code_string(ret));
	SPI_finish();
	f->written = true;
	f->subid = GetCurrentSubTransactionId();
}

static void
fw_pending_free(FwPendingFixture *f)
{
	pfree(f->fingerprint);
	pfree(f->path);
	pfree(f->model);
	pfree(f->messages);
	pfree(f->response);
	pfree(f);
}

/*
 * Write one fixture in a subtransaction of its own.  A write that fails
 * (no INSERT privilege, a constraint, a read-only transaction, ...) is a
 * WARNING and returns false; the caller drops the record.  Nothing is left
 * behind to fail again: the error used to propagate, the record stayed
 * owed, and every later record/replay call and fixtures_export retried it
 * and failed the same way until the session ended.  The attempt itself is
 * unaffected: the engine logs it and returns its answer (item 7: a paid
 * attempt is never lost to a fixture).
 *
 * A cancel that arrives during the write is not swallowed: it is raised
 * again at the engine's next interrupt check, which logs what is in flight.
 */
static bool
fw_fixture_try_write(FwPendingFixture *f)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = false;

	/* a parallel query's leader may neither write nor start a subxact */
	if (IsInParallelMode())
	{
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("could not record fw_tier fixture for request %s", f->fingerprint),
				 errdetail("Fixtures cannot be written during a parallel operation."),
				 errhint("Record with max_parallel_workers_per_gather = 0.")));
		return false;
	}

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		fw_fixture_write(f);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;

		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
		{
			InterruptPending = true;
			QueryCancelPending = true;
		}
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("could not record fw_tier fixture for request %s", f->fingerprint),
				 errdetail("%s", edata->message),
				 errhint("The call itself is unaffected and logged; recording needs INSERT and UPDATE on fw_tier.fixtures.")));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return ok;
}

static void
fw_fixture_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			/* written ones are durable now; unwritten ones wait */
			foreach(lc, fw_pending)
			{
				FwPendingFixture *f = lfirst(lc);

				if (f->written)
				{
					fw_pending = foreach_delete_current(fw_pending, lc);
					fw_pending_free(f);
				}
			}
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			foreach(lc, fw_pending)
				((FwPendingFixture *) lfirst(lc))->written = false;
			break;
		default:
			break;
	}
}

static void
fw_fixture_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
							SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	foreach(lc, fw_pending)
	{
		FwPendingFixture *f = lfirst(lc);

		if (!f->written || f->subid != mySubid)
			continue;
		if (event == SUBXACT_EVENT_COMMIT_SUB)
			f->subid = parentSubid;
		else if (event == SUBXACT_EVENT_ABORT_SUB)
			f->written = false;
	}
}

/*
 * Write the records a rollback took away; returns how many.  One that
 * cannot be written is dropped with a WARNING (fw_fixture_try_write).
 */
static int
fw_fixture_flush_pending(void)
{
	ListCell   *lc;
	int			n = 0;

	foreach(lc, fw_pending)
	{
		FwPendingFixture *f = lfirst(lc);

		if (f->written)
			continue;
		if (fw_fixture_try_write(f))
			n++;
		else
		{
			fw_pending = foreach_delete_current(fw_pending, lc);
			fw_pending_free(f);
		}
	}
	return n;
}

/*
 * Session end: a recording session whose last statement failed still owes
 * those records.  Written the way temp-table cleanup works at exit
 * (RemoveTempRelationsCallback): a fresh transaction of our own.  Only on
 * a normal exit.  An error here is reported and the records are lost
 * (during exit it is raised as FATAL, which ends the session anyway).
 */
static void
fw_fixture_exit_flush(int code, Datum arg)
{
	ListCell   *lc;
	bool		owed = false;

	foreach(lc, fw_pending)
		owed |= !((FwPendingFixture *) lfirst(lc))->written;
	if (code != 0 || !owed)
		return;

	AbortOutOfAnyTransaction();
	PG_TRY();
	{
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		fw_fixture_flush_pending();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		EmitErrorReport();
		FlushErrorState();
		AbortOutOfAnyTransaction();
	}
	PG_END_TRY();
}

void
fw_fixture_record(FwCall *call, const FwHttpResult *r)
{
	/* a 200 whose typed answer failed is recorded like a failure (issue 12) */
	bool		success = (r->status >= 200 && r->status < 300) && call->bad_output == 0;
	MemoryContext old;
	FwPendingFixture *f;

	/* Only HTTP answers are fixtures; a transport failure is not one. */
	if (r->failed || r->status == 0)
		return;
	fw_fixture_key(call);
	fw_fixture_flush_pending();

	/*
	 * The body goes into a text column: bytes that are not valid text in
	 * the database encoding (or hold a NUL) would be stored invalid and
	 * break every reader and pg_restore.  Such a body is no fixture.
	 */
	if (r->body != NULL &&
		(strlen(r->body) != r->body_len ||
		 !pg_verify_mbstr(GetDatabaseEncoding(), r->body, (int) r->body_len, true)))
	{
		ereport(WARNING,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("could not record fw_tier fixture for request %s", call->fingerprint),
				 errdetail("The response body is not valid %s text.",
						   GetDatabaseEncodingName()),
				 errhint("The call itself is unaffected and logged.")));
		return;
	}

	if (!fw_callbacks_registered)
	{
		RegisterXactCallback(fw_fixture_xact_callback, NULL);
		RegisterSubXactCallback(fw_fixture_subxact_callback, NULL);
		before_shmem_exit(fw_fixture_exit_flush, (Datum) 0);
		fw_callbacks_registered = true;
	}

	old = MemoryContextSwitchTo(TopMemoryContext);
	f = palloc0(sizeof(FwPendingFixture));
	f->fingerprint = pstrdup(call->fingerprint);
	f->path = pstrdup(success ? "any" : fw_path_name(call->path_sent));
	f->attempt = success ? 0 : (int32) call->attempt;
	f->model = pstrdup(fw_fixture_model(call));
	f->chat = (call->kind == FW_KIND_CHAT);
	{
		Jsonb	   *content = f->chat ? call->messages : call->fields;

		f->messages = palloc(VARSIZE(content));
		memcpy(f->messages, content, VARSIZE(content));
	}
	f->http_status = (int32) r->status;
	f->response = r->body ? pnstrdup(r->body, r->body_len) : pstrdup("");
	f->retry_after = r->retry_after_ms >= 0 ? r->retry_after_ms / 1000 : -1;
	fw_pending = lappend(fw_pending, f);
	MemoryContextSwitchTo(old);

	/* in the list first: the subtransaction callbacks follow its subid */
	if (!fw_fixture_try_write(f))
	{
		fw_pending = list_delete_ptr(fw_pending, f);
		fw_pending_free(f);
	}
}

PG_FUNCTION_INFO_V1(fw_fixture_flush);

/*
 * fw_fixture_flush() RETURNS integer: write the records of failed calls
 * whose statement rolled back (see FwPendingFixture).
 */
Datum
fw_fixture_flush(PG_FUNCTION_ARGS)
{
	PG_RETURN_INT32(fw_fixture_flush_pending());
}

PG_FUNCTION_INFO_V1(fw_fixture_key_sql);

/*
 * fw_tier.fixture_key(messages jsonb, workload text, options jsonb,
 *					   OUT fingerprint text, OUT model text)
 *
 * The key the engine will use for this request, resolved exactly as
 * fw_call_init resolves a call (workload's model, options' model and path,
 * the Fast model on the Fast path), and the model it stands for.  Raises
 * what the call itself would raise for an unknown workload or bad options.
 */
Datum
fw_fixture_key_sql(PG_FUNCTION_ARGS)
{
	FwCall		call;
	TupleDesc	desc;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	Jsonb	   *messages;
	Jsonb	   *options;

	fw_require_preload();
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("messages and workload must not be NULL")));
	messages = PG_GETARG_JSONB_P(0);
	options = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);
	fw_check_messages(messages);
	if (options && (!JB_ROOT_IS_OBJECT(options) || JB_ROOT_IS_SCALAR(options)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("options must be a JSON object")));

	fw_call_init(&call, text_to_cstring(PG_GETARG_TEXT_PP(1)), messages,
				 options, false);
	/* Priority and Standard share the model; only Fast changes it. */
	call.path_sent = call.configured;
	fw_fixture_key(&call);

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = CStringGetTextDatum(call.fingerprint);
	values[1] = CStringGetTextDatum(fw_fixture_model(&call));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc),
													  values, nulls)));
}
