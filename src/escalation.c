/*-------------------------------------------------------------------------
 *
 * escalation.c
 *		The per-workload Priority window: a small state machine in shared
 *		memory.
 *
 * State is per (database, workload): see "Slots" below.
 *
 * A workload starts on its configured path.  When an attempt on Standard is
 * shed with 503 Service Overloaded and the workload's policy is "priority",
 * the workload is escalated: priority_until = now + window, and every new
 * request of the workload goes to Priority until then.  Overloaded again
 * while on Priority extends the window.  Exactly one escalation is counted
 * per window however many backends see the 503 at once: the window is
 * opened under wl_lock held exclusively, after re-checking it is not open.
 *
 * Under the workload's window_policy "probe" (issue 16), a window can also
 * end early: see "Probes" below.
 *
 * Contracts: functions ending in _locked expect the caller to hold
 * fw_shared->wl_lock exclusively (fw_find_slot_locked: in any mode).
 * fw_route() and fw_count_attempt() take no lock at all (see shmem.c for
 * the protocol), except to resolve again a handle whose slot was reused,
 * which is rare.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/pg_prng.h"
#include "miscadmin.h"
#include "utils/hsearch.h"
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

/*
 * Slots
 * -----
 * A slot holds the state of one workload of one database, keyed by
 * (database oid, workload name): a window opened in one database never
 * routes another database's workload of the same name.  A slot is only
 * assigned to a workload whose row was found (fw_workload_get, fw_escalate
 * check the row first), so names that are not workloads never take one.
 *
 * Slots are reused.  When every slot is taken, the least recently used one
 * whose window is closed and already recorded by the worker (and which was
 * not looked up or routed for FW_SLOT_REUSE_IDLE_US) is given to the new
 * workload under wl_lock held exclusively; its counters restart at zero.
 * An open window is never taken away.
 *
 * Backends keep slot handles (index + generation) across calls.  Each
 * reassignment bumps the slot's generation, so a handle of the previous
 * owner no longer matches: it is resolved again by name (below), never
 * applied to the new owner.  A handle is 64 bits and carries the whole
 * 32-bit generation: a shorter one would match again after its wrap (a
 * few ten thousand reuses of a busy slot).
 */
#define FW_SLOT_INDEX_BITS	16
#define FW_SLOT_INDEX_MASK	((1 << FW_SLOT_INDEX_BITS) - 1)
#define FW_SLOT_REUSE_IDLE_US	(2 * USECS_PER_SEC)
/* last_used is written at most this often by one backend */
#define FW_SLOT_TOUCH_US	(100 * 1000)

StaticAssertDecl(10000 <= FW_SLOT_INDEX_MASK, "slot index must fit in a handle");

static inline int64
fw_slot_handle(int index, uint32 gen)
{
	return (int64) (((uint64) gen << FW_SLOT_INDEX_BITS) | (uint32) index);
}

static inline int
fw_slot_index(int64 handle)
{
	return (int) (handle & FW_SLOT_INDEX_MASK);
}

/*
 * Backend-local: the workload name each handle was issued for, so a stale
 * handle (its slot was reused) can be resolved again by name.
 */
typedef struct FwHandleName
{
	int64		handle;			/* hash key */
	char		name[FW_NAMELEN];
} FwHandleName;

static HTAB *fw_handle_names = NULL;

static void
fw_remember_handle(int64 handle, const char *name)
{
	FwHandleName *e;
	bool		found;

	if (fw_handle_names == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(int64);
		ctl.entrysize = sizeof(FwHandleName);
		fw_handle_names = hash_create("fw_tier slot handles", 16, &ctl,
									  HASH_ELEM | HASH_BLOBS);
	}
	e = hash_search(fw_handle_names, &handle, HASH_ENTER, &found);
	strlcpy(e->name, name, FW_NAMELEN);
}

/* caller holds wl_lock (any mode) */
static int64
fw_find_slot_locked(Oid dboid, const char *name)
{
	for (int i = 0; i < fw_shared->num_workloads; i++)
	{
		FwWorkload *w = &fw_shared->workloads[i];

		if (w->in_use && w->dboid == dboid && strcmp(w->name, name) == 0)
			return fw_slot_handle(i, pg_atomic_read_u32(&w->generation));
	}
	return -1;
}

/*
 * A slot for a new assignment: a never used one, else the least recently
 * used idle one whose window is closed and recorded.  -1 when none.
 * Caller holds wl_lock exclusively.
 */
static int
fw_free_slot_locked(TimestampTz now)
{
	int			best = -1;
	TimestampTz best_used = 0;

	if (fw_shared->num_workloads < fw_max_workloads)
		return fw_shared->num_workloads++;

	for (int i = 0; i < fw_shared->num_workloads; i++)
	{
		FwWorkload *w = &fw_shared->workloads[i];
		TimestampTz until = (TimestampTz) pg_atomic_read_u64(&w->priority_until);
		TimestampTz used = (TimestampTz) pg_atomic_read_u64(&w->last_used);

		if (!w->in_use)
			return i;
		if (until > now || now - used < FW_SLOT_REUSE_IDLE_US)
			continue;
		/* a window the worker has not written (or closed) yet stays */
		if (w->window_started != 0 &&
			(w->mirrored_started != w->window_started || !w->mirrored_closed ||
			 (w->alerted && !w->alert_notified)))
			continue;
		if (best < 0 || used < best_used)
		{
			best = i;
			best_used = used;
		}
	}
	return best;
}

/*
 * Find the slot of (dboid, name), assigning one when create is true and
 * there is room.  Returns a handle, or -1 when not found (or no slot is
 * free: *full).  Never raises.
 */
static int64
fw_lookup_slot(Oid dboid, const char *name, bool create, bool *full)
{
	int64		handle;
	int			i;
	TimestampTz now;

	*full = false;

	LWLockAcquire(fw_shared->wl_lock, LW_SHARED);
	handle = fw_find_slot_locked(dboid, name);
	LWLockRelease(fw_shared->wl_lock);
	if (handle >= 0 || !create)
		return handle;

	now = GetCurrentTimestamp();
	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	handle = fw_find_slot_locked(dboid, name);
	if (handle < 0 && (i = fw_free_slot_locked(now)) >= 0)
	{
		FwWorkload *w = &fw_shared->workloads[i];
		uint32		gen = pg_atomic_read_u32(&w->generation) + 1;

		/* the new generation first: old handles stop matching at once */
		pg_atomic_write_u32(&w->generation, gen);
		pg_memory_barrier();
		w->dboid = dboid;
		strlcpy(w->name, name, FW_NAMELEN);
		pg_atomic_write_u64(&w->priority_until, 0);
		pg_atomic_write_u64(&w->window_us, 0);
		pg_atomic_write_u64(&w->last_used, (uint64) now);
		for (int p = 0; p < FW_NUM_PATHS; p++)
			for (int o = 0; o < FW_NUM_OUTCOMES; o++)
				pg_atomic_write_u64(&w->attempts[p][o], 0);
		w->window_started = 0;
		w->last_overloaded = 0;
		w->escalations = 0;
		w->priority_overloaded = 0;
		w->windows_in_row = 0;
		w->run_window_us = 0;
		w->manual = false;
		w->alerted = false;
		w->alert_notified = false;
		w->mirrored_started = 0;
		w->mirrored_until = 0;
		w->mirrored_closed = false;
		pg_atomic_write_u64(&w->probe_next, 0);
		pg_atomic_write_u64(&w->probe_interval_us, 0);
		w->probe_streak = 0;
		w->end_reason = FW_END_NONE;
		w->window_probes = 0;
		w->window_probes_shed = 0;
		w->probes = 0;
		w->probes_shed = 0;
		w->closed_by_probes = 0;
		w->priority_us_done = 0;
		w->prev_pending = false;
		w->in_use = true;
		handle = fw_slot_handle(i, gen);
	}
	else if (handle < 0)
		*full = true;
	LWLockRelease(fw_shared->wl_lock);
	return handle;
}

/*
 * The slot a handle stands for, or NULL.  Marks it used (now > 0).  A
 * stale handle is resolved again by the name it was issued for (a slot is
 * assigned when needed); *handle then gets the current one.  Never raises
 * but for out of memory: the hot path calls it.
 */
static FwWorkload *
fw_resolve(int64 *handle, TimestampTz now)
{
	int			index;
	FwWorkload *w;
	FwHandleName *e;
	bool		full;

	if (fw_shared == NULL || *handle < 0)
		return NULL;
	index = fw_slot_index(*handle);
	if (index >= fw_max_workloads)
		return NULL;
	w = &fw_shared->workloads[index];
	if (now > 0 &&
		now - (TimestampTz) pg_atomic_read_u64(&w->last_used) > FW_SLOT_TOUCH_US)
	{
		pg_atomic_write_u64(&w->last_used, (uint64) now);
		/* the touch is visible before we trust the generation */
		pg_memory_barrier();
	}
	if (fw_slot_handle(index, pg_atomic_read_u32(&w->generation)) == *handle)
		return w;

	/* reused for another workload since the handle was issued */
	if (fw_handle_names == NULL ||
		(e = hash_search(fw_handle_names, handle, HASH_FIND, NULL)) == NULL)
		return NULL;
	*handle = fw_lookup_slot(MyDatabaseId, e->name, true, &full);
	if (*handle < 0)
		return NULL;
	fw_remember_handle(*handle, e->name);
	return &fw_shared->workloads[fw_slot_index(*handle)];
}

/*
 * The slot of a workload of this database, assigned on first use.  The
 * caller has found the workload's row.  Backends cache the handle (see
 * fw_workload_slot_valid).
 */
int64
fw_workload_slot(const char *name)
{
	int64		slot;
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

	slot = fw_lookup_slot(MyDatabaseId, name, true, &full);
	if (slot < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many fw_tier workloads"),
				 errdetail("All %d workload slots in shared memory hold an open or recent priority window, or were used in the last %d seconds.",
						   fw_max_workloads, (int) (FW_SLOT_REUSE_IDLE_US / USECS_PER_SEC)),
				 errhint("Raise fw_tier.max_workloads (it counts the workloads of every database) and restart the server.")));
	fw_remember_handle(slot, name);
	return slot;
}

/*
 * Is a cached handle still its workload's?  Marks the slot used.
 */
bool
fw_workload_slot_valid(int64 slot)
{
	FwWorkload *w;
	int			index;
	TimestampTz now;

	if (fw_shared == NULL || slot < 0)
		return false;
	index = fw_slot_index(slot);
	if (index >= fw_max_workloads)
		return false;
	w = &fw_shared->workloads[index];
	now = GetCurrentTimestamp();
	if (now - (TimestampTz) pg_atomic_read_u64(&w->last_used) > FW_SLOT_TOUCH_US)
	{
		pg_atomic_write_u64(&w->last_used, (uint64) now);
		/* the touch is visible before we trust the generation */
		pg_memory_barrier();
	}
	return fw_slot_handle(index, pg_atomic_read_u32(&w->generation)) == slot;
}

/*
 * Probes
 * ------
 * Under window_policy "probe" a window need not last its whole length:
 * while it is open, one new attempt per probe interval (of every backend
 * together), and a share fw_tier.probe_share of the others, is sent on
 * Standard instead of Priority.  The interval is
 * claimed without a lock (fw_claim_probe: one compare-and-swap of
 * probe_next), so the hot path stays two atomic reads outside a probe.
 * Each probe's outcome is recorded under wl_lock (fw_probe_result; with
 * probe_share > 0 many are in flight at once and complete in any order):
 * a success extends the streak, and
 * fw_tier.probe_successes successes in a row close the window for every
 * backend at once, as fw_deescalate does (window_us = 0: no per-backend
 * jitter); a probe shed with 503 Overloaded resets the streak and doubles
 * the interval (at most FW_PROBE_BACKOFF_MAX times fw_tier.probe_interval)
 * and halves the share, and its call is retried at once on Priority.  Probes never extend a
 * window: it still ends at its configured length at the latest.  A manual
 * window (fw_escalate) never probes: the operator chose its length; an
 * open window fw_escalate extends becomes manual at once, so a probe in
 * flight then no longer counts, and stays manual after a restart (its
 * row's trigger becomes 'manual').  Which
 * calls may probe is the caller's business (engine.c): workloads whose
 * window_policy is "probe", live mode only.
 */
#define FW_PROBE_BACKOFF_MAX	16

static int64
fw_probe_base_us(void)
{
	return (int64) Max(fw_probe_interval_ms, 1) * 1000;
}

/* A window opens (or is restored): fresh probe state.  wl_lock exclusive. */
static void
fw_probe_reset_locked(FwWorkload *w, TimestampTz now, bool manual)
{
	w->probe_streak = 0;
	w->end_reason = FW_END_NONE;
	w->window_probes = 0;
	w->window_probes_shed = 0;
	pg_atomic_write_u64(&w->probe_interval_us, (uint64) fw_probe_base_us());
	pg_atomic_write_u64(&w->probe_next,
						manual ? PG_UINT64_MAX : (uint64) (now + fw_probe_base_us()));
}

/*
 * Open a new window at now.  Caller holds wl_lock exclusively.
 *
 * windows_in_row counts windows that follow each other: a window opened
 * less than one window length after the previous one ended continues the
 * run.  A window closed by probes adds to the count only if this one
 * opens within fw_tier.probe_interval of its end.  The alert flag is
 * raised once per run.  end_reason is still the previous window's until
 * fw_probe_reset_locked() below.
 */
static void
fw_open_window_locked(FwWorkload *w, TimestampTz now, int64 window_us,
					  bool manual)
{
	TimestampTz prev_end = (TimestampTz) pg_atomic_read_u64(&w->priority_until);

	/*
	 * A window the probes closed early, and that stays closed for at
	 * least one probe interval, does not count as one more in a row (the
	 * run goes on, its count stays): Standard came back, so a run of such
	 * windows is a spike that flaps.  Reopened sooner, the probes' streak
	 * was luck (with probe_share, successes arrive milliseconds apart
	 * while Standard still sheds a share steadily): that is the capacity
	 * problem the alert is for, so it counts.
	 */
	if (prev_end != 0 && now - prev_end < window_us)
	{
		if (w->end_reason != FW_END_PROBES ||
			now - prev_end < fw_probe_base_us())
			w->windows_in_row++;
	}
	else
	{
		w->windows_in_row = 1;
		w->alerted = false;
		w->alert_notified = false;
	}
	if (w->windows_in_row >= fw_alert_windows)
		w->alerted = true;

	/* the previous window's time, for fw_tier.status.priority_seconds */
	if (w->window_started != 0 && prev_end > w->window_started)
		w->priority_us_done += prev_end - w->window_started;

	/*
	 * The previous window not yet written as ended (it reopens before the
	 * flusher woke): keep its end, reason and probes until it is, so its
	 * row gets them (fw_windows_to_sync).  Only the last such window is
	 * kept.
	 */
	if (w->window_started != 0 &&
		!(w->mirrored_started == w->window_started &&
		  w->mirrored_closed && w->mirrored_until == prev_end))
	{
		w->prev_pending = true;
		w->prev_started = w->window_started;
		w->prev_until = Min(prev_end, now);
		w->prev_end_reason = w->end_reason;
		w->prev_probes = w->window_probes;
		w->prev_probes_shed = w->window_probes_shed;
	}

	w->escalations++;
	w->window_started = now;
	w->manual = manual;
	fw_probe_reset_locked(w, now, manual);

	w->run_window_us = window_us;
	pg_atomic_write_u64(&w->window_us, (uint64) window_us);
	/* exchange: full barrier, window_us is visible before the new end */
	pg_atomic_exchange_u64(&w->priority_until, (uint64) (now + window_us));
}

/* Move the end of the open window.  Caller holds wl_lock exclusively. */
static void
fw_set_until_locked(FwWorkload *w, TimestampTz until, int64 window_us)
{
	if (window_us > 0)
		w->run_window_us = window_us;
	pg_atomic_write_u64(&w->window_us, (uint64) window_us);
	pg_atomic_exchange_u64(&w->priority_until, (uint64) until);
}

/*
 * Is w's alerted run over?  A window opened less than one window length
 * after the previous one ended continues the run (fw_open_window_locked),
 * so the run, and its alert, is over once the workload has been back on
 * its own path for one full window length.  Caller holds wl_lock.
 */
static bool
fw_alert_over(const FwWorkload *w, TimestampTz until, TimestampTz now)
{
	int64		len = w->run_window_us > 0 ? w->run_window_us :
		(int64) fw_priority_window_s * USECS_PER_SEC;

	return until != 0 && until <= now && now - until >= len;
}

/*
 * The path a new attempt takes.  HOT PATH: no lock, two atomic reads.
 */
FwPath
fw_route(int64 *slot, FwPath configured, TimestampTz now)
{
	FwWorkload *w;
	uint64		until;
	FwJitter   *j;

	if (configured != FW_PATH_STANDARD)
		return configured;
	w = fw_resolve(slot, now);
	if (w == NULL)
		return configured;

	until = pg_atomic_read_u64(&w->priority_until);
	if (until == 0)
		return FW_PATH_STANDARD;
	if (now < (TimestampTz) until)
		return FW_PATH_PRIORITY;

	/* the window is over: our own small extension, drawn once per window */
	if (fw_jitter == NULL)
		fw_jitter = MemoryContextAllocZero(TopMemoryContext,
										   sizeof(FwJitter) * fw_max_workloads);
	j = &fw_jitter[fw_slot_index(*slot)];
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
fw_on_overloaded(int64 *slot, FwPath path_used, FwOnOverload policy,
				 int window_s, TimestampTz now)
{
	FwWorkload *w;
	int64		window_us;
	bool		retry = false;
	bool		wake = false;

	w = fw_resolve(slot, now);
	if (w == NULL)
		return false;
	window_us = (int64) (window_s > 0 ? window_s : fw_priority_window_s) * USECS_PER_SEC;

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	/* as fw_escalate_now: the slot cannot be reused while we hold the lock */
	if (fw_slot_handle(fw_slot_index(*slot),
					   pg_atomic_read_u32(&w->generation)) != *slot)
	{
		/* reused in between: no window for another workload; back off */
		LWLockRelease(fw_shared->wl_lock);
		return false;
	}
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
fw_count_attempt(int64 *slot, FwPath path, FwOutcome outcome)
{
	FwWorkload *w;

	if (path < 0 || path >= FW_NUM_PATHS ||
		outcome < 0 || outcome >= FW_NUM_OUTCOMES)
		return;
	w = fw_resolve(slot, 0);
	if (w != NULL)
		pg_atomic_fetch_add_u64(&w->attempts[path][outcome], 1);
}

/*
 * May the attempt starting now be a probe?  Only while the window is open
 * (its jitter tail does not probe): the first attempt once the interval
 * is due (for every backend together), and besides, each attempt with
 * probability fw_tier.probe_share, scaled down as the interval backs off.
 * HOT PATH: atomic reads, one compare-and-swap when due, one PRNG draw
 * when probe_share is set.
 */
bool
fw_claim_probe(int64 *slot, TimestampTz now)
{
	FwWorkload *w;
	uint64		next;
	uint64		interval;

	w = fw_resolve(slot, now);
	if (w == NULL)
		return false;
	if ((TimestampTz) pg_atomic_read_u64(&w->priority_until) <= now)
		return false;
	pg_read_barrier();
	next = pg_atomic_read_u64(&w->probe_next);
	if (next == PG_UINT64_MAX)
		return false;			/* a manual window */
	interval = pg_atomic_read_u64(&w->probe_interval_us);
	if (interval == 0)
		interval = (uint64) fw_probe_base_us();
	/* the interval's probe: the winner of the swap probes */
	if (now >= (TimestampTz) next &&
		pg_atomic_compare_exchange_u64(&w->probe_next, &next,
									   (uint64) now + interval))
		return true;
	/* the share's, backed off as the interval is: halved per doubling */
	if (fw_probe_share > 0 &&
		pg_prng_double(&pg_global_prng_state) <
		fw_probe_share * (double) fw_probe_base_us() / (double) interval)
		return true;
	return false;
}

/*
 * A probe sent at sent_at finished with outcome (see "Probes").  A probe
 * of an earlier window, or one finishing after its window ended, is
 * counted but moves no streak.  429, 503 Unavailable, timeouts and the
 * like say nothing about congestion: they neither extend nor reset it.
 */
void
fw_probe_result(int64 *slot, FwOutcome outcome, TimestampTz sent_at,
				TimestampTz now)
{
	FwWorkload *w;
	bool		closed = false;
	bool		current;

	w = fw_resolve(slot, now);
	if (w == NULL)
		return;

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	if (fw_slot_handle(fw_slot_index(*slot),
					   pg_atomic_read_u32(&w->generation)) != *slot)
	{
		LWLockRelease(fw_shared->wl_lock);
		return;
	}
	/* an operator's window is not the probes' to end */
	current = (sent_at >= w->window_started && !w->manual &&
			   pg_atomic_read_u64(&w->probe_next) != PG_UINT64_MAX &&
			   (TimestampTz) pg_atomic_read_u64(&w->priority_until) > now);
	w->probes++;
	if (sent_at >= w->window_started)
		w->window_probes++;
	if (outcome == FW_OVERLOADED)
	{
		w->probes_shed++;
		if (sent_at >= w->window_started)
			w->window_probes_shed++;
		if (current)
		{
			uint64		interval = pg_atomic_read_u64(&w->probe_interval_us);
			uint64		cap = (uint64) (fw_probe_base_us() * FW_PROBE_BACKOFF_MAX);

			w->probe_streak = 0;
			interval = Min(Max(interval, 1) * 2, cap);
			pg_atomic_write_u64(&w->probe_interval_us, interval);
			if (pg_atomic_read_u64(&w->probe_next) != PG_UINT64_MAX)
				pg_atomic_write_u64(&w->probe_next, (uint64) now + interval);
		}
	}
	else if (outcome == FW_OK && current)
	{
		pg_atomic_write_u64(&w->probe_interval_us, (uint64) fw_probe_base_us());
		if (++w->probe_streak >= fw_probe_successes)
		{
			/* Standard is back: every backend leaves Priority now */
			fw_set_until_locked(w, now, 0);
			w->end_reason = FW_END_PROBES;
			w->closed_by_probes++;
			w->probe_streak = 0;
			closed = true;
		}
	}
	LWLockRelease(fw_shared->wl_lock);

	if (closed)
		fw_wake_worker();
}

/*
 * Operator: put the workload of this database on Priority for window_ms
 * from now.  An open window gets the new end (no new escalation is
 * counted); otherwise a manual window opens.  The caller has checked the
 * workload exists.  Returns the window's end.
 */
TimestampTz
fw_escalate_now(const char *workload, int64 window_ms)
{
	int64		slot;
	FwWorkload *w;
	TimestampTz now = GetCurrentTimestamp();
	int64		window_us = window_ms * 1000;
	TimestampTz until;

	if (window_us <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("escalation window must be positive")));

	slot = fw_workload_slot(workload);
	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	/* the slot cannot be reused while we hold the lock */
	w = &fw_shared->workloads[fw_slot_index(slot)];
	if (fw_slot_handle(fw_slot_index(slot),
					   pg_atomic_read_u32(&w->generation)) != slot)
	{
		LWLockRelease(fw_shared->wl_lock);
		/* reused between lookup and lock: idle for seconds, never open */
		elog(ERROR, "fw_tier workload slot of \"%s\" was reused", workload);
	}
	if ((TimestampTz) pg_atomic_read_u64(&w->priority_until) > now)
	{
		fw_set_until_locked(w, now + window_us, window_us);
		/*
		 * The operator now owns its length: no probe ends it early, not
		 * one in flight (fw_probe_result tests manual under wl_lock) nor
		 * after a restart (the row's trigger becomes 'manual').
		 */
		w->manual = true;
		w->probe_streak = 0;
		pg_atomic_write_u64(&w->probe_next, PG_UINT64_MAX);
	}
	else
		fw_open_window_locked(w, now, window_us, true);
	until = (TimestampTz) pg_atomic_read_u64(&w->priority_until);
	LWLockRelease(fw_shared->wl_lock);

	fw_wake_worker();
	return until;
}

/*
 * Operator: end the open window now, without the per-backend jitter
 * (window_us = 0 makes every backend draw a zero extension).
 */
void
fw_deescalate_now(const char *workload)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		ended = false;

	fw_check_shared();
	if (strlen(workload) >= FW_NAMELEN)
		return;					/* never had a slot */

	/* no slot is assigned: a workload without one has no window */
	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	{
		int64		slot = fw_find_slot_locked(MyDatabaseId, workload);
		FwWorkload *w;

		if (slot >= 0)
		{
			w = &fw_shared->workloads[fw_slot_index(slot)];
			if ((TimestampTz) pg_atomic_read_u64(&w->priority_until) > now)
			{
				fw_set_until_locked(w, now, 0);
				w->end_reason = FW_END_DEESCALATED;
				ended = true;
			}
		}
	}
	LWLockRelease(fw_shared->wl_lock);

	if (ended)
		fw_wake_worker();
}

/*
 * Copies of the tracked workloads of this database, palloc'd in the
 * current context.  The array is allocated before the lock is taken.
 */
int
fw_workload_snapshots(FwWorkloadSnapshot **out)
{
	FwWorkloadSnapshot *snaps;
	int			n = 0;
	TimestampTz now = GetCurrentTimestamp();

	fw_check_shared();
	snaps = palloc0(sizeof(FwWorkloadSnapshot) * fw_max_workloads);

	LWLockAcquire(fw_shared->wl_lock, LW_SHARED);
	for (int i = 0; i < fw_shared->num_workloads; i++)
	{
		FwWorkload *w = &fw_shared->workloads[i];
		FwWorkloadSnapshot *s;

		if (!w->in_use || w->dboid != MyDatabaseId)
			continue;
		s = &snaps[n++];

		memcpy(s->name, w->name, FW_NAMELEN);
		s->priority_until = (TimestampTz) pg_atomic_read_u64(&w->priority_until);
		s->window_started = w->window_started;
		s->last_overloaded = w->last_overloaded;
		s->escalations = w->escalations;
		s->windows_in_row = w->windows_in_row;
		s->alerted = w->alerted && !fw_alert_over(w, s->priority_until, now);
		for (int p = 0; p < FW_NUM_PATHS; p++)
			for (int o = 0; o < FW_NUM_OUTCOMES; o++)
				s->attempts[p][o] = (int64) pg_atomic_read_u64(&w->attempts[p][o]);
		s->probes = w->probes;
		s->probes_shed = w->probes_shed;
		s->closed_by_probes = w->closed_by_probes;
		s->priority_us = w->priority_us_done;
		if (w->window_started != 0)
			s->priority_us += Max(Min(now, s->priority_until) - w->window_started, 0);
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
fw_restore_window(Oid dboid, const char *workload, TimestampTz started,
				  TimestampTz until, int32 windows_in_row, bool manual)
{
	int64		slot;
	bool		full;
	FwWorkload *w;

	fw_check_shared();
	if (strlen(workload) >= FW_NAMELEN)
		return;
	slot = fw_lookup_slot(dboid, workload, true, &full);
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
	w = &fw_shared->workloads[fw_slot_index(slot)];

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	if (fw_slot_handle(fw_slot_index(slot),
					   pg_atomic_read_u32(&w->generation)) == slot &&
		(TimestampTz) pg_atomic_read_u64(&w->priority_until) < until)
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
		fw_probe_reset_locked(w, GetCurrentTimestamp(), manual);
		fw_set_until_locked(w, until, until - started);
	}
	LWLockRelease(fw_shared->wl_lock);
}

/* fw_tier.escalations.ended_by of a closed window */
static const char *
fw_end_name(int32 reason)
{
	return reason == FW_END_PROBES ? "probes" :
		reason == FW_END_DEESCALATED ? "deescalated" : "expired";
}

/*
 * Worker: the windows whose state differs from what the worker last wrote
 * to fw_tier.escalations, or whose alert is due, each after the window
 * before it if that one is not yet written as ended.  out has room for
 * 2 * fw_max_workloads entries.  *next_expiry gets the earliest end of an open
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
		/* the window before, not yet written as ended: first */
		if (w->prev_pending)
		{
			out[n].slot = fw_slot_handle(i, pg_atomic_read_u32(&w->generation));
			out[n].dboid = w->dboid;
			memcpy(out[n].name, w->name, FW_NAMELEN);
			out[n].started = w->prev_started;
			out[n].until = w->prev_until;
			out[n].closed = true;
			out[n].manual = false;	/* never turns a row to 'manual' */
			out[n].windows_in_row = w->windows_in_row;
			out[n].alert = false;
			out[n].ended_by = fw_end_name(w->prev_end_reason);
			out[n].probes = w->prev_probes;
			out[n].probes_shed = w->prev_probes_shed;
			out[n].previous = true;
			n++;
		}
		closed = (until <= now);
		alert = w->alerted && !w->alert_notified;
		if (!closed && (*next_expiry == 0 || until < *next_expiry))
			*next_expiry = until;

		if (w->mirrored_started == w->window_started &&
			w->mirrored_until == until &&
			w->mirrored_closed == closed && !alert)
			continue;

		out[n].slot = fw_slot_handle(i, pg_atomic_read_u32(&w->generation));
		out[n].dboid = w->dboid;
		memcpy(out[n].name, w->name, FW_NAMELEN);
		out[n].started = w->window_started;
		out[n].until = until;
		out[n].closed = closed;
		out[n].manual = w->manual;
		out[n].windows_in_row = w->windows_in_row;
		out[n].alert = alert;
		out[n].ended_by = !closed ? NULL : fw_end_name(w->end_reason);
		out[n].probes = w->window_probes;
		out[n].probes_shed = w->window_probes_shed;
		out[n].previous = false;
		n++;
	}
	LWLockRelease(fw_shared->wl_lock);

	return n;
}

/* Worker: record, after COMMIT, what fw_tier.escalations now holds. */
void
fw_windows_synced(const FwWindowSync *ws)
{
	int			index = fw_slot_index(ws->slot);
	FwWorkload *w = &fw_shared->workloads[index];

	LWLockAcquire(fw_shared->wl_lock, LW_EXCLUSIVE);
	/* reused since: that is another workload's state */
	if (fw_slot_handle(index, pg_atomic_read_u32(&w->generation)) != ws->slot)
	{
		LWLockRelease(fw_shared->wl_lock);
		return;
	}
	if (ws->previous)
	{
		if (w->prev_pending && w->prev_started == ws->started)
			w->prev_pending = false;
		LWLockRelease(fw_shared->wl_lock);
		return;
	}
	w->mirrored_started = ws->started;
	w->mirrored_until = ws->until;
	w->mirrored_closed = ws->closed;
	if (ws->alert && w->window_started == ws->started)
		w->alert_notified = true;
	LWLockRelease(fw_shared->wl_lock);
}

/*
 * Replay
 *
 * A replayed 503 is a test's story, not the fleet's: in replay mode the
 * window it opens lives in this backend only (per workload of this
 * backend's database), so a CI suite replaying on a shared cluster never
 * escalates production, writes no fw_tier.escalations row and moves no
 * shared counter.  fw_route's shared window still applies on top.
 */
typedef struct FwReplayWindow
{
	char		name[FW_NAMELEN];
	TimestampTz until;
} FwReplayWindow;

static FwReplayWindow *fw_replay_windows = NULL;
static int	fw_replay_nwindows = 0;
static int	fw_replay_cap = 0;

static FwReplayWindow *
fw_replay_find(const char *workload, bool create)
{
	for (int i = 0; i < fw_replay_nwindows; i++)
		if (strcmp(fw_replay_windows[i].name, workload) == 0)
			return &fw_replay_windows[i];
	if (!create || strlen(workload) >= FW_NAMELEN)
		return NULL;
	if (fw_replay_nwindows == fw_replay_cap)
	{
		int			cap = fw_replay_cap > 0 ? fw_replay_cap * 2 : 8;

		fw_replay_windows = fw_replay_windows ?
			repalloc(fw_replay_windows, sizeof(FwReplayWindow) * cap) :
			MemoryContextAlloc(TopMemoryContext, sizeof(FwReplayWindow) * cap);
		fw_replay_cap = cap;
	}
	strlcpy(fw_replay_windows[fw_replay_nwindows].name, workload, FW_NAMELEN);
	fw_replay_windows[fw_replay_nwindows].until = 0;
	return &fw_replay_windows[fw_replay_nwindows++];
}

/* path (what fw_route chose) moved to Priority by this backend's window */
FwPath
fw_replay_route(const char *workload, FwPath path, TimestampTz now)
{
	FwReplayWindow *r;

	if (path != FW_PATH_STANDARD)
		return path;
	r = fw_replay_find(workload, false);
	if (r != NULL && r->until > now)
		return FW_PATH_PRIORITY;
	return path;
}

/* fw_on_overloaded's rules, for this backend's window only */
bool
fw_replay_overloaded(const char *workload, FwPath path_used,
					 FwOnOverload policy, int window_s, TimestampTz now)
{
	int64		window_us = (int64) (window_s > 0 ? window_s : fw_priority_window_s) * USECS_PER_SEC;
	FwReplayWindow *r;

	if (policy != FW_ONOVERLOAD_PRIORITY)
		return false;
	if (path_used == FW_PATH_STANDARD)
	{
		r = fw_replay_find(workload, true);
		if (r == NULL)
			return false;
		if (r->until <= now)
			r->until = now + window_us;
		return true;
	}
	r = fw_replay_find(workload, false);
	if (path_used == FW_PATH_PRIORITY && r != NULL && r->until > now &&
		now + window_us > r->until)
		r->until = now + window_us;
	return false;
}

/* end of this backend's replay window of workload, 0 = none */
TimestampTz
fw_replay_window_until(const char *workload)
{
	FwReplayWindow *r = fw_replay_find(workload, false);

	return r ? r->until : 0;
}

/* fw_deescalate(): this backend's replay window ends too */
void
fw_replay_forget(const char *workload)
{
	FwReplayWindow *r = fw_replay_find(workload, false);
	TimestampTz now = GetCurrentTimestamp();

	if (r != NULL && r->until > now)
		r->until = now;
}
