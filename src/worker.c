/*-------------------------------------------------------------------------
 *
 * worker.c
 *		The fw_tier background workers: a launcher that owns the timing,
 *		and a short-lived flusher that drains the call-log ring into
 *		fw_tier.calls, mirrors Priority windows into fw_tier.escalations,
 *		closes them on time and raises the capacity alert.
 *
 * The autovacuum-launcher pattern.  The "fw_tier launcher" is a static
 * worker connected to no database: it reads only the shared catalog
 * pg_database, so it never keeps fw_tier.database open and never blocks a
 * DROP DATABASE of it.  It sleeps on its latch until the earliest deadline
 * (the end of the earliest open window, a retry) and starts a dynamic
 * "fw_tier flusher" connected to fw_tier.database whenever there is
 * database work: records in the ring, a window to record or close, an
 * alert, fw_flush(), the restore at first start.  One flusher at a time;
 * its exit wakes the launcher (bgw_notify_pid).  Backends set the
 * launcher's latch (worker_latch); the launcher passes the wakeup on to a
 * running flusher.
 *
 * The flusher follows the worker_spi skeleton: SIGHUP reloads the
 * configuration, SIGTERM asks for a shutdown, and the loop sleeps until
 * the next flush of the ring (fw_tier.flush_interval) or the end of a
 * window.  It stays while the ring holds records and leaves after
 * FW_FLUSHER_IDLE_MS with nothing to do.  At every wake, and between
 * batches, it probes for a DROP DATABASE (or ALTER DATABASE RENAME / SET
 * TABLESPACE) of its database: those hold AccessExclusiveLock on the
 * database object while they wait up to 5 s for other sessions to leave,
 * so a conditional AccessShareLock fails and the flusher exits at once.
 * Its records stay in the ring.  The launcher makes the same probe before
 * starting a flusher.
 *
 * When fw_tier.database does not exist the launcher says so once and looks
 * again at each wake (backing off to FW_RECHECK_MAX_MS between looks);
 * when the extension is not created there the flusher says so once (the
 * flag lives in shared memory, flushers come and go) and exits, and the
 * launcher retries likewise.
 *
 * One transaction and one INSERT per batch; no LWLock is ever held across
 * SPI.  The ring is drained first, then the spill (spill.c).  A batch whose
 * INSERT fails with an error that can be about a row is retried row by
 * row, a subtransaction each, and the rows that still fail go to
 * fw_tier.calls_dead_letter (fw_worker_write_batch); any other failure
 * keeps the records and backs off.  The flusher runs with lock_timeout, so
 * a lock held on fw_tier.calls cannot hang it.  Why the log does not drain
 * (no database, no extension, lock timeout, a failing insert) is kept in
 * shared memory for fw_tier.log_status (drain_state).  After the shutdown request the flusher drains the ring one last
 * time (autoprewarm style).  The postmaster starts no worker once a
 * shutdown has begun, so the final drain has to be the flusher's: the
 * launcher keeps one running whenever the ring is not empty.  What cannot
 * be written stays in the ring file for the next start.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "access/genam.h"
#include "catalog/indexing.h"
#include "catalog/pg_database.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "common/string.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "fw_tier.h"

/* after a termination (exit 1) the postmaster restarts the launcher */
#define FW_LAUNCHER_RESTART_S	5

#define FW_BATCH_MAX		1000	/* records per transaction */
#define FW_RETRY_MAX_MS		10000	/* longest pause after a failed batch */
#define FW_LOCK_TIMEOUT_MS	1000	/* the flusher's lock_timeout */

/*
 * A flusher leaves after this long with nothing to do.  It is also its
 * longest sleep, hence the period of its DROP DATABASE probe: well under
 * the 5 s that DROP DATABASE waits for other sessions.
 */
#define FW_FLUSHER_IDLE_MS	1000

/* database or extension missing: look again after 1 s, 2 s, ... 10 s */
#define FW_RECHECK_MIN_MS	1000
#define FW_RECHECK_MAX_MS	10000

/* FwSharedState.worker_flags */
#define FW_WF_RESTORED		0x01	/* open windows read back after startup */
#define FW_WF_OLDEXT		0x04	/* the extension's SQL is older than this
									 * library (said once, until it changes) */
#define FW_WF_NOEXT			0x02	/* a flusher found no extension (and said
									 * so) */
/* either: the flusher cannot write there; the launcher backs off */
#define FW_WF_EXTWAIT		(FW_WF_NOEXT | FW_WF_OLDEXT)

/* what the launcher found of fw_tier.database */
typedef enum FwDbState
{
	FW_DB_OK,
	FW_DB_MISSING,				/* no such database, or an invalid one */
	FW_DB_NOCONN,				/* datallowconn is false */
	FW_DB_BUSY					/* DROP / ALTER DATABASE waiting on it */
} FwDbState;

static MemoryContext fw_worker_cxt = NULL;	/* lives as long as the flusher */
static MemoryContext fw_batch_cxt = NULL;	/* reset per batch */
static SPIPlanPtr fw_insert_plan = NULL;
static FwDrainedRecord *fw_batch = NULL;
static FwWindowSync *fw_sync = NULL;
static int	fw_fail_count = 0;

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
 * Both workers run as the bootstrap superuser.  Before their first
 * statement they pin search_path to pg_catalog, pg_temp (PGC_S_OVERRIDE: a
 * reload of postgresql.conf or ALTER ROLE/DATABASE SET cannot change it),
 * so no object of an ordinary role (an operator in public, a schema named
 * after the superuser for "$user") can be resolved by their SQL.  The SQL
 * strings qualify their operators and functions as well.
 */
static void
fw_worker_pin_search_path(void)
{
	SetConfigOption("search_path", "pg_catalog, pg_temp",
					PGC_SUSET, PGC_S_OVERRIDE);
}

/*
 * The launcher's SIGTERM: who sent it?  The postmaster sends SIGTERM when
 * the server shuts down; anything else (pg_terminate_backend, kill) is a
 * termination the launcher must come back from, and a background worker
 * that exits with 0 is unregistered for good.  si_pid tells the two apart
 * (TerminateBackgroundWorker() is delivered by the postmaster too, and
 * means "for good").
 */
static volatile sig_atomic_t fw_term_by_postmaster = false;

static void
fw_launcher_sigterm(int signo, siginfo_t *info, void *context)
{
	int			save_errno = errno;

	if (info == NULL || info->si_pid == PostmasterPid)
		fw_term_by_postmaster = true;
	ShutdownRequestPending = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

static void
fw_launcher_set_sigterm(void)
{
	struct sigaction act;

	memset(&act, 0, sizeof(act));
	act.sa_sigaction = fw_launcher_sigterm;
	sigemptyset(&act.sa_mask);
	act.sa_flags = SA_SIGINFO | SA_RESTART;
	if (sigaction(SIGTERM, &act, NULL) < 0)
		elog(FATAL, "fw_tier launcher: could not set the SIGTERM handler: %m");
}

/*
 * _PG_init: the launcher is the only static worker.  It needs a connection
 * to reach pg_database, but to no database in particular.
 */
void
fw_register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = FW_LAUNCHER_RESTART_S;
	strlcpy(worker.bgw_library_name, "fw_tier", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "fw_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "fw_tier launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "fw_tier launcher", BGW_MAXLEN);
	worker.bgw_main_arg = (Datum) 0;
	worker.bgw_notify_pid = 0;
	RegisterBackgroundWorker(&worker);
}

static bool
fw_launcher_start_flusher(BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "fw_tier", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "fw_flusher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "fw_tier flusher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "fw_tier flusher", BGW_MAXLEN);
	worker.bgw_main_arg = (Datum) 0;
	/* its exit sets our latch */
	worker.bgw_notify_pid = MyProcPid;
	return RegisterDynamicBackgroundWorker(&worker, handle);
}

/*
 * Is a DROP DATABASE (or an ALTER DATABASE that needs the database to
 * itself) waiting on dboid?  It holds AccessExclusiveLock on the database
 * object while it waits for the other sessions to leave; a normal session
 * holds no lock on it after connecting, so only such a command (or one
 * queued behind it) makes this conditional AccessShareLock fail.  A
 * session lock: no transaction needed.
 */
static bool
fw_database_busy(Oid dboid)
{
	LOCKTAG		tag;

	SET_LOCKTAG_OBJECT(tag, InvalidOid, DatabaseRelationId, dboid, 0);
	if (LockAcquire(&tag, AccessShareLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
		return true;
	LockRelease(&tag, AccessShareLock, true);
	return false;
}

/*
 * Launcher: can a flusher connect to fw_tier.database now?  A heap scan of
 * the shared catalog, as the autovacuum launcher does: no database needed.
 */
static FwDbState
fw_launcher_database_state(void)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	Oid			dboid = InvalidOid;
	bool		invalid = false;
	bool		allowconn = true;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();

	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), fw_database) == 0)
		{
			dboid = db->oid;
			allowconn = db->datallowconn;
#if PG_VERSION_NUM >= 150004
			invalid = database_is_invalid_form(db);
#endif
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);

	CommitTransactionCommand();

	if (!OidIsValid(dboid) || invalid)
		return FW_DB_MISSING;
	if (!allowconn)
		return FW_DB_NOCONN;
	if (fw_database_busy(dboid))
		return FW_DB_BUSY;
	return FW_DB_OK;
}

/* Launcher: say once why no flusher can run, and once when it can again. */
static void
fw_launcher_report(FwDbState state, FwDbState *reported)
{
	if (state == FW_DB_MISSING)
		fw_set_drain_state("no database");
	else if (state == FW_DB_NOCONN)
		fw_set_drain_state("no connections");
	if (state == *reported || state == FW_DB_BUSY)
		return;

	if (state == FW_DB_MISSING)
		ereport(WARNING,
				(errcode(ERRCODE_UNDEFINED_DATABASE),
				 errmsg("fw_tier launcher: database \"%s\" does not exist",
						fw_database),
				 errdetail("Call-log records wait in the ring and Priority windows are not recorded; once the ring is full they go to the spill (pg_fw_tier/spill.*, up to fw_tier.log_spill_limit).  The launcher checks again from time to time."),
				 errhint("Create database \"%s\" and run CREATE EXTENSION fw_tier in it, or set fw_tier.database to the database where fw_tier is installed and restart the server.",
						 fw_database)));
	else if (state == FW_DB_NOCONN)
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("fw_tier launcher: database \"%s\" does not allow connections",
						fw_database),
				 errdetail("Call-log records wait in the ring and Priority windows are not recorded."),
				 errhint("Run ALTER DATABASE \"%s\" ALLOW_CONNECTIONS true, or set fw_tier.database to another database and restart the server.",
						 fw_database)));
	else if (*reported != FW_DB_OK)
		ereport(LOG,
				(errmsg("fw_tier launcher: database \"%s\" is available",
						fw_database)));
	*reported = state;
}

static void
fw_launcher_detach(int code, Datum arg)
{
	uint32		mine = (uint32) MyProcPid;

	if (fw_shared == NULL)
		return;
	fw_shared->worker_latch = NULL;
	pg_atomic_write_u32(&fw_shared->launcher_pid, 0);
	(void) pg_atomic_compare_exchange_u32(&fw_shared->worker_pid, &mine, 0);
}

static void
fw_flusher_detach(int code, Datum arg)
{
	if (fw_shared == NULL)
		return;
	fw_shared->flusher_latch = NULL;
	/* the launcher answers for the call log again */
	pg_atomic_write_u32(&fw_shared->worker_pid,
						pg_atomic_read_u32(&fw_shared->launcher_pid));
}

/*
 * The version of fw_tier created in this database, palloc'd, or NULL when
 * it is not created.  Caller is in a transaction.
 */
static char *
fw_extension_version(void)
{
	Relation	rel;
	SysScanDesc scan;
	ScanKeyData key;
	HeapTuple	tup;
	char	   *version = NULL;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber,
				F_NAMEEQ, CStringGetDatum("fw_tier"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, Anum_pg_extension_extversion,
									 RelationGetDescr(rel), &isnull);

		version = isnull ? pstrdup("") : TextDatumGetCString(d);
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

/*
 * Flusher: is the extension created in our database, at the version this
 * library writes for?  Says so once when it is not, and once when it is
 * again; the flags are shared because every flusher is a new process.  A
 * library newer than the extension's SQL (the server was upgraded, ALTER
 * EXTENSION fw_tier UPDATE not yet run) would fail on every insert: the
 * records wait instead, and drain_state says what to run.
 */
static bool
fw_flusher_extension_ready(void)
{
	char	   *version;
	bool		ok;
	bool		current;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	version = fw_extension_version();
	ok = (version != NULL);
	current = ok && strcmp(version, FW_SQL_VERSION) == 0;
	if (ok && !current)
		version = MemoryContextStrdup(fw_worker_cxt, version);
	CommitTransactionCommand();

	if (!ok)
	{
		fw_set_drain_state("no extension");
		if ((pg_atomic_fetch_or_u32(&fw_shared->worker_flags, FW_WF_NOEXT) &
			 FW_WF_NOEXT) == 0)
			ereport(WARNING,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("fw_tier flusher: extension \"fw_tier\" is not installed in database \"%s\"",
							fw_database),
					 errdetail("Call-log records wait in the ring and Priority windows are not recorded; once the ring is full they go to the spill (pg_fw_tier/spill.*, up to fw_tier.log_spill_limit)."),
					 errhint("Run CREATE EXTENSION fw_tier in database \"%s\", or set fw_tier.database to the database where it is installed.",
							 fw_database)));
		return false;
	}
	if (!current)
	{
		char		state[FW_ERRLEN];

		snprintf(state, sizeof(state), "extension needs update: %s, library %s",
				 version, FW_SQL_VERSION);
		fw_set_drain_state(state);
		/*
		 * Only OLDEXT (the launcher backs off for either flag): a later
		 * DROP EXTENSION must still get its own "not installed" WARNING.
		 */
		pg_atomic_fetch_and_u32(&fw_shared->worker_flags, ~FW_WF_NOEXT);
		if ((pg_atomic_fetch_or_u32(&fw_shared->worker_flags, FW_WF_OLDEXT) &
			 FW_WF_OLDEXT) == 0)
			ereport(WARNING,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("fw_tier flusher: extension \"fw_tier\" in database \"%s\" is at version %s, the library at %s",
							fw_database, version, FW_SQL_VERSION),
					 errdetail("Call-log records wait in the ring and the spill until the extension is updated."),
					 errhint("Run ALTER EXTENSION fw_tier UPDATE in database \"%s\".",
							 fw_database)));
		pfree(version);
		return false;
	}
	if ((pg_atomic_fetch_and_u32(&fw_shared->worker_flags,
								 ~FW_WF_EXTWAIT) &
		 FW_WF_EXTWAIT) != 0)
		ereport(LOG,
				(errmsg("fw_tier flusher: extension \"fw_tier\" %s found in database \"%s\"",
						FW_SQL_VERSION, fw_database)));
	return true;
}

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
 * One batch: copy records out of the ring (or, once the ring is empty, out
 * of the spill), insert them in one transaction, commit, then release
 * their space.  Returns the number of records consumed, which
 * records_flushed counts: the rows inserted plus those ON CONFLICT skipped
 * because an earlier run had written them, plus the dead letters, so
 * records_pushed = records_flushed once the log is empty.  -1 when nothing
 * was left to read.
 */
static int
fw_worker_drain_batch(void)
{
	uint64		end_pos;
	uint64		spill_bytes = 0;
	uint64		size,
				used,
				head,
				tail;
	int			n;
	bool		from_spill = false;

	fw_calllog_usage(&size, &used, &head, &tail);
	if (used == 0)
	{
		/* the ring is empty: everything in the spill came after it */
		if (!fw_spill_pending())
			return -1;
		from_spill = true;
	}

	MemoryContextReset(fw_batch_cxt);
	{
		MemoryContext old = MemoryContextSwitchTo(fw_batch_cxt);

		if (from_spill)
			n = fw_spill_read(fw_batch, FW_BATCH_MAX, &end_pos, &spill_bytes);
		else
			n = fw_calllog_read(fw_batch, FW_BATCH_MAX, &end_pos);
		MemoryContextSwitchTo(old);
	}
	if (from_spill ? n < 0 : end_pos == tail)
		return -1;				/* the first record is still being written */

	if (n > 0)
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "fw_tier: writing the call log");

		fw_worker_prepare_insert();
		/* the datums built here live in SPI's context, freed by SPI_finish */
		fw_worker_write_batch(n);

		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
		pgstat_report_activity(STATE_IDLE, NULL);
		/*
		 * A long-lived flusher would otherwise report its inserts only at
		 * exit: autovacuum and autoanalyze would not see fw_tier.calls
		 * grow.  Not forced: at most once per PGSTAT_MIN_INTERVAL.
		 */
		pgstat_report_stat(false);
	}

	/* only now, after COMMIT, may the space be reused */
	if (from_spill)
		fw_spill_advance(end_pos, n, spill_bytes);
	else
		fw_calllog_advance(end_pos, n);
	return n;
}

/* records in the ring or in the spill */
static bool
fw_log_pending(void)
{
	return fw_calllog_pending() || fw_spill_pending();
}

/*
 * Write fw_tier.escalations from shared memory: for each window whose
 * state changed, close older open rows of the workload, then update the
 * row of this window or insert it.  Windows are per database: every row
 * names its database (the worker writes them all here, in
 * fw_tier.database).  A window of a database dropped since is not written.
 * Idempotent, so a crash between COMMIT and fw_windows_synced() only
 * repeats the work.
 */
static void
fw_worker_sync_rows(FwWindowSync *ws, int n)
{
	for (int i = 0; i < n; i++)
	{
		FwWindowSync *w = &ws[i];
		Datum		args[7];
		char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
		Oid			types[7] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
		TIMESTAMPTZOID, TEXTOID, INT4OID, NAMEOID};
		int			ret;
		char	   *dbname = get_database_name(w->dboid);
		NameData	dbn;

		if (dbname == NULL)
			continue;			/* dropped: nobody can read its windows */
		namestrcpy(&dbn, dbname);

		args[0] = CStringGetTextDatum(w->name);
		args[1] = TimestampTzGetDatum(w->started);
		args[2] = TimestampTzGetDatum(w->until);
		args[3] = TimestampTzGetDatum(w->until);
		if (!w->closed)
			nulls[3] = 'n';
		args[4] = CStringGetTextDatum(w->manual ? "manual" : "overloaded");
		args[5] = Int32GetDatum(w->windows_in_row);
		args[6] = NameGetDatum(&dbn);

		/* every statement gets all 7 (fixed parameters may go unused) */
		ret = SPI_execute_with_args("UPDATE fw_tier.escalations"
									" SET ended = LEAST(priority_until, $2)"
									" WHERE database OPERATOR(pg_catalog.=) $7"
									" AND workload OPERATOR(pg_catalog.=) $1 AND ended IS NULL"
									" AND started OPERATOR(pg_catalog.<>) $2",
									7, types, args, nulls, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "fw_tier: closing old windows failed: %s",
				 SPI_result_code_string(ret));

		ret = SPI_execute_with_args("UPDATE fw_tier.escalations"
									" SET priority_until = $3, ended = $4"
									" WHERE database OPERATOR(pg_catalog.=) $7"
									" AND workload OPERATOR(pg_catalog.=) $1"
									" AND started OPERATOR(pg_catalog.=) $2",
									7, types, args, nulls, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "fw_tier: updating a window failed: %s",
				 SPI_result_code_string(ret));

		if (SPI_processed == 0)
		{
			ret = SPI_execute_with_args("INSERT INTO fw_tier.escalations"
										" (database, workload, started, priority_until, ended, trigger, windows_in_row)"
										" VALUES ($7, $1, $2, $3, $4, $5, $6)",
										7, types, args, nulls, false, 0);
			if (ret != SPI_OK_INSERT)
				elog(ERROR, "fw_tier: recording a window failed: %s",
					 SPI_result_code_string(ret));
		}

		if (w->alert)
		{
			StringInfoData payload;

			ereport(WARNING,
					(errmsg("fw_tier: workload \"%s\" has been escalated to priority for %d windows in a row",
							w->name, w->windows_in_row),
					 errdetail("The workload is in database \"%s\"; the current window lasts until %s.",
							   dbname, timestamptz_to_str(w->until)),
					 errhint("Sustained 503 Service Overloaded on the standard path is a capacity problem, not a spike: review the workload's path and capacity.")));

			initStringInfo(&payload);
			appendStringInfoString(&payload, "{\"database\": ");
			escape_json(&payload, dbname);
			appendStringInfoString(&payload, ", \"workload\": ");
			escape_json(&payload, w->name);
			appendStringInfo(&payload, ", \"windows_in_row\": %d, \"priority_until\": ",
							 w->windows_in_row);
			escape_json(&payload, timestamptz_to_str(w->until));
			appendStringInfoChar(&payload, '}');
			/* delivered at COMMIT */
			Async_Notify("fw_tier_alert", payload.data);
		}
	}
}

/*
 * At start: put back windows still open in fw_tier.escalations, those of
 * every database (a server restart inside a window keeps Priority), then
 * close rows whose window passed while we were away.  A row of a database
 * that no longer exists is not restored.  Runs after fw_worker_sync_rows()
 * in the same transaction, so windows still in shared memory (worker
 * restart without crash) were written first and are not closed.
 */
static void
fw_worker_restore(void)
{
	typedef struct
	{
		Oid			dboid;
		char		name[FW_NAMELEN];
		TimestampTz started;
		TimestampTz until;
		int32		windows_in_row;
		bool		manual;
	} FwOpenRow;
	FwOpenRow  *rows;
	int			nrows;
	int			ret;

	ret = SPI_execute("SELECT workload, started, priority_until, windows_in_row,"
					  " trigger OPERATOR(pg_catalog.=) 'manual'::pg_catalog.text, database"
					  " FROM fw_tier.escalations"
					  " WHERE ended IS NULL"
					  " AND priority_until OPERATOR(pg_catalog.>) pg_catalog.now()"
					  " ORDER BY id", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "fw_tier: reading open windows failed: %s",
			 SPI_result_code_string(ret));

	nrows = (int) SPI_processed;
	rows = palloc0(sizeof(FwOpenRow) * Max(nrows, 1));
	for (int i = 0; i < nrows; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		char	   *name = SPI_getvalue(tup, desc, 1);

		strlcpy(rows[i].name, name ? name : "", FW_NAMELEN);
		rows[i].started = DatumGetTimestampTz(SPI_getbinval(tup, desc, 2, &isnull));
		rows[i].until = DatumGetTimestampTz(SPI_getbinval(tup, desc, 3, &isnull));
		rows[i].windows_in_row = DatumGetInt32(SPI_getbinval(tup, desc, 4, &isnull));
		rows[i].manual = DatumGetBool(SPI_getbinval(tup, desc, 5, &isnull));
		rows[i].dboid = InvalidOid;
		if (SPI_getvalue(tup, desc, 6) != NULL)
			rows[i].dboid = get_database_oid(SPI_getvalue(tup, desc, 6), true);
	}

	/* takes wl_lock per call; no SPI while it is held */
	for (int i = 0; i < nrows; i++)
	{
		if (rows[i].name[0] == '\0' || !OidIsValid(rows[i].dboid))
			continue;
		fw_restore_window(rows[i].dboid, rows[i].name, rows[i].started,
						  rows[i].until, rows[i].windows_in_row, rows[i].manual);
		ereport(LOG,
				(errmsg("fw_tier worker: workload \"%s\" of database %u stays on priority until %s",
						rows[i].name, rows[i].dboid,
						timestamptz_to_str(rows[i].until))));
	}

	ret = SPI_execute("UPDATE fw_tier.escalations SET ended = priority_until"
					  " WHERE ended IS NULL"
					  " AND priority_until OPERATOR(pg_catalog.<=) pg_catalog.now()",
					  false, 0);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "fw_tier: closing expired windows failed: %s",
			 SPI_result_code_string(ret));
}

/*
 * Mirror the windows; at start, restore too.  Returns the earliest end of
 * an open window (0 = none): the flusher's next deadline.  *nsynced gets
 * the number of windows written.
 */
static TimestampTz
fw_worker_sync_windows(bool at_start, int *nsynced)
{
	TimestampTz next_expiry;
	int			n;

	n = fw_windows_to_sync(fw_sync, GetCurrentTimestamp(), &next_expiry);
	*nsynced = n;
	if (n == 0 && !at_start)
		return next_expiry;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "fw_tier: recording priority windows");

	fw_worker_sync_rows(fw_sync, n);
	if (at_start)
		fw_worker_restore();

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);

	for (int i = 0; i < n; i++)
		fw_windows_synced(&fw_sync[i]);

	if (at_start)
	{
		/* restored windows have deadlines of their own */
		(void) fw_windows_to_sync(fw_sync, GetCurrentTimestamp(), &next_expiry);
	}
	return next_expiry;
}

/*
 * Log and clean up after an error in a transaction of ours; the flusher
 * keeps running and retries later (records stay in the ring).
 */
static void
fw_worker_recover_error(void)
{
	ErrorData  *edata;
	char		state[FW_ERRLEN];
	char		prev[FW_ERRLEN];

	MemoryContextSwitchTo(fw_worker_cxt);

	/*
	 * Why the log does not drain, for log_status; the server log gets the
	 * error when that changes, not at every retry.
	 */
	edata = CopyErrorData();
	if (edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE)
		strlcpy(state, "lock timeout", sizeof(state));
	else
	{
		snprintf(state, sizeof(state), "insert failing: %s",
				 edata->message ? edata->message : "");
		pg_clean_ascii(state);
	}
	fw_get_drain_state(prev, sizeof(prev));
	if (strcmp(prev, state) != 0)
		EmitErrorReport();
	fw_set_drain_state(state);
	FreeErrorData(edata);
	FlushErrorState();
	AbortCurrentTransaction();
	/* the plan may refer to a dropped table: prepare it again */
	if (fw_insert_plan)
	{
		SPI_freeplan(fw_insert_plan);
		fw_insert_plan = NULL;
	}
	pgstat_report_activity(STATE_IDLE, NULL);
	fw_fail_count++;
}

static long
fw_ms_until(TimestampTz deadline, TimestampTz now)
{
	if (deadline <= now)
		return 0;
	/* round up: waking a hair early would only loop once more */
	return (long) Min((deadline - now + 999) / 1000, (int64) INT_MAX);
}

/*
 * A lock held on fw_tier.calls (or escalations, prices) must not hang the
 * flusher, and with it every fw_flush(): its statements give up after
 * FW_LOCK_TIMEOUT_MS, the records stay, drain_state says "lock timeout".
 */
static void
fw_flusher_lock_timeout(void)
{
	char		buf[32];

	snprintf(buf, sizeof(buf), "%d", FW_LOCK_TIMEOUT_MS);
	SetConfigOption("lock_timeout", buf, PGC_SUSET, PGC_S_OVERRIDE);
}

static void
fw_flusher_leave_for_drop(void)
{
	ereport(LOG,
			(errmsg("fw_tier flusher: leaving database \"%s\" for a pending DROP DATABASE or ALTER DATABASE",
					fw_database),
			 errdetail("Call-log records stay in the ring until the database can be used again.")));
	proc_exit(0);
}

/*
 * The flusher: today's database work, for as long as there is some.
 * Started by the launcher, never restarted by the postmaster.
 */
void
fw_flusher_main(Datum main_arg)
{
	TimestampTz flush_deadline = 0;
	TimestampTz retry_at = 0;
	volatile TimestampTz sync_retry_at = 0;
	volatile int sync_fail_count = 0;
	TimestampTz idle_since;
	volatile bool published = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(fw_database, NULL, 0);
	fw_worker_pin_search_path();
	fw_flusher_lock_timeout();

	fw_worker_cxt = AllocSetContextCreate(TopMemoryContext,
										  "fw_tier flusher",
										  ALLOCSET_DEFAULT_SIZES);
	fw_batch_cxt = AllocSetContextCreate(fw_worker_cxt,
										 "fw_tier flusher batch",
										 ALLOCSET_DEFAULT_SIZES);
	fw_batch = MemoryContextAllocZero(fw_worker_cxt,
									  sizeof(FwDrainedRecord) * FW_BATCH_MAX);
	fw_cols = MemoryContextAllocZero(fw_worker_cxt, sizeof(FwInsertColumns));
	fw_sync = MemoryContextAllocZero(fw_worker_cxt,
									 sizeof(FwWindowSync) * fw_max_workloads);

	before_shmem_exit(fw_flusher_detach, (Datum) 0);
	fw_shared->flusher_latch = MyLatch;

	ereport(DEBUG1,
			(errmsg("fw_tier flusher started in database \"%s\"", fw_database)));

	idle_since = GetCurrentTimestamp();
	for (;;)
	{
		TimestampTz now;
		TimestampTz deadline = 0;
		TimestampTz cap;
		volatile TimestampTz next_expiry = 0;
		volatile bool did_work = false;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		/* before anything else, even the final drain */
		if (fw_database_busy(MyDatabaseId))
			fw_flusher_leave_for_drop();

		MemoryContextSwitchTo(fw_worker_cxt);
		if (!fw_flusher_extension_ready())
		{
			/* nothing to do here; the launcher retries later */
			pg_atomic_write_u32(&fw_shared->flush_requested, 0);
			break;
		}
		now = GetCurrentTimestamp();

		/*
		 * Escalation windows (fw_tier.escalations) and the call log
		 * (fw_tier.calls) fail separately: a lock or a bad row on the
		 * first backs off its sync only, and the log keeps draining (and
		 * drain_state speaks of the log only).
		 */
		if (sync_retry_at == 0 || now >= sync_retry_at || ShutdownRequestPending)
		{
			PG_TRY();
			{
				bool		restored;
				int			nsynced;

				restored = (pg_atomic_read_u32(&fw_shared->worker_flags) &
							FW_WF_RESTORED) != 0;
				next_expiry = fw_worker_sync_windows(!restored, &nsynced);
				if (!restored)
					pg_atomic_fetch_or_u32(&fw_shared->worker_flags,
										   FW_WF_RESTORED);
				if (!published)
				{
					/* after the restore: log_status shows us from now on */
					pg_atomic_write_u32(&fw_shared->worker_pid,
										(uint32) MyProcPid);
					published = true;
				}
				if (nsynced > 0)
					did_work = true;
				sync_fail_count = 0;
				sync_retry_at = 0;
			}
			PG_CATCH();
			{
				ErrorData  *edata;

				MemoryContextSwitchTo(fw_worker_cxt);
				edata = CopyErrorData();
				FlushErrorState();
				AbortCurrentTransaction();
				pgstat_report_activity(STATE_IDLE, NULL);
				ereport(WARNING,
						(errcode(edata->sqlerrcode),
						 errmsg("fw_tier flusher: could not record escalation windows in fw_tier.escalations: %s",
								edata->message ? edata->message : ""),
						 errdetail("The call log is still written; the windows are recorded again after a back-off.")));
				FreeErrorData(edata);
				sync_fail_count++;
				sync_retry_at = GetCurrentTimestamp() +
					(int64) Min(fw_flush_interval_ms * (1 << Min(sync_fail_count, 10)),
								FW_RETRY_MAX_MS) * 1000;
			}
			PG_END_TRY();
		}

		/* issue 18: attempts whose owner exited without its callbacks */
		fw_intents_reap();

		now = GetCurrentTimestamp();
		if (retry_at == 0 || now >= retry_at || ShutdownRequestPending)
		{
			PG_TRY();
			{
				bool		flush_now;
				uint64		size,
							used,
							head,
							tail;

				fw_calllog_usage(&size, &used, &head, &tail);
				if (used == 0 && fw_spill_pending())
					used = 1;	/* the spill counts as work */
				now = GetCurrentTimestamp();
				if (used > 0 && flush_deadline == 0)
					flush_deadline = now + (int64) fw_flush_interval_ms * 1000;
				flush_now = pg_atomic_exchange_u32(&fw_shared->flush_requested, 0) != 0 ||
					used > size / 2 ||
					(flush_deadline != 0 && now >= flush_deadline) ||
					ShutdownRequestPending;

				if (used > 0 && flush_now)
				{
					/*
					 * Drain; a bounded number of batches per wake so that
					 * windows are still mirrored under a flood, and
					 * everything at shutdown.  A DROP DATABASE interrupts.
					 */
					int			batches = 0;

					did_work = true;
					while (fw_worker_drain_batch() >= 0)
					{
						if (!fw_log_pending())
							break;
						if (fw_database_busy(MyDatabaseId))
							break;
						if (++batches >= 16 && !ShutdownRequestPending)
						{
							/* come back at once */
							pg_atomic_write_u32(&fw_shared->flush_requested, 1);
							SetLatch(MyLatch);
							break;
						}
					}
					flush_deadline = fw_log_pending() ?
						GetCurrentTimestamp() + (int64) fw_flush_interval_ms * 1000 : 0;
					/* bound what an OS crash can lose (calllog.c) */
					fw_calllog_sync(false);
				}
				fw_fail_count = 0;
				retry_at = 0;
				fw_set_drain_state("ok");
			}
			PG_CATCH();
			{
				fw_worker_recover_error();
				retry_at = GetCurrentTimestamp() +
					(int64) Min(fw_flush_interval_ms * (1 << Min(fw_fail_count, 10)),
								FW_RETRY_MAX_MS) * 1000;
			}
			PG_END_TRY();
		}

		if (ShutdownRequestPending)
			break;

		/* idle: nothing written, nothing waiting in the ring, no retry */
		now = GetCurrentTimestamp();
		if (did_work || retry_at != 0 || sync_retry_at != 0 || fw_log_pending())
			idle_since = now;
		else if (now - idle_since >= (int64) FW_FLUSHER_IDLE_MS * 1000)
			break;

		/* sleep until the earliest deadline, and never long */
		if (retry_at != 0)
			deadline = retry_at;
		else
		{
			if (flush_deadline != 0)
				deadline = flush_deadline;
			if (next_expiry != 0 && (deadline == 0 || next_expiry < deadline))
				deadline = next_expiry;
		}
		if (sync_retry_at != 0 && (deadline == 0 || sync_retry_at < deadline))
			deadline = sync_retry_at;
		cap = idle_since + (int64) FW_FLUSHER_IDLE_MS * 1000;
		if (cap <= now)
			cap = now + (int64) FW_FLUSHER_IDLE_MS * 1000;
		if (deadline == 0 || deadline > cap)
			deadline = cap;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 fw_ms_until(deadline, now), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	fw_calllog_sync(true);
	/* shutdown: the final drain above ran with ShutdownRequestPending set */
	if (ShutdownRequestPending && fw_calllog_pending())
	{
		uint64		size,
					used,
					head,
					tail;

		fw_calllog_usage(&size, &used, &head, &tail);
		ereport(LOG,
				(errmsg("fw_tier flusher: " UINT64_FORMAT " bytes of call log remain in the ring file and will be written after the next start",
						used)));
	}
	/* what the last batches inserted */
	pgstat_report_stat(true);
	proc_exit(0);
}

/*
 * The launcher: decides when a flusher must run, starts it, and otherwise
 * sleeps until the next window ends.
 */
void
fw_launcher_main(Datum main_arg)
{
	BackgroundWorkerHandle *flusher = NULL;
	FwWindowSync *sync;
	FwDbState	reported = FW_DB_OK;
	bool		first_try_done = false;
	bool		noslot_warned = false;
	TimestampTz next_try = 0;	/* nothing can run: not before this */
	TimestampTz last_try = 0;
	int			recheck_ms = FW_RECHECK_MIN_MS;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	fw_launcher_set_sigterm();
	BackgroundWorkerUnblockSignals();

	/* no database: shared catalogs only */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	fw_worker_pin_search_path();

	sync = MemoryContextAllocZero(TopMemoryContext,
								  sizeof(FwWindowSync) * fw_max_workloads);

	before_shmem_exit(fw_launcher_detach, (Datum) 0);
	pg_atomic_write_u32(&fw_shared->launcher_pid, (uint32) MyProcPid);
	fw_shared->worker_latch = MyLatch;

	ereport(LOG,
			(errmsg("fw_tier launcher started; the call log goes to database \"%s\"",
					fw_database)));

	for (;;)
	{
		TimestampTz now;
		TimestampTz deadline = 0;
		bool		running = false;
		long		timeout = -1;
		int			events;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		if (ShutdownRequestPending)
			break;

		if (flusher != NULL)
		{
			pid_t		pid;
			BgwHandleStatus status = GetBackgroundWorkerPid(flusher, &pid);

			if (status == BGWH_STARTED || status == BGWH_NOT_YET_STARTED)
				running = true;
			else
			{
				pfree(flusher);
				flusher = NULL;
				if (pg_atomic_read_u32(&fw_shared->worker_flags) & FW_WF_EXTWAIT)
				{
					/* no extension there, or an old one: look again later */
					next_try = GetCurrentTimestamp() + (int64) recheck_ms * 1000;
					recheck_ms = Min(recheck_ms * 2, FW_RECHECK_MAX_MS);
				}
				else
				{
					next_try = 0;
					recheck_ms = FW_RECHECK_MIN_MS;
				}
			}
		}

		now = GetCurrentTimestamp();
		if (running)
		{
			/* pass the wakeup on; the flusher's exit wakes us */
			Latch	   *latch = fw_shared->flusher_latch;

			if (latch != NULL)
				SetLatch(latch);
			deadline = now + (int64) FW_RECHECK_MAX_MS * 1000;
		}
		else
		{
			TimestampTz next_expiry;
			uint64		size,
						used,
						head,
						tail;
			bool		urgent;
			bool		want;
			int			n;

			fw_calllog_usage(&size, &used, &head, &tail);
			if (used == 0 && fw_spill_pending())
				used = 1;		/* the spill counts as work */
			n = fw_windows_to_sync(sync, now, &next_expiry);
			urgent = pg_atomic_read_u32(&fw_shared->flush_requested) != 0 ||
				used > size / 2;
			want = used > 0 || n > 0 || urgent ||
				(!first_try_done &&
				 (pg_atomic_read_u32(&fw_shared->worker_flags) & FW_WF_RESTORED) == 0);

			if (want)
			{
				TimestampTz not_before = next_try;

				/*
				 * fw_flush() or a filling ring: once a second at most; not
				 * while the extension is missing or old, where a new
				 * flusher each second would only find that again: the
				 * back-off stands.
				 */
				if (urgent &&
					(pg_atomic_read_u32(&fw_shared->worker_flags) & FW_WF_EXTWAIT) == 0 &&
					not_before > last_try + (int64) FW_RECHECK_MIN_MS * 1000)
					not_before = last_try + (int64) FW_RECHECK_MIN_MS * 1000;

				if (now >= not_before)
				{
					FwDbState	state = fw_launcher_database_state();

					last_try = now;
					first_try_done = true;
					fw_launcher_report(state, &reported);
					if (state == FW_DB_OK)
					{
						if (fw_launcher_start_flusher(&flusher))
						{
							running = true;
							noslot_warned = false;
						}
						else
						{
							flusher = NULL;
							if (!noslot_warned)
								ereport(WARNING,
										(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
										 errmsg("fw_tier launcher: could not start a flusher"),
										 errdetail("No background worker slot is free."),
										 errhint("Raise max_worker_processes and restart the server.")));
							noslot_warned = true;
							next_try = now + (int64) FW_RECHECK_MIN_MS * 1000;
						}
					}
					else if (state == FW_DB_BUSY)
						next_try = now + (int64) FW_RECHECK_MIN_MS * 1000;
					else
					{
						next_try = now + (int64) recheck_ms * 1000;
						recheck_ms = Min(recheck_ms * 2, FW_RECHECK_MAX_MS);
						/* fw_flush() callers ask again every second */
						pg_atomic_write_u32(&fw_shared->flush_requested, 0);
					}
				}
				else
					deadline = not_before;
			}

			if (running)
				deadline = now + (int64) FW_RECHECK_MAX_MS * 1000;
			else
			{
				if (next_try > now && want && (deadline == 0 || next_try < deadline))
					deadline = next_try;
				if (next_expiry != 0 && (deadline == 0 || next_expiry < deadline))
					deadline = next_expiry;
				/* nobody else answers for the call log */
				if (first_try_done)
					pg_atomic_write_u32(&fw_shared->worker_pid, (uint32) MyProcPid);
			}
		}

		events = WL_LATCH_SET | WL_EXIT_ON_PM_DEATH;
		if (deadline != 0)
		{
			events |= WL_TIMEOUT;
			timeout = fw_ms_until(deadline, GetCurrentTimestamp());
		}
		(void) WaitLatch(MyLatch, events, timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	if (!fw_term_by_postmaster)
	{
		/*
		 * Terminated while the server runs: take the flusher along (it
		 * drains the ring first), so that the launcher the postmaster
		 * starts again in bgw_restart_time seconds finds no flusher it has
		 * no handle for, then exit with 1 so that it is restarted.
		 */
		if (flusher != NULL)
		{
			TerminateBackgroundWorker(flusher);
			(void) WaitForBackgroundWorkerShutdown(flusher);
		}
		ereport(LOG,
				(errmsg("fw_tier launcher terminated; it restarts in %d s",
						FW_LAUNCHER_RESTART_S)));
		proc_exit(1);
	}

	/* a running flusher got SIGTERM too and does the final drain */
	if (flusher == NULL && fw_calllog_pending())
	{
		uint64		size,
					used,
					head,
					tail;

		fw_calllog_usage(&size, &used, &head, &tail);
		ereport(LOG,
				(errmsg("fw_tier launcher: " UINT64_FORMAT " bytes of call log remain in the ring file and will be written after the next start",
						used)));
	}
	proc_exit(0);
}
