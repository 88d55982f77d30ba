/*-------------------------------------------------------------------------
 *
 * shipper.c
 *		A hot standby's call log, shipped to the primary (issue 11): the
 *		"fw_tier shipper" worker, the libpq connection it uses
 *		(fw_tier.log_conninfo), and fw_tier.ingest_calls(), the function
 *		on the primary that writes what it receives.
 *
 * A standby cannot write fw_tier.calls.  Its backends push records into
 * their ring (and spill) as on a primary; on a standby the launcher
 * (launcher.c, fw_shipper_launch) starts this worker instead of a
 * flusher.  It connects to the primary over libpq and, batch by batch:
 *	1. reads up to FW_BATCH_MAX records from the ring's tail (the spill
 *	   once the ring is empty), as the flusher does;
 *	2. frames them again as ring records with their CRC (fw_rec_frame)
 *	   behind a small header, and calls fw_tier.ingest_calls(origin_sysid,
 *	   origin_node, records) on the primary, which checks every byte and
 *	   writes them with the flusher's own insert path (loginsert.c),
 *	   ON CONFLICT DO NOTHING on the full key, origin included;
 *	3. asks the primary for pg_current_wal_insert_lsn(): the statement of
 *	   step 2 has committed, so this is at or after its commit record;
 *	4. waits until this standby has replayed that far
 *	   (GetXLogReplayRecPtr) and only then moves the tail.  The wait has
 *	   no time bound (replay may be delayed or paused on purpose) and the
 *	   acknowledged batch is never sent again meanwhile (fw_acked): the
 *	   main loop naps and checks, doing its other jobs in between.  The
 *	   next batch is read once this one is freed (no send-ahead: the
 *	   tail could not move past an unreplayed batch anyway).
 * Exactly once: a batch is freed only once its rows are in the primary's
 * table and in this standby's own copy of it.  A cut between 2 and 4, a
 * crash, a restart: the records are still at the tail and are sent again;
 * the key (origin_sysid, origin_node, call_id, attempt) makes the second
 * insert a no-op.  A promotion between 2 and 4: what the standby had not
 * replayed is not in its table, and it still holds the records, which its
 * own flusher then writes (launcher.c switches at the end of recovery).
 * So after a failover nothing freed is missing on the new primary.
 *
 * The LSN is only meaningful for the WAL stream this standby replays:
 * fw_tier.log_conninfo must reach its primary (a cascaded standby: the
 * primary at the top, not its upstream, which cannot write).  The
 * shipper checks that the server it reaches has this standby's system
 * identifier.
 *
 * While the primary cannot be reached (or refuses) records wait in the
 * ring, then the spill, bounded as on a primary (fw_tier.log_spill_limit);
 * the call path never waits for the shipper (calllog.c does not let a
 * writer wait during recovery).  drain_state in fw_tier.log_status says
 * "standby" while shipping works and "standby: <why>" when it does not.
 * Reconnects back off from FW_SHIP_BACKOFF_MIN_MS to FW_SHIP_BACKOFF_MAX_MS.
 * Every wait (connect, send, result) is on the latch and the socket,
 * bounded in time; the replay wait is a nap of the main loop; all end at
 * SIGTERM or promotion.
 *
 * The connection: fw_tier.log_conninfo (superuser-only, SIGHUP); empty
 * means primary_conninfo with dbname = fw_tier.database.  On the primary
 * the role it logs in as needs EXECUTE on fw_tier.ingest_calls, granted to
 * nobody by default (README "Read replicas").  The search path of the
 * session is emptied first (what the replication clients do), and its
 * lock_timeout and statement_timeout set below the shipper's own wait.
 *
 * fw_tier.ingest_calls is a trust boundary: whoever may execute it may
 * write call-log rows, and the bytes it receives are checked as a damaged
 * ring file is (fw_rec_check: lengths, CRC, enums, terminated strings),
 * plus the batch header (magic, wire version, record layout, the
 * sender's node id), the record count (1 to FW_BATCH_MAX), the total
 * size, and the origin (a valid node name; never this server's own
 * identity, whose keys its flusher uses; one node id per name, as
 * fw_tier.origin_nodes remembers it).  Ranges of the record's counts and
 * status are fw_rec_check's; more cached than prompt tokens is capped.
 *
 * The shipper is connected to fw_tier.database (read-only there, in
 * recovery) for one more job of the flusher's: a budget's spend rebuilt
 * from fw_tier.calls (spend.c).  The shipped rows come back by
 * replication before the tail moves, so "the records before the slot
 * have landed" means the same on a standby.
 *
 * Locking: no LWLock of its own; the ring and spill functions take
 * ring_lock inside.  fw_shared->flusher_latch names the shipper while it
 * runs (the launcher passes wakeups on), worker_pid too.
 *
 * Called by: launcher.c (fw_shipper_launch, in the launcher); the
 * postmaster (fw_shipper_main, a dynamic worker); SQL on the primary
 * (fw_tier.ingest_calls); fw_tier.c (fw_shipper_define_gucs).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "access/xlogrecovery.h"
#include "catalog/pg_type.h"
#include "common/string.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "libpq-fe.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "spend.h"
#include "worker.h"

#define FW_SHIP_MAGIC			0x46575348	/* "FWSH" */
#define FW_SHIP_VERSION			2	/* 2: the node id in the header */
#define FW_SHIP_HDRSZ			(16 + FW_NODELEN)	/* records start 8-byte aligned */
#define FW_SHIP_BACKOFF_MIN_MS	100
#define FW_SHIP_BACKOFF_MAX_MS	10000
#define FW_SHIP_CONNECT_MS		10000	/* connect, send, one result */
#define FW_SHIP_QUERY_MS		60000
#define FW_SHIP_REPLAY_MS		30000	/* then log_status says we wait */
#define FW_SHIPPER_IDLE_MS		5000	/* then the shipper leaves */

/* the batch header, in the byte order of both ends (physical replicas) */
typedef struct FwShipHeader
{
	uint32		magic;
	uint16		version;
	uint16		unused;
	uint32		rec_header_size;	/* fw_rec_header_size(): layout check */
	uint32		nrecords;
	char		node_id[FW_NODELEN];	/* the sender's node file id */
} FwShipHeader;

StaticAssertDecl(sizeof(FwShipHeader) == FW_SHIP_HDRSZ &&
				 FW_SHIP_HDRSZ % 8 == 0,
				 "the shipping header keeps the records aligned");

char	   *fw_log_conninfo = NULL;

/* the shipper's state (process-local) */
static PGconn *fw_conn = NULL;
static char *fw_conn_for = NULL;	/* fw_tier.log_conninfo it was made for */
static MemoryContext fw_ship_cxt = NULL;
static MemoryContext fw_ship_batch_cxt = NULL;
static FwDrainedRecord *fw_ship_recs = NULL;

/*
 * The batch the primary has committed, kept until this standby has
 * replayed its commit (lsn): never sent again meanwhile, however long
 * replay takes (recovery_min_apply_delay, a conflicting query with
 * max_standby_streaming_delay = -1, pg_wal_replay_pause()).  A newer LSN
 * taken for a resend would only move the target further away.
 */
static struct
{
	bool		valid;
	bool		from_spill;
	int			nrecords;
	uint64		end_pos;
	uint64		spill_bytes;
	XLogRecPtr	lsn;
	TimeLineID	tli;			/* the primary's, when it said lsn */
	TimestampTz since;
	long		nap_ms;			/* the main loop's next nap: 1 ms, 2, ... 50 */
} fw_acked;

/* the conninfo in effect: fw_tier.log_conninfo, else primary_conninfo */
static const char *
fw_ship_conninfo(void)
{
	if (fw_log_conninfo && fw_log_conninfo[0])
		return fw_log_conninfo;
	return PrimaryConnInfo ? PrimaryConnInfo : "";
}

void
fw_shipper_define_gucs(void)
{
	DefineCustomStringVariable("fw_tier.log_conninfo",
							   "Connection string a standby ships its call log to (superuser only).",
							   "Empty: primary_conninfo with dbname = fw_tier.database.",
							   &fw_log_conninfo, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);
}

/* ---- the primary's side: fw_tier.ingest_calls ---- */

static void
fw_ingest_refuse(const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
			 errmsg("fw_tier.ingest_calls: the batch is not valid"),
			 errdetail("%s", detail)));
}

/*
 * One node id per (origin_sysid, origin_node): the first server that
 * ships under a name owns it (fw_tier.origin_nodes).  Another server
 * under the same name (a second standby given the same fw_tier.node_name,
 * a standby rebuilt under its predecessor's name) would have its rows
 * that share a key with the first's silently dropped by ON CONFLICT DO
 * NOTHING: refused instead (42710).  Inside the caller's SPI connection.
 */
static void
fw_ingest_check_node(int64 sysid, const char *node, const char *node_id)
{
	Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
	Datum		args[3];
	int			ret;
	bool		isnull;
	char	   *owner;

	args[0] = Int64GetDatum(sysid);
	args[1] = CStringGetTextDatum(node);
	args[2] = CStringGetTextDatum(node_id);
	ret = SPI_execute_with_args("INSERT INTO fw_tier.origin_nodes (origin_sysid, origin_node, node_id)"
								" VALUES ($1, $2, $3)"
								" ON CONFLICT (origin_sysid, origin_node) DO NOTHING",
								3, types, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "fw_tier.ingest_calls: recording the origin failed: %s",
			 SPI_result_code_string(ret));
	ret = SPI_execute_with_args("SELECT node_id FROM fw_tier.origin_nodes"
								" WHERE origin_sysid OPERATOR(pg_catalog.=) $1"
								"   AND origin_node OPERATOR(pg_catalog.=) $2",
								2, types, args, NULL, false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "fw_tier.ingest_calls: reading the origin failed: %s",
			 SPI_result_code_string(ret));
	owner = TextDatumGetCString(SPI_getbinval(SPI_tuptable->vals[0],
											  SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull || strcmp(owner, node_id) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("fw_tier.ingest_calls: the origin \"%s\" belongs to another server",
						node),
				 errdetail("Node \"%s\" first shipped under this name; this batch comes from node \"%s\".",
						   isnull ? "" : owner, node_id),
				 errhint("Give each server its own fw_tier.node_name, or leave it empty.  A server rebuilt under its predecessor's name: DELETE its row from fw_tier.origin_nodes once the old one is gone.")));
}

/*
 * fw_tier.ingest_calls(origin_sysid bigint, origin_node text, records
 * bytea) RETURNS bigint: the rows inserted (a batch sent again inserts
 * none).  SECURITY DEFINER, EXECUTE granted to nobody by default.
 */
PG_FUNCTION_INFO_V1(fw_tier_ingest_calls);
Datum
fw_tier_ingest_calls(PG_FUNCTION_ARGS)
{
	int64		sysid = PG_GETARG_INT64(0);
	text	   *node_t = PG_GETARG_TEXT_PP(1);
	bytea	   *recs = PG_GETARG_BYTEA_PP(2);
	Size		len = VARSIZE_ANY_EXHDR(recs);
	char	   *node;
	char	   *buf;
	FwShipHeader hdr;
	FwDrainedRecord *batch;
	Size		pos;
	uint64		rows = 0;

	fw_require_preload();
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("fw_tier.ingest_calls cannot run on a standby"),
				 errhint("Point fw_tier.log_conninfo of the shipping standby at the primary.")));

	if (VARSIZE_ANY_EXHDR(node_t) == 0 || VARSIZE_ANY_EXHDR(node_t) >= FW_NODELEN)
		fw_ingest_refuse("The origin node name is empty or too long.");
	node = text_to_cstring(node_t);
	if (!fw_origin_name_ok(node))
		fw_ingest_refuse("The origin node name is not printable ASCII.");
	if (sysid == fw_origin_sysid() && strcmp(node, fw_origin_node_name()) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("fw_tier.ingest_calls: the records' origin \"%s\" is this server's own identity",
						node),
				 errdetail("Rows with this server's origin are its own flusher's; a standby's rows need a node name of their own."),
				 errhint("Leave fw_tier.node_name empty on the standby (its generated id is its own), or give it a name of its own.")));

	if (len < FW_SHIP_HDRSZ)
		fw_ingest_refuse("It is shorter than its header.");
	if (len > FW_SHIP_HDRSZ + (Size) FW_BATCH_MAX * fw_rec_max_size())
		fw_ingest_refuse("It is larger than the largest batch.");
	memcpy(&hdr, VARDATA_ANY(recs), FW_SHIP_HDRSZ);
	if (hdr.magic != FW_SHIP_MAGIC)
		fw_ingest_refuse("Its magic number is wrong (not a shipped batch, or another byte order).");
	if (hdr.version != FW_SHIP_VERSION || hdr.rec_header_size != fw_rec_header_size())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
				 errmsg("fw_tier.ingest_calls: the batch is from another version of fw_tier"),
				 errdetail("Wire version %u, record header %u bytes; this library reads version %d, %u bytes.",
						   (unsigned) hdr.version, hdr.rec_header_size,
						   FW_SHIP_VERSION, (unsigned) fw_rec_header_size()),
				 errhint("Run the same fw_tier library on the primary and its standbys.")));
	if (hdr.nrecords < 1 || hdr.nrecords > FW_BATCH_MAX)
		fw_ingest_refuse("Its record count is out of range.");
	if (strnlen(hdr.node_id, FW_NODELEN) >= FW_NODELEN ||
		!fw_origin_name_ok(hdr.node_id))
		fw_ingest_refuse("Its node id is not a valid node name.");

	/* aligned for the record structs */
	buf = palloc(len);
	memcpy(buf, VARDATA_ANY(recs), len);
	batch = palloc0(sizeof(FwDrainedRecord) * hdr.nrecords);
	pos = FW_SHIP_HDRSZ;
	for (uint32 i = 0; i < hdr.nrecords; i++)
	{
		const char *problem;

		if (pos >= len)
			fw_ingest_refuse("It holds fewer records than its header says.");
		problem = fw_rec_check(buf + pos, len - pos);
		if (problem)
			fw_ingest_refuse(psprintf("Record %u: %s.", i + 1, problem));
		fw_rec_to_drained(buf + pos, &batch[i]);
		/*
		 * More cached tokens than prompt tokens would cost less than
		 * nothing: capped, not refused (an API answer can say so, and a
		 * refused batch would stop the standby's shipping for good)
		 */
		if (batch[i].rec.prompt_tokens >= 0 &&
			batch[i].rec.cached_prompt_tokens > batch[i].rec.prompt_tokens)
			batch[i].rec.cached_prompt_tokens = batch[i].rec.prompt_tokens;
		pos += fw_rec_len(buf + pos);
	}
	if (pos != len)
		fw_ingest_refuse("It has bytes after its last record.");

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	fw_ingest_check_node(sysid, node, hdr.node_id);
	fw_loginsert_set_origin(sysid, node);
	PG_TRY();
	{
		rows = fw_loginsert_batch(batch, hdr.nrecords, false);
	}
	PG_FINALLY();
	{
		fw_loginsert_set_origin(0, NULL);
	}
	PG_END_TRY();
	SPI_finish();
	PG_RETURN_INT64((int64) rows);
}

/* ---- the standby's side: the launcher starts the shipper ---- */

/*
 * Launcher, on a standby (or with a shipper still running after a
 * promotion): start a shipper when records wait.  Returns the launcher's
 * next deadline (it polls for the end of recovery), 0 once promoted with
 * no shipper left: the launcher goes on as on a primary.
 */
TimestampTz
fw_shipper_launch(BackgroundWorkerHandle **handle, TimestampTz now)
{
	bool		running = false;

	if (*handle != NULL)
	{
		pid_t		pid;
		BgwHandleStatus status = GetBackgroundWorkerPid(*handle, &pid);

		if (status == BGWH_STARTED || status == BGWH_NOT_YET_STARTED)
			running = true;
		else
		{
			pfree(*handle);
			*handle = NULL;
		}
	}
	if (running)
	{
		Latch	   *latch = fw_shared->flusher_latch;

		if (latch != NULL)
			SetLatch(latch);
		return now + (int64) 1000 * 1000;
	}
	if (!RecoveryInProgress())
		return 0;				/* promoted: the flusher's turn */

	pg_atomic_write_u32(&fw_shared->worker_pid, (uint32) MyProcPid);
	if (fw_calllog_pending() || fw_spill_pending() || fw_spend_worker_pending())
	{
		BackgroundWorker worker;

		if (!fw_launcher_database_ok())
		{
			char		state[FW_ERRLEN];

			snprintf(state, sizeof(state),
					 "standby: database \"%s\" cannot be connected to (fw_tier.database)",
					 fw_database);
			fw_set_drain_state(state);
			return now + (int64) 1000 * 1000;
		}

		fw_worker_describe(&worker, "fw_shipper_main", "fw_tier shipper",
						   BGW_NEVER_RESTART, MyProcPid);
		worker.bgw_start_time = BgWorkerStart_ConsistentState;
		if (!RegisterDynamicBackgroundWorker(&worker, handle))
		{
			*handle = NULL;
			fw_set_drain_state("standby: no background worker slot for the shipper");
		}
	}
	return now + (int64) 1000 * 1000;
}

/* ---- the shipper ---- */

static void
fw_shipper_detach(int code, Datum arg)
{
	if (fw_conn)
	{
		PQfinish(fw_conn);
		fw_conn = NULL;
	}
	if (fw_shared == NULL)
		return;
	fw_shared->flusher_latch = NULL;
	pg_atomic_write_u32(&fw_shared->worker_pid,
						pg_atomic_read_u32(&fw_shared->launcher_pid));
}

/*
 * drain_state: "standby" (what == NULL: shipping works), else "standby:
 * <what>": a fixed phrase, plus the SQLSTATE when the primary sent one
 * (fw_ship_state_res).  libpq's own text (msg) goes to the server log
 * only, as the walreceiver's does: it may echo the connection string,
 * password included, and fw_tier.log_status is readable by PUBLIC.
 * Logged when the state changes.
 */
static void
fw_ship_state(const char *what, const char *msg)
{
	char		state[FW_ERRLEN];
	char		prev[FW_ERRLEN];

	if (what == NULL)
		strlcpy(state, "standby", sizeof(state));
	else
		snprintf(state, sizeof(state), "standby: %s", what);
	fw_get_drain_state(prev, sizeof(prev));
	if (strcmp(prev, state) != 0)
	{
		if (what == NULL)
			ereport(LOG,
					(errmsg("fw_tier shipper: shipping the call log to the primary")));
		else if (msg && msg[0])
			ereport(LOG,
					(errmsg("fw_tier shipper: %s", what),
					 errdetail_internal("%s", msg),
					 errhint("Call-log records wait in the ring and the spill; the shipper tries again.")));
		else
			ereport(LOG,
					(errmsg("fw_tier shipper: %s", what),
					 errhint("Call-log records wait in the ring and the spill; the shipper tries again.")));
		fw_set_drain_state(state);
	}
}

/* the same for an error result: the SQLSTATE is shown, the text logged */
static void
fw_ship_state_res(const char *what, const PGresult *res)
{
	const char *code = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	char		buf[FW_ERRLEN];
	bool		ok = code != NULL && strlen(code) == 5;

	for (int i = 0; ok && i < 5; i++)
		ok = (code[i] >= '0' && code[i] <= '9') || (code[i] >= 'A' && code[i] <= 'Z');
	if (ok)
		snprintf(buf, sizeof(buf), "%s (SQLSTATE %s)", what, code);
	else
		strlcpy(buf, what, sizeof(buf));
	fw_ship_state(buf, res ? PQresultErrorMessage(res) : NULL);
}

static void
fw_ship_disconnect(void)
{
	if (fw_conn)
		PQfinish(fw_conn);
	fw_conn = NULL;
}

/*
 * Wait on the latch and the connection's socket until the socket is ready
 * for io (WL_SOCKET_READABLE / WRITEABLE) or the deadline passes.  false
 * at the deadline, at SIGTERM and at promotion (the caller gives up).
 */
static bool
fw_ship_wait_socket(int io, TimestampTz deadline)
{
	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		int			rc;

		CHECK_FOR_INTERRUPTS();
		if (ShutdownRequestPending || !RecoveryInProgress() || now >= deadline ||
			PQsocket(fw_conn) < 0)
			return false;
		rc = WaitLatchOrSocket(MyLatch,
							   WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH | io,
							   PQsocket(fw_conn),
							   Min(fw_ms_until(deadline, now), 1000),
							   PG_WAIT_EXTENSION);
		if (rc & WL_LATCH_SET)
			ResetLatch(MyLatch);
		if (rc & io)
			return true;
	}
}

/* the conninfo: fw_tier.log_conninfo, else primary_conninfo + dbname */
static bool
fw_ship_connect(void)
{
	const char **k;
	const char **v;
	int			n = 0;
	PQconninfoOption *opts = NULL;
	char	   *err = NULL;
	TimestampTz deadline;

	if (fw_log_conninfo && fw_log_conninfo[0])
	{
		opts = PQconninfoParse(fw_log_conninfo, &err);
		if (opts == NULL)
		{
			fw_ship_state("fw_tier.log_conninfo is not valid", err);
			PQfreemem(err);
			return false;
		}
	}
	else if (PrimaryConnInfo && PrimaryConnInfo[0])
	{
		opts = PQconninfoParse(PrimaryConnInfo, &err);
		if (opts == NULL)
		{
			fw_ship_state("primary_conninfo is not valid", err);
			PQfreemem(err);
			return false;
		}
	}
	else
	{
		fw_ship_state("nowhere to ship: fw_tier.log_conninfo and primary_conninfo are empty", NULL);
		return false;
	}

	for (PQconninfoOption *o = opts; o->keyword; o++)
		n++;
	k = palloc0(sizeof(char *) * (n + 4));
	v = palloc0(sizeof(char *) * (n + 4));
	n = 0;
	for (PQconninfoOption *o = opts; o->keyword; o++)
	{
		if (o->val == NULL || o->val[0] == '\0')
			continue;
		/* a walreceiver's primary_conninfo may say replication: not here */
		if (strcmp(o->keyword, "replication") == 0)
			continue;
		if (strcmp(o->keyword, "dbname") == 0 && !(fw_log_conninfo && fw_log_conninfo[0]))
			continue;
		k[n] = o->keyword;
		v[n] = o->val;
		n++;
	}
	if (!(fw_log_conninfo && fw_log_conninfo[0]))
	{
		k[n] = "dbname";
		v[n] = fw_database;
		n++;
	}
	/*
	 * last, so it wins over an application_name of primary_conninfo (the
	 * walreceiver's, e.g. for synchronous_standby_names): the primary's
	 * pg_stat_activity must tell the shipper from the walreceiver
	 */
	k[n] = "application_name";
	v[n] = "fw_tier shipper";
	n++;
	fw_conn = PQconnectStartParams(k, v, false);
	PQconninfoFree(opts);
	pfree(k);
	pfree(v);
	if (fw_conn == NULL)
	{
		fw_ship_state("could not connect to the primary (out of memory)", NULL);
		return false;
	}
	deadline = GetCurrentTimestamp() + (int64) FW_SHIP_CONNECT_MS * 1000;
	for (;;)
	{
		PostgresPollingStatusType st = PQconnectPoll(fw_conn);

		if (st == PGRES_POLLING_OK)
			break;
		if (st == PGRES_POLLING_FAILED ||
			!fw_ship_wait_socket(st == PGRES_POLLING_READING ?
								 WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE,
								 deadline))
		{
			if (st == PGRES_POLLING_FAILED)
				fw_ship_state("could not connect to the primary",
							  PQerrorMessage(fw_conn));
			else if (!ShutdownRequestPending && RecoveryInProgress())
				fw_ship_state("could not connect to the primary (timeout)", NULL);
			fw_ship_disconnect();
			return false;
		}
	}
	if (PQsetnonblocking(fw_conn, 1) != 0)
	{
		fw_ship_state("could not connect to the primary", PQerrorMessage(fw_conn));
		fw_ship_disconnect();
		return false;
	}
	return true;
}

/*
 * One statement, waited for on the latch and the socket.  The result
 * (PQclear it), or NULL when the connection failed, the deadline passed,
 * SIGTERM came or recovery ended: the connection is closed then.
 */
static PGresult *
fw_ship_exec(const char *sql, int nparams, const Oid *types,
			 const char *const *values, const int *lengths, const int *formats,
			 int timeout_ms)
{
	TimestampTz deadline = GetCurrentTimestamp() + (int64) timeout_ms * 1000;
	PGresult   *last = NULL;

	if (!PQsendQueryParams(fw_conn, sql, nparams, types, values, lengths, formats, 0))
		goto fail;
	for (;;)
	{
		int			f = PQflush(fw_conn);

		if (f == 0)
			break;
		if (f < 0 || !fw_ship_wait_socket(WL_SOCKET_WRITEABLE | WL_SOCKET_READABLE, deadline))
			goto fail;
		if (!PQconsumeInput(fw_conn))
			goto fail;
	}
	for (;;)
	{
		PGresult   *res;

		while (PQisBusy(fw_conn))
		{
			if (!fw_ship_wait_socket(WL_SOCKET_READABLE, deadline) ||
				!PQconsumeInput(fw_conn))
				goto fail;
		}
		res = PQgetResult(fw_conn);
		if (res == NULL)
			break;
		if (last)
			PQclear(last);
		last = res;
	}
	if (last == NULL)
		goto fail;
	return last;

fail:
	if (last)
		PQclear(last);
	if (!ShutdownRequestPending && RecoveryInProgress())
		fw_ship_state(PQstatus(fw_conn) == CONNECTION_BAD || PQerrorMessage(fw_conn)[0] ?
					  "the connection to the primary failed" :
					  "the connection to the primary failed (timeout)",
					  PQerrorMessage(fw_conn));
	fw_ship_disconnect();
	return NULL;
}

/*
 * After connecting: an empty search path, timeouts below ours, and a
 * check of whom we reached.
 */
static bool
fw_ship_session_setup(void)
{
	PGresult   *res;
	bool		ok;
	int64		their_sysid;

	/*
	 * A lock on fw_tier.calls or a slow primary must not leave a backend
	 * there working on a batch this side gave up on (FW_SHIP_QUERY_MS)
	 */
	res = fw_ship_exec("SELECT pg_catalog.set_config('search_path', '', false),"
					   " (SELECT system_identifier FROM pg_catalog.pg_control_system()),"
					   " pg_catalog.pg_is_in_recovery(),"
					   " pg_catalog.set_config('lock_timeout', '10s', false),"
					   " pg_catalog.set_config('statement_timeout', '50s', false)",
					   0, NULL, NULL, NULL, NULL, FW_SHIP_CONNECT_MS);
	if (res == NULL)
		return false;
	ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
	if (!ok)
	{
		fw_ship_state_res("the primary refused the session setup", res);
		PQclear(res);
		fw_ship_disconnect();
		return false;
	}
	their_sysid = strtoi64(PQgetvalue(res, 0, 1), NULL, 10);
	if (their_sysid != fw_origin_sysid())
	{
		PQclear(res);
		fw_ship_state("fw_tier.log_conninfo reaches a server of another system identifier, not this standby's primary", NULL);
		fw_ship_disconnect();
		return false;
	}
	if (strcmp(PQgetvalue(res, 0, 2), "t") == 0)
	{
		PQclear(res);
		fw_ship_state("fw_tier.log_conninfo reaches a standby, not the primary", NULL);
		fw_ship_disconnect();
		return false;
	}
	PQclear(res);
	return true;
}

/*
 * The acknowledged batch: freed once this standby has replayed the
 * primary's commit.  1 = freed, 2 = still waiting (no time bound; the
 * main loop naps on the latch and comes back, SIGTERM and promotion
 * honoured there).
 */
static int
fw_ship_acked(void)
{
	TimeLineID	tli = 0;
	XLogRecPtr	replayed = GetXLogReplayRecPtr(&tli);

	/*
	 * The LSN belongs to the primary's timeline: on another one (this
	 * standby follows a newer primary, or the server we reached is an old
	 * primary after a failover) it says nothing.  Not freed; sent again
	 * after a reconnect, where the key makes it a no-op.
	 */
	if (fw_acked.lsn != InvalidXLogRecPtr && tli != fw_acked.tli &&
		!(tli < fw_acked.tli && replayed < fw_acked.lsn))
	{
		fw_acked.valid = false;
		fw_ship_state("the primary's timeline is not the one this standby replays", NULL);
		fw_ship_disconnect();
		return -1;
	}
	if (replayed < fw_acked.lsn || (fw_acked.lsn != InvalidXLogRecPtr && tli != fw_acked.tli))
	{
		if (GetCurrentTimestamp() - fw_acked.since >= (int64) FW_SHIP_REPLAY_MS * 1000)
			fw_ship_state("waiting for this standby to replay the primary's commit", NULL);
		return 2;
	}
	/* in the primary's table and replayed here: the space may be reused */
	if (fw_acked.from_spill)
		fw_spill_advance(fw_acked.end_pos, fw_acked.nrecords, fw_acked.spill_bytes);
	else
		fw_calllog_advance(fw_acked.end_pos, fw_acked.nrecords);
	fw_acked.valid = false;
	fw_ship_state(NULL, NULL);
	return 1;
}

/*
 * One batch: read, send, note the commit's LSN, free once replayed
 * (fw_ship_acked).  1 = a batch went, 2 = the last one waits for replay,
 * 0 = nothing to send, -1 = it failed (kept; back off).
 */
static int
fw_ship_batch(void)
{
	uint64		end_pos;
	uint64		spill_bytes = 0;
	uint64		size,
				used,
				head,
				tail;
	int			n;
	bool		from_spill = false;
	StringInfoData buf;
	FwShipHeader hdr;
	char		sysid[32];
	const char *values[3];
	int			lengths[3];
	int			formats[3] = {0, 0, 1};
	Oid			types[3] = {INT8OID, TEXTOID, BYTEAOID};
	PGresult   *res;
	XLogRecPtr	lsn;
	TimeLineID	tli = 0;

	if (fw_acked.valid)
		return fw_ship_acked();
	fw_calllog_usage(&size, &used, &head, &tail);
	if (used == 0)
	{
		if (!fw_spill_pending())
			return 0;
		from_spill = true;
	}
	MemoryContextReset(fw_ship_batch_cxt);
	MemoryContextSwitchTo(fw_ship_batch_cxt);
	if (from_spill)
		n = fw_spill_read(fw_ship_recs, FW_BATCH_MAX, &end_pos, &spill_bytes);
	else
		n = fw_calllog_read(fw_ship_recs, FW_BATCH_MAX, &end_pos);
	if (from_spill ? n < 0 : end_pos == tail)
		return 0;				/* the first record is still being written */

	if (n > 0)
	{
		initStringInfo(&buf);
		memset(&hdr, 0, sizeof(hdr));
		hdr.magic = FW_SHIP_MAGIC;
		hdr.version = FW_SHIP_VERSION;
		hdr.rec_header_size = fw_rec_header_size();
		hdr.nrecords = n;
		strlcpy(hdr.node_id, fw_origin_node_id(), sizeof(hdr.node_id));
		appendBinaryStringInfo(&buf, (const char *) &hdr, sizeof(hdr));
		for (int i = 0; i < n; i++)
			fw_rec_frame(&buf, &fw_ship_recs[i]);

		snprintf(sysid, sizeof(sysid), INT64_FORMAT, fw_origin_sysid());
		values[0] = sysid;
		values[1] = fw_origin_node_name();
		values[2] = buf.data;
		lengths[0] = lengths[1] = 0;
		lengths[2] = buf.len;
		res = fw_ship_exec("SELECT fw_tier.ingest_calls($1, $2, $3)",
						   3, types, values, lengths, formats, FW_SHIP_QUERY_MS);
		if (res == NULL)
			return -1;
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			fw_ship_state_res("the primary refused the batch", res);
			PQclear(res);
			return -1;
		}
		PQclear(res);

		/* the statement above has committed: this is at or past its commit */
		res = fw_ship_exec("SELECT pg_catalog.pg_current_wal_insert_lsn(),"
						   " pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_insert_lsn())",
						   0, NULL, NULL, NULL, NULL, FW_SHIP_QUERY_MS);
		if (res == NULL)
			return -1;
		if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
		{
			fw_ship_state_res("the primary did not say its WAL position", res);
			PQclear(res);
			return -1;
		}
		{
			unsigned int hi,
						lo;

			unsigned int ptli;

			/* a WAL file name starts with its timeline, 8 hex digits */
			if (sscanf(PQgetvalue(res, 0, 0), "%X/%X", &hi, &lo) != 2 ||
				PQnfields(res) != 2 || strlen(PQgetvalue(res, 0, 1)) != 24 ||
				sscanf(PQgetvalue(res, 0, 1), "%8X", &ptli) != 1 || ptli == 0)
			{
				fw_ship_state("the primary did not say its WAL position", NULL);
				PQclear(res);
				fw_ship_disconnect();
				return -1;
			}
			lsn = ((uint64) hi << 32) | lo;
			tli = (TimeLineID) ptli;
		}
		PQclear(res);
	}
	else
		lsn = InvalidXLogRecPtr;	/* only damage skipped: free at once */

	fw_acked.valid = true;
	fw_acked.from_spill = from_spill;
	fw_acked.nrecords = n;
	fw_acked.end_pos = end_pos;
	fw_acked.spill_bytes = spill_bytes;
	fw_acked.lsn = lsn;
	fw_acked.tli = tli;
	fw_acked.since = GetCurrentTimestamp();
	fw_acked.nap_ms = 1;
	return fw_ship_acked();
}

void
fw_shipper_main(Datum main_arg)
{
	TimestampTz idle_since;
	TimestampTz retry_at = 0;
	TimestampTz ship_deadline = 0;
	int			backoff_ms = FW_SHIP_BACKOFF_MIN_MS;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	/* the budgets' restore reads fw_tier.calls here (spend.c) */
	BackgroundWorkerInitializeConnection(fw_database, NULL, 0);
	fw_worker_pin_search_path();

	fw_ship_cxt = AllocSetContextCreate(TopMemoryContext, "fw_tier shipper",
										ALLOCSET_DEFAULT_SIZES);
	fw_ship_batch_cxt = AllocSetContextCreate(fw_ship_cxt, "fw_tier shipper batch",
											  ALLOCSET_DEFAULT_SIZES);
	fw_ship_recs = MemoryContextAllocZero(fw_ship_cxt,
										   sizeof(FwDrainedRecord) * FW_BATCH_MAX);
	before_shmem_exit(fw_shipper_detach, (Datum) 0);
	fw_shared->flusher_latch = MyLatch;
	pg_atomic_write_u32(&fw_shared->worker_pid, (uint32) MyProcPid);

	idle_since = GetCurrentTimestamp();
	for (;;)
	{
		TimestampTz now;
		long		timeout;
		bool		pending;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			/*
			 * a new fw_tier.log_conninfo, or (when it is empty) a new
			 * primary_conninfo, as after a failover: connect again
			 */
			if (fw_conn_for == NULL || strcmp(fw_conn_for, fw_ship_conninfo()) != 0)
				fw_ship_disconnect();
		}
		/* records stay for the next shipper, or the flusher after a promotion */
		if (ShutdownRequestPending || !RecoveryInProgress())
			break;

		MemoryContextSwitchTo(fw_ship_cxt);
		/* issue 18: attempts whose owner exited without its callbacks */
		fw_intents_reap();
		fw_calllog_sync(false);

		/*
		 * Budgets (spend.c): a slot's spend is rebuilt from fw_tier.calls
		 * once the records before it are shipped and replayed here.
		 */
		if (fw_spend_worker_pending())
		{
			idle_since = GetCurrentTimestamp();
			PG_TRY();
			{
				fw_spend_worker_run();
			}
			PG_CATCH();
			{
				ErrorData  *edata;

				MemoryContextSwitchTo(fw_ship_cxt);
				edata = CopyErrorData();
				FlushErrorState();
				AbortCurrentTransaction();
				ereport(WARNING,
						(errcode(edata->sqlerrcode),
						 errmsg("fw_tier shipper: could not restore budgets from fw_tier.calls: %s",
								edata->message ? edata->message : "")));
				FreeErrorData(edata);
			}
			PG_END_TRY();
			MemoryContextSwitchTo(fw_ship_cxt);
		}

		now = GetCurrentTimestamp();
		pending = fw_calllog_pending() || fw_spill_pending();
		if (pending)
		{
			uint64		size,
						used,
						head,
						tail;

			idle_since = now;
			fw_calllog_usage(&size, &used, &head, &tail);
			if (ship_deadline == 0)
				ship_deadline = now + (int64) fw_flush_interval_ms * 1000;
			if (fw_acked.valid ||
				(now >= retry_at &&
				 (now >= ship_deadline || used > size / 2 ||
				  pg_atomic_exchange_u32(&fw_shared->flush_requested, 0) != 0)))
			{
				int			rc = 1;
				int			batches = 0;

				/* a bounded number of batches per wake */
				while (rc == 1 && batches++ < 100)
				{
					/* a batch waiting for replay needs no connection */
					if (fw_conn == NULL && !fw_acked.valid)
					{
						if (fw_conn_for)
							pfree(fw_conn_for);
						fw_conn_for = MemoryContextStrdup(fw_ship_cxt, fw_ship_conninfo());
						if (!fw_ship_connect() || !fw_ship_session_setup())
						{
							rc = -1;
							break;
						}
					}
					PG_TRY();
					{
						rc = fw_ship_batch();
					}
					PG_CATCH();
					{
						ErrorData  *edata;

						MemoryContextSwitchTo(fw_ship_cxt);
						edata = CopyErrorData();
						FlushErrorState();
						fw_ship_state("reading the call log failed", edata->message);
						FreeErrorData(edata);
						rc = -1;
					}
					PG_END_TRY();
					MemoryContextSwitchTo(fw_ship_cxt);
					CHECK_FOR_INTERRUPTS();
					if (ShutdownRequestPending || !RecoveryInProgress())
						break;
				}
				if (rc < 0)
				{
					retry_at = GetCurrentTimestamp() + (int64) backoff_ms * 1000;
					backoff_ms = Min(backoff_ms * 2, FW_SHIP_BACKOFF_MAX_MS);
				}
				else
				{
					backoff_ms = FW_SHIP_BACKOFF_MIN_MS;
					retry_at = 0;
					ship_deadline = 0;
				}
				if (rc != 2)
					continue;
			}
		}
		else
		{
			ship_deadline = 0;
			pg_atomic_write_u32(&fw_shared->flush_requested, 0);
			if (now - idle_since >= (int64) FW_SHIPPER_IDLE_MS * 1000)
				break;
		}

		/*
		 * sleep to the next ship, retry or idle check, or (a batch waiting
		 * for replay) a short nap, 1 ms growing to 50 ms, then 1 s once the
		 * wait is long; promotion polled
		 */
		timeout = 1000;
		if (fw_acked.valid)
		{
			if (now - fw_acked.since < (int64) FW_SHIP_REPLAY_MS * 1000)
				timeout = fw_acked.nap_ms;
			fw_acked.nap_ms = Min(fw_acked.nap_ms * 2, 50);
		}
		else if (pending)
			timeout = Min(timeout, fw_ms_until(Max(retry_at, ship_deadline), now));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(timeout, 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	fw_ship_disconnect();
	proc_exit(0);
}
