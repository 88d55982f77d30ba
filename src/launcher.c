/*-------------------------------------------------------------------------
 *
 * launcher.c
 *		The "fw_tier launcher": the static background worker that owns the
 *		timing and starts a flusher (flusher.c) when there is database
 *		work; and what both workers share (registration, the search_path
 *		pin, the DROP DATABASE probe).
 *
 * The autovacuum-launcher pattern.  The launcher is a static worker
 * connected to no database: it reads only the shared catalog pg_database,
 * so it never keeps fw_tier.database open and never blocks a DROP DATABASE
 * of it.  It sleeps on its latch until the earliest deadline (the end of
 * the earliest open window, a retry) and starts a dynamic "fw_tier
 * flusher" connected to fw_tier.database whenever there is database work:
 * records in the ring, a window to record or close, an alert, fw_flush(),
 * the restore at first start.  One flusher at a time; its exit wakes the
 * launcher (bgw_notify_pid).  Before starting one it probes for a DROP
 * DATABASE (or ALTER DATABASE RENAME / SET TABLESPACE) of the database,
 * as the flusher does at every wake (fw_database_busy).
 *
 * When fw_tier.database does not exist the launcher says so once and looks
 * again at each wake (backing off to FW_RECHECK_MAX_MS between looks);
 * when the extension is not created there the flusher says so once (the
 * flag lives in shared memory, flushers come and go) and exits, and the
 * launcher retries likewise.  The postmaster starts no worker once a
 * shutdown has begun, so the final drain has to be the running flusher's:
 * the launcher keeps one running whenever the ring is not empty.
 *
 * Locking: no LWLock of its own.  Backends set the launcher's latch
 * (fw_shared->worker_latch, written by the launcher only); the launcher
 * passes the wakeup on to a running flusher (flusher_latch).  worker_pid,
 * launcher_pid, worker_flags and flush_requested are atomics.  Ring usage
 * is read through fw_calllog_usage() (ring_lock inside), windows through
 * fw_windows_to_sync() (wl_lock inside).
 *
 * On a hot standby (issue 11) the launcher runs too (it starts at a
 * consistent state) but starts no flusher: fw_shipper_launch (shipper.c)
 * starts the "fw_tier shipper" when records wait, and polls for the end
 * of recovery; once promoted, and the shipper gone, the launcher goes on
 * as on any primary and its flusher drains what is left.
 *
 * Called by: the postmaster (fw_register_worker from _PG_init, then
 * fw_launcher_main); fw_worker_pin_search_path, fw_database_busy,
 * fw_ms_until and fw_worker_describe by flusher.c and shipper.c too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/heapam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "worker.h"

/* after a termination (exit 1) the postmaster restarts the launcher */
#define FW_LAUNCHER_RESTART_S	5

/* database or extension missing: look again after 1 s, 2 s, ... 10 s */
#define FW_RECHECK_MIN_MS	1000
#define FW_RECHECK_MAX_MS	10000

/* what the launcher found of fw_tier.database */
typedef enum FwDbState
{
	FW_DB_OK,
	FW_DB_MISSING,				/* no such database, or an invalid one */
	FW_DB_NOCONN,				/* datallowconn is false */
	FW_DB_BUSY					/* DROP / ALTER DATABASE waiting on it */
} FwDbState;

/*
 * Both workers run as the bootstrap superuser.  Before their first
 * statement they pin search_path to pg_catalog, pg_temp (PGC_S_OVERRIDE: a
 * reload of postgresql.conf or ALTER ROLE/DATABASE SET cannot change it),
 * so no object of an ordinary role (an operator in public, a schema named
 * after the superuser for "$user") can be resolved by their SQL.  The SQL
 * strings qualify their operators and functions as well.
 */
void
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
/*
 * Both workers: shared memory, a database connection, after recovery.
 * (The launcher and the shipper also run on a hot standby: issue 11.)
 */
void
fw_worker_describe(BackgroundWorker *worker, const char *function,
				   const char *name, int restart_time, pid_t notify_pid)
{
	memset(worker, 0, sizeof(*worker));
	worker->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker->bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker->bgw_restart_time = restart_time;
	strlcpy(worker->bgw_library_name, "fw_tier", BGW_MAXLEN);
	strlcpy(worker->bgw_function_name, function, BGW_MAXLEN);
	strlcpy(worker->bgw_name, name, BGW_MAXLEN);
	strlcpy(worker->bgw_type, name, BGW_MAXLEN);
	worker->bgw_main_arg = (Datum) 0;
	worker->bgw_notify_pid = notify_pid;
}

void
fw_register_worker(void)
{
	BackgroundWorker worker;

	fw_worker_describe(&worker, "fw_launcher_main", "fw_tier launcher",
					   FW_LAUNCHER_RESTART_S, 0);
	/* issue 11: on a hot standby too, where it starts the shipper */
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	RegisterBackgroundWorker(&worker);
}

static bool
fw_launcher_start_flusher(BackgroundWorkerHandle **handle)
{
	BackgroundWorker worker;

	/* never restarted by the postmaster; its exit sets our latch */
	fw_worker_describe(&worker, "fw_flusher_main", "fw_tier flusher",
					   BGW_NEVER_RESTART, MyProcPid);
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
bool
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

/* issue 11: may a shipper connect to fw_tier.database?  (shipper.c) */
bool
fw_launcher_database_ok(void)
{
	return fw_launcher_database_state() == FW_DB_OK;
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

long
fw_ms_until(TimestampTz deadline, TimestampTz now)
{
	if (deadline <= now)
		return 0;
	/* round up: waking a hair early would only loop once more */
	return (long) Min((deadline - now + 999) / 1000, (int64) INT_MAX);
}

/*
 * The launcher: decides when a flusher must run, starts it, and otherwise
 * sleeps until the next window ends.
 */
void
fw_launcher_main(Datum main_arg)
{
	BackgroundWorkerHandle *flusher = NULL;
	BackgroundWorkerHandle *shipper = NULL; /* issue 11: on a standby */
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
								  sizeof(FwWindowSync) * 2 * fw_max_workloads);

	before_shmem_exit(fw_launcher_detach, (Datum) 0);
	pg_atomic_write_u32(&fw_shared->launcher_pid, (uint32) MyProcPid);
	fw_shared->worker_latch = MyLatch;

	ereport(LOG,
			(errmsg("fw_tier launcher started; the call log goes to database \"%s\"",
					fw_database)));

	/* issue 14: a worker in each database with queued enrichment work */
	fw_enrich_start_scout();

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
		/* issue 11: a standby ships its log (shipper.c), never flushes */
		if (flusher == NULL && (shipper != NULL || RecoveryInProgress()))
			deadline = fw_shipper_launch(&shipper, now);
		if (deadline != 0)
			;					/* a standby, or its shipper finishing */
		else if (running)
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
		if (shipper != NULL)
		{
			TerminateBackgroundWorker(shipper);
			(void) WaitForBackgroundWorkerShutdown(shipper);
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
