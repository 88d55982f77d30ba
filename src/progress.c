/*-------------------------------------------------------------------------
 *
 * progress.c
 *		Per-backend progress of fw_tier calls, for fw_tier.progress.
 *
 * One slot per backend (indexed by MyBackendId), written only by its own
 * backend and read by anyone through fw_tier_progress().  Writers follow
 * the pgstat "changecount" protocol: bump to odd, write, bump to even,
 * with barriers; readers retry until they see the same even count before
 * and after copying.  No lock is taken on either side, so the hot path
 * pays a few stores per batch round.
 *
 * A statement that calls fw_complete row by row shows up as one growing
 * run: counters restart when the statement start time changes.
 *
 * fw_enrich runs one engine run per chunk inside a single CALL: it sets
 * the job's figures with fw_tier.progress_job(), and while a job is set
 * total / done / failed describe the current (or last) chunk only,
 * job_total / job_done the whole job (job_done = rows of earlier chunks
 * + done).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/backendid.h"
#include "storage/procarray.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "budget.h"

typedef struct FwProgressSlot
{
	uint32		changecount;
	int			pid;			/* 0: idle */
	char		workload[FW_NAMELEN];
	TimestampTz statement_start;
	int64		total;			/* calls asked for in this statement */
	int64		done;			/* finished, successfully or not */
	int64		failed;
	int32		in_flight;
	int32		limit;			/* current concurrency limit (429 pacing) */
	int64		base_done;		/* done before the current engine run */
	int64		base_failed;
	bool		job;			/* fw_tier.progress_job() called this statement */
	int64		job_total;		/* rows the job has to do */
	int64		job_base;		/* rows finished before the current chunk */
} FwProgressSlot;

static FwProgressSlot *fw_progress = NULL;
static FwProgressSlot *fw_my_progress = NULL;

PG_FUNCTION_INFO_V1(fw_tier_progress);
PG_FUNCTION_INFO_V1(fw_tier_progress_job);
PG_FUNCTION_INFO_V1(fw_tier_require_no_xact_block);

Size
fw_progress_shmem_size(void)
{
	return mul_size(MaxBackends, sizeof(FwProgressSlot));
}

void
fw_progress_shmem_init(void)
{
	bool		found;

	fw_progress = ShmemInitStruct("fw_tier progress", fw_progress_shmem_size(), &found);
	if (!found)
		memset(fw_progress, 0, fw_progress_shmem_size());
}

static inline void
fw_progress_write_begin(FwProgressSlot *s)
{
	s->changecount++;
	pg_write_barrier();
}

static inline void
fw_progress_write_end(FwProgressSlot *s)
{
	pg_write_barrier();
	s->changecount++;
}

/* This backend's slot, its counters restarted for a new statement. */
static FwProgressSlot *
fw_progress_claim(void)
{
	FwProgressSlot *s;
	TimestampTz stmt = GetCurrentStatementStartTimestamp();

	if (fw_progress == NULL || MyBackendId == InvalidBackendId ||
		MyBackendId > MaxBackends)
		return NULL;
	s = fw_my_progress = &fw_progress[MyBackendId - 1];
	if (s->pid != MyProcPid || s->statement_start != stmt)
	{
		fw_progress_write_begin(s);
		s->pid = MyProcPid;
		s->statement_start = stmt;
		s->total = s->done = s->failed = 0;
		s->in_flight = 0;
		s->job = false;
		s->job_total = s->job_base = 0;
		fw_progress_write_end(s);
	}
	return s;
}

void
fw_progress_begin(const char *workload, int ncalls)
{
	FwProgressSlot *s = fw_progress_claim();

	if (s == NULL)
		return;
	fw_progress_write_begin(s);
	/* inside a job each engine run is a chunk: counted on its own */
	if (s->job)
	{
		s->job_base += s->done;
		s->total = s->done = s->failed = 0;
	}
	strlcpy(s->workload, workload, sizeof(s->workload));
	s->total += ncalls;
	s->base_done = s->done;
	s->base_failed = s->failed;
	s->in_flight = 0;
	fw_progress_write_end(s);
}

void
fw_progress_update(int done, int in_flight, int failed, int limit)
{
	FwProgressSlot *s = fw_my_progress;

	if (s == NULL)
		return;
	fw_progress_write_begin(s);
	s->done = s->base_done + done;
	s->failed = s->base_failed + failed;
	s->in_flight = in_flight;
	s->limit = limit;
	fw_progress_write_end(s);
}

void
fw_progress_end(void)
{
	FwProgressSlot *s = fw_my_progress;

	if (s == NULL)
		return;
	fw_progress_write_begin(s);
	s->in_flight = 0;
	fw_progress_write_end(s);
}

/*
 * fw_tier.progress_job(total bigint, done bigint): the whole job's rows to
 * do and rows finished so far, for the calling backend's own slot only
 * (callable by anyone: it can only change what the caller's backend shows).
 */
Datum
fw_tier_progress_job(PG_FUNCTION_ARGS)
{
	FwProgressSlot *s;

	fw_require_preload();
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) ||
		PG_GETARG_INT64(0) < 0 || PG_GETARG_INT64(1) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("job total and done must be non-negative")));
	s = fw_progress_claim();
	if (s == NULL)
		PG_RETURN_VOID();
	fw_progress_write_begin(s);
	if (!s->job)
	{
		/* the job starts: nothing of it is running yet */
		s->total = s->done = s->failed = 0;
		s->in_flight = 0;
	}
	s->job = true;
	s->job_total = PG_GETARG_INT64(0);
	/* done counts the finished chunk, still shown until the next begins */
	s->job_base = PG_GETARG_INT64(1) - s->done;
	fw_progress_write_end(s);
	PG_RETURN_VOID();
}

/*
 * fw_tier.require_no_transaction_block(what text): refuse to go on inside a
 * transaction block (explicit, implicit or a savepoint).  A procedure that
 * COMMITs per chunk checks this before its first paid call: PostgreSQL
 * would only refuse at the first COMMIT, after the chunk was paid for.
 */
Datum
fw_tier_require_no_xact_block(PG_FUNCTION_ARGS)
{
	const char *what = PG_ARGISNULL(0) ? "this procedure" : text_to_cstring(PG_GETARG_TEXT_PP(0));

	if (IsTransactionBlock() || IsSubTransaction())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("%s cannot run inside a transaction block", what),
				 errdetail("It commits after each chunk."),
				 errhint("CALL it on its own, outside BEGIN ... COMMIT, a savepoint or a multi-statement query string.")));
	PG_RETURN_VOID();
}

/*
 * fw_tier_progress() RETURNS TABLE (pid, workload, statement_start, total,
 * done, in_flight, failed, concurrency_limit, job_total, job_done): backends whose current
 * statement called fw_tier.
 */
Datum
fw_tier_progress(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	fw_require_preload();
	InitMaterializedSRF(fcinfo, 0);

	for (int i = 0; i < MaxBackends; i++)
	{
		FwProgressSlot copy;
		Datum		values[10];
		bool		nulls[10] = {0};

		for (;;)
		{
			uint32		before = fw_progress[i].changecount;

			pg_read_barrier();
			memcpy(&copy, &fw_progress[i], sizeof(copy));
			pg_read_barrier();
			if (before == fw_progress[i].changecount && (before & 1) == 0)
				break;
			CHECK_FOR_INTERRUPTS();
		}
		if (copy.pid == 0)
			continue;
		/* A slot whose backend exited keeps its last run until reused. */
		if (BackendPidGetProc(copy.pid) == NULL)
			continue;

		values[0] = Int32GetDatum(copy.pid);
		values[1] = CStringGetTextDatum(copy.workload);
		values[2] = TimestampTzGetDatum(copy.statement_start);
		values[3] = Int64GetDatum(copy.total);
		values[4] = Int64GetDatum(copy.done);
		values[5] = Int32GetDatum(copy.in_flight);
		values[6] = Int64GetDatum(copy.failed);
		values[7] = Int32GetDatum(copy.limit);
		if (copy.job)
		{
			values[8] = Int64GetDatum(copy.job_total);
			values[9] = Int64GetDatum(copy.job_base + copy.done);
		}
		else
			nulls[8] = nulls[9] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
