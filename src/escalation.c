/*-------------------------------------------------------------------------
 *
 * escalation.c
 *		The per-workload Priority window: a small state machine in shared
 *		memory.
 *
 * A workload starts on its configured path.  When an attempt on Standard is
 * shed with 503 Service Overloaded and the workload's policy is "priority",
 * the workload is escalated: priority_until = now + window, and every new
 * request of the workload goes to Priority until then.  Overloaded again
 * while on Priority extends the window.  Exactly one escalation is counted
 * per window however many backends see the 503 at once: the window is
 * opened under wl_lock held exclusively, after re-checking it is not open.
 *
 * Contracts: functions ending in _locked expect the caller to hold
 * fw_shared->wl_lock exclusively.  fw_route() and fw_count_attempt() take
 * no lock at all (see shmem.c for the protocol).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/pg_prng.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "fw_tier.h"

/* Longest random extension a backend adds to the end of a window. */
#define FW_JITTER_MAX_US	(30 * USECS_PER_SEC)

/*
 * Per-backend end-of-window jitter, one entry per slot, drawn once for each
 * priority_until value seen, so that the backends do not all flip back to
 * Standard in the same instant.
 */
typedef struct FwJitter
{
	uint64		until;			/* priority_until the draw belongs to */
	int64		jitter_us;
} FwJitter;

static FwJitter *fw_jitter = NULL;

static void
fw_check_shared(void)
{
	if (fw_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("fw_tier shared memory is not initialized"),
				 errhint("Add fw_tier to shared_preload_libraries in postgresql.conf and restart the server.")));
}

/* caller holds wl_lock (any mode) */
static int
fw_find_slot_locked(const char *name)
{
	for (int i = 0; i < fw_shared->num_workloads; i++)
	{
		FwWorkload *w = &fw_shared->workloads[i];

		if (w->in_use && strcmp(w->name, name) == 0)
			return i;
	}
	return -1;
}

/*
 * Find a slot, creating it when create is true and there is room.  Returns
 * -1 when not found (or the table is full); never raises.
 */
static int
fw_lookup_slot(const char *name, bool create, bool *full)
{
	int			slot;

	*full = false;

	LWLockAcquire(fw_shared->wl_lock, LW_SHARED);
	slot = fw_find_slot_locked(name);
	LWLockRelease(fw_shared->wl_lock);
	if (slot >= 0 || !create)
		return slot;

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	slot = fw_find_slot_locked(name);
	if (slot < 0)
	{
		if (fw_shared->num_workloads < fw_max_workloads)
		{
			FwWorkload *w;

			slot = fw_shared->num_workloads;
			w = &fw_shared->workloads[slot];
			/* atomics were initialized at startup and never used since */
			strlcpy(w->name, name, FW_NAMELEN);
			w->window_started = 0;
			w->last_overloaded = 0;
			w->escalations = 0;
			w->priority_overloaded = 0;
			w->windows_in_row = 0;
			w->manual = false;
			w->alerted = false;
			w->alert_notified = false;
			w->mirrored_started = 0;
			w->mirrored_until = 0;
			w->mirrored_closed = false;
			w->in_use = true;
			fw_shared->num_workloads++;
		}
		else
			*full = true;
	}
	LWLockRelease(fw_shared->wl_lock);
	return slot;
}

/*
 * The slot of a workload, created on first use.  The engine caches the
 * index per backend; slots are never freed, so an index stays valid until
 * the shared memory is re-created.
 */
int
fw_workload_slot(const char *name)
{
	int			slot;
	bool		full;

	fw_check_shared();
	if (name == NULL || name[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("workload name must not be empty")));
	if (strlen(name) >= FW_NAMELEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("workload name \"%s\" is too long", name),
				 errdetail("Workload names are limited to %d bytes.",
						   FW_NAMELEN - 1)));

	slot = fw_lookup_slot(name, true, &full);
	if (slot < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many fw_tier workloads"),
				 errdetail("All %d workload slots in shared memory are in use.",
						   fw_max_workloads),
				 errhint("Raise fw_tier.max_workloads and restart the server.")));
	return slot;
}

/*
 * Open a new window at now.  Caller holds wl_lock exclusively.
 *
 * windows_in_row counts windows that follow each other: a window opened
 * less than one window length after the previous one ended continues the
 * run.  The alert flag is raised once per run.
 */
static void
fw_open_window_locked(FwWorkload *w, TimestampTz now, int64 window_us,
					  bool manual)
{
	TimestampTz prev_end = (TimestampTz) pg_atomic_read_u64(&w->priority_until);

	if (prev_end != 0 && now - prev_end < window_us)
		w->windows_in_row++;
	else
	{
		w->windows_in_row = 1;
		w->alerted = false;
		w->alert_notified = false;
	}
	if (w->windows_in_row >= fw_alert_windows)
		w->alerted = true;

	w->escalations++;
	w->window_started = now;
	w->manual = manual;

	pg_atomic_write_u64(&w->window_us, (uint64) window_us);
	/* exchange: full barrier, window_us is visible before the new end */
	pg_atomic_exchange_u64(&w->priority_until, (uint64) (now + window_us));
}

/* Move the end of the open window.  Caller holds wl_lock exclusively. */
static void
fw_set_until_locked(FwWorkload *w, TimestampTz until, int64 window_us)
{
	pg_atomic_write_u64(&w->window_us, (uint64) window_us);
	pg_atomic_exchange_u64(&w->priority_until, (uint64) until);
}

/*
 * The path a new attempt takes.  HOT PATH: no lock, two atomic reads.
 */
FwPath
fw_route(int slot, FwPath configured, TimestampTz now)
{
	FwWorkload *w;
	uint64		until;
	FwJitter   *j;

	if (configured != FW_PATH_STANDARD || fw_shared == NULL ||
		slot < 0 || slot >= fw_max_workloads)
		return configured;

	w = &fw_shared->workloads[slot];
	until = pg_atomic_read_u64(&w->priority_until);
	if (until == 0)
		return FW_PATH_STANDARD;
	if (now < (TimestampTz) until)
		return FW_PATH_PRIORITY;

	/* the window is over: our own small extension, drawn once per window */
	if (fw_jitter == NULL)
		fw_jitter = MemoryContextAllocZero(TopMemoryContext,
										   sizeof(FwJitter) * fw_max_workloads);
	j = &fw_jitter[slot];
	if (j->until != until)
	{
		uint64		window_us;
		uint64		max_us;

		pg_read_barrier();
		window_us = pg_atomic_read_u64(&w->window_us);
		max_us = Min(window_us / 10, (uint64) FW_JITTER_MAX_US);
		j->jitter_us = max_us > 0 ?
			(int64) pg_prng_uint64_range(&pg_global_prng_state, 0, max_us) : 0;
		j->until = until;
	}
	if (now < (TimestampTz) until + j->jitter_us)
		return FW_PATH_PRIORITY;
	return FW_PATH_STANDARD;
}

/*
 * An attempt was shed with 503 Service Overloaded.  Returns true when the
 * engine should retry at once (the next fw_route() gives Priority).
 */
bool
fw_on_overloaded(int slot, FwPath path_used, FwOnOverload policy,
				 int window_s, TimestampTz now)
{
	FwWorkload *w;
	int64		window_us;
	bool		retry = false;
	bool		wake = false;

	if (fw_shared == NULL || slot < 0 || slot >= fw_max_workloads)
		return false;
	w = &fw_shared->workloads[slot];
	window_us = (int64) (window_s > 0 ? window_s : fw_priority_window_s) * USECS_PER_SEC;

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	w->last_overloaded = now;
	if (policy == FW_ONOVERLOAD_PRIORITY && path_used == FW_PATH_STANDARD)
	{
		TimestampTz until = (TimestampTz) pg_atomic_read_u64(&w->priority_until);

		/* re-check under the lock: another backend may have opened it */
		if (until <= now)
		{
			fw_open_window_locked(w, now, window_us, false);
			wake = true;
		}
		retry = true;
	}
	else if (policy == FW_ONOVERLOAD_PRIORITY && path_used == FW_PATH_PRIORITY)
	{
		TimestampTz until = (TimestampTz) pg_atomic_read_u64(&w->priority_until);

		w->priority_overloaded++;
		/* only an escalated workload is extended; configured Priority is not */
		if (until > now && now + window_us > until)
		{
			fw_set_until_locked(w, now + window_us, window_us);
			wake = true;
		}
	}
	LWLockRelease(fw_shared->wl_lock);

	if (wake)
		fw_wake_worker();
	return retry;
}

/* HOT PATH: one atomic increment, no lock. */
void
fw_count_attempt(int slot, FwPath path, FwOutcome outcome)
{
	if (fw_shared == NULL || slot < 0 || slot >= fw_max_workloads ||
		path < 0 || path >= FW_NUM_PATHS ||
		outcome < 0 || outcome >= FW_NUM_OUTCOMES)
		return;
	pg_atomic_fetch_add_u64(&fw_shared->workloads[slot].attempts[path][outcome], 1);
}

/*
 * Operator: put the workload on Priority for window_ms from now.  An open
 * window gets the new end (no new escalation is counted); otherwise a
 * manual window opens.
 */
void
fw_escalate_now(const char *workload, int64 window_ms)
{
	int			slot = fw_workload_slot(workload);
	FwWorkload *w = &fw_shared->workloads[slot];
	TimestampTz now = GetCurrentTimestamp();
	int64		window_us = window_ms * 1000;

	if (window_us <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("escalation window must be positive")));

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	if ((TimestampTz) pg_atomic_read_u64(&w->priority_until) > now)
		fw_set_until_locked(w, now + window_us, window_us);
	else
		fw_open_window_locked(w, now, window_us, true);
	LWLockRelease(fw_shared->wl_lock);

	fw_wake_worker();
}

/*
 * Operator: end the open window now, without the per-backend jitter
 * (window_us = 0 makes every backend draw a zero extension).
 */
void
fw_deescalate_now(const char *workload)
{
	int			slot = fw_workload_slot(workload);
	FwWorkload *w = &fw_shared->workloads[slot];
	TimestampTz now = GetCurrentTimestamp();
	bool		ended = false;

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	if ((TimestampTz) pg_atomic_read_u64(&w->priority_until) > now)
	{
		fw_set_until_locked(w, now, 0);
		ended = true;
	}
	LWLockRelease(fw_shared->wl_lock);

	if (ended)
		fw_wake_worker();
}

/*
 * Copies of every tracked workload, palloc'd in the current context.  The
 * array is allocated before the lock is taken.
 */
int
fw_workload_snapshots(FwWorkloadSnapshot **out)
{
	FwWorkloadSnapshot *snaps;
	int			n;

	fw_check_shared();
	snaps = palloc0(sizeof(FwWorkloadSnapshot) * fw_max_workloads);

	LWLockAcquire(fw_shared->wl_lock, LW_SHARED);
	n = fw_shared->num_workloads;
	for (int i = 0; i < n; i++)
	{
		FwWorkload *w = &fw_shared->workloads[i];
		FwWorkloadSnapshot *s = &snaps[i];

		memcpy(s->name, w->name, FW_NAMELEN);
		s->priority_until = (TimestampTz) pg_atomic_read_u64(&w->priority_until);
		s->window_started = w->window_started;
		s->last_overloaded = w->last_overloaded;
		s->escalations = w->escalations;
		s->windows_in_row = w->windows_in_row;
		s->alerted = w->alerted;
		for (int p = 0; p < FW_NUM_PATHS; p++)
			for (int o = 0; o < FW_NUM_OUTCOMES; o++)
				s->attempts[p][o] = (int64) pg_atomic_read_u64(&w->attempts[p][o]);
	}
	LWLockRelease(fw_shared->wl_lock);

	*out = snaps;
	return n;
}

/*
 * Worker: put back a window read from fw_tier.escalations after a restart.
 * A window already in shared memory that ends later wins.  The restored
 * window counts as one escalation, and is already mirrored.
 */
void
fw_restore_window(const char *workload, TimestampTz started,
				  TimestampTz until, int32 windows_in_row, bool manual)
{
	int			slot;
	bool		full;
	FwWorkload *w;

	slot = fw_lookup_slot(workload, true, &full);
	if (slot < 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not restore the priority window of workload \"%s\"",
						workload),
				 errdetail("All %d workload slots in shared memory are in use.",
						   fw_max_workloads),
				 errhint("Raise fw_tier.max_workloads and restart the server.")));
		return;
	}
	w = &fw_shared->workloads[slot];

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	if ((TimestampTz) pg_atomic_read_u64(&w->priority_until) < until)
	{
		w->window_started = started;
		w->windows_in_row = Max(windows_in_row, 1);
		w->manual = manual;
		w->escalations++;
		w->alerted = (w->windows_in_row >= fw_alert_windows);
		/* the alert of this run was sent before the restart */
		w->alert_notified = w->alerted;
		w->mirrored_started = started;
		w->mirrored_until = until;
		w->mirrored_closed = false;
		fw_set_until_locked(w, until, until - started);
	}
	LWLockRelease(fw_shared->wl_lock);
}

/*
 * Worker: the windows whose state differs from what the worker last wrote
 * to fw_tier.escalations, or whose alert is due.  out has room for
 * fw_max_workloads entries.  *next_expiry gets the earliest end of an open
 * window (0 = none), the worker's next deadline.
 */
int
fw_windows_to_sync(FwWindowSync *out, TimestampTz now, TimestampTz *next_expiry)
{
	int			n = 0;

	*next_expiry = 0;
	if (fw_shared == NULL)
		return 0;

	LWLockAcquire(fw_shared->wl_lock, LW_SHARED);
	for (int i = 0; i < fw_shared->num_workloads; i++)
	{
		FwWorkload *w = &fw_shared->workloads[i];
		TimestampTz until = (TimestampTz) pg_atomic_read_u64(&w->priority_until);
		bool		closed;
		bool		alert;

		if (!w->in_use || w->window_started == 0 || until == 0)
			continue;
		closed = (until <= now);
		alert = w->alerted && !w->alert_notified;
		if (!closed && (*next_expiry == 0 || until < *next_expiry))
			*next_expiry = until;

		if (w->mirrored_started == w->window_started &&
			w->mirrored_until == until &&
			w->mirrored_closed == closed && !alert)
			continue;

		out[n].slot = i;
		memcpy(out[n].name, w->name, FW_NAMELEN);
		out[n].started = w->window_started;
		out[n].until = until;
		out[n].closed = closed;
		out[n].manual = w->manual;
		out[n].windows_in_row = w->windows_in_row;
		out[n].alert = alert;
		n++;
	}
	LWLockRelease(fw_shared->wl_lock);

	return n;
}

/* Worker: record, after COMMIT, what fw_tier.escalations now holds. */
void
fw_windows_synced(const FwWindowSync *ws)
{
	FwWorkload *w = &fw_shared->workloads[ws->slot];

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	w->mirrored_started = ws->started;
	w->mirrored_until = ws->until;
	w->mirrored_closed = ws->closed;
	if (ws->alert && w->window_started == ws->started)
		w->alert_notified = true;
	LWLockRelease(fw_shared->wl_lock);
}
