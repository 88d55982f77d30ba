/*-------------------------------------------------------------------------
 *
 * enrich.c
 *		Continuous enrichment (issue 14): the fw_enrich_* entry points, the
 *		prompt template, and the "fw_tier enrich" workers that keep a
 *		column filled from fw_tier.enrich_queue.
 *
 * The SQL side (sql/fw_tier--0.3--0.4.sql, section N) owns the registry
 * fw_tier.enrichments, the shared queue fw_tier.enrich_queue and the
 * triggers, which only enqueue.  This file owns everything that runs:
 *
 * Entry points.  fw_enrich_create/drop/pause/resume/retry take the calling
 * role (GetUserId(): after SET ROLE, or a SECURITY DEFINER function's
 * owner) and run the plpgsql bodies fw_tier.enrich_install / enrich_manage
 * as the bootstrap superuser, which check that role's rights before they
 * write (table owner, or UPDATE on the target and SELECT on what is read).
 *
 * Template.  '{column}' is the column's value (its text output), '{{' and
 * '}}' are literal braces; anything else between braces, an unclosed '{'
 * or a lone '}' is 22023.  It is parsed here, never part of any SQL text:
 * the workers select the named columns (quote_identifier) and build the
 * prompt in C.  A row with any named column NULL is not sent.
 *
 * Workers.  One per database with work, at most fw_tier.enrich_workers,
 * in slots of a small shared array (spinlock: slot fields are written
 * under it, the latch is read under it).  A commit that enqueued wakes them
 * or starts one (fw_enrich_kick, from a commit callback); the launcher
 * starts a "scout" at server start that starts one in each database, which
 * leaves again when it finds nothing.  A worker connects as the bootstrap
 * superuser with search_path pinned; it reads the source, runs the calls
 * and writes the target as the enrichment's owner
 * (SetUserIdAndSecContext), so an enrichment writes nothing its creator
 * could not, and the owner's row level security applies.
 *
 * Key ranges.  For a one-column key the INSERT trigger queues one item per
 * statement, a jsonb array [{key: min}, {key: max}] (a row's item is an
 * object); the worker that claims next expands it, in the claim's
 * transaction, into one item per row of the range whose target is NULL
 * (ON CONFLICT DO NOTHING), as the superuser (the rows are read again as
 * the owner before anything is sent).  That statement, like the triggers,
 * touches only the key (built-in scalar types, enrich_install) and the
 * target's nullness: no cast, domain CHECK or operator of a user type
 * runs as the superuser.  Rows are found by (pk ->> 'col')::type, never by
 * jsonb_populate_record(NULL::rel, ...), which runs every domain column's
 * CHECK.
 *
 * A chunk: claim up to `chunk` queued items (FOR UPDATE SKIP LOCKED, state
 * in_flight, claimed_by = our pid), read their rows, build the prompts,
 * commit; run the calls on the engine (fw_engine_run: the concurrency,
 * pacing, escalation, budgets and call log of fw_complete_batch) with a
 * per-turn hook; at each turn the calls that finished are written back in
 * one short transaction, each item in a subtransaction: the queue item
 * locked, the source row locked (SKIP LOCKED), its prompt rebuilt and
 * compared with the one answered; equal: the target is written and the
 * item deleted; changed: the item is queued again (the answer is for a
 * value the row no longer has); row locked by a writer: the answer and the
 * md5 of its prompt are saved in the item, queued again; failed call:
 * attempts + 1, backoff 2^attempts s (at most 300), 'dead' at
 * max_attempts (fw_tier.enrich_dead_letters, fw_enrich_retry).  An error
 * of the engine run itself (a replay miss raises) is charged to the first
 * call not finished, in the order the engine starts them; one raised while
 * the calls are built (a bad option) to every item of the chunk.
 *
 * Nothing lost, nothing twice.  An item leaves the queue only in the
 * transaction that writes its answer, so a crash at any point leaves it
 * queued or in_flight; an in_flight item whose claimer is not a live
 * backend that started before the claim (pg_stat_get_activity) is queued
 * again by the next worker (at its start and every 10 s).  An answer is
 * made durable in the turn of the loop that read it (synchronous commit),
 * either written back or, when the write-back cannot happen now, saved in
 * the item with the md5 of its prompt; a claimed item with a saved answer
 * whose md5 still matches the row's current prompt is written back
 * without a request.  So a request is paid twice only if the process dies
 * between reading the answer and that commit (milliseconds; the call log
 * still has the attempt), or the row changed (then the old answer is of no
 * use).  A cancel (pg_cancel_backend) or SIGTERM stops the engine: the
 * answers that had arrived are written back (or saved) before the worker
 * goes on (cancel) or exits (SIGTERM); the items in flight go back to the
 * queue.  Dropping an enrichment deletes its items, so answers in flight
 * find no item and are not written.
 *
 * Locking: a worker takes RowExclusiveLock on the source table before it
 * locks queue rows (claim, write-back), the order DDL on the table takes
 * them (its event trigger deletes queue rows), so the two never deadlock.
 *
 * Called by: SQL (the entry points, fw_tier.enrich_template_columns,
 * fw_tier.enrich_notify), the postmaster (fw_enrich_main,
 * fw_enrich_scout_main), _PG_init (fw_enrich_init), the launcher
 * (fw_enrich_start_scout).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_database.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "common/md5.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "storage/lmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "embed.h"
#include "engine.h"
#include "fwjson.h"
#include "jsonschema.h"
#include "worker.h"

#define FW_ENRICH_SLOTS		32	/* workers at once, all databases */
#define FW_ENRICH_IDLE_MS	10000	/* a worker with nothing to do leaves */
#define FW_ENRICH_RECOVER_MS 10000	/* look for orphaned in_flight items */
#define FW_ENRICH_ERRLEN	500 /* last_error kept, bytes */
#define FW_ENRICH_PROMPT_MAX (4 * 1024 * 1024)	/* a longer prompt is an item's error */

/* options.kind */
#define FW_ENRICH_COMPLETE	0
#define FW_ENRICH_JSON		1
#define FW_ENRICH_EMBED		2

int			fw_enrich_workers = 1;

typedef struct FwEnrichSlot
{
	bool		used;
	bool		checked;		/* the worker looked at its queue once */
	Oid			dboid;
	pid_t		pid;
	Latch	   *latch;
} FwEnrichSlot;

typedef struct FwEnrichShared
{
	slock_t		mutex;
	FwEnrichSlot slot[FW_ENRICH_SLOTS];
} FwEnrichShared;

static FwEnrichShared *fw_enrich_shared = NULL;
static shmem_request_hook_type prev_request_hook = NULL;
static shmem_startup_hook_type prev_startup_hook = NULL;

static bool fw_enrich_kick_pending = false;
static bool fw_enrich_cb_registered = false;

/* worker state */
static int	fw_enrich_myslot = -1;
static volatile sig_atomic_t fw_enrich_stop = false;

PG_FUNCTION_INFO_V1(fw_enrich_template_columns);
PG_FUNCTION_INFO_V1(fw_enrich_notify);
PG_FUNCTION_INFO_V1(fw_enrich_create);
PG_FUNCTION_INFO_V1(fw_enrich_drop);
PG_FUNCTION_INFO_V1(fw_enrich_pause);
PG_FUNCTION_INFO_V1(fw_enrich_resume);
PG_FUNCTION_INFO_V1(fw_enrich_retry);

/* ---------------------------------------------------------------------
 * Shared slots
 * ---------------------------------------------------------------------
 */
static void
fw_enrich_shmem_request(void)
{
	if (prev_request_hook)
		prev_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(FwEnrichShared)));
}

static void
fw_enrich_shmem_startup(void)
{
	bool		found;

	if (prev_startup_hook)
		prev_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	fw_enrich_shared = ShmemInitStruct("fw_tier enrich", sizeof(FwEnrichShared), &found);
	if (!found)
	{
		memset(fw_enrich_shared, 0, sizeof(FwEnrichShared));
		SpinLockInit(&fw_enrich_shared->mutex);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* _PG_init: the GUC and the shared slots */
void
fw_enrich_init(void)
{
	DefineCustomIntVariable("fw_tier.enrich_workers",
							"Enrichment workers per database at most.",
							"0 stops enrichment; queued rows wait.",
							&fw_enrich_workers, 1, 0, 8,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	prev_request_hook = shmem_request_hook;
	shmem_request_hook = fw_enrich_shmem_request;
	prev_startup_hook = shmem_startup_hook;
	shmem_startup_hook = fw_enrich_shmem_startup;
}

static void
fw_enrich_describe(BackgroundWorker *w, const char *function, int slot,
				   Oid dboid, pid_t notify)
{
	memset(w, 0, sizeof(*w));
	w->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	w->bgw_start_time = BgWorkerStart_RecoveryFinished;
	w->bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(w->bgw_library_name, "fw_tier", BGW_MAXLEN);
	strlcpy(w->bgw_function_name, function, BGW_MAXLEN);
	strlcpy(w->bgw_name, slot >= 0 ? "fw_tier enrich" : "fw_tier enrich scout", BGW_MAXLEN);
	strlcpy(w->bgw_type, w->bgw_name, BGW_MAXLEN);
	w->bgw_main_arg = Int32GetDatum(slot);
	memcpy(w->bgw_extra, &dboid, sizeof(Oid));
	w->bgw_notify_pid = notify;
}

/*
 * Wake the workers of dboid, or start one while fewer than
 * fw_tier.enrich_workers run there.  Returns the slot started, or -1.
 */
static int
fw_enrich_kick(Oid dboid, pid_t notify)
{
	Latch	   *latches[FW_ENRICH_SLOTS];
	int			nlatch = 0;
	int			running = 0;
	int			freeslot = -1;
	BackgroundWorker w;
	BackgroundWorkerHandle *h;

	if (fw_enrich_shared == NULL || fw_enrich_workers <= 0)
		return -1;
	SpinLockAcquire(&fw_enrich_shared->mutex);
	for (int i = 0; i < FW_ENRICH_SLOTS; i++)
	{
		FwEnrichSlot *s = &fw_enrich_shared->slot[i];

		if (s->used && s->dboid == dboid)
		{
			running++;
			if (s->latch)
				latches[nlatch++] = s->latch;
		}
		else if (!s->used && freeslot < 0)
			freeslot = i;
	}
	if (running < fw_enrich_workers && freeslot >= 0)
	{
		FwEnrichSlot *s = &fw_enrich_shared->slot[freeslot];

		s->used = true;
		s->checked = false;
		s->dboid = dboid;
		s->pid = 0;
		s->latch = NULL;
	}
	else
		freeslot = -1;
	SpinLockRelease(&fw_enrich_shared->mutex);

	for (int i = 0; i < nlatch; i++)
		SetLatch(latches[i]);
	if (freeslot < 0)
		return -1;

	fw_enrich_describe(&w, "fw_enrich_main", freeslot, dboid, notify);
	if (!RegisterDynamicBackgroundWorker(&w, &h))
	{
		SpinLockAcquire(&fw_enrich_shared->mutex);
		fw_enrich_shared->slot[freeslot].used = false;
		SpinLockRelease(&fw_enrich_shared->mutex);
		return -1;
	}
	return freeslot;
}

static void
fw_enrich_xact_cb(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && fw_enrich_kick_pending)
		(void) fw_enrich_kick(MyDatabaseId, 0);
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT)
		fw_enrich_kick_pending = false;
}

/* fw_tier.enrich_notify(): the triggers' "wake a worker at commit" */
Datum
fw_enrich_notify(PG_FUNCTION_ARGS)
{
	if (!fw_enrich_cb_registered)
	{
		RegisterXactCallback(fw_enrich_xact_cb, NULL);
		fw_enrich_cb_registered = true;
	}
	fw_enrich_kick_pending = true;
	PG_RETURN_VOID();
}

/* ---------------------------------------------------------------------
 * The template
 * ---------------------------------------------------------------------
 */
typedef struct FwSeg
{
	const char *lit;			/* literal bytes, or NULL for a column */
	int			len;
	int			col;			/* index in the column list */
} FwSeg;

/*
 * Parse t into segments; *cols gets the distinct column names in order.
 * Literal segments point into t (with {{ and }} as one-byte segments).
 */
static List *
fw_template_parse(const char *t, List **cols)
{
	List	   *segs = NIL;
	const char *p = t;

	*cols = NIL;
	while (*p)
	{
		FwSeg	   *s = palloc0(sizeof(FwSeg));

		if ((p[0] == '{' && p[1] == '{') || (p[0] == '}' && p[1] == '}'))
		{
			s->lit = p;
			s->len = 1;
			p += 2;
		}
		else if (*p == '}')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("a lone \"}\" in the prompt template at byte %d", (int) (p - t) + 1),
					 errhint("Write }} for a literal brace.")));
		else if (*p == '{')
		{
			const char *end = strchr(p + 1, '}');
			char	   *name;
			int			n = 0;
			ListCell   *lc;
			bool		have = false;

			if (end == NULL || memchr(p + 1, '{', end - p - 1) != NULL)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("an unclosed \"{\" in the prompt template at byte %d", (int) (p - t) + 1),
						 errhint("Write {column} for a column's value, {{ for a literal brace.")));
			if (end == p + 1 || end - p - 1 >= NAMEDATALEN)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("\"{%.*s}\" in the prompt template is not a column name",
								(int) Min(end - p - 1, NAMEDATALEN), p + 1),
						 errdetail("A placeholder names one column exactly as it is spelled in the table, 1 to %d bytes.",
								   NAMEDATALEN - 1)));
			name = pnstrdup(p + 1, end - p - 1);
			foreach(lc, *cols)
			{
				if (strcmp((char *) lfirst(lc), name) == 0)
				{
					have = true;
					break;
				}
				n++;
			}
			if (!have)
				*cols = lappend(*cols, name);
			s->col = n;
			p = end + 1;
		}
		else
		{
			const char *q = p;

			while (*q && *q != '{' && *q != '}')
				q++;
			s->lit = p;
			s->len = q - p;
			p = q;
		}
		segs = lappend(segs, s);
	}
	return segs;
}

/* fw_tier.enrich_template_columns(template text) RETURNS name[] */
Datum
fw_enrich_template_columns(PG_FUNCTION_ARGS)
{
	char	   *t = text_to_cstring(PG_GETARG_TEXT_PP(0));
	List	   *cols;
	Datum	   *d;
	int			n = 0;
	ListCell   *lc;

	(void) fw_template_parse(t, &cols);
	d = palloc(sizeof(Datum) * (list_length(cols) + 1));
	foreach(lc, cols)
	{
		Name		nm = palloc0(NAMEDATALEN);

		namestrcpy(nm, (char *) lfirst(lc));
		d[n++] = NameGetDatum(nm);
	}
	PG_RETURN_ARRAYTYPE_P(construct_array(d, n, NAMEOID, NAMEDATALEN, false, TYPALIGN_CHAR));
}

/*
 * The prompt of one row: vals[i] is column i's text, none NULL.  NULL when
 * longer than FW_ENRICH_PROMPT_MAX (measured first: columns of up to 1 GB
 * each must not reach StringInfo's limit, an error that would fail the
 * whole chunk).
 */
static char *
fw_template_render(List *segs, char **vals)
{
	StringInfoData b;
	ListCell   *lc;
	Size		len = 0;

	foreach(lc, segs)
	{
		FwSeg	   *s = lfirst(lc);

		len += s->lit ? (Size) s->len : strlen(vals[s->col]);
		if (len > FW_ENRICH_PROMPT_MAX)
			return NULL;
	}
	initStringInfo(&b);
	foreach(lc, segs)
	{
		FwSeg	   *s = lfirst(lc);

		if (s->lit)
			appendBinaryStringInfo(&b, s->lit, s->len);
		else
			appendStringInfoString(&b, vals[s->col]);
	}
	return b.data;
}

/* ---------------------------------------------------------------------
 * The SQL entry points
 * ---------------------------------------------------------------------
 */

/*
 * Run sql (one SELECT of a plpgsql body) as the bootstrap superuser for
 * the calling role, which the body gets as $1 and checks.
 */
static Datum
fw_enrich_as_owner(const char *sql, int nargs, Oid *types, Datum *values,
				   const char *nulls, bool *isnull)
{
	Oid			save_uid;
	int			save_sec;
	Datum		result = (Datum) 0;
	int			rc;

	fw_require_preload();
	GetUserIdAndSecContext(&save_uid, &save_sec);
	SetUserIdAndSecContext(BOOTSTRAP_SUPERUSERID, save_sec | SECURITY_LOCAL_USERID_CHANGE);
	PG_TRY();
	{
		SPI_connect();
		rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 1);
		if (rc != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "fw_enrich: unexpected result %d", rc);
		result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, isnull);
		if (!*isnull)
			result = SPI_datumTransfer(result, true, 8);
		SPI_finish();
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_uid, save_sec);
	}
	PG_END_TRY();
	return result;
}

static char
fw_null(FunctionCallInfo fcinfo, int i)
{
	return PG_ARGISNULL(i) ? 'n' : ' ';
}

Datum
fw_enrich_create(PG_FUNCTION_ARGS)
{
	Oid			types[7] = {OIDOID, TEXTOID, REGCLASSOID, NAMEOID, TEXTOID, TEXTOID, JSONBOID};
	Datum		values[7];
	char		nulls[8];
	bool		isnull;
	Datum		id;

	values[0] = ObjectIdGetDatum(GetUserId());
	nulls[0] = ' ';
	for (int i = 0; i < 6; i++)
	{
		values[i + 1] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i + 1] = fw_null(fcinfo, i);
	}
	nulls[7] = '\0';
	id = fw_enrich_as_owner("SELECT fw_tier.enrich_install($1, $2, $3, $4, $5, $6, $7)",
							7, types, values, nulls, &isnull);
	if (isnull)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(id);
}

static Datum
fw_enrich_manage(FunctionCallInfo fcinfo, const char *action)
{
	Oid			types[3] = {OIDOID, TEXTOID, TEXTOID};
	Datum		values[3];
	char		nulls[4] = "   ";
	bool		isnull;

	values[0] = ObjectIdGetDatum(GetUserId());
	values[1] = CStringGetTextDatum(action);
	values[2] = PG_ARGISNULL(0) ? (Datum) 0 : PG_GETARG_DATUM(0);
	nulls[2] = fw_null(fcinfo, 0);
	return fw_enrich_as_owner("SELECT fw_tier.enrich_manage($1, $2, $3)",
							  3, types, values, nulls, &isnull);
}

Datum
fw_enrich_drop(PG_FUNCTION_ARGS)
{
	(void) fw_enrich_manage(fcinfo, "drop");
	PG_RETURN_VOID();
}

Datum
fw_enrich_pause(PG_FUNCTION_ARGS)
{
	(void) fw_enrich_manage(fcinfo, "pause");
	PG_RETURN_VOID();
}

Datum
fw_enrich_resume(PG_FUNCTION_ARGS)
{
	PG_RETURN_DATUM(fw_enrich_manage(fcinfo, "resume"));
}

Datum
fw_enrich_retry(PG_FUNCTION_ARGS)
{
	PG_RETURN_DATUM(fw_enrich_manage(fcinfo, "retry"));
}

/* ---------------------------------------------------------------------
 * The worker
 * ---------------------------------------------------------------------
 */
typedef struct FwEnrichItem
{
	char	   *pk;				/* jsonb text */
	char	   *prompt;			/* NULL: nothing to send */
	char		md5[33];
	char	   *saved;			/* a saved answer, or NULL */
	char		saved_md5[33];
	int			call;			/* index in job->calls, -1 = none */
	char	   *err;			/* the run's error, charged to this item */
	bool		handled;
} FwEnrichItem;

typedef struct FwEnrichJob
{
	int			id;
	Oid			owner;
	Oid			relid;			/* the source */
	int			kind;			/* FW_ENRICH_* */
	Oid			type;			/* the answer's: text, jsonb or real[] */
	Oid			typinput;
	Oid			typoutput;
	Oid			typioparam;
	int			max_attempts;
	int			concurrency;
	int			chunk;
	char	   *workload;
	Jsonb	   *options;		/* the request's (fw_tier keys removed) */
	Jsonb	   *schema;
	List	   *segs;
	int			ncols;
	char	   *sql_values;		/* the chunk's rows */
	char	   *sql_lock;		/* one row, locked */
	char	   *sql_exists;
	char	   *sql_update;
	char	   *sql_expand;		/* a key range into its rows, or NULL */
	SPIPlanPtr	p_lock;
	SPIPlanPtr	p_exists;
	SPIPlanPtr	p_update;
	FwEnrichItem *items;
	int			nitems;
	FwCall	   *calls;
	int			ncalls;
	int			done;			/* written back, this turn */
	MemoryContext cxt;
} FwEnrichJob;

static void
fw_enrich_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	/*
	 * Stop the engine as a cancel does, then leave cleanly (the write-back
	 * holds cancel, but waits for no row lock and at most lock_timeout for
	 * the table); a second SIGTERM is die(): FATAL at the next
	 * CHECK_FOR_INTERRUPTS, lock waits included.
	 */
	if (fw_enrich_stop)
		ProcDiePending = true;
	fw_enrich_stop = true;
	InterruptPending = true;
	QueryCancelPending = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

static void
fw_enrich_detach(int code, Datum arg)
{
	if (fw_enrich_shared == NULL || fw_enrich_myslot < 0)
		return;
	SpinLockAcquire(&fw_enrich_shared->mutex);
	if (fw_enrich_shared->slot[fw_enrich_myslot].pid == MyProcPid)
		fw_enrich_shared->slot[fw_enrich_myslot].used = false;
	fw_enrich_shared->slot[fw_enrich_myslot].latch = NULL;
	SpinLockRelease(&fw_enrich_shared->mutex);
}

static void
fw_enrich_mark_checked(void)
{
	SpinLockAcquire(&fw_enrich_shared->mutex);
	fw_enrich_shared->slot[fw_enrich_myslot].checked = true;
	SpinLockRelease(&fw_enrich_shared->mutex);
}

static void
fw_xact_begin(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
}

static void
fw_xact_end(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
}

static void
fw_as(Oid uid)
{
	int			sec;
	Oid			cur;

	GetUserIdAndSecContext(&cur, &sec);
	if (uid == BOOTSTRAP_SUPERUSERID)
		SetUserIdAndSecContext(uid, sec & ~(SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION));
	else
		SetUserIdAndSecContext(uid, sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
}

static void
fw_md5(const char *s, char *out)
{
	const char *err;

	if (!pg_md5_hash(s, strlen(s), out, &err))
		elog(ERROR, "md5 failed: %s", err);
}

/* run a fixed statement on the queue (as the superuser) */
static void
fw_q(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (rc < 0)
		elog(ERROR, "fw_tier enrich: queue statement failed: %d", rc);
}

/*
 * In_flight items whose claimer is gone (killed, crashed, restarted) or is
 * this worker (after an error) go back to the queue.
 */
static void
fw_enrich_recover(void)
{
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(MyProcPid)};

	/* SKIP LOCKED: a writer's open transaction may hold a queue row */
	fw_q("UPDATE fw_tier.enrich_queue q SET state = 'queued', claimed_by = NULL, claimed_at = NULL"
		 " FROM (SELECT x.enrichment, x.pk FROM fw_tier.enrich_queue x"
		 "  WHERE x.state = 'in_flight' AND (x.claimed_by = $1 OR NOT EXISTS ("
		 "   SELECT 1 FROM pg_catalog.pg_stat_get_activity(x.claimed_by) a"
		 "    WHERE a.backend_start <= x.claimed_at))"
		 "  FOR UPDATE OF x SKIP LOCKED) c"
		 " WHERE q.enrichment = c.enrichment AND q.pk = c.pk",
		 1, types, values, NULL);
}

static char *
fw_getstr(HeapTuple tup, TupleDesc td, int col)
{
	char	   *v = SPI_getvalue(tup, td, col);

	return v;
}

/* the enrichment's settings and its statements, built with quote_identifier */
static FwEnrichJob *
fw_enrich_load_job(int id, MemoryContext cxt)
{
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(id)};
	FwEnrichJob *job;
	HeapTuple	tup;
	TupleDesc	td;
	MemoryContext old;
	Oid			relid;
	char	   *rel;
	char	   *target;
	char	   *tmpl;
	List	   *cols;
	Datum		d;
	bool		isnull;
	ArrayType  *keys;
	Datum	   *kd;
	int			nk;
	StringInfoData sel,
				join,
				joinv,
				joinu;
	char	  **keytypes;
	ListCell   *lc;
	int			rc;

	rc = SPI_execute_with_args("SELECT e.owner, e.source::pg_catalog.oid, e.target_column::pg_catalog.text, e.prompt,"
							   " e.key_columns, e.workload, e.kind,"
							   " e.options OPERATOR(pg_catalog.-) ARRAY['kind', 'schema', 'max_attempts', 'concurrency', 'chunk'],"
							   " e.options -> 'schema', e.max_attempts,"
							   " (e.options ->> 'concurrency')::pg_catalog.int4,"
							   " (e.options ->> 'chunk')::pg_catalog.int4"
							   " FROM fw_tier.enrichments e WHERE e.id = $1 AND NOT e.paused"
							   " AND EXISTS (SELECT 1 FROM pg_catalog.pg_authid r WHERE r.oid = e.owner)",
							   1, types, values, NULL, true, 1);
	if (rc != SPI_OK_SELECT || SPI_processed != 1)
		return NULL;
	tup = SPI_tuptable->vals[0];
	td = SPI_tuptable->tupdesc;

	old = MemoryContextSwitchTo(cxt);
	job = palloc0(sizeof(FwEnrichJob));
	job->cxt = cxt;
	job->id = id;
	job->owner = DatumGetObjectId(SPI_getbinval(tup, td, 1, &isnull));
	relid = DatumGetObjectId(SPI_getbinval(tup, td, 2, &isnull));
	job->relid = relid;
	target = fw_getstr(tup, td, 3);
	tmpl = fw_getstr(tup, td, 4);
	keys = DatumGetArrayTypeP(SPI_getbinval(tup, td, 5, &isnull));
	job->workload = fw_getstr(tup, td, 6);
	{
		char	   *k = fw_getstr(tup, td, 7);
		bool		varlena;

		job->kind = strcmp(k, "json") == 0 ? FW_ENRICH_JSON :
			strcmp(k, "embed") == 0 ? FW_ENRICH_EMBED : FW_ENRICH_COMPLETE;
		job->type = job->kind == FW_ENRICH_JSON ? JSONBOID :
			job->kind == FW_ENRICH_EMBED ? FLOAT4ARRAYOID : TEXTOID;
		getTypeInputInfo(job->type, &job->typinput, &job->typioparam);
		getTypeOutputInfo(job->type, &job->typoutput, &varlena);
	}
	d = SPI_getbinval(tup, td, 8, &isnull);
	job->options = isnull ? NULL : DatumGetJsonbPCopy(d);
	d = SPI_getbinval(tup, td, 9, &isnull);
	job->schema = isnull ? NULL : DatumGetJsonbPCopy(d);
	job->max_attempts = DatumGetInt32(SPI_getbinval(tup, td, 10, &isnull));
	d = SPI_getbinval(tup, td, 11, &isnull);
	job->concurrency = Min(fw_max_concurrency, fw_max_concurrency_cap);
	if (!isnull)
		job->concurrency = Max(1, Min(DatumGetInt32(d), fw_max_concurrency_cap));
	d = SPI_getbinval(tup, td, 12, &isnull);
	job->chunk = isnull ? Min(8 * job->concurrency, 2000) : Max(1, Min(DatumGetInt32(d), 10000));

	if (job->kind == FW_ENRICH_JSON)
	{
		fw_schema_check(job->schema);
		job->options = fw_json_options(job->options, job->schema);
	}
	job->segs = fw_template_parse(tmpl, &cols);
	job->ncols = list_length(cols);

	if (get_rel_name(relid) == NULL)
	{
		/* dropped under us (the event trigger removes the enrichment) */
		MemoryContextSwitchTo(old);
		return NULL;
	}
	rel = quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
									 get_rel_name(relid));
	initStringInfo(&sel);
	foreach(lc, cols)
		appendStringInfo(&sel, ", (t.%s)::pg_catalog.text", quote_identifier(lfirst(lc)));
	deconstruct_array(keys, NAMEOID, NAMEDATALEN, false, TYPALIGN_CHAR, &kd, NULL, &nk);
	/*
	 * The key, compared as (pk ->> 'k')::type: its types are built-in
	 * scalars (enrich_install), so the casts and operators run no user
	 * code, unlike jsonb_populate_record(NULL::rel, ...), which runs the
	 * CHECK of every domain-typed column of the table.
	 */
	keytypes = palloc(sizeof(char *) * nk);
	for (int i = 0; i < nk; i++)
	{
		const char *k = NameStr(*DatumGetName(kd[i]));
		AttrNumber	att = get_attnum(relid, k);
		Oid			kt = att == InvalidAttrNumber ? InvalidOid : get_atttype(relid, att);

		if (att == InvalidAttrNumber)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("enrichment %d: primary key column \"%s\" no longer exists (renamed?)", id, k)));
		if (!OidIsValid(kt) || kt >= FirstNormalObjectId || get_typtype(kt) != TYPTYPE_BASE ||
			type_is_array(kt))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("enrichment %d: primary key column \"%s\" is not of a built-in scalar type", id, k)));
		keytypes[i] = format_type_extended(kt, -1, FORMAT_TYPE_FORCE_QUALIFY);
	}
	initStringInfo(&join);
	initStringInfo(&joinv);
	initStringInfo(&joinu);
	for (int i = 0; i < nk; i++)
	{
		const char *k = NameStr(*DatumGetName(kd[i]));
		const char *fmt = "%s t.%s OPERATOR(pg_catalog.=) (%s OPERATOR(pg_catalog.->>) %s)::%s";

		appendStringInfo(&join, fmt, i ? " AND" : "", quote_identifier(k),
						 "$1::pg_catalog.jsonb", quote_literal_cstr(k), keytypes[i]);
		appendStringInfo(&joinv, fmt, i ? " AND" : "", quote_identifier(k),
						 "k.pk", quote_literal_cstr(k), keytypes[i]);
		appendStringInfo(&joinu, fmt, i ? " AND" : "", quote_identifier(k),
						 "$2::pg_catalog.jsonb", quote_literal_cstr(k), keytypes[i]);
	}
	job->sql_values = psprintf("SELECT k.o%s FROM pg_catalog.unnest($1::pg_catalog.jsonb[]) WITH ORDINALITY k(pk, o)"
							   " JOIN ONLY %s t ON %s",
							   sel.data, rel, joinv.data);
	/* NO KEY UPDATE: the write-back changes no key; a referencing insert's KEY SHARE need not wait */
	job->sql_lock = psprintf("SELECT 1%s FROM ONLY %s t WHERE %s FOR NO KEY UPDATE OF t SKIP LOCKED",
							 sel.data, rel, join.data);
	job->sql_exists = psprintf("SELECT 1 FROM ONLY %s t WHERE %s", rel, join.data);
	/* by the key, not ctid: a creator with column privileges cannot read ctid */
	job->sql_update = psprintf("UPDATE ONLY %s t SET %s = $1 WHERE %s",
							   rel, quote_identifier(target), joinu.data);
	if (nk == 1)
	{
		const char *k = NameStr(*DatumGetName(kd[0]));
		const char *qk = quote_identifier(k);
		const char *lk = quote_literal_cstr(k);

		/*
		 * Run as the superuser (it writes the queue): reads the key and
		 * the target's nullness only, built-in casts and operators.
		 */
		job->sql_expand = psprintf("INSERT INTO fw_tier.enrich_queue (enrichment, pk)"
								   " SELECT $1, pg_catalog.jsonb_build_object(%s, t.%s)"
								   " FROM ONLY %s t"
								   " WHERE t.%s OPERATOR(pg_catalog.>=) ($2::pg_catalog.jsonb -> 0 ->> %s)::%s"
								   " AND t.%s OPERATOR(pg_catalog.<=) ($2::pg_catalog.jsonb -> 1 ->> %s)::%s"
								   " AND t.%s IS NULL"
								   " ON CONFLICT (enrichment, pk) DO NOTHING",
								   lk, qk, rel, qk, lk, keytypes[0], qk, lk, keytypes[0],
								   quote_identifier(target));
	}
	MemoryContextSwitchTo(old);
	return job;
}

/* RowExclusiveLock on the source (no privilege needed: a lock only); false if gone */
static bool
fw_enrich_lock_source(FwEnrichJob *job)
{
	LockRelationOid(job->relid, RowExclusiveLock);
	if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(job->relid)))
	{
		UnlockRelationOid(job->relid, RowExclusiveLock);
		return false;
	}
	/* a snapshot taken before the lock may not see what DDL committed */
	PopActiveSnapshot();
	PushActiveSnapshot(GetTransactionSnapshot());
	return true;
}

static SPIPlanPtr
fw_plan(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	p = SPI_prepare(sql, nargs, types);

	if (p == NULL)
		elog(ERROR, "fw_tier enrich: could not prepare \"%s\": %s", sql,
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(p);
	return p;
}

/*
 * Claim a chunk of due items of job, read their rows, build the prompts.
 * In the caller's transaction.  Returns the number claimed.
 */
static int
fw_enrich_claim(FwEnrichJob *job)
{
	Oid			types[3] = {INT4OID, INT4OID, INT4OID};
	Datum		values[3];
	MemoryContext old;
	int			n;
	Datum	   *pks;
	ArrayType  *arr;
	Oid			atypes[1] = {TEXTARRAYOID};
	Datum		avalues[1];
	int			rc;

	values[0] = Int32GetDatum(job->id);
	values[1] = Int32GetDatum(job->chunk);
	values[2] = Int32GetDatum(MyProcPid);

	/*
	 * The table before the queue rows, as DDL on it does (ALTER TABLE's
	 * event trigger deletes queue rows under AccessExclusiveLock): never
	 * the other order, so the two cannot deadlock.
	 */
	if (!fw_enrich_lock_source(job))
		return 0;

	/* key ranges the INSERT trigger queued: one item per row still NULL */
	if (job->sql_expand)
	{
		List	   *ranges = NIL;
		ListCell   *lc;
		Oid			etypes[2] = {INT4OID, TEXTOID};

		rc = SPI_execute_with_args("SELECT q.pk::pg_catalog.text FROM fw_tier.enrich_queue q"
								   " WHERE q.enrichment = $1 AND pg_catalog.jsonb_typeof(q.pk) = 'array'"
								   " AND q.state = 'queued' LIMIT 20 FOR UPDATE SKIP LOCKED",
								   1, types, values, NULL, false, 0);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "fw_tier enrich: reading key ranges failed: %d", rc);
		for (uint64 r = 0; r < SPI_processed; r++)
			ranges = lappend(ranges, SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1));
		foreach(lc, ranges)
		{
			Datum		ev[2] = {values[0], CStringGetTextDatum((char *) lfirst(lc))};

			fw_q(job->sql_expand, 2, etypes, ev, NULL);
			fw_q("DELETE FROM fw_tier.enrich_queue WHERE enrichment = $1 AND pk = $2::pg_catalog.jsonb",
				 2, etypes, ev, NULL);
		}
	}

	rc = SPI_execute_with_args("WITH c AS (SELECT q.pk FROM fw_tier.enrich_queue q"
							   "  WHERE q.enrichment = $1 AND q.state = 'queued'"
							   "    AND pg_catalog.jsonb_typeof(q.pk) = 'object'"
							   "    AND q.not_before <= pg_catalog.now()"
							   "  LIMIT $2 FOR UPDATE SKIP LOCKED)"
							   " UPDATE fw_tier.enrich_queue q SET state = 'in_flight',"
							   "   claimed_by = $3, claimed_at = pg_catalog.now()"
							   "  FROM c WHERE q.enrichment = $1 AND q.pk = c.pk"
							   " RETURNING q.pk::pg_catalog.text, q.answer, q.answer_md5",
							   3, types, values, NULL, false, 0);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "fw_tier enrich: claim failed: %d", rc);
	n = (int) SPI_processed;
	if (n == 0)
		return 0;
	/* a full chunk: there may be work for one more worker (fw_tier.enrich_workers) */
	if (n == job->chunk)
		(void) fw_enrich_kick(MyDatabaseId, 0);

	old = MemoryContextSwitchTo(job->cxt);
	job->items = palloc0(sizeof(FwEnrichItem) * n);
	job->nitems = n;
	pks = palloc(sizeof(Datum) * n);
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;
		char	   *md5;

		job->items[i].pk = SPI_getvalue(tup, td, 1);
		job->items[i].saved = SPI_getvalue(tup, td, 2);
		md5 = SPI_getvalue(tup, td, 3);
		if (md5)
			strlcpy(job->items[i].saved_md5, md5, 33);
		job->items[i].call = -1;
		pks[i] = CStringGetTextDatum(job->items[i].pk);
	}
	arr = construct_array(pks, n, TEXTOID, -1, false, TYPALIGN_INT);
	MemoryContextSwitchTo(old);

	/* the rows, read as the owner */
	avalues[0] = PointerGetDatum(arr);
	fw_as(job->owner);
	rc = SPI_execute_with_args(job->sql_values, 1, atypes, avalues, NULL, true, 0);
	fw_as(BOOTSTRAP_SUPERUSERID);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "fw_tier enrich: reading the rows failed: %d", rc);

	old = MemoryContextSwitchTo(job->cxt);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	td = SPI_tuptable->tupdesc;
		bool		isnull;
		int			o = DatumGetInt64(SPI_getbinval(tup, td, 1, &isnull)) - 1;
		char	  **vals = palloc(sizeof(char *) * (job->ncols + 1));
		bool		anynull = false;

		for (int c = 0; c < job->ncols; c++)
		{
			vals[c] = SPI_getvalue(tup, td, c + 2);
			anynull |= (vals[c] == NULL);
		}
		if (o < 0 || o >= n || anynull)
			continue;
		job->items[o].prompt = fw_template_render(job->segs, vals);
		if (job->items[o].prompt == NULL)
		{
			/* too long: an attempt charged (a dead letter at max_attempts) */
			job->items[o].call = -2;
			job->items[o].err = psprintf("the prompt is longer than %d bytes", FW_ENRICH_PROMPT_MAX);
			continue;
		}
		fw_md5(job->items[o].prompt, job->items[o].md5);
	}
	MemoryContextSwitchTo(old);
	return n;
}

/*
 * Write back (or requeue, or fail) item i, in a subtransaction of the
 * caller's transaction.  answer NULL: the call failed with err.  Returns
 * false when a writer holds the queue row (its trigger's ON CONFLICT):
 * never wait for it (the writer may keep its transaction open, and the
 * write-back holds cancel); the caller tries again next turn.
 */
static bool
fw_enrich_finish_item(FwEnrichJob *job, FwEnrichItem *it, Datum value,
					  const char *answer, const char *err)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	Oid			qtypes[6] = {INT4OID, TEXTOID, INT4OID, TEXTOID, TEXTOID, INT4OID};
	Datum		qv[6];
	char		qn[7] = "      ";
	const char *fail = err;
	bool		save = false;	/* keep the answer in the item */
	volatile bool busy = false; /* a writer holds the queue row */

	qv[0] = Int32GetDatum(job->id);
	qv[1] = CStringGetTextDatum(it->pk);
	qv[2] = Int32GetDatum(MyProcPid);

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		int			rc;

		/* still ours?  (fw_enrich_drop deletes it; never write then) */
		rc = SPI_execute_with_args("SELECT 1 FROM fw_tier.enrich_queue WHERE enrichment = $1"
								   " AND pk = $2::pg_catalog.jsonb AND state = 'in_flight'"
								   " AND claimed_by = $3 FOR UPDATE SKIP LOCKED",
								   3, qtypes, qv, NULL, false, 1);
		if (rc == SPI_OK_SELECT && SPI_processed == 0)
		{
			rc = SPI_execute_with_args("SELECT 1 FROM fw_tier.enrich_queue WHERE enrichment = $1"
									   " AND pk = $2::pg_catalog.jsonb AND state = 'in_flight'"
									   " AND claimed_by = $3",
									   3, qtypes, qv, NULL, true, 1);
			busy = (rc == SPI_OK_SELECT && SPI_processed == 1);
			fail = NULL;
		}
		else if (rc != SPI_OK_SELECT || SPI_processed != 1)
			fail = NULL;		/* not ours any more: nothing to do */
		else if (answer != NULL)
		{
			Oid			ltypes[1] = {TEXTOID};
			Datum		lv[1] = {qv[1]};

			fw_as(job->owner);
			rc = SPI_execute_plan(job->p_lock, lv, NULL, false, 1);
			if (rc == SPI_OK_SELECT && SPI_processed == 1)
			{
				HeapTuple	tup = SPI_tuptable->vals[0];
				TupleDesc	td = SPI_tuptable->tupdesc;
				char	  **vals = palloc(sizeof(char *) * (job->ncols + 1));
				bool		anynull = false;
				char		md5[33];
				char	   *p;

				for (int c = 0; c < job->ncols; c++)
				{
					vals[c] = SPI_getvalue(tup, td, c + 2);
					anynull |= (vals[c] == NULL);
				}
				p = anynull ? NULL : fw_template_render(job->segs, vals);
				if (p == NULL)
					md5[0] = '\0';
				else
					fw_md5(p, md5);
				if (strcmp(md5, it->md5) == 0)
				{
					Datum		uv[2];

					uv[0] = value;
					uv[1] = qv[1];	/* the key: the row we hold locked */
					rc = SPI_execute_plan(job->p_update, uv, NULL, false, 0);
					if (rc != SPI_OK_UPDATE)
						elog(ERROR, "fw_tier enrich: write-back failed: %d", rc);
					fw_as(BOOTSTRAP_SUPERUSERID);
					fw_q("DELETE FROM fw_tier.enrich_queue WHERE enrichment = $1 AND pk = $2::pg_catalog.jsonb",
						 2, qtypes, qv, NULL);
					job->done++;
				}
				else
				{
					/* the row changed since: its new value needs a new answer */
					fw_as(BOOTSTRAP_SUPERUSERID);
					fw_q("UPDATE fw_tier.enrich_queue SET state = 'queued', claimed_by = NULL,"
						 " claimed_at = NULL, answer = NULL, answer_md5 = NULL"
						 " WHERE enrichment = $1 AND pk = $2::pg_catalog.jsonb",
						 2, qtypes, qv, NULL);
				}
				fail = NULL;
			}
			else
			{
				rc = SPI_execute_plan(job->p_exists, lv, NULL, true, 1);
				fw_as(BOOTSTRAP_SUPERUSERID);
				if (rc == SPI_OK_SELECT && SPI_processed == 1)
				{
					/* a writer holds the row: keep the answer, look again soon */
					qv[3] = CStringGetTextDatum(answer);
					qv[4] = CStringGetTextDatum(it->md5);
					fw_q("UPDATE fw_tier.enrich_queue SET state = 'queued', claimed_by = NULL,"
						 " claimed_at = NULL, answer = $4, answer_md5 = $5,"
						 " not_before = pg_catalog.now() + '1 second'::pg_catalog.interval"
						 " WHERE enrichment = $1 AND pk = $2::pg_catalog.jsonb",
						 5, qtypes, qv, NULL);
				}
				else
					fw_q("DELETE FROM fw_tier.enrich_queue WHERE enrichment = $1 AND pk = $2::pg_catalog.jsonb",
						 2, qtypes, qv, NULL);	/* the row is gone */
				fail = NULL;
			}
			(void) ltypes;
		}
		else if (it->prompt == NULL)
		{
			/* gone, or a named column is NULL: nothing to send */
			fw_q("DELETE FROM fw_tier.enrich_queue WHERE enrichment = $1 AND pk = $2::pg_catalog.jsonb",
				 2, qtypes, qv, NULL);
			fail = NULL;
		}
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		fail = psprintf("write-back: %s", edata->message);
		save = (answer != NULL);
		FreeErrorData(edata);
	}
	PG_END_TRY();

	if (fail)
	{
		Oid			ftypes[6] = {INT4OID, TEXTOID, TEXTOID, INT4OID, TEXTOID, TEXTOID};
		Datum		fv[6];

		fv[0] = qv[0];
		fv[1] = qv[1];
		fv[2] = CStringGetTextDatum(pnstrdup(fail, FW_ENRICH_ERRLEN));
		fv[3] = Int32GetDatum(job->max_attempts);
		if (save)
		{
			fv[4] = CStringGetTextDatum(answer);
			fv[5] = CStringGetTextDatum(it->md5);
			qn[4] = qn[5] = ' ';
		}
		else
		{
			fv[4] = fv[5] = (Datum) 0;
			qn[4] = qn[5] = 'n';
		}
		qn[6] = '\0';
		fw_q("UPDATE fw_tier.enrich_queue SET attempts = attempts + 1, last_error = $3,"
			 " state = CASE WHEN attempts + 1 >= $4 THEN 'dead' ELSE 'queued' END,"
			 " not_before = pg_catalog.now() + pg_catalog.make_interval(secs => LEAST(300, 2 ^ attempts)),"
			 " claimed_by = NULL, claimed_at = NULL,"
			 " answer = coalesce($5, answer), answer_md5 = coalesce($6, answer_md5)"
			 " WHERE enrichment = $1 AND pk = $2::pg_catalog.jsonb AND state = 'in_flight'",
			 6, ftypes, fv, qn);
	}
	(void) qtypes;
	return !busy;
}

static void
fw_enrich_count_done(FwEnrichJob *job)
{
	Oid			types[2] = {INT4OID, INT8OID};
	Datum		values[2];

	if (job->done == 0)
		return;
	values[0] = Int32GetDatum(job->id);
	values[1] = Int64GetDatum((int64) job->done);
	fw_q("INSERT INTO fw_tier.enrich_done AS d (enrichment, bucket, n)"
		 " VALUES ($1, pg_catalog.date_bin('10 seconds', pg_catalog.now(), 'epoch'), $2)"
		 " ON CONFLICT (enrichment, bucket) DO UPDATE SET n = d.n + excluded.n",
		 2, types, values, NULL);
	job->done = 0;
}

/* the write-back of a turn, in the caller's transaction (source locked) */
static void
fw_enrich_write_turn(FwEnrichJob *job)
{
	if (job->p_lock == NULL)
	{
		Oid			t1[1] = {TEXTOID};
		Oid			t2[2] = {job->type, TEXTOID};

		fw_as(job->owner);
		job->p_lock = fw_plan(job->sql_lock, 1, t1);
		job->p_exists = fw_plan(job->sql_exists, 1, t1);
		job->p_update = fw_plan(job->sql_update, 2, t2);
		fw_as(BOOTSTRAP_SUPERUSERID);
	}
	for (int i = 0; i < job->nitems; i++)
	{
		FwEnrichItem *it = &job->items[i];
		FwCall	   *c;

		if (it->handled)
			continue;
		if (it->call == -2)
		{
			it->handled = fw_enrich_finish_item(job, it, (Datum) 0, NULL, it->err);
			continue;
		}
		if (it->call < 0)
		{
			/* nothing to send, or a saved answer still good */
			if (it->prompt && it->saved)
				it->handled = fw_enrich_finish_item(job, it,
													OidInputFunctionCall(job->typinput, it->saved, job->typioparam, -1),
													it->saved, NULL);
			else
				it->handled = fw_enrich_finish_item(job, it, (Datum) 0, NULL, NULL);
			continue;
		}
		c = &job->calls[it->call];
		if (it->err && !c->finished)
			it->handled = fw_enrich_finish_item(job, it, (Datum) 0, NULL, it->err);
		else if (!c->finished)
			continue;
		else if (c->ok)
		{
			Datum		v;

			if (job->kind == FW_ENRICH_JSON)
				v = JsonbPGetDatum(c->output);
			else if (job->kind == FW_ENRICH_EMBED)
				v = PointerGetDatum(fw_embed_answer(c));
			else
				v = CStringGetTextDatum(c->content);
			it->handled = fw_enrich_finish_item(job, it, v, OidOutputFunctionCall(job->typoutput, v), NULL);
		}
		else
			it->handled = fw_enrich_finish_item(job, it, (Datum) 0, NULL,
												psprintf("%s: %s", fw_outcome_name(c->outcome),
														 c->detail ? c->detail : "no detail"));
	}
	fw_enrich_count_done(job);
}

/*
 * Make every finished, unhandled item durable, in one transaction.  With
 * in_engine, the engine's transaction is committed first and a new one
 * begun after (the engine keeps no snapshot or SPI connection between
 * turns).
 */
static void
fw_enrich_flush(FwEnrichJob *job, bool in_engine)
{
	bool		any = false;
	MemoryContext old = CurrentMemoryContext;

	for (int i = 0; i < job->nitems && !any; i++)
	{
		FwEnrichItem *it = &job->items[i];

		if (!it->handled && (it->call < 0 || it->err || job->calls[it->call].finished))
			any = true;
	}
	if (!any)
		return;

	/* a cancel is for the calls: the write-back is short and goes through */
	HOLD_CANCEL_INTERRUPTS();
	if (in_engine)
	{
		fw_as(BOOTSTRAP_SUPERUSERID);
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	fw_xact_begin();
	if (!fw_enrich_lock_source(job))
	{
		/* the table is gone, and its items with it */
		for (int i = 0; i < job->nitems; i++)
			job->items[i].handled = true;
	}
	else
		fw_enrich_write_turn(job);
	if (!in_engine)
	{
		/*
		 * The last turn: an item whose queue row a writer still holds stays
		 * in_flight, ours; fw_enrich_recover (SKIP LOCKED, every 10 s)
		 * queues it again once the writer is done.  Its answer is dropped:
		 * the writer's trigger touched the row because a watched column
		 * changed, so it answers a value the row no longer has.
		 */
		for (int i = 0; i < job->nitems; i++)
			job->items[i].handled = true;
	}
	fw_xact_end();
	if (in_engine)
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		PushActiveSnapshot(GetTransactionSnapshot());
		fw_as(job->owner);
	}
	RESUME_CANCEL_INTERRUPTS();
	MemoryContextSwitchTo(old);
}

static void
fw_enrich_hook(FwCall *calls, int ncalls, void *arg)
{
	fw_enrich_flush((FwEnrichJob *) arg, true);
}

/*
 * One chunk of enrichment id: claim, call, write back.  Returns the number
 * of items claimed.
 */
static int
fw_enrich_chunk(int id, MemoryContext cxt)
{
	FwEnrichJob *volatile job = NULL;
	volatile int n = 0;
	MemoryContext old;

	PG_TRY();
	{
		fw_xact_begin();
		job = fw_enrich_load_job(id, cxt);
		n = job ? fw_enrich_claim(job) : 0;
		fw_xact_end();
	}
	PG_CATCH();
	{
		/*
		 * The enrichment cannot be loaded or its items read (SELECT
		 * revoked, a column's text cast raising, a bad option): its due
		 * items are charged an attempt, with the items' backoff, so it
		 * neither loops nor hides (last_error, a dead letter at
		 * max_attempts, fw_enrich_retry).  A cancel charges nothing.
		 */
		ErrorData  *edata;
		Oid			ftypes[2] = {INT4OID, TEXTOID};
		Datum		fv[2];

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
		if (fw_enrich_stop || edata->sqlerrcode == ERRCODE_QUERY_CANCELED)
			ReThrowError(edata);
		fv[0] = Int32GetDatum(id);
		fv[1] = CStringGetTextDatum(psprintf("claim: %s", pnstrdup(edata->message, FW_ENRICH_ERRLEN)));
		fw_xact_begin();
		fw_q("UPDATE fw_tier.enrich_queue q SET attempts = q.attempts + 1, last_error = $2,"
			 " state = CASE WHEN q.attempts + 1 >= e.max_attempts THEN 'dead' ELSE 'queued' END,"
			 " not_before = pg_catalog.now() + pg_catalog.make_interval(secs => LEAST(300, 2 ^ q.attempts))"
			 " FROM fw_tier.enrichments e"
			 " WHERE e.id = $1 AND q.enrichment = $1 AND q.state = 'queued'"
			 " AND q.not_before <= pg_catalog.now()",
			 2, ftypes, fv, NULL);
		fw_xact_end();
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("fw_tier enrich: enrichment %d cannot claim its items: %s", id, edata->message),
				 errdetail("Its due items were charged an attempt (fw_tier.enrich_dead_letters at max_attempts).")));
		FreeErrorData(edata);
		return 0;
	}
	PG_END_TRY();
	if (n == 0)
		return 0;

	/* the calls: items with a prompt and no saved answer for it */
	old = MemoryContextSwitchTo(cxt);
	job->calls = palloc0(sizeof(FwCall) * n);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		fw_as(job->owner);
		for (int i = 0; i < n; i++)
		{
			FwEnrichItem *it = &job->items[i];
			FwCall	   *c;

			if (it->prompt == NULL ||
				(it->saved && strcmp(it->saved_md5, it->md5) == 0))
				continue;
			it->saved = NULL;
			c = &job->calls[job->ncalls];
			if (job->kind == FW_ENRICH_EMBED)
				fw_embed_prepare(c, job->workload, it->prompt, job->options);
			else
			{
				fw_call_init(c, job->workload, fw_messages_from_prompt(it->prompt),
							 job->options, true);
				c->prompt_text = it->prompt;
				c->schema = job->kind == FW_ENRICH_JSON ? job->schema : NULL;
			}
			it->call = job->ncalls++;
		}
		if (job->ncalls > 0)
		{
			fw_engine_set_hook(fw_enrich_hook, job);
			fw_engine_run(job->calls, job->ncalls, job->concurrency, false);
			fw_engine_set_hook(NULL, NULL);
		}
		fw_as(BOOTSTRAP_SUPERUSERID);
		PopActiveSnapshot();
		CommitTransactionCommand();
		MemoryContextSwitchTo(cxt);
		fw_enrich_flush(job, false);
	}
	PG_CATCH();
	{
		/*
		 * A cancel, SIGTERM or an error: the answers that had arrived are
		 * written (or saved) before anything else; the rest of the chunk
		 * goes back to the queue (fw_enrich_recover, by our pid).
		 */
		ErrorData  *edata;

		fw_engine_set_hook(NULL, NULL);
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
		if (job->calls)
		{
			bool		stop = fw_enrich_stop;

			/*
			 * Not a cancel: an error of the run itself (a replay miss, a
			 * bad setting) came from the first call not finished, in the
			 * order the engine starts them; that item is charged with it
			 * (so a replay miss becomes a dead letter, not a loop), the
			 * others go back to the queue uncharged.
			 */
			if (edata->sqlerrcode != ERRCODE_QUERY_CANCELED)
			{
				int			first = -1;

				for (int i = 0; i < job->nitems; i++)
				{
					FwEnrichItem *it = &job->items[i];

					if (it->call >= 0 && !job->calls[it->call].finished &&
						(first < 0 || it->call < job->items[first].call))
						first = i;
				}
				if (first >= 0)
					job->items[first].err = psprintf("error: %s", edata->message);
				else
				{
					/* raised while the calls were built (options): all of them */
					for (int i = 0; i < job->nitems; i++)
						if (job->items[i].prompt && job->items[i].call < 0 &&
							!(job->items[i].saved && strcmp(job->items[i].saved_md5, job->items[i].md5) == 0))
						{
							job->items[i].err = psprintf("error: %s", edata->message);
							job->items[i].call = -2;
						}
				}
			}

			/* the cancel was for the engine, not for the write-back */
			QueryCancelPending = false;
			fw_enrich_flush(job, false);
			fw_enrich_stop = stop;
		}
		fw_xact_begin();
		fw_enrich_recover();
		fw_xact_end();
		ereport(fw_enrich_stop ? LOG : WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("fw_tier enrich: a chunk of enrichment %d stopped: %s", id, edata->message)));
		/* not a cancel: do not spin on a chunk that fails at once */
		if (!fw_enrich_stop && edata->sqlerrcode != ERRCODE_QUERY_CANCELED)
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 1000, PG_WAIT_EXTENSION);
		if (job->p_lock)
		{
			SPI_freeplan(job->p_lock);
			SPI_freeplan(job->p_exists);
			SPI_freeplan(job->p_update);
		}
		MemoryContextSwitchTo(old);
		return n;
	}
	PG_END_TRY();
	if (job->p_lock)
	{
		SPI_freeplan(job->p_lock);
		SPI_freeplan(job->p_exists);
		SPI_freeplan(job->p_update);
	}
	MemoryContextSwitchTo(old);
	return n;
}

/*
 * The enrichments with due work, after `after` (round robin); -1 = none.
 * *pending: any non-paused item queued at all (due or not) or in flight.
 */
static int
fw_enrich_next(int after, bool *pending)
{
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(after)};
	int			id = -1;
	bool		isnull;

	*pending = false;
	if (SPI_execute_with_args("SELECT e.id FROM fw_tier.enrichments e WHERE NOT e.paused AND e.id > $1"
							  " AND EXISTS (SELECT 1 FROM pg_catalog.pg_authid r WHERE r.oid = e.owner)"
							  " AND EXISTS (SELECT 1 FROM fw_tier.enrich_queue q WHERE q.enrichment = e.id"
							  "  AND q.state = 'queued' AND q.not_before <= pg_catalog.now())"
							  " ORDER BY e.id LIMIT 1", 1, types, values, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
		id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (id >= 0)
	{
		*pending = true;
		return id;
	}
	if (SPI_execute("SELECT 1 FROM fw_tier.enrich_queue q JOIN fw_tier.enrichments e ON e.id = q.enrichment"
					" WHERE NOT e.paused AND q.state <> 'dead'"
					" AND EXISTS (SELECT 1 FROM pg_catalog.pg_authid r WHERE r.oid = e.owner) LIMIT 1", true, 1) == SPI_OK_SELECT)
		*pending = SPI_processed > 0;
	return -1;
}

static bool
fw_enrich_installed(void)
{
	return SPI_execute("SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
					   " WHERE n.nspname = 'fw_tier' AND c.relname = 'enrich_queue'", true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1;
}

void
fw_enrich_main(Datum main_arg)
{
	Oid			dboid;
	MemoryContext cxt;
	TimestampTz idle_since = 0;
	TimestampTz last_recover = 0;
	int			last_id = 0;
	char	   *dbname;

	fw_enrich_myslot = DatumGetInt32(main_arg);
	memcpy(&dboid, MyBgworkerEntry->bgw_extra, sizeof(Oid));

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, fw_enrich_sigterm);
	BackgroundWorkerUnblockSignals();

	SpinLockAcquire(&fw_enrich_shared->mutex);
	fw_enrich_shared->slot[fw_enrich_myslot].pid = MyProcPid;
	fw_enrich_shared->slot[fw_enrich_myslot].latch = MyLatch;
	SpinLockRelease(&fw_enrich_shared->mutex);
	before_shmem_exit(fw_enrich_detach, (Datum) 0);

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	fw_worker_pin_search_path();
	/* an answer is durable when its turn commits (see the header) */
	SetConfigOption("synchronous_commit", "on", PGC_SUSET, PGC_S_OVERRIDE);
	/* never wait long for a writer or DDL (the queue rows are SKIP LOCKED) */
	SetConfigOption("lock_timeout", "5s", PGC_SUSET, PGC_S_OVERRIDE);
	cxt = AllocSetContextCreate(TopMemoryContext, "fw_tier enrich chunk", ALLOCSET_DEFAULT_SIZES);

	fw_xact_begin();
	dbname = get_database_name(dboid);
	dbname = MemoryContextStrdup(TopMemoryContext, dbname ? dbname : "?");
	SetConfigOption("application_name", psprintf("fw_tier enrich %s", dbname),
					PGC_USERSET, PGC_S_SESSION);
	pgstat_report_appname(psprintf("fw_tier enrich %s", dbname));
	if (!fw_enrich_installed())
	{
		fw_xact_end();
		fw_enrich_mark_checked();
		proc_exit(0);
	}
	fw_xact_end();

	for (;;)
	{
		int			id = -1;
		bool		pending = false;
		TimestampTz now;

		if (fw_enrich_stop)
			break;
		/* a cancel between chunks has nothing to stop */
		QueryCancelPending = false;
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (fw_enrich_workers <= 0)
			break;
		/* never block a DROP DATABASE (or ALTER DATABASE) of ours */
		if (fw_database_busy(MyDatabaseId))
			break;

		now = GetCurrentTimestamp();
		pgstat_report_activity(STATE_RUNNING, "fw_tier enrich: looking for work");
		fw_xact_begin();
		if (TimestampDifferenceExceeds(last_recover, now, FW_ENRICH_RECOVER_MS))
		{
			fw_enrich_recover();
			last_recover = now;
		}
		id = fw_enrich_next(last_id, &pending);
		if (id < 0 && last_id > 0)
			id = fw_enrich_next(0, &pending);
		fw_xact_end();
		fw_enrich_mark_checked();

		if (id >= 0)
		{
			volatile int got = 0;

			pgstat_report_activity(STATE_RUNNING, "fw_tier enrich: a chunk");

			PG_TRY();
			{
				got = fw_enrich_chunk(id, cxt);
			}
			PG_CATCH();
			{
				/* the chunk's own recovery failed: report, back off, go on */
				EmitErrorReport();
				FlushErrorState();
				AbortCurrentTransaction();
				pg_usleep(1000000L);
			}
			PG_END_TRY();
			MemoryContextReset(cxt);
			last_id = id;
			idle_since = 0;
			/* nothing claimed (others took it, the table is gone): no spinning */
			if (got == 0)
			{
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 200, PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
			}
			continue;
		}
		last_id = 0;
		if (!pending)
		{
			if (idle_since == 0)
				idle_since = now;
			else if (TimestampDifferenceExceeds(idle_since, now, FW_ENRICH_IDLE_MS))
				break;
		}
		else
			idle_since = 0;
		pgstat_report_activity(STATE_IDLE, NULL);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 pending ? 200 : 1000, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	proc_exit(0);
}

/* ---------------------------------------------------------------------
 * The scout: at server start, one worker in each database in turn
 * ---------------------------------------------------------------------
 */
void
fw_enrich_scout_main(Datum main_arg)
{
	List	   *dbs = NIL;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	ListCell   *lc;

	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (db->datallowconn && !db->datistemplate
#if PG_VERSION_NUM >= 150004
			&& !database_is_invalid_form(db)
#endif
			)
			dbs = lappend_oid(dbs, db->oid);
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();

	foreach(lc, dbs)
	{
		Oid			dboid = lfirst_oid(lc);
		int			slot;

		if (fw_database_busy(dboid))
			continue;
		slot = fw_enrich_kick(dboid, MyProcPid);
		if (slot < 0)
			continue;
		/* one at a time: until it looked at its queue or left (30 s at most) */
		for (int t = 0; t < 600; t++)
		{
			bool		done;

			SpinLockAcquire(&fw_enrich_shared->mutex);
			done = !fw_enrich_shared->slot[slot].used || fw_enrich_shared->slot[slot].checked;
			SpinLockRelease(&fw_enrich_shared->mutex);
			if (done)
				break;
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 50, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
	}
	proc_exit(0);
}

/* launcher.c, once at its start */
void
fw_enrich_start_scout(void)
{
	BackgroundWorker w;
	BackgroundWorkerHandle *h;

	if (fw_enrich_workers <= 0)
		return;
	fw_enrich_describe(&w, "fw_enrich_scout_main", -1, InvalidOid, 0);
	w.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	(void) RegisterDynamicBackgroundWorker(&w, &h);
}
