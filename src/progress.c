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
} FwProgressSlot;

static FwProgressSlot *fw_progress = NULL;
static FwProgressSlot *fw_my_progress = NULL;

PG_FUNCTION_INFO_V1(fw_tier_progress);

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

void
fw_progress_begin(const char *workload, int ncalls)
{
	FwProgressSlot *s;
	TimestampTz stmt = GetCurrentStatementStartTimestamp();

	if (fw_progress == NULL || MyBackendId == InvalidBackendId ||
		MyBackendId > MaxBackends)
		return;
	s = fw_my_progress = &fw_progress[MyBackendId - 1];

	fw_progress_write_begin(s);
	if (s->pid != MyProcPid || s->statement_start != stmt)
	{
		s->pid = MyProcPid;
		s->statement_start = stmt;
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
 * fw_tier_progress() RETURNS TABLE (pid, workload, statement_start, total,
 * done, in_flight, failed, concurrency_limit): backends whose current
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
		Datum		values[8];
		bool		nulls[8] = {0};

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
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
