/*-------------------------------------------------------------------------
 *
 * winsync.c
 *		Escalation windows mirrored from shared memory into
 *		fw_tier.escalations, closed on time, restored at start; the
 *		capacity alert (WARNING + NOTIFY fw_tier_alert).
 *
 * The windows live in shared memory (escalation.c); a row per window in
 * fw_tier.escalations makes them visible and survives a restart.  The
 * flusher calls fw_winsync_windows() at every wake: it writes the windows
 * whose state changed since they were last mirrored (fw_windows_to_sync),
 * in one transaction (a window that reopened before it was written as
 * ended: the ended one first, with its end, reason and probes), and only
 * after its COMMIT marks them mirrored
 * (fw_windows_synced); the writes are idempotent, so a crash in between
 * only repeats them.  At the first start after a restart it also reads
 * back the windows still open and puts them into shared memory
 * (fw_restore_window), then closes the rows whose window passed meanwhile.
 *
 * Runs as the bootstrap superuser with search_path pinned (launcher.c):
 * every operator and function in the SQL below is pg_catalog's.
 *
 * Locking: no LWLock here; fw_windows_to_sync, fw_windows_synced and
 * fw_restore_window take wl_lock inside, never across SPI.
 *
 * Called by: flusher.c only.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "worker.h"

/* the windows to write, one per workload slot (allocated at first use) */
static FwWindowSync *fw_sync = NULL;

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
		Datum		args[10];
		char		nulls[10] = {' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' ', ' '};
		Oid			types[10] = {TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
			TIMESTAMPTZOID, TEXTOID, INT4OID, NAMEOID,
		TEXTOID, INT8OID, INT8OID}; /* $8..$10: issue 16 */
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
		args[7] = w->ended_by ? CStringGetTextDatum(w->ended_by) : (Datum) 0;
		if (!w->ended_by)
			nulls[7] = 'n';
		args[8] = Int64GetDatum(w->probes);
		args[9] = Int64GetDatum(w->probes_shed);

		/* every statement gets all 10 (fixed parameters may go unused) */
		ret = SPI_execute_with_args("UPDATE fw_tier.escalations"
									" SET ended = LEAST(priority_until, $2)"
									" WHERE database OPERATOR(pg_catalog.=) $7"
									" AND workload OPERATOR(pg_catalog.=) $1 AND ended IS NULL"
									" AND started OPERATOR(pg_catalog.<>) $2",
									10, types, args, nulls, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "fw_tier: closing old windows failed: %s",
				 SPI_result_code_string(ret));

		ret = SPI_execute_with_args("UPDATE fw_tier.escalations"
									" SET priority_until = $3, ended = $4,"
									" trigger = CASE WHEN $5 OPERATOR(pg_catalog.=) 'manual'::pg_catalog.text"
									" THEN $5 ELSE trigger END,"
									" ended_by = $8, probes = $9, probes_shed = $10"
									" WHERE database OPERATOR(pg_catalog.=) $7"
									" AND workload OPERATOR(pg_catalog.=) $1"
									" AND started OPERATOR(pg_catalog.=) $2",
									10, types, args, nulls, false, 0);
		if (ret != SPI_OK_UPDATE)
			elog(ERROR, "fw_tier: updating a window failed: %s",
				 SPI_result_code_string(ret));

		if (SPI_processed == 0)
		{
			ret = SPI_execute_with_args("INSERT INTO fw_tier.escalations"
										" (database, workload, started, priority_until, ended, trigger, windows_in_row,"
										" ended_by, probes, probes_shed)"
										" VALUES ($7, $1, $2, $3, $4, $5, $6, $8, $9, $10)",
										10, types, args, nulls, false, 0);
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

	ret = SPI_execute("UPDATE fw_tier.escalations SET ended = priority_until,"
					  " ended_by = 'expired'"
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
TimestampTz
fw_winsync_windows(bool at_start, int *nsynced)
{
	TimestampTz next_expiry;
	int			n;

	if (fw_sync == NULL)
		fw_sync = MemoryContextAllocZero(TopMemoryContext,
										 sizeof(FwWindowSync) * 2 * fw_max_workloads);
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
