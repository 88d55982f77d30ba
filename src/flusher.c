/*-------------------------------------------------------------------------
 *
 * flusher.c
 *		The "fw_tier flusher": the short-lived worker connected to
 *		fw_tier.database that drains the call-log ring (then the spill)
 *		into fw_tier.calls and has the windows mirrored (winsync.c).
 *
 * Started by the launcher (launcher.c), never restarted by the postmaster.
 * It follows the worker_spi skeleton: SIGHUP reloads the configuration,
 * SIGTERM asks for a shutdown, and the loop sleeps until the next flush of
 * the ring (fw_tier.flush_interval) or the end of a window.  It stays while
 * the ring holds records and leaves after FW_FLUSHER_IDLE_MS with nothing
 * to do.  At every wake, and between batches, it probes for a DROP
 * DATABASE (or ALTER DATABASE RENAME / SET TABLESPACE) of its database:
 * those hold AccessExclusiveLock on the database object while they wait up
 * to 5 s for other sessions to leave, so a conditional AccessShareLock
 * fails and the flusher exits at once.  Its records stay in the ring.
 *
 * Before writing it checks that the extension is created in its database,
 * at the version this library writes for (fw_flusher_extension_ready);
 * else the records wait and drain_state says why.
 *
 * One transaction per batch (fw_flusher_drain_batch); the rows are written
 * by loginsert.c.  The ring is drained first, then the spill (spill.c).
 * The tail (ring or spill) moves only after the COMMIT is durable: a ring
 * batch commits with synchronous_commit off and its tail move waits, in
 * order, for the WAL flush past its commit record (fw_flusher_move_tail,
 * issue 15); the spill's commits are synchronous (at least 'local', even
 * where the database's setting is off).  A failure that is
 * not about a row keeps the records and backs off.  The flusher runs with
 * lock_timeout, so a lock held on fw_tier.calls cannot hang it.  Why the
 * log does not drain (no database, no extension, lock timeout, a failing
 * insert) is kept in shared memory for fw_tier.log_status (drain_state).
 * After the shutdown request the flusher drains the ring one last time
 * (autoprewarm style).  What cannot be written stays in the ring file for
 * the next start.
 *
 * Locking: no LWLock is ever held across SPI or a transaction; the ring
 * and spill functions take ring_lock inside, the window functions wl_lock.
 * flusher_latch is written by the flusher only (set at start, cleared at
 * exit); worker_pid names it once the windows are restored.
 *
 * Called by: the postmaster, as a dynamic worker the launcher registers
 * (fw_flusher_main).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "common/string.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "postmaster/walwriter.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "spend.h"
#include "worker.h"

#define FW_LOCK_TIMEOUT_MS	1000	/* the flusher's lock_timeout */

/*
 * A flusher leaves after this long with nothing to do.  It is also its
 * longest sleep, hence the period of its DROP DATABASE probe: well under
 * the 5 s that DROP DATABASE waits for other sessions.
 */
#define FW_FLUSHER_IDLE_MS	1000

static MemoryContext fw_worker_cxt = NULL;	/* lives as long as the flusher */
static MemoryContext fw_batch_cxt = NULL;	/* reset per batch */
static FwDrainedRecord *fw_batch = NULL;
static int	fw_fail_count = 0;

/*
 * Which batches may hold rows already in fw_tier.calls (loginsert.c's
 * header, "Duplicates", has the argument):
 * fw_checked_below: ring positions below it were there when this flusher
 * started, read by an earlier process that may have committed them
 * without moving the tail; 0 once a batch of them inserted a row.
 * fw_spill_checked: the same for the spill, whose read position after a
 * restart (spill.read) may lag behind what was committed; false once a
 * spill batch inserted a row.
 * fw_advance_pending: a COMMIT was tried and the tail has not moved since
 * (an error in between leaves it set).
 */
static uint64 fw_checked_below = 0;
static bool fw_spill_checked = true;
static bool fw_advance_pending = false;

/*
 * Issue 15: a ring batch commits with synchronous_commit off, so its
 * COMMIT does not wait for the WAL flush; the walwriter flushes it within
 * a few wal_writer_delay.  Its tail move waits here, in commit order,
 * until the WAL is flushed past its commit record (fw_flusher_move_tail);
 * the next batch is read after it (fw_read_pos).  The tail thus still
 * moves only past durable rows, in order.  XLogFlush is ours only when
 * something waits: fw_flush(), a ring over half full, a full queue, a
 * move older than FW_MOVE_WAIT_MS, the spill, the flusher's exit.  With
 * synchronous replication configured the batches commit as before (the
 * commit waits for the standby).
 */
#define FW_MOVES_MAX	64
#define FW_MOVE_WAIT_MS	1000

typedef struct FwTailMove
{
	uint64		end_pos;		/* where the tail goes */
	int			nrecords;		/* records_flushed's share */
	XLogRecPtr	lsn;			/* WAL flushed to here: the batch is durable */
} FwTailMove;

static FwTailMove fw_moves[FW_MOVES_MAX];
static int	fw_nmoves = 0;
static uint64 fw_read_pos = 0;	/* with fw_nmoves > 0: the last move's end */
static TimestampTz fw_moves_since = 0;	/* the oldest waiting move's age */

/*
 * The WAL's insert position in the form of a record's end, which
 * XLogFlush accepts: GetXLogInsertRecPtr gives where the next record
 * starts, past the page header when that is at a page boundary, a
 * position the WAL reaches only once more is written (XLogFlush of it
 * fails on an idle server, after pg_switch_wal say).  Every record
 * inserted so far ends at or before the boundary.
 */
static XLogRecPtr
fw_insert_end(void)
{
	XLogRecPtr	p = GetXLogInsertRecPtr();

	if (XLogSegmentOffset(p, wal_segment_size) == SizeOfXLogLongPHD)
		p -= SizeOfXLogLongPHD;
	else if (p % XLOG_BLCKSZ == SizeOfXLogShortPHD)
		p -= SizeOfXLogShortPHD;
	return p;
}

/*
 * Move the ring's tail past the batches whose commit the WAL has flushed
 * (all of them, flushing it ourselves, when flush).  No lock held.
 */
static void
fw_flusher_move_tail(bool flush)
{
	XLogRecPtr	flushed;
	int			i;
	int			nrecords = 0;

	if (fw_nmoves == 0)
		return;
	if (flush)
	{
		XLogRecPtr	upto = InvalidXLogRecPtr;

		/* the largest: a move queued without an LSN (0) may come last */
		for (i = 0; i < fw_nmoves; i++)
			upto = Max(upto, fw_moves[i].lsn);
		XLogFlush(upto);
	}
	flushed = GetFlushRecPtr(NULL);
	for (i = 0; i < fw_nmoves && fw_moves[i].lsn <= flushed; i++)
		nrecords += fw_moves[i].nrecords;
	if (i == 0)
		return;
	fw_calllog_advance(fw_moves[i - 1].end_pos, nrecords);
	fw_nmoves -= i;
	memmove(fw_moves, fw_moves + i, sizeof(FwTailMove) * fw_nmoves);
	fw_moves_since = GetCurrentTimestamp();
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
 * One batch: copy records out of the ring (or, once the ring is empty, out
 * of the spill), insert them in one transaction, commit, then release
 * their space.  Returns the number of records consumed, which
 * records_flushed counts: the rows inserted plus those ON CONFLICT skipped
 * because an earlier run had written them, plus the dead letters, so
 * records_pushed = records_flushed once the log is empty.  -1 when nothing
 * was left to read.
 */
static int
fw_flusher_drain_batch(void)
{
	uint64		end_pos;
	uint64		spill_bytes = 0;
	uint64		size,
				used,
				head,
				tail;
	uint64		start;
	int			n;
	bool		from_spill = false;
	bool		may_repeat;
	bool		async = false;
	uint64		rows = 0;
	XLogRecPtr	lsn = InvalidXLogRecPtr;

	/* the moves the walwriter has made durable since; all when full */
	fw_flusher_move_tail(fw_nmoves >= FW_MOVES_MAX);
	fw_calllog_usage(&size, &used, &head, &tail);
	if (fw_nmoves > 0 && (fw_read_pos < tail || fw_read_pos > head))
	{
		/* the ring was reset (a damaged header): nothing to wait for */
		fw_flusher_move_tail(true);
		fw_calllog_usage(&size, &used, &head, &tail);
	}
	start = fw_nmoves > 0 ? fw_read_pos : tail;
	if (head == start)
	{
		/* the ring is read: everything in the spill came after it */
		if (!fw_spill_pending())
			return -1;
		/* with the ring's moves done: the spill's commits are synchronous */
		fw_flusher_move_tail(true);
		from_spill = true;
	}

	MemoryContextReset(fw_batch_cxt);
	{
		MemoryContext old = MemoryContextSwitchTo(fw_batch_cxt);

		if (from_spill)
			n = fw_spill_read(fw_batch, FW_BATCH_MAX, &end_pos, &spill_bytes);
		else
			n = fw_calllog_read_after(start, fw_batch, FW_BATCH_MAX, &end_pos);
		MemoryContextSwitchTo(old);
	}
	if (from_spill ? n < 0 : end_pos == start)
		return -1;				/* the first record is still being written */

	may_repeat = fw_advance_pending ||
		(from_spill ? fw_spill_checked : start < fw_checked_below);
	if (n > 0)
	{
		TransactionId xid;

		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		/* issue 15: the tail move waits for the WAL instead (above) */
		async = !from_spill &&
			!(SyncRepRequested() && SyncRepStandbyNames != NULL &&
			  SyncRepStandbyNames[0] != '\0');
		if (async)
			(void) set_config_option("synchronous_commit", "off",
									 PGC_SUSET, PGC_S_SESSION,
									 GUC_ACTION_LOCAL, true, 0, false);
		else if (synchronous_commit == SYNCHRONOUS_COMMIT_OFF)
		{
			/*
			 * A spill batch's space, and a move queued without an LSN, are
			 * released right after COMMIT: that commit must be flushed,
			 * whatever synchronous_commit the flusher's database inherits.
			 */
			(void) set_config_option("synchronous_commit", "local",
									 PGC_SUSET, PGC_S_SESSION,
									 GUC_ACTION_LOCAL, true, 0, false);
		}
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "fw_tier: writing the call log");

		/* the datums built there live in SPI's context, freed by SPI_finish */
		rows = fw_loginsert_batch(fw_batch, n, may_repeat);

		SPI_finish();
		PopActiveSnapshot();
		fw_advance_pending = true;
		xid = GetTopTransactionIdIfAny();
		CommitTransactionCommand();
		/*
		 * Durable once the WAL is flushed past the commit record; without
		 * an xid nothing was written (every row was there already): what
		 * made those rows is below the WAL's insert position.
		 */
		lsn = TransactionIdIsValid(xid) ? XactLastCommitEnd :
			fw_insert_end();
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
	{
		/*
		 * In order behind the moves waiting: a batch of damaged records
		 * only (n = 0, no commit) waits for them too.  Synchronous: the
		 * WAL is flushed already.
		 */
		if (fw_nmoves == 0)
			fw_moves_since = GetCurrentTimestamp();
		fw_moves[fw_nmoves].end_pos = end_pos;
		fw_moves[fw_nmoves].nrecords = n;
		fw_moves[fw_nmoves].lsn = async ? lsn : InvalidXLogRecPtr;
		fw_nmoves++;
		fw_read_pos = end_pos;
		fw_flusher_move_tail(false);
	}
	fw_advance_pending = false;

	/*
	 * A record of this batch was not in the table yet: none after it is
	 * (committed records are a prefix of the ring's, or the spill's,
	 * order).
	 */
	if (may_repeat && rows > 0)
	{
		if (from_spill)
			fw_spill_checked = false;
		else
			fw_checked_below = 0;
	}
	return n;
}

/* records in the ring or in the spill */
static bool
fw_log_pending(void)
{
	return fw_calllog_pending() || fw_spill_pending();
}

/*
 * Log and clean up after an error in a transaction of ours; the flusher
 * keeps running and retries later (records stay in the ring).
 */
static void
fw_flusher_recover_error(void)
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
	/* what loginsert.c keeps may refer to a dropped table */
	fw_loginsert_reset();
	pgstat_report_activity(STATE_IDLE, NULL);
	fw_fail_count++;
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
	fw_flusher_move_tail(true);
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
/*
 * A transaction of the flusher's own (windows, budgets) failed: abort it,
 * say so as a WARNING with the error's SQLSTATE, and carry on; the caller
 * backs off.  The call log's own errors go through
 * fw_flusher_recover_error, which also records drain_state.
 */
static void
fw_flusher_warn_caught(const char *what, const char *detail)
{
	ErrorData  *edata;

	MemoryContextSwitchTo(fw_worker_cxt);
	edata = CopyErrorData();
	FlushErrorState();
	AbortCurrentTransaction();
	pgstat_report_activity(STATE_IDLE, NULL);
	ereport(WARNING,
			(errcode(edata->sqlerrcode),
			 errmsg("fw_tier flusher: %s: %s", what,
					edata->message ? edata->message : ""),
			 detail ? errdetail("%s", detail) : 0));
	FreeErrorData(edata);
}

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

	/* what the ring holds now was read by earlier flushers, if any */
	{
		uint64		size,
					used,
					head,
					tail;

		fw_calllog_usage(&size, &used, &head, &tail);
		fw_checked_below = head;
	}

	fw_worker_cxt = AllocSetContextCreate(TopMemoryContext,
										  "fw_tier flusher",
										  ALLOCSET_DEFAULT_SIZES);
	fw_batch_cxt = AllocSetContextCreate(fw_worker_cxt,
										 "fw_tier flusher batch",
										 ALLOCSET_DEFAULT_SIZES);
	fw_batch = MemoryContextAllocZero(fw_worker_cxt,
									  sizeof(FwDrainedRecord) * FW_BATCH_MAX);

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
				next_expiry = fw_winsync_windows(!restored, &nsynced);
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
				fw_flusher_warn_caught("could not record escalation windows in fw_tier.escalations",
									   "The call log is still written; the windows are recorded again after a back-off.");
				sync_fail_count++;
				sync_retry_at = GetCurrentTimestamp() +
					(int64) Min(fw_flush_interval_ms * (1 << Min(sync_fail_count, 10)),
								FW_RETRY_MAX_MS) * 1000;
			}
			PG_END_TRY();
		}

		/* issue 18: attempts whose owner exited without its callbacks */
		fw_intents_reap();

		/* backing off after an error: what is committed still lands */
		if (retry_at != 0)
			fw_flusher_move_tail(true);

		now = GetCurrentTimestamp();
		if (retry_at == 0 || now >= retry_at || ShutdownRequestPending)
		{
			PG_TRY();
			{
				bool		flush_now;
				bool		requested;
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
				requested = pg_atomic_exchange_u32(&fw_shared->flush_requested, 0) != 0;
				flush_now = requested ||
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
					while (fw_flusher_drain_batch() >= 0)
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
				}
				/*
				 * Issue 15: the tail moves waiting for the WAL; flushed by
				 * us when fw_flush() waits, when the ring needs space, or
				 * when the walwriter is late.
				 */
				fw_flusher_move_tail(requested || used > size / 2 ||
									 ShutdownRequestPending ||
									 (fw_nmoves > 0 &&
									  GetCurrentTimestamp() - fw_moves_since >=
									  (int64) FW_MOVE_WAIT_MS * 1000));
				if (used > 0 && flush_now)
				{
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
				fw_flusher_recover_error();
				retry_at = GetCurrentTimestamp() +
					(int64) Min(fw_flush_interval_ms * (1 << Min(fw_fail_count, 10)),
								FW_RETRY_MAX_MS) * 1000;
			}
			PG_END_TRY();
		}

		/*
		 * Budgets (issue 13, spend.c): restore a budget's spend once the
		 * call log written before it has landed, send budget alerts.
		 */
		if (fw_spend_worker_pending())
		{
			did_work = true;
			PG_TRY();
			{
				fw_spend_worker_run();
			}
			PG_CATCH();
			{
				fw_flusher_warn_caught("could not restore budgets from fw_tier.calls", NULL);
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
		/* issue 15: tail moves waiting for the walwriter */
		if (fw_nmoves > 0 &&
			(deadline == 0 || deadline > now + (int64) WalWriterDelay * 1000))
			deadline = now + (int64) WalWriterDelay * 1000;
		cap = idle_since + (int64) FW_FLUSHER_IDLE_MS * 1000;
		if (cap <= now)
			cap = now + (int64) FW_FLUSHER_IDLE_MS * 1000;
		if (deadline == 0 || deadline > cap)
			deadline = cap;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 fw_ms_until(deadline, now), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	fw_flusher_move_tail(true);
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
