/*-------------------------------------------------------------------------
 *
 * status.c
 *		SQL functions over the shared state: the per-workload state behind
 *		the fw_tier.status view, the call-log ring counters, the operator's
 *		fw_escalate() / fw_deescalate(), and fw_flush().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "common/int.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "fw_tier.h"

PG_FUNCTION_INFO_V1(fw_tier_workload_state);
PG_FUNCTION_INFO_V1(fw_tier_log_state);
PG_FUNCTION_INFO_V1(fw_escalate);
PG_FUNCTION_INFO_V1(fw_deescalate);
PG_FUNCTION_INFO_V1(fw_flush);

#define FW_STATE_COLS	20

/*
 * fw_tier_workload_state(): one row per workload of this database tracked
 * in shared memory (a workload appears once a call used it or it was
 * escalated, until its slot is reused).
 */
Datum
fw_tier_workload_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	FwWorkloadSnapshot *snaps;
	int			n;

	fw_require_preload();
	InitMaterializedSRF(fcinfo, 0);

	n = fw_workload_snapshots(&snaps);
	for (int i = 0; i < n; i++)
	{
		FwWorkloadSnapshot *s = &snaps[i];
		Datum		values[FW_STATE_COLS];
		bool		nulls[FW_STATE_COLS];
		int64		total = 0;
		int64		per_outcome[FW_NUM_OUTCOMES];
		int64		per_path[FW_NUM_PATHS];
		int			c = 0;

		memset(nulls, 0, sizeof(nulls));
		memset(per_outcome, 0, sizeof(per_outcome));
		memset(per_path, 0, sizeof(per_path));
		for (int p = 0; p < FW_NUM_PATHS; p++)
			for (int o = 0; o < FW_NUM_OUTCOMES; o++)
			{
				per_outcome[o] += s->attempts[p][o];
				per_path[p] += s->attempts[p][o];
				total += s->attempts[p][o];
			}

		/*
		 * A replaying session sees its own replay window (escalation.c,
		 * "Replay"): it tests its overload handling with this view.  The
		 * escalations count and counters stay the shared ones.
		 */
		if (fw_mode == FW_MODE_REPLAY)
		{
			TimestampTz local = fw_replay_window_until(s->name);

			if (local > s->priority_until)
				s->priority_until = local;
		}

		values[c++] = CStringGetTextDatum(s->name);
		values[c] = TimestampTzGetDatum(s->priority_until);
		nulls[c++] = (s->priority_until == 0);
		values[c] = TimestampTzGetDatum(s->window_started);
		nulls[c++] = (s->window_started == 0);
		values[c] = TimestampTzGetDatum(s->last_overloaded);
		nulls[c++] = (s->last_overloaded == 0);
		values[c++] = Int64GetDatum(s->escalations);
		values[c++] = Int32GetDatum(s->windows_in_row);
		values[c++] = BoolGetDatum(s->alerted);
		values[c++] = Int64GetDatum(total);
		values[c++] = Int64GetDatum(per_outcome[FW_OK]);
		values[c++] = Int64GetDatum(per_outcome[FW_OVERLOADED]);
		values[c++] = Int64GetDatum(per_outcome[FW_RATE_LIMITED]);
		values[c++] = Int64GetDatum(per_outcome[FW_UNAVAILABLE]);
		values[c++] = Int64GetDatum(per_path[FW_PATH_STANDARD]);
		values[c++] = Int64GetDatum(per_path[FW_PATH_PRIORITY]);
		values[c++] = Int64GetDatum(per_path[FW_PATH_FAST]);
		values[c++] = Int64GetDatum(s->attempts[FW_PATH_PRIORITY][FW_OVERLOADED]);
		/* issue 16 */
		values[c++] = Int64GetDatum(s->probes);
		values[c++] = Int64GetDatum(s->probes_shed);
		values[c++] = Int64GetDatum(s->closed_by_probes);
		values[c++] = Float8GetDatum((double) s->priority_us / USECS_PER_SEC);
		Assert(c == FW_STATE_COLS);

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * fw_tier_log_state(): the call log, one row: the ring, the spill, what
 * was lost or refused, and why it does not drain.
 */
#define FW_LOG_STATE_COLS	15

Datum
fw_tier_log_state(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[FW_LOG_STATE_COLS];
	bool		nulls[FW_LOG_STATE_COLS];
	uint64		size,
				used,
				head,
				tail,
				spill_bytes,
				spill_records;
	uint32		pid;
	char		state[FW_ERRLEN];

	fw_require_preload();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	fw_calllog_usage(&size, &used, &head, &tail);
	fw_spill_usage(&spill_bytes, &spill_records);
	pid = pg_atomic_read_u32(&fw_shared->worker_pid);
	fw_get_drain_state(state, sizeof(state));
	/* issue 11: the shipper says "standby" or "standby: <why>" (shipper.c) */
	if (RecoveryInProgress() && strncmp(state, "standby", 7) != 0)
		strlcpy(state, "standby", sizeof(state));

	memset(nulls, 0, sizeof(nulls));
	values[0] = Int64GetDatum((int64) size);
	values[1] = Int64GetDatum((int64) used);
	values[2] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->records_pushed));
	values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->records_flushed));
	values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->ring_waits));
	values[5] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->records_skipped));
	values[6] = Int32GetDatum((int32) pid);
	nulls[6] = (pid == 0);
	values[7] = Int64GetDatum((int64) head);
	values[8] = Int64GetDatum((int64) spill_bytes);
	values[9] = Int64GetDatum((int64) spill_records);
	values[10] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->records_spilled));
	values[11] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->records_dropped));
	values[12] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->records_corrupt));
	values[13] = Int64GetDatum((int64) pg_atomic_read_u64(&fw_shared->dead_letters));
	values[14] = CStringGetTextDatum(state);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/* the longest escalation window fw_escalate() opens */
#define FW_ESCALATE_MAX_DAYS	365

/*
 * An escalation duration in microseconds, or an error: a month counts 30
 * days, as in interval comparison; every step is overflow-checked (an
 * interval can hold about 178 million years of months, far more than
 * int64 microseconds), and the result must be positive and at most
 * FW_ESCALATE_MAX_DAYS (a longer Priority is a configuration: set the
 * workload's path).
 */
static int64
fw_escalate_duration_us(const Interval *iv, const char *what)
{
	int64		us;
	int64		part;

	if (pg_mul_s64_overflow((int64) iv->month, (int64) DAYS_PER_MONTH * USECS_PER_DAY, &part) ||
		pg_add_s64_overflow(iv->time, part, &us) ||
		pg_mul_s64_overflow((int64) iv->day, USECS_PER_DAY, &part) ||
		pg_add_s64_overflow(us, part, &us))
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_FIELD_OVERFLOW),
				 errmsg("%s is out of range", what),
				 errdetail("An escalation lasts at most %d days.",
						   FW_ESCALATE_MAX_DAYS)));
	if (us <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be positive", what)));
	if (us > (int64) FW_ESCALATE_MAX_DAYS * USECS_PER_DAY)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_FIELD_OVERFLOW),
				 errmsg("%s is out of range", what),
				 errdetail("An escalation lasts at most %d days.",
						   FW_ESCALATE_MAX_DAYS),
				 errhint("To keep a workload on priority, set its path in fw_tier.workloads.")));
	return us;
}

/*
 * The workload's priority_window from fw_tier.workloads into *window;
 * false when it is NULL.  Raises 22023 when the workload does not exist.
 */
static bool
fw_status_workload_window(const char *workload, Interval *window,
						  FwPath *path)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		args[1];
	int			ret;
	bool		has_window = false;
	bool		found;

	args[0] = CStringGetTextDatum(workload);

	SPI_connect();
	ret = SPI_execute_with_args("SELECT priority_window, path FROM fw_tier.workloads"
								" WHERE workload OPERATOR(pg_catalog.=) $1",
								1, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "SPI_execute_with_args failed: %s",
			 SPI_result_code_string(ret));
	found = (SPI_processed > 0);
	if (found)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0],
									  SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
		{
			/* SPI_finish frees the tuple: copy the value out */
			*window = *DatumGetIntervalP(d);
			has_window = true;
		}
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2,
						  &isnull);
		if (isnull || !fw_parse_path(TextDatumGetCString(d), path))
			*path = FW_PATH_STANDARD;
	}
	SPI_finish();

	if (!found)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("workload \"%s\" does not exist", workload),
				 errhint("Workloads are rows of fw_tier.workloads.")));
	return has_window;
}

/*
 * fw_escalate(workload text, duration interval DEFAULT NULL)
 *	Put the workload on Priority now, for duration (NULL: the workload's
 *	priority_window, else fw_tier.priority_window).  Returns the new end.
 */
Datum
fw_escalate(PG_FUNCTION_ARGS)
{
	char	   *workload;
	int64		window_us;
	Interval	window;
	bool		has_window;
	FwPath		path;

	fw_require_preload();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("workload must not be null")));
	workload = text_to_cstring(PG_GETARG_TEXT_PP(0));

	/* checks that the workload exists, whatever the duration */
	has_window = fw_status_workload_window(workload, &window, &path);
	/* only Standard escalates: a window on another path would count, not route */
	if (path != FW_PATH_STANDARD)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("workload \"%s\" cannot be escalated", workload),
				 errdetail("Its path is %s; only workloads on the standard path escalate to priority.",
						   fw_path_name(path)),
				 errhint("Escalate a workload whose path is standard, or set this workload's path in fw_tier.workloads.")));
	if (!PG_ARGISNULL(1))
		window_us = fw_escalate_duration_us(PG_GETARG_INTERVAL_P(1),
											"escalation duration");
	else if (has_window)
		window_us = fw_escalate_duration_us(&window,
											"the workload's priority_window");
	else
		window_us = (int64) fw_priority_window_s * USECS_PER_SEC;

	/* whole milliseconds, at least one */
	PG_RETURN_TIMESTAMPTZ(fw_escalate_now(workload, Max(window_us / 1000, 1)));
}

/*
 * fw_deescalate(workload text): end the workload's window now.
 */
Datum
fw_deescalate(PG_FUNCTION_ARGS)
{
	char	   *workload;
	Interval	window;
	FwPath		path;

	fw_require_preload();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("workload must not be null")));
	workload = text_to_cstring(PG_GETARG_TEXT_PP(0));

	(void) fw_status_workload_window(workload, &window, &path);
	fw_deescalate_now(workload);
	fw_replay_forget(workload);
	PG_RETURN_VOID();
}

/*
 * fw_flush(): returns once every record pushed before the call is in
 * fw_tier.calls.  Waits for the worker; statement_timeout applies.
 */
Datum
fw_flush(PG_FUNCTION_ARGS)
{
	fw_require_preload();
	fw_flush_wait();
	PG_RETURN_VOID();
}
