/*-------------------------------------------------------------------------
 *
 * calllog.c
 *		The ring of call records: backends push, the worker drains into
 *		fw_tier.calls.
 *
 * Backends never INSERT into fw_tier.calls: a row must survive the
 * caller's ROLLBACK, errors and cancels.  They push a record into a ring
 * and the background worker writes batches in transactions of its own.
 *
 * The ring never loses a record:
 *	- a full ring makes the writer wait (interruptibly, on ring_space_cv)
 *	  instead of dropping; the wait is counted and wakes the worker;
 *	- the ring's bytes and its head/tail live in a file of the data directory
 *	  (pg_fw_tier/calllog.ring) mapped MAP_SHARED by the postmaster in the
 *	  shmem startup hook and inherited by every child.  A crash-restart
 *	  (SIGKILLed worker or backend) re-creates the shared memory segment but
 *	  not this mapping, so undrained records are still there afterwards;
 *	- the worker moves tail only after the COMMIT of the batch; a crash
 *	  between the two re-inserts the batch, which ON CONFLICT (call_id,
 *	  attempt) DO NOTHING absorbs.
 *
 * Records are variable length, 8-byte aligned, {len, state} first.  A
 * writer reserves space under ring_lock and writes the header (RESERVED)
 * before releasing it; it then copies the payload without the lock and
 * publishes with state = READY behind a write barrier.  The worker reads
 * READY records from the tail in order and stops at the first RESERVED
 * one.  A record that does not fit before the end of the ring leaves a SKIP
 * record there and starts at offset 0.  A RESERVED record found at startup
 * belongs to a writer that died in the crash: it becomes SKIP.
 *
 * The file is not fsync'ed: it survives process crashes, not an operating
 * system crash.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file_perm.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "storage/fd.h"
#include "storage/lwlock.h"
#include "utils/wait_event.h"

#include "fw_tier.h"

#define FW_RING_DIR			"pg_fw_tier"
#define FW_RING_FILE		"pg_fw_tier/calllog.ring"
#define FW_RING_MAGIC		0x46575247	/* "FWRG" */
#define FW_RING_VERSION		1
#define FW_RING_HDRSZ		4096	/* the data starts one page in */
#define FW_CONTENT_MAX		8192	/* prompt / answer kept, bytes */

#define FW_REC_RESERVED		0x52455356	/* space taken, payload coming */
#define FW_REC_READY		0x52454459	/* published */
#define FW_REC_SKIP			0x534b4950	/* end-of-ring padding, or garbage */

typedef struct FwRingFile
{
	uint32		magic;
	uint32		version;
	uint64		size;			/* bytes of data after the header page */
	uint32		rec_size;		/* sizeof(FwRingRec): layout check */
	uint32		unused;
	uint64		head;			/* next byte to reserve; ring_lock */
	uint64		tail;			/* first byte not yet in the table; ring_lock */
} FwRingFile;

typedef struct FwRingRec
{
	uint32		len;			/* whole record, 8-byte multiple */
	volatile uint32 state;
	int32		prompt_len;		/* -1 = NULL */
	int32		answer_len;		/* -1 = NULL */
	int32		encoding;		/* writer's database encoding */
	int32		unused;
	FwCallRecord rec;
	/* prompt bytes, then answer bytes, no terminators */
} FwRingRec;

#define FW_REC_ALIGN(x)		TYPEALIGN(8, (x))
#define FW_REC_MINLEN		8	/* len + state */

static FwRingFile *fw_ring = NULL;
static char *fw_ring_data = NULL;

Size
fw_calllog_shmem_size(void)
{
	/* everything lives in the mapped file */
	return 0;
}

static uint64
fw_ring_data_size(void)
{
	return (uint64) fw_log_buffer_kb * 1024;
}

static void
fw_ring_reset(const char *why)
{
	ereport(LOG,
			(errmsg("fw_tier: initializing call-log ring file \"%s\"", FW_RING_FILE),
			 errdetail_internal("%s", why)));
	memset(fw_ring, 0, sizeof(FwRingFile));
	fw_ring->magic = FW_RING_MAGIC;
	fw_ring->version = FW_RING_VERSION;
	fw_ring->size = fw_ring_data_size();
	fw_ring->rec_size = sizeof(FwRingRec);
	fw_ring->head = 0;
	fw_ring->tail = 0;
}

/*
 * Postmaster only, with no other process alive (first start or
 * crash-restart): check [tail, head) and turn records whose writer died
 * before publishing into SKIP records.
 */
static void
fw_ring_recover(void)
{
	uint64		size = fw_ring->size;
	uint64		pos = fw_ring->tail;
	uint64		head = fw_ring->head;
	int			ready = 0;
	int			skipped = 0;

	if (pos > head || head - pos > size || pos % 8 != 0 || head % 8 != 0)
	{
		fw_ring_reset("The head and tail positions were inconsistent; the ring starts empty.");
		return;
	}

	while (pos < head)
	{
		uint64		off = pos % size;
		FwRingRec  *r = (FwRingRec *) (fw_ring_data + off);
		uint32		len = r->len;

		if (len < FW_REC_MINLEN || len % 8 != 0 || off + len > size ||
			pos + len > head)
		{
			ereport(LOG,
					(errmsg("fw_tier: call-log ring file \"%s\" is damaged at position " UINT64_FORMAT,
							FW_RING_FILE, pos),
					 errdetail("%d records before it are kept; the rest is discarded.", ready)));
			fw_ring->head = pos;
			break;
		}
		if (r->state == FW_REC_RESERVED)
		{
			r->state = FW_REC_SKIP;
			skipped++;
		}
		else if (r->state == FW_REC_READY)
			ready++;
		else if (r->state != FW_REC_SKIP)
		{
			ereport(LOG,
					(errmsg("fw_tier: call-log ring file \"%s\" is damaged at position " UINT64_FORMAT,
							FW_RING_FILE, pos),
					 errdetail("%d records before it are kept; the rest is discarded.", ready)));
			fw_ring->head = pos;
			break;
		}
		pos += len;
	}

	if (ready > 0 || skipped > 0)
		ereport(LOG,
				(errmsg("fw_tier: call-log ring holds %d records not yet written to fw_tier.calls",
						ready),
				 skipped > 0 ?
				 errdetail("%d records whose writer died before completing them were skipped.",
						   skipped) : 0));
	if (fw_shared && skipped > 0)
		pg_atomic_fetch_add_u64(&fw_shared->records_skipped, skipped);
}

static void
fw_ring_map(bool validate)
{
	uint64		want = FW_RING_HDRSZ + fw_ring_data_size();
	struct stat st;
	int			fd;
	void	   *p;
	bool		fresh = false;

	if (validate)
	{
		if (MakePGDirectory(FW_RING_DIR) < 0 && errno != EEXIST)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not create directory \"%s\": %m", FW_RING_DIR)));
	}

	fd = BasicOpenFilePerm(FW_RING_FILE, O_RDWR | (validate ? O_CREAT : 0) | PG_BINARY,
						   pg_file_create_mode);
	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\": %m", FW_RING_FILE)));
	if (fstat(fd, &st) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat file \"%s\": %m", FW_RING_FILE)));

	if (validate && (uint64) st.st_size != want)
	{
		fresh = true;
		if (ftruncate(fd, 0) < 0 || ftruncate(fd, (off_t) want) < 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not resize file \"%s\": %m", FW_RING_FILE)));
#ifdef HAVE_POSIX_FALLOCATE
		/* allocate the blocks now: a full disk later would be a SIGBUS */
		{
			int			rc = posix_fallocate(fd, 0, (off_t) want);

			if (rc != 0 && rc != EINVAL && rc != EOPNOTSUPP)
			{
				errno = rc;
				ereport(ERROR,
						(errcode_for_file_access(),
						 errmsg("could not allocate file \"%s\": %m", FW_RING_FILE)));
			}
		}
#endif
	}
	else if ((uint64) st.st_size != want)
		elog(ERROR, "fw_tier call-log ring file \"%s\" has an unexpected size",
			 FW_RING_FILE);

	p = mmap(NULL, (size_t) want, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not map file \"%s\": %m", FW_RING_FILE)));
	close(fd);

	fw_ring = (FwRingFile *) p;
	fw_ring_data = (char *) p + FW_RING_HDRSZ;

	if (!validate)
		return;

	if (fresh)
		fw_ring_reset(st.st_size == 0 ?
					  "The file is new." :
					  "Its size did not match fw_tier.log_buffer; records it held are discarded.");
	else if (fw_ring->magic != FW_RING_MAGIC ||
			 fw_ring->version != FW_RING_VERSION ||
			 fw_ring->size != fw_ring_data_size() ||
			 fw_ring->rec_size != sizeof(FwRingRec))
		fw_ring_reset("Its header did not match this version of fw_tier or fw_tier.log_buffer; records it held are discarded.");
	else
		fw_ring_recover();
}

/*
 * Called from the shmem startup hook.  In the postmaster (first start and
 * every crash-restart) the file is mapped once, validated and recovered;
 * children inherit the mapping through fork().  With EXEC_BACKEND a child
 * maps the file the postmaster prepared.
 */
void
fw_calllog_startup(void)
{
	if (fw_ring != NULL)
	{
		/* crash-restart: the mapping survived in the postmaster */
		if (!IsUnderPostmaster)
			fw_ring_recover();
		return;
	}
	fw_ring_map(!IsUnderPostmaster);
}

/*
 * Push one record.  Waits (interruptibly) while the ring is full; a
 * cancel during that wait raises the usual error and the record is lost,
 * which is the only way a pushed record can be lost.
 */
void
fw_calllog_push(const FwCallRecord *rec, const char *prompt, const char *answer)
{
	uint64		size;
	int64		content_max;
	int			plen = -1;
	int			alen = -1;
	uint32		need;
	uint64		used = 0;
	bool		was_empty = false;
	bool		waited = false;
	FwRingRec  *r = NULL;
	char	   *p;

	if (fw_ring == NULL || fw_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("fw_tier call log is not initialized"),
				 errhint("Add fw_tier to shared_preload_libraries in postgresql.conf and restart the server.")));
	size = fw_ring->size;

	/* a record always fits in half the ring: clip the content to that */
	content_max = ((int64) size / 2 - (int64) sizeof(FwRingRec) - 8) / 2;
	content_max = Min(content_max, FW_CONTENT_MAX);
	content_max = Max(content_max, 0);
	if (fw_log_content)
	{
		if (prompt)
			plen = pg_mbcliplen(prompt, strlen(prompt), (int) content_max);
		if (answer)
			alen = pg_mbcliplen(answer, strlen(answer), (int) content_max);
	}
	need = FW_REC_ALIGN(sizeof(FwRingRec) + Max(plen, 0) + Max(alen, 0));

	/*
	 * Reserve; from here to READY nothing may raise an error.  The attempt
	 * this record describes has already been paid for, so a cancel must
	 * not drop it: cancel and statement_timeout are held off while waiting
	 * for space (the worker makes room within a flush), and are processed
	 * right after the record is published.  pg_terminate_backend still
	 * works.
	 */
	HOLD_CANCEL_INTERRUPTS();
	for (;;)
	{
		uint64		head;
		uint64		tail;
		uint64		off;
		uint64		pad;

		LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
		head = fw_ring->head;
		tail = fw_ring->tail;
		off = head % size;
		pad = (size - off < need) ? size - off : 0;
		if (head + pad + need - tail <= size)
		{
			was_empty = (head == tail);
			if (pad > 0)
			{
				FwRingRec  *padrec = (FwRingRec *) (fw_ring_data + off);

				padrec->len = (uint32) pad;
				padrec->state = FW_REC_SKIP;
				head += pad;
				off = 0;
			}
			r = (FwRingRec *) (fw_ring_data + off);
			r->len = need;
			r->state = FW_REC_RESERVED;
			head += need;
			fw_ring->head = head;
			used = head - tail;
			LWLockRelease(fw_shared->ring_lock);
			break;
		}
		LWLockRelease(fw_shared->ring_lock);

		if (!waited)
		{
			waited = true;
			pg_atomic_fetch_add_u64(&fw_shared->ring_waits, 1);
			ConditionVariablePrepareToSleep(&fw_shared->ring_space_cv);
		}
		fw_wake_worker();
		ConditionVariableSleep(&fw_shared->ring_space_cv, PG_WAIT_EXTENSION);
	}
	if (waited)
		ConditionVariableCancelSleep();
	RESUME_CANCEL_INTERRUPTS();

	r->prompt_len = plen;
	r->answer_len = alen;
	r->encoding = GetDatabaseEncoding();
	r->unused = 0;
	memcpy(&r->rec, rec, sizeof(FwCallRecord));
	p = (char *) r + sizeof(FwRingRec);
	if (plen > 0)
		memcpy(p, prompt, plen);
	if (alen > 0)
		memcpy(p + Max(plen, 0), answer, alen);

	pg_write_barrier();
	r->state = FW_REC_READY;

	pg_atomic_fetch_add_u64(&fw_shared->records_pushed, 1);

	/* the worker sleeps while the ring is empty; flush early past half */
	if (was_empty || used > size / 2)
		fw_wake_worker();
}

static char *
fw_copy_text(const char *p, int len)
{
	char	   *s;

	if (len < 0)
		return NULL;
	s = palloc(len + 1);
	memcpy(s, p, len);
	s[len] = '\0';
	return s;
}

/*
 * Worker: copy out up to max READY records from the tail, in order.
 * *end_pos is where the tail goes once they are committed.  No lock is
 * held while copying: nobody writes [tail, head) but the record's writer,
 * and we read only what it published.
 */
int
fw_calllog_read(FwDrainedRecord *out, int max, uint64 *end_pos)
{
	uint64		head;
	uint64		pos;
	uint64		size = fw_ring->size;
	int			n = 0;

	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	head = fw_ring->head;
	pos = fw_ring->tail;
	LWLockRelease(fw_shared->ring_lock);

	while (pos < head && n < max)
	{
		FwRingRec  *r = (FwRingRec *) (fw_ring_data + pos % size);
		uint32		state = r->state;
		char	   *p;

		if (state == FW_REC_SKIP)
		{
			pos += r->len;
			continue;
		}
		if (state != FW_REC_READY)
			break;				/* its writer is still copying */
		pg_read_barrier();

		memcpy(&out[n].rec, &r->rec, sizeof(FwCallRecord));
		out[n].encoding = r->encoding;
		p = (char *) r + sizeof(FwRingRec);
		out[n].prompt = fw_copy_text(p, r->prompt_len);
		out[n].answer = fw_copy_text(p + Max(r->prompt_len, 0), r->answer_len);
		pos += r->len;
		n++;
	}
	*end_pos = pos;
	return n;
}

/*
 * Worker, after COMMIT: release the space up to end_pos and wake the
 * writers waiting for space and the fw_flush() callers.
 */
void
fw_calllog_advance(uint64 end_pos, int nrecords)
{
	LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
	if (end_pos > fw_ring->tail && end_pos <= fw_ring->head)
		fw_ring->tail = end_pos;
	LWLockRelease(fw_shared->ring_lock);

	pg_atomic_fetch_add_u64(&fw_shared->records_flushed, nrecords);
	ConditionVariableBroadcast(&fw_shared->ring_space_cv);
	ConditionVariableBroadcast(&fw_shared->ring_flushed_cv);
}

void
fw_calllog_usage(uint64 *size, uint64 *used, uint64 *head, uint64 *tail)
{
	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	*size = fw_ring->size;
	*head = fw_ring->head;
	*tail = fw_ring->tail;
	LWLockRelease(fw_shared->ring_lock);
	*used = *head - *tail;
}

bool
fw_calllog_pending(void)
{
	bool		pending;

	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	pending = (fw_ring->head != fw_ring->tail);
	LWLockRelease(fw_shared->ring_lock);
	return pending;
}

/*
 * fw_flush(): return once everything pushed before the call is in
 * fw_tier.calls.  Waits interruptibly; when the worker is not running the
 * wait lasts until it comes back, or until statement_timeout.
 */
void
fw_flush_wait(void)
{
	uint64		target;

	if (fw_ring == NULL || fw_shared == NULL)
		return;

	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	target = fw_ring->head;
	LWLockRelease(fw_shared->ring_lock);

	ConditionVariablePrepareToSleep(&fw_shared->ring_flushed_cv);
	for (;;)
	{
		uint64		tail;

		LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
		tail = fw_ring->tail;
		LWLockRelease(fw_shared->ring_lock);
		if (tail >= target)
			break;

		pg_atomic_write_u32(&fw_shared->flush_requested, 1);
		fw_wake_worker();
		/* timed: a worker that restarts never saw our request */
		(void) ConditionVariableTimedSleep(&fw_shared->ring_flushed_cv, 1000,
										   PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
}
