/*-------------------------------------------------------------------------
 *
 * shmem.c
 *		The shared state of fw_tier: its size, the request and startup
 *		hooks, and the "fw_tier" LWLock tranche.
 *
 * Locking protocol
 * ----------------
 * The tranche "fw_tier" holds two LWLocks, never held together and never
 * held across palloc, ereport, SPI, a latch wait or any other I/O:
 *
 * wl_lock (workload slots, escalation.c):
 *	- shared to look a (database, name) key up and to copy slots out
 *	  (snapshots, the worker's mirror list); exclusive to assign or reuse a
 *	  slot or to change a window (open, extend, de-escalate, restore, worker
 *	  bookkeeping).  num_workloads is the high-water mark of slots ever
 *	  assigned; slots are reused, never emptied (escalation.c, "Slots").
 *	- priority_until and window_us are pg_atomic_uint64: written only while
 *	  holding wl_lock exclusively, read WITHOUT any lock by fw_route() so the
 *	  per-request hot path never contends.  The attempt counters are
 *	  atomics too, incremented without a lock.
 *	- generation is written only under wl_lock exclusively, when a slot is
 *	  (re)assigned, and read without a lock to check a backend's cached
 *	  handle; last_used is written by any backend without a lock (a
 *	  timestamp, last writer wins) and read by the reuse decision.
 *
 * ring_lock (the call-log ring, calllog.c):
 *	- exclusive, briefly, for a writer to reserve space: it moves head and
 *	  writes the 8-byte record header (length, RESERVED) before releasing, so
 *	  a reader never sees a stale header between tail and head.  The payload
 *	  is copied after the release; state = READY is published behind a
 *	  write barrier.
 *	- the worker reads head under the lock (shared), copies READY records
 *	  out without it (nobody overwrites [tail, head)), inserts and commits,
 *	  then takes it exclusively to move tail.
 *	- waiting for space or for a flush uses the condition variables below,
 *	  always after the lock is released.
 *
 * next_call_id and the ring counters are atomics.  worker_latch (the
 * launcher's) and flusher_latch are written by their owner only and read
 * without a lock; a stale pointer costs a spurious wakeup of some other
 * process at worst.  worker_pid, launcher_pid and worker_flags are atomics
 * written by the launcher and the flusher (launcher.c, flusher.c).
 *
 * The ring's bytes and its head/tail live in a file mapped MAP_SHARED
 * (calllog.c), not in the main shared memory segment, so that they survive
 * the crash-restart that follows a SIGKILLed worker or backend.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "budget.h"
#include "fw_tier.h"
#include "spend.h"

#define FW_NUM_LWLOCKS	2

FwSharedState *fw_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static Size
fw_shmem_size(void)
{
	Size		size;

	size = offsetof(FwSharedState, workloads);
	size = add_size(size, mul_size(fw_max_workloads, sizeof(FwWorkload)));
	size = add_size(size, fw_calllog_shmem_size());
	size = add_size(size, fw_budget_shmem_size());
	size = add_size(size, fw_progress_shmem_size());
	size = add_size(size, fw_spend_shmem_size());
	return size;
}

static void
fw_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();

	RequestAddinShmemSpace(fw_shmem_size());
	RequestNamedLWLockTranche("fw_tier", FW_NUM_LWLOCKS);
}

static void
fw_shmem_startup(void)
{
	bool		found;
	Size		size;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	size = offsetof(FwSharedState, workloads) +
		mul_size(fw_max_workloads, sizeof(FwWorkload));

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);

	fw_shared = ShmemInitStruct("fw_tier", size, &found);
	if (!found)
	{
		LWLockPadded *locks = GetNamedLWLockTranche("fw_tier");

		memset(fw_shared, 0, size);
		fw_shared->wl_lock = &locks[0].lock;
		fw_shared->ring_lock = &locks[1].lock;

		/*
		 * Call ids start at the current time in microseconds, so ids stay
		 * unique across restarts (fw_tier.calls has them in its key).
		 */
		pg_atomic_init_u64(&fw_shared->next_call_id,
						   (uint64) GetCurrentTimestamp());
		pg_atomic_init_u32(&fw_shared->flush_requested, 0);
		pg_atomic_init_u32(&fw_shared->worker_pid, 0);
		fw_shared->worker_latch = NULL;
		fw_shared->flusher_latch = NULL;
		pg_atomic_init_u32(&fw_shared->launcher_pid, 0);
		pg_atomic_init_u32(&fw_shared->worker_flags, 0);
		ConditionVariableInit(&fw_shared->ring_space_cv);
		ConditionVariableInit(&fw_shared->ring_flushed_cv);
		pg_atomic_init_u64(&fw_shared->ring_waits, 0);
		pg_atomic_init_u64(&fw_shared->records_pushed, 0);
		pg_atomic_init_u64(&fw_shared->records_flushed, 0);
		pg_atomic_init_u64(&fw_shared->records_skipped, 0);
		fw_shared->num_workloads = 0;
		for (int i = 0; i < fw_max_workloads; i++)
		{
			FwWorkload *w = &fw_shared->workloads[i];

			w->dboid = InvalidOid;
			pg_atomic_init_u64(&w->priority_until, 0);
			pg_atomic_init_u64(&w->window_us, 0);
			pg_atomic_init_u32(&w->generation, 0);
			pg_atomic_init_u64(&w->last_used, 0);
			for (int p = 0; p < FW_NUM_PATHS; p++)
				for (int o = 0; o < FW_NUM_OUTCOMES; o++)
					pg_atomic_init_u64(&w->attempts[p][o], 0);
		}
	}

	fw_budget_shmem_init();
	fw_progress_shmem_init();
	fw_spend_shmem_init();

	LWLockRelease(AddinShmemInitLock);

	/* issue 11: the node name; a copied call log is removed before mapping */
	fw_origin_startup();
	/* the ring file: mapped (and, in the postmaster, validated) here */
	fw_calllog_startup();
}

void
fw_shmem_install_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = fw_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = fw_shmem_startup;
}

/*
 * Wake the background worker (call log to drain, window to mirror).
 */
void
fw_wake_worker(void)
{
	Latch	   *latch;

	if (fw_shared == NULL)
		return;
	latch = fw_shared->worker_latch;
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * Call ids group the attempts of one SQL call.
 */
int64
fw_next_call_id(void)
{
	return (int64) pg_atomic_fetch_add_u64(&fw_shared->next_call_id, 1);
}
