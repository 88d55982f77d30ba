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
 * The ring never loses a record silently:
 *	- a full ring makes the writer wait a bounded time (at most
 *	  fw_tier.flush_interval, capped at FW_RING_WAIT_MAX_MS, and not at all
 *	  when the log is known not to drain); then the record goes to the
 *	  spill (spill.c).  Once anything is in the spill every new record goes
 *	  there too, until the flusher has drained it, so order is kept: the
 *	  flusher writes the ring out first, then the spill.  A cancel during
 *	  the wait ends it at once: the record is spilled, then the cancel is
 *	  processed.  Only a full (or failing) spill drops a record: counted in
 *	  records_dropped, with a WARNING;
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
 * Every field read back from the file is untrusted (a torn page after an
 * operating-system crash, a stray write, a hostile file): each published
 * record carries a CRC-32C over its length, lengths, encoding, call record
 * and payload, written before the READY publish, and every field is
 * checked (fw_rec_problem) before use, by the postmaster's recovery and by
 * the flusher's read alike.  A damaged record is overwritten with SKIP
 * records up to the next record that checks out (found by scanning the
 * 8-byte-aligned positions for a READY record with a good CRC), counted in
 * records_corrupt and reported once.
 *
 * Durability: the ring survives any process crash (the mapping is
 * MAP_SHARED).  Against an operating-system crash the flusher msync()s the
 * file at most once per FW_RING_SYNC_MS while it drains, so what can be
 * lost is the records pushed since the last sync (at most about a second
 * of calls, more if the flusher cannot run); damaged records are skipped,
 * never trusted.
 *
 * Write-ahead attempts (issue 18).  A crash-restart kills every backend
 * with its attempts in flight; the provider may have billed them.  So
 * before an attempt's first byte is sent (engine.c) the backend writes its
 * record, outcome 'unknown' at the worst case (fw_worst_case_tokens), into
 * a slot of a second MAP_SHARED file, pg_fw_tier/calllog.intents; the
 * header callback (http.c) copies the request id into that slot in place;
 * when the answer comes, the real record is pushed to the ring as ever and
 * then the slot is freed.  Why a fixed slot table beside the ring rather
 * than intents inside it: ring records are variable-length (prompt and
 * answer inline) and the tail may only move over what is committed, so an
 * intent in the ring would either be completed by a record of another
 * size (two records, a search to pair them) or pin the tail for as long
 * as the attempt runs (a 10-minute request would stall the whole log, and
 * fill the ring behind it).  In its own table an intent pins nothing: the
 * flusher never sees it, the records behind a long attempt flush as
 * usual, and the tail moves only over committed records, unchanged.
 *
 * Slots: MaxBackends * FW_INTENTS_PER_BACKEND, fixed for the server's
 * life.  A backend claims one by compare-and-swap (FREE -> CLAIMED),
 * starting at its own PGPROC's stretch so that backends do not contend,
 * fills it, computes a CRC, and publishes it LIVE behind a write barrier:
 * no lock, no system call, no fsync on the call path.  Who writes a LIVE
 * slot as a row, and why never while its owner works on it:
 *	- the postmaster, at every start and crash-restart, with no other
 *	  process alive (fw_intents_recover): every LIVE slot is abandoned.  If
 *	  the attempt's own record is already in [tail, head) of the ring (the
 *	  owner died between pushing it and freeing the slot) nothing is
 *	  written; if it was already flushed, the 'unknown' record pushed now
 *	  comes later and the flusher's ON CONFLICT (call_id, attempt) DO
 *	  NOTHING drops it.  Exactly one row either way.  (If that record went
 *	  to the spill instead, the 'unknown' one, written to the ring, lands
 *	  first and wins: still one row, at the worst case.)  The epoch in the
 *	  file header is bumped each time;
 *	- the owner itself, for a slot it still holds when its transfers are
 *	  gone without a record (transaction abort, exit callback);
 *	- the flusher (fw_intents_reap, once per FW_INTENT_REAP_MS), for a slot
 *	  whose owner is gone without a crash-restart (it exited without its
 *	  before_shmem_exit callbacks).  The owner is alive while its PGPROC
 *	  (owner_procno) holds its pid and the slot's epoch is the current one:
 *	  PostgreSQL frees a PGPROC only after the before_shmem_exit callbacks,
 *	  where the owner frees its own slots, and a pid recycled into the same
 *	  PGPROC within one epoch would have to belong to that same PGPROC's
 *	  next process, which the exit callback precedes.  It checks a slot
 *	  only after moving it LIVE -> REAPING by compare-and-swap, so that
 *	  no backend can free and re-claim it between its reads (REAPING
 *	  counts as LIVE for recovery and the owner).
 * A slot's content is untrusted like the ring's: its CRC (request id
 * excluded, it changes in place; checked as printable ASCII instead) and
 * fw_rec_problem are checked before it becomes a record.  A CLAIMED slot
 * was never sent: recovery frees it.  Durability is the ring's: the slots
 * survive any process crash; the flusher msync()s them with the ring, so
 * an operating-system crash loses the attempts begun in the last second
 * or so, as it does their records.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file_perm.h"
#include "access/xlog.h"
#include "port/pg_crc32c.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "storage/fd.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "fw_tier.h"

#define FW_RING_DIR			"pg_fw_tier"
#define FW_RING_FILE		"pg_fw_tier/calllog.ring"
#define FW_RING_MAGIC		0x46575247	/* "FWRG" */
#define FW_RING_VERSION		2	/* 2: records carry a CRC */
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
	pg_crc32c	crc;			/* version 1: unused (0) */
	FwCallRecord rec;
	/* prompt bytes, then answer bytes, no terminators */
} FwRingRec;

#define FW_REC_ALIGN(x)		TYPEALIGN(8, (x))

static void fw_intents_startup(void);
static void fw_intents_sync(void);
#define FW_REC_MINLEN		8	/* len + state */
#define FW_RING_WAIT_MAX_MS	10000	/* longest wait for ring space */
#define FW_RING_SYNC_MS		1000	/* flusher msync period */

static FwRingFile *fw_ring = NULL;
static char *fw_ring_data = NULL;

/*
 * The data size, process-local: the length this process mapped
 * (fw_tier.log_buffer, fixed at server start).  fw_ring->size in the file
 * is checked against it once at startup (a mismatch resets the ring) and
 * never used for addressing: a stray write to the file cannot make a
 * writer or the flusher address past the mapping.
 */
static uint64 fw_ring_size = 0;

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

/* ---- record framing: shared by the ring and the spill ---- */

static pg_crc32c
fw_rec_crc(const FwRingRec *r)
{
	pg_crc32c	crc;

	INIT_CRC32C(crc);
	COMP_CRC32C(crc, &r->len, sizeof(r->len));
	/* prompt_len, answer_len, encoding: not state (it changes), not crc */
	COMP_CRC32C(crc, &r->prompt_len,
				offsetof(FwRingRec, crc) - offsetof(FwRingRec, prompt_len));
	/* the call record and the payload right behind it */
	COMP_CRC32C(crc, &r->rec,
				sizeof(FwCallRecord) + Max(r->prompt_len, 0) + Max(r->answer_len, 0));
	FIN_CRC32C(crc);
	return crc;
}

static bool
fw_terminated(const char *s, size_t n)
{
	return memchr(s, '\0', n) != NULL;
}

/*
 * What is wrong with the published record r, of which avail bytes can be
 * read; NULL when nothing.  Nothing beyond r + avail is read, and nothing
 * beyond the header before the lengths are known to fit.  check_crc is
 * false only for a version 1 ring, whose records have none.
 */
static const char *
fw_rec_problem(const FwRingRec *r, uint64 avail, bool check_crc)
{
	const FwCallRecord *c = &r->rec;
	uint32		len;
	uint8		b1,
				b2,
				b3;

	if (avail < sizeof(FwRingRec))
		return "it is cut short";
	len = r->len;
	if (len < sizeof(FwRingRec) || len % 8 != 0 || len > avail)
		return "its length is out of range";
	if (r->prompt_len < -1 || r->prompt_len > FW_CONTENT_MAX ||
		r->answer_len < -1 || r->answer_len > FW_CONTENT_MAX)
		return "a content length is out of range";
	if (FW_REC_ALIGN(sizeof(FwRingRec) + Max(r->prompt_len, 0) +
					 Max(r->answer_len, 0)) != len)
		return "its content lengths do not match its length";
	if (check_crc && !EQ_CRC32C(r->crc, fw_rec_crc(r)))
		return "its checksum does not match";
	if (!PG_VALID_BE_ENCODING(r->encoding))
		return "its encoding is not valid";
	if (c->path < 0 || c->path >= FW_NUM_PATHS)
		return "its path is out of range";
	if (c->outcome < 0 || c->outcome >= FW_NUM_OUTCOMES)
		return "its outcome is out of range";
	memcpy(&b1, &c->priority_sent, 1);
	memcpy(&b2, &c->escalated, 1);
	memcpy(&b3, &c->replayed, 1);
	if (b1 > 1 || b2 > 1 || b3 > 1)
		return "a flag is not a boolean";
	if (c->attempt < 1 || !IS_VALID_TIMESTAMP(c->started_at))
		return "its attempt or start time is out of range";
	/* issue 11: a shipped batch is checked here too (shipper.c) */
	if (c->kind < 0 || c->kind >= FW_NUM_KINDS)
		return "its kind is out of range";
	memcpy(&b1, &c->probe, 1);
	if (b1 > 1)
		return "a flag is not a boolean";
	if (c->http_status < -1 || c->http_status > 999)
		return "its HTTP status is out of range";
	/* not the latencies: a clock stepped back makes one negative */
	if (c->prompt_tokens < -1 || c->cached_prompt_tokens < -1 ||
		c->completion_tokens < -1)
		return "a count is out of range";
	if (!fw_terminated(c->dbname.data, NAMEDATALEN) ||
		!fw_terminated(c->username.data, NAMEDATALEN) ||
		!fw_terminated(c->workload, FW_NAMELEN) ||
		!fw_terminated(c->model, FW_MODELLEN) ||
		!fw_terminated(c->request_id, FW_REQIDLEN) ||
		!fw_terminated(c->error, FW_ERRLEN))
		return "a name is not terminated";
	return NULL;
}

/* Fill everything but len and state (len must be set: the CRC covers it). */
static void
fw_rec_fill(FwRingRec *r, int plen, int alen, const FwCallRecord *rec,
			const char *prompt, const char *answer, int encoding)
{
	char	   *p;

	r->prompt_len = plen;
	r->answer_len = alen;
	r->encoding = encoding;
	memcpy(&r->rec, rec, sizeof(FwCallRecord));
	p = (char *) r + sizeof(FwRingRec);
	if (plen > 0)
		memcpy(p, prompt, plen);
	if (alen > 0)
		memcpy(p + Max(plen, 0), answer, alen);
	/* zero the alignment padding: the file holds no stale bytes */
	memset(p + Max(plen, 0) + Max(alen, 0), 0,
		   r->len - sizeof(FwRingRec) - Max(plen, 0) - Max(alen, 0));
	r->crc = fw_rec_crc(r);
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

/* a checked record becomes a drained one (palloc'd strings) */
static void
fw_rec_decode(const FwRingRec *r, FwDrainedRecord *out)
{
	const char *p = (const char *) r + sizeof(FwRingRec);

	memcpy(&out->rec, &r->rec, sizeof(FwCallRecord));
	out->encoding = r->encoding;
	out->prompt = fw_copy_text(p, r->prompt_len);
	out->answer = fw_copy_text(p + Max(r->prompt_len, 0), r->answer_len);
}

/* spill.c sees the framing through these */
Size
fw_rec_header_size(void)
{
	return sizeof(FwRingRec);
}

Size
fw_rec_max_size(void)
{
	return FW_REC_ALIGN(sizeof(FwRingRec) + 2 * FW_CONTENT_MAX);
}

uint32
fw_rec_len(const char *buf)
{
	return ((const FwRingRec *) buf)->len;
}

const char *
fw_rec_check(const char *buf, uint64 avail)
{
	const FwRingRec *r = (const FwRingRec *) buf;

	if (avail < sizeof(FwRingRec))
		return "it is cut short";
	if (r->state != FW_REC_READY)
		return "its state is not valid";
	return fw_rec_problem(r, avail, true);
}

void
fw_rec_to_drained(const char *buf, FwDrainedRecord *out)
{
	fw_rec_decode((const FwRingRec *) buf, out);
}

/*
 * Issue 11: a drained record framed again as a published ring record
 * (with its CRC), appended to buf: the standby's shipper sends these, and
 * fw_tier.ingest_calls checks them with fw_rec_check like the ring's.
 */
void
fw_rec_frame(StringInfo buf, const FwDrainedRecord *d)
{
	int			plen = d->prompt ? (int) Min(strlen(d->prompt), FW_CONTENT_MAX) : -1;
	int			alen = d->answer ? (int) Min(strlen(d->answer), FW_CONTENT_MAX) : -1;
	uint32		len = FW_REC_ALIGN(sizeof(FwRingRec) + Max(plen, 0) + Max(alen, 0));
	FwRingRec  *r;

	enlargeStringInfo(buf, len + 8);
	/* records are 8-byte aligned within the batch; buf->data is MAXALIGNed */
	while (buf->len % 8 != 0)
		buf->data[buf->len++] = '\0';
	r = (FwRingRec *) (buf->data + buf->len);
	r->len = len;
	r->state = FW_REC_READY;
	fw_rec_fill(r, plen, alen, &d->rec, d->prompt, d->answer, d->encoding);
	buf->len += len;
	buf->data[buf->len] = '\0';
}

/* ---- damage in the ring ---- */

/* bytes of [pos, head) readable as one piece from pos (not across the end) */
static uint64
fw_ring_avail(uint64 pos, uint64 head)
{
	uint64		size = fw_ring_size;

	return Min(size - pos % size, head - pos);
}

static bool
fw_ring_frame_ok(const FwRingRec *r, uint64 avail, uint32 minlen)
{
	uint32		len = r->len;

	return len >= minlen && len % 8 == 0 && len <= avail;
}

/*
 * The first 8-byte-aligned position after pos, before head, where a
 * published record checks out (a 32-bit CRC: garbage passing it is
 * negligible); head when there is none.  With stop_at_reserved, also a
 * RESERVED header: a live writer's record, which the flusher must wait
 * for rather than skip.
 */
static uint64
fw_ring_resync(uint64 pos, uint64 head, bool stop_at_reserved)
{
	for (pos += 8; pos < head; pos += 8)
	{
		FwRingRec  *r = (FwRingRec *) (fw_ring_data + pos % fw_ring_size);
		uint64		avail = fw_ring_avail(pos, head);
		uint32		state;

		if (avail < sizeof(FwRingRec))
			continue;
		state = r->state;
		/* the payload is read only after the state (as fw_calllog_read) */
		pg_read_barrier();
		if (state == FW_REC_READY && fw_rec_problem(r, avail, true) == NULL)
			return pos;
		if (stop_at_reserved && state == FW_REC_RESERVED &&
			fw_ring_frame_ok(r, avail, sizeof(FwRingRec)))
			return pos;
	}
	return head;
}

/* Cover [from, to) with SKIP records, one per lap of the ring. */
static void
fw_ring_skip_range(uint64 from, uint64 to)
{
	uint64		size = fw_ring_size;

	while (from < to)
	{
		uint64		off = from % size;
		uint64		l = Min(to - from, size - off);
		FwRingRec  *r = (FwRingRec *) (fw_ring_data + off);

		r->len = (uint32) l;
		r->state = FW_REC_SKIP;
		from += l;
	}
}

/* Damage found by one pass over the ring: how much, and the first of it. */
typedef struct FwRingDamage
{
	int			count;
	uint64		first_pos;
	const char *first_problem;
} FwRingDamage;

/*
 * The record at pos is damaged (why: problem): note it, cover it with SKIP
 * up to the next record that checks out, and return where that is.
 */
static uint64
fw_ring_skip_damage(uint64 pos, uint64 head, bool stop_at_reserved,
					const char *problem, FwRingDamage *damage)
{
	uint64		next = fw_ring_resync(pos, head, stop_at_reserved);

	if (damage->count++ == 0)
	{
		damage->first_pos = pos;
		damage->first_problem = problem;
	}
	fw_ring_skip_range(pos, next);
	return next;
}

/*
 * Postmaster only, with no other process alive (first start or
 * crash-restart): check [tail, head) record by record.  Records whose
 * writer died before publishing become SKIP; damaged ones are covered with
 * SKIP up to the next record that checks out, and counted.  legacy: a
 * version 1 file, whose records get their CRC now.
 */
static void
fw_ring_recover(bool legacy)
{
	uint64		size = fw_ring_size;
	uint64		pos = fw_ring->tail;
	uint64		head = fw_ring->head;
	int			ready = 0;
	int			skipped = 0;
	FwRingDamage damage = {0, 0, NULL};

	if (pos > head || head - pos > size || pos % 8 != 0 || head % 8 != 0)
	{
		fw_ring_reset("The head and tail positions were inconsistent; the ring starts empty.");
		if (fw_shared)
			pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, 1);
		return;
	}

	while (pos < head)
	{
		FwRingRec  *r = (FwRingRec *) (fw_ring_data + pos % size);
		uint64		avail = fw_ring_avail(pos, head);
		uint32		state = r->state;
		const char *problem;

		if (state == FW_REC_SKIP && fw_ring_frame_ok(r, avail, FW_REC_MINLEN))
		{
			pos += r->len;
			continue;
		}
		if (state == FW_REC_RESERVED && fw_ring_frame_ok(r, avail, sizeof(FwRingRec)))
		{
			r->state = FW_REC_SKIP;
			skipped++;
			pos += r->len;
			continue;
		}
		if (state == FW_REC_READY)
		{
			problem = fw_rec_problem(r, avail, !legacy);
			if (problem == NULL)
			{
				if (legacy)
					r->crc = fw_rec_crc(r);
				ready++;
				pos += r->len;
				continue;
			}
		}
		else if (state == FW_REC_SKIP || state == FW_REC_RESERVED)
			problem = "its length is out of range";
		else
			problem = "its state is not valid";

		pos = fw_ring_skip_damage(pos, head, false, problem, &damage);
	}

	if (damage.count > 0)
		ereport(LOG,
				(errmsg("fw_tier: skipped %d damaged records in call-log ring file \"%s\"",
						damage.count, FW_RING_FILE),
				 errdetail("The first, at position " UINT64_FORMAT ", was damaged because %s; %d good records are kept.  A damaged stretch whose records cannot be told apart counts once.",
						   damage.first_pos, damage.first_problem, ready)));
	if (ready > 0 || skipped > 0)
		ereport(LOG,
				(errmsg("fw_tier: call-log ring holds %d records not yet written to fw_tier.calls",
						ready),
				 skipped > 0 ?
				 errdetail("%d records whose writer died before completing them were skipped.",
						   skipped) : 0));
	if (fw_shared && skipped > 0)
		pg_atomic_fetch_add_u64(&fw_shared->records_skipped, skipped);
	if (fw_shared && damage.count > 0)
		pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, damage.count);
}

/*
 * The mapped files (the ring, the intents): open (the postmaster creates)
 * and stat, resize with the blocks allocated, map.  Errors are raised:
 * these run at server start.
 */
static int
fw_file_open(const char *path, bool create, struct stat *st)
{
	int			fd = BasicOpenFilePerm(path, O_RDWR | (create ? O_CREAT : 0) | PG_BINARY,
									   pg_file_create_mode);

	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\": %m", path)));
	if (fstat(fd, st) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat file \"%s\": %m", path)));
	return fd;
}

static void
fw_file_resize(int fd, const char *path, uint64 want)
{
	if (ftruncate(fd, 0) < 0 || ftruncate(fd, (off_t) want) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not resize file \"%s\": %m", path)));
#ifdef HAVE_POSIX_FALLOCATE
	/* allocate the blocks now: a full disk later would be a SIGBUS */
	{
		int			rc = posix_fallocate(fd, 0, (off_t) want);

		if (rc != 0 && rc != EINVAL && rc != EOPNOTSUPP)
		{
			errno = rc;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not allocate file \"%s\": %m", path)));
		}
	}
#endif
}

static void *
fw_file_map(int fd, const char *path, uint64 size)
{
	void	   *p = mmap(NULL, (size_t) size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not map file \"%s\": %m", path)));
	return p;
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

	fd = fw_file_open(FW_RING_FILE, validate, &st);
	if (validate && (uint64) st.st_size != want)
	{
		fresh = true;
		fw_file_resize(fd, FW_RING_FILE, want);
	}
	else if ((uint64) st.st_size != want)
		elog(ERROR, "fw_tier call-log ring file \"%s\" has an unexpected size",
			 FW_RING_FILE);

	p = fw_file_map(fd, FW_RING_FILE, want);
	close(fd);

	fw_ring = (FwRingFile *) p;
	fw_ring_data = (char *) p + FW_RING_HDRSZ;
	fw_ring_size = want - FW_RING_HDRSZ;

	if (!validate)
		return;

	if (fresh)
		fw_ring_reset(st.st_size == 0 ?
					  "The file is new." :
					  "Its size did not match fw_tier.log_buffer; records it held are discarded.");
	else if (fw_ring->magic != FW_RING_MAGIC ||
			 (fw_ring->version != FW_RING_VERSION && fw_ring->version != 1) ||
			 fw_ring->rec_size != sizeof(FwRingRec))
	{
		fw_ring_reset("Its header is damaged or from another version of fw_tier; records it held are discarded.");
		if (fw_shared)
			pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, 1);
	}
	else if (fw_ring->size != fw_ring_data_size())
		fw_ring_reset("Its size did not match fw_tier.log_buffer; records it held are discarded.");
	else if (fw_ring->version == 1)
	{
		/* 0.1's layout, without CRCs: checked, given CRCs, kept */
		fw_ring_recover(true);
		fw_ring->version = FW_RING_VERSION;
	}
	else
		fw_ring_recover(false);
}

/* postmaster: the shared fields of this module and spill.c, then the files */
static void
fw_calllog_init_shared(void)
{
	if (fw_shared == NULL)
		return;
	pg_atomic_init_u64(&fw_shared->records_corrupt, 0);
	pg_atomic_init_u64(&fw_shared->records_dropped, 0);
	pg_atomic_init_u64(&fw_shared->records_spilled, 0);
	pg_atomic_init_u64(&fw_shared->dead_letters, 0);
	fw_shared->spill_active = false;
	fw_shared->spill_read_pos = 0;
	fw_shared->spill_write_pos = 0;
	fw_shared->spill_bytes = 0;
	fw_shared->spill_records = 0;
	fw_shared->spill_corrupt_upto = 0;
	fw_shared->drain_ok = true;
	strlcpy(fw_shared->drain_state, "ok", sizeof(fw_shared->drain_state));
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
	if (!IsUnderPostmaster)
		fw_calllog_init_shared();
	if (fw_ring != NULL)
	{
		/* crash-restart: the mapping survived in the postmaster */
		if (!IsUnderPostmaster)
		{
			if (fw_ring->size != fw_ring_size)
			{
				fw_ring_reset("Its size field was damaged; records it held are discarded.");
				if (fw_shared)
					pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, 1);
			}
			else
				fw_ring_recover(false);
		}
	}
	else
		fw_ring_map(!IsUnderPostmaster);
	if (!IsUnderPostmaster)
		fw_spill_startup();
	/* after the ring and the spill: recovery writes 'unknown' records */
	fw_intents_startup();
}

/*
 * May a writer wait for ring space?  Only while the log is draining: when
 * the flusher cannot write (no database, standby, failing inserts) waiting
 * only delays the call, and the record goes to the spill at once.
 */
static bool
fw_calllog_draining(void)
{
	bool		ok;

	if (RecoveryInProgress())
		return false;
	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	ok = fw_shared->drain_ok;
	LWLockRelease(fw_shared->ring_lock);
	return ok;
}

/*
 * Reserve need bytes at the head (a SKIP pad first when the record would
 * cross the end of the ring) and write the header (RESERVED).  NULL when
 * the ring has no room.  ring_lock held exclusively (or, in the postmaster
 * during recovery, no other process alive).
 */
static FwRingRec *
fw_ring_reserve_locked(uint32 need, bool *was_empty, uint64 *used)
{
	uint64		size = fw_ring_size;
	uint64		head = fw_ring->head;
	uint64		tail = fw_ring->tail;
	uint64		off = head % size;
	uint64		pad = (size - off < need) ? size - off : 0;
	FwRingRec  *r;

	if (head + pad + need - tail > size)
		return NULL;
	*was_empty = (head == tail);
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
	*used = head - tail;
	return r;
}

static void fw_calllog_push_internal(const FwCallRecord *rec, const char *prompt,
									 const char *answer, int encoding,
									 bool may_wait);

/*
 * Push one record.  The attempt it describes was paid for, so it is never
 * lost silently: while the ring is full the writer waits a bounded time
 * for space (fw_tier.flush_interval, at most FW_RING_WAIT_MAX_MS, and only
 * while the log drains), then the record goes to the spill.  Interrupts
 * are held for the whole wait: none is serviced before the record has a
 * place.  A cancel, statement_timeout or terminate ends that wait at once
 * (it sets our latch): the record is spilled, and the interrupt stays
 * pending for the caller's next CHECK_FOR_INTERRUPTS(); any other
 * interrupt waits at most the bounded wait.
 * Never raises once the record is reserved.  Only a full (or failing)
 * spill drops a record: counted, with a WARNING.
 */
void
fw_calllog_push(const FwCallRecord *rec, const char *prompt, const char *answer)
{
	fw_calllog_push_internal(rec, prompt, answer, GetDatabaseEncoding(), true);
}

/*
 * encoding: the database encoding of the process the record describes
 * (a write-ahead attempt resolved by another process keeps its owner's).
 * may_wait = false: a full ring sends the record to the spill at once (the
 * flusher resolving an orphaned attempt must not wait for itself).
 */
static void
fw_calllog_push_internal(const FwCallRecord *rec, const char *prompt,
						 const char *answer, int encoding, bool may_wait)
{
	uint64		size;
	int64		content_max;
	int			plen = -1;
	int			alen = -1;
	uint32		need;
	uint64		used = 0;
	bool		was_empty = false;
	bool		waited = false;
	bool		to_spill = false;
	bool		spilled = false;
	const char *why = NULL;
	int			save_errno = 0;
	TimestampTz wait_until = 0;
	FwRingRec  *r = NULL;
	static char *spill_buf = NULL;

	if (fw_ring == NULL || fw_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("fw_tier call log is not initialized"),
				 errhint("Add fw_tier to shared_preload_libraries in postgresql.conf and restart the server.")));
	size = fw_ring_size;

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

	/* the spill path must not allocate under the lock */
	if (spill_buf == NULL)
		spill_buf = MemoryContextAlloc(TopMemoryContext, fw_rec_max_size());

	/*
	 * Reserve; from here to READY nothing may raise an error.  The loop
	 * leaves with ring_lock held when the record goes to the spill, so that
	 * the choice and the append are one step (ordering, see the header).
	 */
	for (;;)
	{
		bool		give_up;

		LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
		if (fw_shared->spill_active)
		{
			to_spill = true;
			break;
		}
		r = fw_ring_reserve_locked(need, &was_empty, &used);
		if (r != NULL)
		{
			LWLockRelease(fw_shared->ring_lock);
			break;
		}
		if (!may_wait)
		{
			to_spill = true;
			break;
		}
		LWLockRelease(fw_shared->ring_lock);

		if (!waited)
		{
			waited = true;
			pg_atomic_fetch_add_u64(&fw_shared->ring_waits, 1);

			/*
			 * No interrupt may be serviced before the record has a place:
			 * an error re-raised from a parallel worker, a client-gone
			 * FATAL or a terminate would lose it.  Cancel and terminate
			 * are only looked at (give_up); the rest waits for the
			 * caller's next CHECK_FOR_INTERRUPTS(), at most the bounded
			 * wait later.
			 */
			HOLD_INTERRUPTS();
			wait_until = GetCurrentTimestamp() +
				(int64) Min(fw_flush_interval_ms, FW_RING_WAIT_MAX_MS) * 1000;
		}
		give_up = QueryCancelPending || ProcDiePending ||
			GetCurrentTimestamp() >= wait_until || !fw_calllog_draining();
		if (give_up)
		{
			LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
			to_spill = true;
			break;
		}

		/*
		 * Sleep on our latch, not in ConditionVariableSleep(): its
		 * CHECK_FOR_INTERRUPTS() would process an interrupt before we could
		 * save the record.  Joining the CV's wakeup list makes the
		 * flusher's broadcast set the latch; so do cancel and terminate.
		 * Nothing is serviced here (interrupts are held): other interrupts
		 * (barriers, memory-context dumps ...) wait at most the bounded
		 * wait.
		 */
		ConditionVariablePrepareToSleep(&fw_shared->ring_space_cv);
		fw_wake_worker();
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 50, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	if (to_spill)
	{
		FwRingRec  *sr = (FwRingRec *) spill_buf;

		/* ring_lock is held */
		sr->len = need;
		sr->state = FW_REC_READY;
		fw_rec_fill(sr, plen, alen, rec, prompt, answer, encoding);
		spilled = fw_spill_append_locked(spill_buf, need, &why, &save_errno);
		LWLockRelease(fw_shared->ring_lock);
	}
	if (waited)
		ConditionVariableCancelSleep();

	if (to_spill)
	{
		/* the record is in the spill (or counted as dropped) */
		if (waited)
			RESUME_INTERRUPTS();
		if (spilled)
		{
			pg_atomic_fetch_add_u64(&fw_shared->records_pushed, 1);
			pg_atomic_fetch_add_u64(&fw_shared->records_spilled, 1);
		}
		else
		{
			pg_atomic_fetch_add_u64(&fw_shared->records_dropped, 1);
			errno = save_errno;
			ereport(WARNING,
					(errcode(save_errno != 0 ? ERRCODE_IO_ERROR : ERRCODE_DISK_FULL),
					 errmsg("fw_tier: call-log record dropped: the ring is full and %s",
							why),
			/* one DETAIL: a second errdetail would replace the OS error */
					 save_errno != 0 ?
					 errdetail_internal("%m; call_id " INT64_FORMAT ", attempt %d; counted in fw_tier.log_status.records_dropped.",
										rec->call_id, rec->attempt) :
					 errdetail_internal("call_id " INT64_FORMAT ", attempt %d; counted in fw_tier.log_status.records_dropped.",
										rec->call_id, rec->attempt),
					 errhint("See fw_tier.log_status.drain_state for why the call log does not drain; raise fw_tier.log_spill_limit for more room.")));
		}
		fw_wake_worker();

		/*
		 * A cancel that ended the wait stays pending: the caller's next
		 * CHECK_FOR_INTERRUPTS() raises it, after it has logged what else
		 * it must (several in-flight attempts of a cancelled batch).
		 */
		return;
	}

	fw_rec_fill(r, plen, alen, rec, prompt, answer, encoding);
	pg_write_barrier();
	r->state = FW_REC_READY;

	pg_atomic_fetch_add_u64(&fw_shared->records_pushed, 1);
	/* published: a pending interrupt is the caller's to service */
	if (waited)
		RESUME_INTERRUPTS();

	/* the worker sleeps while the ring is empty; flush early past half */
	if (was_empty || used > size / 2)
		fw_wake_worker();
}

/*
 * Worker: head and tail are read from a file anybody with access to the
 * data directory could have written; when they make no sense the ring is
 * emptied (its records cannot be found) and counted.  ring_lock held
 * exclusively.
 */
static bool
fw_ring_header_ok_locked(void)
{
	uint64		head = fw_ring->head;
	uint64		tail = fw_ring->tail;

	if (tail <= head && head - tail <= fw_ring_size &&
		tail % 8 == 0 && head % 8 == 0)
		return true;
	/* 0, not Max(head, tail): damaged positions may be near UINT64_MAX */
	fw_ring->head = fw_ring->tail = 0;
	return false;
}

/*
 * Worker: copy out up to max READY records from the tail, in order.
 * *end_pos is where the tail goes once they are committed.  No lock is
 * held while copying: nobody writes [tail, head) but the record's writer,
 * and we read only what it published.  Every record is checked before a
 * field of it is used; a damaged one is covered with SKIP (so it is
 * counted and reported once, even when the batch is read again after a
 * failed insert) up to the next record that checks out or a live writer's.
 */
int
fw_calllog_read(FwDrainedRecord *out, int max, uint64 *end_pos)
{
	return fw_calllog_read_after(0, out, max, end_pos);
}

/*
 * Flusher (issue 15): the same from start, the end of records already
 * read whose tail move waits for their commit to be durable (flusher.c);
 * from the tail when start is not within [tail, head] (0, or the ring was
 * reset).
 */
int
fw_calllog_read_after(uint64 start, FwDrainedRecord *out, int max,
					  uint64 *end_pos)
{
	uint64		head;
	uint64		pos;
	int			n = 0;
	FwRingDamage damage = {0, 0, NULL};
	bool		header_ok;

	LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
	header_ok = fw_ring_header_ok_locked();
	head = fw_ring->head;
	pos = fw_ring->tail;
	if (header_ok && start > pos && start <= head)
		pos = start;
	LWLockRelease(fw_shared->ring_lock);
	if (!header_ok)
	{
		pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, 1);
		ereport(WARNING,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("fw_tier flusher: the head and tail of call-log ring file \"%s\" are damaged",
						FW_RING_FILE),
				 errdetail("The records the ring held are discarded.")));
	}

	while (pos < head && n < max)
	{
		FwRingRec  *r = (FwRingRec *) (fw_ring_data + pos % fw_ring_size);
		uint64		avail = fw_ring_avail(pos, head);
		uint32		state = r->state;
		const char *problem;

		if (state == FW_REC_SKIP && fw_ring_frame_ok(r, avail, FW_REC_MINLEN))
		{
			pos += r->len;
			continue;
		}
		if (state == FW_REC_RESERVED && fw_ring_frame_ok(r, avail, sizeof(FwRingRec)))
			break;				/* its writer is still copying */
		if (state == FW_REC_READY)
		{
			pg_read_barrier();
			problem = fw_rec_problem(r, avail, true);
			if (problem == NULL)
			{
				fw_rec_decode(r, &out[n]);
				pos += r->len;
				n++;
				continue;
			}
		}
		else
			problem = "its state or length is not valid";

		pos = fw_ring_skip_damage(pos, head, true, problem, &damage);
	}
	if (damage.count > 0)
	{
		pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, damage.count);
		ereport(WARNING,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("fw_tier flusher: skipped %d damaged records in call-log ring file \"%s\"",
						damage.count, FW_RING_FILE),
				 errdetail("The first, at position " UINT64_FORMAT ", was damaged because %s.",
						   damage.first_pos, damage.first_problem),
				 errhint("Counted in fw_tier.log_status.records_corrupt.  Something other than fw_tier wrote to the file: check the storage of the data directory.")));
	}
	*end_pos = pos;
	return n;
}

/*
 * Flusher: write the ring's dirty pages (records and tail) to disk, at
 * most once per FW_RING_SYNC_MS: what an operating-system crash can lose
 * is bounded by that period, not by the ring.
 */
void
fw_calllog_sync(bool force)
{
	static TimestampTz last = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (fw_ring == NULL)
		return;
	if (!force && now - last < (int64) FW_RING_SYNC_MS * 1000)
		return;
	last = now;
	if (msync((void *) fw_ring, FW_RING_HDRSZ + fw_ring_size, MS_SYNC) != 0)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not sync file \"%s\": %m", FW_RING_FILE)));
	fw_intents_sync();
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
	*size = fw_ring_size;
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
 * fw_tier.calls, the spill's records included.  Waits interruptibly; when
 * the worker is not running the wait lasts until it comes back, or until
 * statement_timeout.  On a standby nothing can be written: an error at
 * once rather than a wait.
 */
void
fw_flush_wait(void)
{
	uint64		target;
	uint64		spill_target;

	if (fw_ring == NULL || fw_shared == NULL)
		return;
	/*
	 * Issue 11: on a standby the shipper (shipper.c) moves the tail once
	 * the primary has the rows and this standby has replayed them; while
	 * the primary cannot be reached this waits, as long as
	 * statement_timeout lets it (cancel ends it).
	 */

	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	target = fw_ring->head;
	spill_target = fw_shared->spill_write_pos;
	LWLockRelease(fw_shared->ring_lock);

	ConditionVariablePrepareToSleep(&fw_shared->ring_flushed_cv);
	for (;;)
	{
		uint64		head;
		uint64		tail;
		uint64		spill_read;
		bool		spill_active;

		LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
		head = fw_ring->head;
		tail = fw_ring->tail;
		spill_read = fw_shared->spill_read_pos;
		spill_active = fw_shared->spill_active;
		LWLockRelease(fw_shared->ring_lock);

		/*
		 * head only grows, but a damaged header resets the ring to 0: what
		 * was below target is then gone (counted in records_corrupt), and
		 * nothing is left to wait for in the ring.
		 */
		if ((tail >= target || head < target) &&
			(spill_read >= spill_target || !spill_active))
			break;

		pg_atomic_write_u32(&fw_shared->flush_requested, 1);
		fw_wake_worker();
		/* timed: a worker that restarts never saw our request */
		(void) ConditionVariableTimedSleep(&fw_shared->ring_flushed_cv, 1000,
										   PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
}

/* The drain state shown by fw_tier.log_status ("ok" = draining). */
void
fw_set_drain_state(const char *state)
{
	LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
	fw_shared->drain_ok = (strcmp(state, "ok") == 0);
	strlcpy(fw_shared->drain_state, state, sizeof(fw_shared->drain_state));
	LWLockRelease(fw_shared->ring_lock);
}

void
fw_get_drain_state(char *buf, Size len)
{
	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	strlcpy(buf, fw_shared->drain_state, len);
	LWLockRelease(fw_shared->ring_lock);
}

/* ---- write-ahead attempts (issue 18): pg_fw_tier/calllog.intents ---- */

/*
 * The intent table: a fixed array of slots in its own MAP_SHARED file,
 * beside the ring (see "Write-ahead attempts" in the header comment).
 * A slot's state is an atomic word in the mapping; FREE -> CLAIMED by a
 * compare-and-swap, filled, then LIVE behind a write barrier; back to FREE
 * once the attempt's record is in the ring (or the spill).
 */
#define FW_INTENT_FILE		"pg_fw_tier/calllog.intents"
#define FW_INTENT_MAGIC		0x46574954	/* "FWIT" */
#define FW_INTENT_VERSION	1
#define FW_INTENTS_PER_BACKEND 16
#define FW_INTENT_REAP_MS	1000	/* flusher's orphan scan period */

#define FW_INTENT_FREE		0
#define FW_INTENT_CLAIMED	0x434c4149	/* being filled: nothing sent yet */
#define FW_INTENT_LIVE		0x4c495645	/* the attempt may be on the wire */
#define FW_INTENT_REAPING	0x52454150	/* LIVE, the flusher checking its
										 * owner: fields stable */

typedef struct FwIntentFile
{
	uint32		magic;
	uint32		version;
	uint32		nslots;
	uint32		slot_size;		/* sizeof(FwIntent): layout check */
	uint64		epoch;			/* bumped at every (re)start */
} FwIntentFile;

typedef struct FwIntent
{
	pg_atomic_uint32 state;
	int32		owner_pid;
	int32		owner_procno;	/* the owner's PGPROC (pgprocno) */
	int32		encoding;		/* the owner's database encoding */
	uint64		epoch;			/* FwIntentFile.epoch when claimed */
	pg_crc32c	crc;			/* over the fields above but state, and rec
								 * with request_id zeroed */
	uint32		unused;
	FwCallRecord rec;			/* outcome 'unknown', worst-case tokens;
								 * request_id filled in place from the
								 * response headers */
} FwIntent;

#define FW_INTENT_HDRSZ		4096

static FwIntentFile *fw_intent_hdr = NULL;
static FwIntent *fw_intents = NULL;
static uint32 fw_nintents = 0;	/* process-local, like fw_ring_size */
static int	fw_my_live = 0;		/* slots this process holds */

static uint32
fw_intent_nslots(void)
{
	return (uint32) Max(MaxBackends, 1) * FW_INTENTS_PER_BACKEND;
}

static pg_crc32c
fw_intent_crc(const FwIntent *in)
{
	FwCallRecord rec;
	pg_crc32c	crc;

	memcpy(&rec, &in->rec, sizeof(rec));
	memset(rec.request_id, 0, sizeof(rec.request_id));
	INIT_CRC32C(crc);
	COMP_CRC32C(crc, &in->owner_pid,
				offsetof(FwIntent, crc) - offsetof(FwIntent, owner_pid));
	COMP_CRC32C(crc, &rec, sizeof(rec));
	FIN_CRC32C(crc);
	return crc;
}

/*
 * An abandoned attempt becomes its 'unknown' record: a copy of the intent
 * (the worst case, what the headers told), with no content.  A request id
 * that is not printable ASCII (a torn write) is cleared; the rest is
 * checked like any ring record.  False when the slot does not check out.
 */
static bool
fw_intent_record(FwIntent *in, FwCallRecord *out, const char **problem)
{
	FwRingRec	rr;
	FwRingRec  *r = &rr;
	bool		id_ok = true;

	if (!EQ_CRC32C(in->crc, fw_intent_crc(in)))
	{
		*problem = "its checksum does not match";
		return false;
	}
	memcpy(out, &in->rec, sizeof(*out));
	out->request_id[FW_REQIDLEN - 1] = '\0';
	for (const char *c = out->request_id; *c; c++)
		if (*c < 0x20 || *c > 0x7e)
			id_ok = false;
	if (!id_ok)
		memset(out->request_id, 0, sizeof(out->request_id));
	out->outcome = (int8) FW_UNKNOWN;
	r->len = sizeof(FwRingRec);
	r->state = FW_REC_READY;
	fw_rec_fill(r, -1, -1, out, NULL, NULL, in->encoding);
	*problem = fw_rec_problem(r, sizeof(FwRingRec), true);
	return *problem == NULL;
}

/*
 * Worst case of an attempt whose answer never came (README "The call
 * log"): the prompt over-estimated from the request's bytes (a token
 * covers at least one byte of text, and the JSON framing of each message
 * outweighs the chat template's tokens), and the completion at max_tokens,
 * or fw_tier.max_output_tokens when the request sets none.  The flusher
 * prices these at the path's input and output prices, cached tokens at
 * none.  Budget reservations (spend.c) use the same bound.
 */
void
fw_worst_case_tokens(size_t body_len, int max_tokens, int32 *prompt,
					 int32 *completion)
{
	*prompt = (int32) Min(body_len + FW_TEMPLATE_TOKENS, (size_t) PG_INT32_MAX);
	*completion = max_tokens > 0 ? max_tokens : fw_max_output_tokens;
}

/*
 * Map (postmaster: create, validate, recover) the intent file.  A file of
 * another size (MaxBackends changed) is recovered at its own size first,
 * then re-made.
 */
static void fw_intents_recover(void);

static void
fw_intents_map(bool postmaster)
{
	uint32		want_n = fw_intent_nslots();
	uint64		want = FW_INTENT_HDRSZ + (uint64) want_n * sizeof(FwIntent);
	struct stat st;
	int			fd;
	void	   *p;

	fd = fw_file_open(FW_INTENT_FILE, postmaster, &st);

	if (postmaster && (uint64) st.st_size != want && st.st_size >= FW_INTENT_HDRSZ)
	{
		/* another size: resolve what it holds at its own size */
		p = mmap(NULL, (size_t) st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (p != MAP_FAILED)
		{
			FwIntentFile *h = (FwIntentFile *) p;

			if (h->magic == FW_INTENT_MAGIC && h->version == FW_INTENT_VERSION &&
				h->slot_size == sizeof(FwIntent) &&
				FW_INTENT_HDRSZ + (uint64) h->nslots * sizeof(FwIntent) == (uint64) st.st_size)
			{
				fw_intent_hdr = h;
				fw_intents = (FwIntent *) ((char *) p + FW_INTENT_HDRSZ);
				fw_nintents = h->nslots;
				fw_intents_recover();
			}
			munmap(p, (size_t) st.st_size);
			fw_intent_hdr = NULL;
			fw_intents = NULL;
			fw_nintents = 0;
		}
	}
	if (postmaster && (uint64) st.st_size != want)
		fw_file_resize(fd, FW_INTENT_FILE, want);
	else if ((uint64) st.st_size != want)
		elog(ERROR, "fw_tier intent file \"%s\" has an unexpected size", FW_INTENT_FILE);

	p = fw_file_map(fd, FW_INTENT_FILE, want);
	close(fd);
	fw_intent_hdr = (FwIntentFile *) p;
	fw_intents = (FwIntent *) ((char *) p + FW_INTENT_HDRSZ);
	fw_nintents = want_n;
	if (!postmaster)
		return;

	if (fw_intent_hdr->magic != FW_INTENT_MAGIC ||
		fw_intent_hdr->version != FW_INTENT_VERSION ||
		fw_intent_hdr->slot_size != sizeof(FwIntent) ||
		fw_intent_hdr->nslots != want_n)
	{
		/* new (zeroed by ftruncate), or not ours: every slot FREE */
		memset(p, 0, (size_t) want);
		fw_intent_hdr->magic = FW_INTENT_MAGIC;
		fw_intent_hdr->version = FW_INTENT_VERSION;
		fw_intent_hdr->nslots = want_n;
		fw_intent_hdr->slot_size = sizeof(FwIntent);
	}
	else
		fw_intents_recover();
}

/*
 * Write the 'unknown' record of slot in: into the ring, or the spill when
 * the ring is full (or has records in the spill ahead of it).  Postmaster
 * recovery only (no other process alive, no lock).
 */
static bool
fw_intent_put_recovered(const FwCallRecord *rec, int encoding)
{
	uint32		need = sizeof(FwRingRec);
	bool		was_empty;
	uint64		used;
	FwRingRec  *r = NULL;
	FwRingRec	sr;
	const char *why;
	int			save_errno;

	if (fw_shared == NULL || !fw_shared->spill_active)
		r = fw_ring_reserve_locked(need, &was_empty, &used);
	if (r != NULL)
	{
		fw_rec_fill(r, -1, -1, rec, NULL, NULL, encoding);
		pg_write_barrier();
		r->state = FW_REC_READY;
		return true;
	}
	if (fw_shared == NULL)
		return false;
	sr.len = need;
	sr.state = FW_REC_READY;
	fw_rec_fill(&sr, -1, -1, rec, NULL, NULL, encoding);
	return fw_spill_append_locked((const char *) &sr, need, &why, &save_errno);
}

/*
 * Postmaster, no other process alive (first start, crash-restart, or a
 * restart after an immediate stop): every LIVE slot is an attempt whose
 * owner died with it on the wire.  Unless its own record already is in
 * the ring (the owner died between pushing it and freeing the slot), it is
 * written with outcome 'unknown'.  A record already in fw_tier.calls (the
 * tail passed it) makes the 'unknown' one a conflict the flusher's ON
 * CONFLICT DO NOTHING absorbs: exactly one row either way.  CLAIMED slots
 * were never sent: freed.
 */
static void
fw_intents_recover(void)
{
	int			nlive = 0;
	int			nwritten = 0;
	int			nlost = 0;
	int			nbad = 0;
	int			nfound = 0;
	const char *first_problem = NULL;

	fw_intent_hdr->epoch++;
	for (uint32 i = 0; i < fw_nintents; i++)
	{
		FwIntent   *in = &fw_intents[i];
		uint32		state = pg_atomic_read_u32(&in->state);
		FwCallRecord rec;
		const char *problem;
		bool		in_ring = false;

		if (state == FW_INTENT_FREE)
			continue;
		/* REAPING: the flusher died checking it, still LIVE */
		if (state != FW_INTENT_LIVE && state != FW_INTENT_REAPING)
		{
			pg_atomic_write_u32(&in->state, FW_INTENT_FREE);
			continue;
		}
		nlive++;
		if (!fw_intent_record(in, &rec, &problem))
		{
			if (nbad++ == 0)
				first_problem = problem;
			pg_atomic_write_u32(&in->state, FW_INTENT_FREE);
			continue;
		}

		/* its own record in [tail, head)?  (recovered, so it checks out) */
		if (fw_ring != NULL)
		{
			uint64		pos = fw_ring->tail;
			uint64		head = fw_ring->head;

			while (pos < head)
			{
				FwRingRec  *r = (FwRingRec *) (fw_ring_data + pos % fw_ring_size);

				if (r->len < FW_REC_MINLEN || r->len % 8 != 0)
					break;
				if (r->state == FW_REC_READY &&
					r->rec.call_id == rec.call_id && r->rec.attempt == rec.attempt &&
					r->rec.outcome != FW_UNKNOWN)
				{
					in_ring = true;
					break;
				}
				pos += r->len;
			}
		}
		if (in_ring)
			nfound++;
		else if (fw_intent_put_recovered(&rec, in->encoding))
		{
			nwritten++;
			if (fw_shared)
				pg_atomic_fetch_add_u64(&fw_shared->records_pushed, 1);
		}
		else
		{
			nlost++;
			if (fw_shared)
				pg_atomic_fetch_add_u64(&fw_shared->records_dropped, 1);
		}
		pg_atomic_write_u32(&in->state, FW_INTENT_FREE);
	}
	if (nlive > 0)
		ereport(LOG,
				(errmsg("fw_tier: %d attempts were in flight when their processes died; %d are logged with outcome 'unknown'",
						nlive, nwritten),
				 errdetail("%d had their record in the call log already; %d could not be logged (ring and spill full); %d intent slots were damaged%s%s.",
						   nfound, nlost, nbad,
						   first_problem ? ": " : "",
						   first_problem ? first_problem : "")));
	if (fw_shared && nbad > 0)
		pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, nbad);
}

/* children inherit the postmaster's mapping; this only sets it up there */
static void
fw_intents_startup(void)
{
	if (IsUnderPostmaster)
	{
		if (fw_intents == NULL)
			fw_intents_map(false);	/* EXEC_BACKEND */
		return;
	}
	if (fw_intents == NULL)
		fw_intents_map(true);
	else
		fw_intents_recover();	/* crash-restart: mapping kept */
}

/*
 * Backend, before the attempt's first byte is sent: claim a slot and fill
 * it with the attempt's 'unknown' record (rec: outcome unknown, worst-case
 * tokens).  Returns the slot, or -1 when every slot is taken (the attempt
 * then goes on without one, with a WARNING once per process).  Costs a CAS, a copy and a
 * CRC over ~800 bytes of the mapping: no lock, no system call, no fsync.
 */
int
fw_intent_begin(const FwCallRecord *rec)
{
	uint32		n = fw_nintents;
	uint32		start;

	if (fw_intents == NULL || n == 0 || MyProc == NULL)
		return -1;
	start = ((uint32) MyProc->pgprocno * FW_INTENTS_PER_BACKEND) % n;
	for (uint32 k = 0; k < n; k++)
	{
		uint32		i = (start + k) % n;
		FwIntent   *in = &fw_intents[i];
		uint32		expected = FW_INTENT_FREE;

		if (pg_atomic_read_u32(&in->state) != FW_INTENT_FREE)
			continue;
		if (!pg_atomic_compare_exchange_u32(&in->state, &expected, FW_INTENT_CLAIMED))
			continue;
		in->owner_pid = MyProcPid;
		in->owner_procno = MyProc->pgprocno;
		in->encoding = GetDatabaseEncoding();
		in->epoch = fw_intent_hdr->epoch;
		in->unused = 0;
		memcpy(&in->rec, rec, sizeof(FwCallRecord));
		memset(in->rec.request_id, 0, sizeof(in->rec.request_id));
		in->rec.outcome = (int8) FW_UNKNOWN;
		in->crc = fw_intent_crc(in);
		pg_write_barrier();
		pg_atomic_write_u32(&in->state, FW_INTENT_LIVE);
		fw_my_live++;
		return (int) i;
	}
	{
		static bool warned = false;

		if (!warned)
			ereport(WARNING,
					(errmsg("fw_tier: no free write-ahead slot for this attempt"),
					 errdetail("All %u slots of \"%s\" are taken; the attempt is sent without one, and a crash before its answer would not log it.",
							   n, FW_INTENT_FILE),
					 errhint("Lower fw_tier.max_concurrency; the slots are %d per possible backend.",
							 FW_INTENTS_PER_BACKEND)));
		warned = true;
	}
	return -1;
}

/*
 * Where the response headers' request id goes, in place (http.c's header
 * callback copies it there): the slot's last byte stays NUL, so a torn
 * write still reads as a string.  NULL for no slot.
 */
char *
fw_intent_request_id(int slot)
{
	if (slot < 0 || (uint32) slot >= fw_nintents)
		return NULL;
	return fw_intents[slot].rec.request_id;
}

/* The attempt's own record is in the ring (or spill): the slot is free. */
void
fw_intent_end(int slot)
{
	if (slot < 0 || (uint32) slot >= fw_nintents)
		return;
	pg_write_barrier();
	pg_atomic_write_u32(&fw_intents[slot].state, FW_INTENT_FREE);
	fw_my_live--;
}

/*
 * Slot i's owner is gone without completing it: write its 'unknown'
 * record and free it.  Runs in the owner itself (an error path that
 * released the transfer without a record) or in the flusher (an owner
 * that exited without its exit callbacks).  A record of the attempt that
 * was pushed before comes first in the log, so the flusher's ON CONFLICT
 * DO NOTHING keeps it: exactly one row.
 */
static void
fw_intent_abandon(uint32 i, bool may_wait)
{
	FwIntent   *in = &fw_intents[i];
	FwCallRecord rec;
	const char *problem;

	if (fw_intent_record(in, &rec, &problem))
		fw_calllog_push_internal(&rec, NULL, NULL, in->encoding, may_wait);
	else
		pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, 1);
	pg_write_barrier();
	pg_atomic_write_u32(&in->state, FW_INTENT_FREE);
}

/*
 * Owner: every slot it still holds is an attempt whose transfer is gone
 * with no record (an abort path; the exit callback): logged as 'unknown'.
 */
void
fw_intents_abandon_mine(void)
{
	if (fw_my_live <= 0 || fw_intents == NULL)
		return;
	for (uint32 i = 0; i < fw_nintents && fw_my_live > 0; i++)
	{
		FwIntent   *in = &fw_intents[i];
		uint32		state = pg_atomic_read_u32(&in->state);

		/* REAPING: the flusher is checking us, alive; it yields to FREE */
		if ((state == FW_INTENT_LIVE || state == FW_INTENT_REAPING) &&
			in->owner_pid == MyProcPid)
		{
			fw_intent_abandon(i, true);
			fw_my_live--;
		}
	}
	fw_my_live = 0;
}

/*
 * Flusher, at most once per FW_INTENT_REAP_MS: a LIVE slot whose owner is
 * gone although no crash-restart happened (it exited without its exit
 * callbacks).  The owner is alive while its PGPROC (owner_procno) still
 * has its pid: PostgreSQL frees a PGPROC only after the before_shmem_exit
 * callbacks, where fw_intents_abandon_mine() ran; a slot of an older epoch
 * survived a restart's recovery (cannot happen; resolved all the same).
 * Never writes a slot whose owner is working on it.
 */
void
fw_intents_reap(void)
{
	static TimestampTz last = 0;
	TimestampTz now = GetCurrentTimestamp();
	uint64		epoch;

	if (fw_intents == NULL || now - last < (int64) FW_INTENT_REAP_MS * 1000)
		return;
	last = now;
	epoch = fw_intent_hdr->epoch;
	for (uint32 i = 0; i < fw_nintents; i++)
	{
		FwIntent   *in = &fw_intents[i];
		uint32		expected = FW_INTENT_LIVE;
		int			procno;
		bool		alive;

		if (pg_atomic_read_u32(&in->state) != FW_INTENT_LIVE)
			continue;

		/*
		 * LIVE -> REAPING first: read without it, the owner could free the
		 * slot and another backend claim and publish it between our reads,
		 * and we would write (and free) a live attempt's slot.  Once
		 * REAPING nobody can claim it and its owner only ever sets it
		 * FREE, so the fields are the current owner's.
		 */
		if (!pg_atomic_compare_exchange_u32(&in->state, &expected, FW_INTENT_REAPING))
			continue;
		procno = in->owner_procno;
		alive = in->epoch == epoch && procno >= 0 &&
			procno < (int) ProcGlobal->allProcCount &&
			ProcGlobal->allProcs[procno].pid == in->owner_pid;
		if (alive)
		{
			/* back to LIVE, unless its owner freed it meanwhile */
			expected = FW_INTENT_REAPING;
			(void) pg_atomic_compare_exchange_u32(&in->state, &expected, FW_INTENT_LIVE);
			continue;
		}
		fw_intent_abandon(i, false);
	}
}

/* with the ring's msync: the intents as of about a second ago */
static void
fw_intents_sync(void)
{
	if (fw_intent_hdr == NULL)
		return;
	if (msync((void *) fw_intent_hdr,
			  FW_INTENT_HDRSZ + (size_t) fw_nintents * sizeof(FwIntent), MS_SYNC) != 0)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not sync file \"%s\": %m", FW_INTENT_FILE)));
}
