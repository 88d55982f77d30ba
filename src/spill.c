/*-------------------------------------------------------------------------
 *
 * spill.c
 *		The call log's overflow: segment files pg_fw_tier/spill.<segment>
 *		that take records when the ring is full and does not drain.
 *
 * A backend appends here when the ring has had no room for a bounded time
 * (calllog.c), or at once when the log is known not to drain.  Once a
 * record is in the spill every new record goes there too, until the
 * flusher has written the whole spill out: the flusher drains the ring
 * first, then the spill, so fw_tier.calls receives the records in the
 * order they were pushed.
 *
 * Records are framed exactly as in the ring (length, state READY, CRC-32C
 * over the record; calllog.c) and appended one after the other.  Positions
 * are logical: segment number * FW_SPILL_SEGSIZE + offset; a record never
 * crosses into the next segment (the writer starts the next segment
 * instead).  Appends happen under ring_lock, so positions, files and the
 * spill_active flag change together; the flusher reads without the lock
 * what lies below spill_write_pos, which only grows.  A fully drained
 * segment is unlinked; when the spill is empty all segments go and the
 * next record starts a new one.  fw_tier.log_spill_limit bounds the bytes
 * held: past it a record is dropped (calllog.c counts and warns).
 *
 * Durability: segments are written with pwrite() and not fsync'ed by the
 * writer (the spill is the degraded path; it must stay cheap).  They
 * survive any process crash; after an operating-system crash a torn or
 * stale record fails its CRC, is counted in records_corrupt, and reading
 * goes on at the next record of the segment that checks out.  After a restart the postmaster finds the segments, the
 * read position in spill.read (written at each advance; without it the
 * oldest segment is read from its start and the rows written twice are
 * absorbed by ON CONFLICT), and makes writers start a fresh segment so no
 * new record follows a torn one.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file_perm.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/lwlock.h"

#include "fw_tier.h"

#define FW_SPILL_DIR		"pg_fw_tier"
#define FW_SPILL_PREFIX		"spill."
#define FW_SPILL_READFILE	"pg_fw_tier/spill.read"
#define FW_DEAD_LETTER_FILE	"pg_fw_tier/dead_letter.jsonl"
#define FW_SPILL_SEGSIZE	((uint64) 16 * 1024 * 1024)

static void
fw_spill_path(char *buf, size_t len, uint64 seg)
{
	snprintf(buf, len, FW_SPILL_DIR "/" FW_SPILL_PREFIX "%016" INT64_MODIFIER "X",
			 seg);
}

/* "spill.<16 hex digits>" -> segment number */
static bool
fw_spill_parse_name(const char *name, uint64 *seg)
{
	const char *p;
	uint64		v = 0;

	if (strncmp(name, FW_SPILL_PREFIX, strlen(FW_SPILL_PREFIX)) != 0)
		return false;
	p = name + strlen(FW_SPILL_PREFIX);
	if (strlen(p) != 16)
		return false;
	for (; *p; p++)
	{
		int			d;

		if (*p >= '0' && *p <= '9')
			d = *p - '0';
		else if (*p >= 'A' && *p <= 'F')
			d = *p - 'A' + 10;
		else
			return false;
		v = v * 16 + d;
	}
	*seg = v;
	return true;
}

/* Count the records of one segment from offset start, by their frames. */
static void
fw_spill_scan_segment(uint64 seg, uint64 start, uint64 *bytes, uint64 *records)
{
	char		path[MAXPGPATH];
	int			fd;
	struct stat st;
	Size		hdr = fw_rec_header_size();
	char	   *buf = palloc(hdr);
	uint64		off = start;

	uint64		fsize;

	fw_spill_path(path, sizeof(path), seg);
	fd = OpenTransientFile(path, O_RDONLY | PG_BINARY);
	if (fd < 0)
	{
		pfree(buf);
		return;
	}
	/* a segment never holds more: anything past is damage, not records */
	fsize = (fstat(fd, &st) == 0) ? Min((uint64) st.st_size, FW_SPILL_SEGSIZE) : 0;
	if (fsize > start)
	{
		*bytes += fsize - start;
		while (off + hdr <= fsize)
		{
			uint32		len;

			if (pread(fd, buf, hdr, (off_t) off) != (ssize_t) hdr)
				break;
			len = fw_rec_len(buf);
			if (len < hdr || len % 8 != 0 || off + len > fsize)
				break;
			(*records)++;
			off += len;
		}
	}
	CloseTransientFile(fd);
	pfree(buf);
}

/*
 * Postmaster, at every start and crash-restart: find what the spill holds.
 * Runs before any other process exists; fw_shared is initialized.
 */
void
fw_spill_startup(void)
{
	DIR		   *dir;
	struct dirent *de;
	bool		any = false;
	uint64		minseg = PG_UINT64_MAX;
	uint64		maxseg = 0;
	uint64		readpos;
	uint64		bytes = 0;
	uint64		records = 0;
	int			fd;

	dir = AllocateDir(FW_SPILL_DIR);
	while ((de = ReadDirExtended(dir, FW_SPILL_DIR, LOG)) != NULL)
	{
		uint64		seg;

		if (!fw_spill_parse_name(de->d_name, &seg))
			continue;
		any = true;
		minseg = Min(minseg, seg);
		maxseg = Max(maxseg, seg);
	}
	FreeDir(dir);

	if (!any)
	{
		fw_shared->spill_read_pos = fw_shared->spill_write_pos = 0;
		fw_shared->spill_active = false;
		/* positions start again at 0: an old read position would lie */
		if (unlink(FW_SPILL_READFILE) < 0 && errno != ENOENT)
			ereport(LOG,
					(errcode_for_file_access(),
					 errmsg("could not remove file \"%s\": %m", FW_SPILL_READFILE)));
		return;
	}

	/* where the flusher had got to, if that is believable */
	readpos = minseg * FW_SPILL_SEGSIZE;
	fd = BasicOpenFile(FW_SPILL_READFILE, O_RDONLY | PG_BINARY);
	if (fd >= 0)
	{
		uint64		saved;

		if (read(fd, &saved, sizeof(saved)) == sizeof(saved) &&
			saved >= minseg * FW_SPILL_SEGSIZE &&
			saved < (maxseg + 1) * FW_SPILL_SEGSIZE && saved % 8 == 0)
			readpos = saved;
		close(fd);
	}

	for (uint64 seg = readpos / FW_SPILL_SEGSIZE; seg <= maxseg; seg++)
		fw_spill_scan_segment(seg, seg == readpos / FW_SPILL_SEGSIZE ?
							  readpos % FW_SPILL_SEGSIZE : 0,
							  &bytes, &records);

	fw_shared->spill_read_pos = readpos;
	/* a fresh segment: nothing new is appended behind a torn record */
	fw_shared->spill_write_pos = (maxseg + 1) * FW_SPILL_SEGSIZE;
	fw_shared->spill_bytes = bytes;
	fw_shared->spill_records = records;
	fw_shared->spill_corrupt_upto = 0;
	fw_shared->spill_active = true;
	ereport(LOG,
			(errmsg("fw_tier: the call-log spill holds " UINT64_FORMAT " records (" UINT64_FORMAT " bytes) not yet written to fw_tier.calls",
					records, bytes)));
}

/*
 * Backend, ring_lock held exclusively: append one framed record.  No
 * ereport(ERROR) here; false with *why (and *save_errno for an I/O error)
 * when the record could not be kept.
 */
bool
fw_spill_append_locked(const char *buf, uint32 len, const char **why,
					   int *save_errno)
{
	uint64		pos = fw_shared->spill_write_pos;
	char		path[MAXPGPATH];
	int			fd;
	ssize_t		wrote;

	*save_errno = 0;
	if (fw_shared->spill_bytes + len > (uint64) fw_log_spill_limit_kb * 1024)
	{
		*why = fw_log_spill_limit_kb == 0 ?
			"the spill is disabled (fw_tier.log_spill_limit = 0)" :
			"the spill is full (fw_tier.log_spill_limit)";
		return false;
	}
	if (pos % FW_SPILL_SEGSIZE + len > FW_SPILL_SEGSIZE)
		pos = (pos / FW_SPILL_SEGSIZE + 1) * FW_SPILL_SEGSIZE;

	fw_spill_path(path, sizeof(path), pos / FW_SPILL_SEGSIZE);
	fd = BasicOpenFilePerm(path, O_WRONLY | O_CREAT | PG_BINARY,
						   pg_file_create_mode);
	if (fd < 0)
	{
		*save_errno = errno;
		*why = "the spill file could not be opened";
		return false;
	}
	wrote = pwrite(fd, buf, len, (off_t) (pos % FW_SPILL_SEGSIZE));
	if (wrote != (ssize_t) len)
	{
		*save_errno = (wrote < 0) ? errno : ENOSPC;
		close(fd);
		/* a partial record past spill_write_pos is overwritten later */
		*why = "the spill file could not be written";
		return false;
	}
	close(fd);

	fw_shared->spill_write_pos = pos + len;
	fw_shared->spill_bytes += len;
	fw_shared->spill_records++;
	fw_shared->spill_active = true;
	return true;
}

bool
fw_spill_pending(void)
{
	bool		pending;

	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	pending = fw_shared->spill_active &&
		fw_shared->spill_read_pos < fw_shared->spill_write_pos;
	LWLockRelease(fw_shared->ring_lock);
	return pending;
}

void
fw_spill_usage(uint64 *bytes, uint64 *records)
{
	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	*bytes = fw_shared->spill_bytes;
	*records = fw_shared->spill_records;
	LWLockRelease(fw_shared->ring_lock);
}

/*
 * Bytes from the damaged record at off to the next record of the segment
 * that checks out (8-byte-aligned positions, CRC and every field), or to
 * the end of the segment.  Reads the rest of the segment once.
 */
static uint64
fw_spill_resync(int fd, uint64 off, uint64 fsize)
{
	uint64		rest = fsize - off;	/* fsize <= FW_SPILL_SEGSIZE */
	char	   *buf;
	uint64		p;

	Assert(fsize <= FW_SPILL_SEGSIZE && off < fsize);
	buf = palloc(rest);

	if (pread(fd, buf, rest, (off_t) off) != (ssize_t) rest)
	{
		pfree(buf);
		return rest;
	}
	for (p = 8; p + fw_rec_header_size() <= rest; p += 8)
		if (fw_rec_check(buf + p, rest - p) == NULL)
			break;
	pfree(buf);
	return (p + fw_rec_header_size() <= rest) ? p : rest;
}

/*
 * Flusher: copy out up to max records from the read position, in order;
 * -1 when nothing could be consumed.  *end_pos is where the read position
 * goes once they are committed, *bytes the spill bytes that frees.  Every
 * record is checked (fw_rec_check) before use; a damaged one is skipped up
 * to the next good one, counted once (spill_corrupt_upto) even when the
 * batch is read again after a failed insert.
 */
/* the flusher's open segment: a static, so PG_FINALLY can close it */
static int	fw_spill_fd = -1;

int
fw_spill_read(FwDrainedRecord *out, int max, uint64 *end_pos, uint64 *bytes)
{
	uint64		pos;
	uint64		write_pos;
	uint64		counted_upto;
	uint64		cur_seg = PG_UINT64_MAX;
	uint64		fsize = 0;
	Size		hdr = fw_rec_header_size();
	char	   *buf = palloc(fw_rec_max_size());
	int			n = 0;
	int			corrupt = 0;
	uint64		start;
	uint64		skip;
	uint64		seg_end = 0;
	bool		oversize = false;

	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	pos = fw_shared->spill_read_pos;
	write_pos = fw_shared->spill_write_pos;
	counted_upto = fw_shared->spill_corrupt_upto;
	LWLockRelease(fw_shared->ring_lock);
	start = pos;
	*bytes = 0;

	/* the descriptor is closed on every path, an error's included */
	PG_TRY();
	{
		for (;;)
		{
			uint64		seg;
			uint64		off;
			uint64		avail;
			ssize_t		got;
			const char *problem;

			/*
			 * Reading has reached the end of a segment whose file is
			 * larger than a segment: the excess is damage, reported and
			 * counted once (a batch read again does not pass
			 * spill_corrupt_upto).
			 */
			if (oversize && pos == (cur_seg + 1) * FW_SPILL_SEGSIZE)
			{
				oversize = false;
				if (pos > counted_upto)
				{
					corrupt++;
					ereport(WARNING,
							(errcode(ERRCODE_DATA_CORRUPTED),
							 errmsg("fw_tier flusher: call-log spill segment %016" INT64_MODIFIER "X is larger than " UINT64_FORMAT " bytes",
									cur_seg, FW_SPILL_SEGSIZE),
							 errdetail("The bytes past that size are damage and are skipped."),
							 errhint("Counted in fw_tier.log_status.records_corrupt.")));
				}
			}
			if (pos >= write_pos || n >= max)
				break;
			seg = pos / FW_SPILL_SEGSIZE;
			off = pos % FW_SPILL_SEGSIZE;

			if (seg != cur_seg)
			{
				char		path[MAXPGPATH];
				struct stat st;

				if (fw_spill_fd >= 0)
					CloseTransientFile(fw_spill_fd);
				fw_spill_fd = -1;
				cur_seg = seg;

				/*
				 * Where reading this segment ends: its end, or in the segment
				 * still being written the spill_write_pos taken above.  Bytes
				 * past it are records appended since (or a failed append's
				 * leftovers): never read, never skipped as damage.
				 */
				seg_end = Min((seg + 1) * FW_SPILL_SEGSIZE, write_pos);
				fw_spill_path(path, sizeof(path), seg);
				/* transient: released at abort, whatever raises below */
				fw_spill_fd = OpenTransientFile(path, O_RDONLY | PG_BINARY);
				if (fw_spill_fd < 0 && errno != ENOENT)
					ereport(ERROR,
							(errcode_for_file_access(),
							 errmsg("fw_tier flusher: could not open file \"%s\": %m", path),
							 errdetail("The call-log spill cannot be drained; its records are kept.")));
				fsize = 0;
				oversize = false;
				if (fw_spill_fd >= 0 && fstat(fw_spill_fd, &st) == 0)
				{
					fsize = (uint64) st.st_size;
					/* a segment is never larger: the excess is damage */
					if (fsize > FW_SPILL_SEGSIZE)
					{
						oversize = true;
						fsize = FW_SPILL_SEGSIZE;
					}
				}
				fsize = Min(fsize, seg_end - seg * FW_SPILL_SEGSIZE);
			}
			if (off >= fsize)
			{
				/* this segment is done (or gone, or cut short): the next one */
				pos = seg_end;
				continue;
			}
			avail = Min(fsize - off, (uint64) fw_rec_max_size());
			got = pread(fw_spill_fd, buf, (size_t) Min(avail, (uint64) hdr), (off_t) off);
			if (got == (ssize_t) hdr && fw_rec_len(buf) >= hdr &&
				fw_rec_len(buf) <= avail)
			{
				uint32		len = fw_rec_len(buf);

				got = pread(fw_spill_fd, buf + hdr, len - hdr, (off_t) (off + hdr));
				if (got == (ssize_t) (len - hdr))
					got = len;
				else
					got = hdr;
			}
			problem = (got < (ssize_t) hdr) ? "it is cut short" :
				fw_rec_check(buf, (uint64) got);
			if (problem == NULL)
			{
				uint32		len = fw_rec_len(buf);

				fw_rec_to_drained(buf, &out[n]);
				n++;
				pos += len;
				*bytes += len;
				continue;
			}

			/* damaged: go on at the next record of the segment that checks out */
			skip = fw_spill_resync(fw_spill_fd, off, fsize);
			if (pos >= counted_upto)
			{
				corrupt++;
				ereport(WARNING,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("fw_tier flusher: damaged record in call-log spill segment %016" INT64_MODIFIER "X at offset " UINT64_FORMAT,
								seg, off),
						 errdetail("It was damaged because %s; " UINT64_FORMAT " bytes are skipped.",
								   problem, skip),
						 errhint("Counted in fw_tier.log_status.records_corrupt.")));
			}
			/* fsize <= seg_end - segment start: never past spill_write_pos */
			*bytes += skip;
			pos += skip;
			if (off + skip >= fsize)
				pos = seg_end;
		}
	}
	PG_FINALLY();
	{
		if (fw_spill_fd >= 0)
			CloseTransientFile(fw_spill_fd);
		fw_spill_fd = -1;
	}
	PG_END_TRY();
	pfree(buf);

	if (corrupt > 0)
	{
		pg_atomic_fetch_add_u64(&fw_shared->records_corrupt, corrupt);
		LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
		fw_shared->spill_corrupt_upto = Max(fw_shared->spill_corrupt_upto, pos);
		LWLockRelease(fw_shared->ring_lock);
	}
	*end_pos = pos;
	return (pos == start) ? -1 : n;
}

/*
 * Flusher, after COMMIT: the records below end_pos are in the table.
 * Unlink the segments left behind; an empty spill lets writers use the
 * ring again.
 */
void
fw_spill_advance(uint64 end_pos, int nrecords, uint64 bytes)
{
	uint64		old_seg;
	uint64		new_seg;
	uint64		read_pos;
	char		path[MAXPGPATH];
	int			fd;

	LWLockAcquire(fw_shared->ring_lock, LW_EXCLUSIVE);
	old_seg = fw_shared->spill_read_pos / FW_SPILL_SEGSIZE;
	if (end_pos > fw_shared->spill_read_pos)
		fw_shared->spill_read_pos = end_pos;
	if (fw_shared->spill_read_pos > fw_shared->spill_write_pos)
	{
		/* skipped damage reached into the write segment: start afresh */
		fw_shared->spill_write_pos = fw_shared->spill_read_pos;
	}
	fw_shared->spill_bytes -= Min(bytes, fw_shared->spill_bytes);
	fw_shared->spill_records -= Min((uint64) nrecords, fw_shared->spill_records);
	if (fw_shared->spill_read_pos == fw_shared->spill_write_pos)
	{
		/* empty: every segment goes, the next record starts a new one */
		uint64		last = (fw_shared->spill_write_pos - 1) / FW_SPILL_SEGSIZE;

		if (fw_shared->spill_write_pos % FW_SPILL_SEGSIZE != 0)
			fw_shared->spill_write_pos = (last + 1) * FW_SPILL_SEGSIZE;
		fw_shared->spill_read_pos = fw_shared->spill_write_pos;
		fw_shared->spill_bytes = 0;
		fw_shared->spill_records = 0;
		fw_shared->spill_active = false;
		new_seg = last + 1;
	}
	else
		new_seg = fw_shared->spill_read_pos / FW_SPILL_SEGSIZE;
	read_pos = fw_shared->spill_read_pos;

	/* under the lock: a writer must not re-create a segment being unlinked */
	for (uint64 seg = old_seg; seg < new_seg; seg++)
	{
		fw_spill_path(path, sizeof(path), seg);
		if (unlink(path) < 0 && errno != ENOENT)
			ereport(WARNING,
					(errcode_for_file_access(),
					 errmsg("could not remove file \"%s\": %m", path)));
	}
	LWLockRelease(fw_shared->ring_lock);

	fd = BasicOpenFilePerm(FW_SPILL_READFILE, O_WRONLY | O_CREAT | PG_BINARY,
						   pg_file_create_mode);
	if (fd >= 0)
	{
		if (pwrite(fd, &read_pos, sizeof(read_pos), 0) != sizeof(read_pos))
			ereport(LOG,
					(errcode_for_file_access(),
					 errmsg("could not write file \"%s\": %m", FW_SPILL_READFILE)));
		close(fd);
	}

	pg_atomic_fetch_add_u64(&fw_shared->records_flushed, nrecords);
	ConditionVariableBroadcast(&fw_shared->ring_flushed_cv);
}

/*
 * Flusher: the last resort for a row neither fw_tier.calls nor
 * fw_tier.calls_dead_letter accepted: one JSON line appended to
 * pg_fw_tier/dead_letter.jsonl (fsync'ed: this is the only copy).
 */
void
fw_dead_letter_file(const char *line)
{
	int			fd;
	size_t		len = strlen(line);

	fd = BasicOpenFilePerm(FW_DEAD_LETTER_FILE,
						   O_WRONLY | O_CREAT | O_APPEND | PG_BINARY,
						   pg_file_create_mode);
	if (fd < 0 ||
		write(fd, line, len) != (ssize_t) len ||
		write(fd, "\n", 1) != 1 ||
		pg_fsync(fd) != 0)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("fw_tier flusher: could not write file \"%s\": %m",
						FW_DEAD_LETTER_FILE),
				 errdetail("The call-log record was: %s", line)));
	if (fd >= 0)
		close(fd);
}
