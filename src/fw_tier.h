/*-------------------------------------------------------------------------
 *
 * fw_tier.h
 *		Declarations shared by the fw_tier modules.
 *
 * Each module owns one concern (see STYLE.md); this header is the contract
 * between them.  Nothing here includes curl.h: only http.c does.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_TIER_H
#define FW_TIER_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/jsonb.h"

/* The extension SQL version this library writes for (fw_tier.control). */
#define FW_SQL_VERSION	"0.4"

/*
 * The worst case of an attempt's prompt tokens: one per byte of the request
 * body as sent, plus this for the chat template.  Budget reservations
 * (spend.c) and 'unknown' attempts (calllog.c) use the same bound.
 */
#define FW_TEMPLATE_TOKENS	64

#define FW_NAMELEN		64		/* workload name, incl. terminator */
#define FW_MODELLEN		160		/* model id, incl. terminator */
#define FW_REQIDLEN		64		/* provider request id */
#define FW_ERRLEN		256		/* error text kept in the call log */

/* The three synchronous serving paths. */
typedef enum FwPath
{
	FW_PATH_STANDARD = 0,
	FW_PATH_PRIORITY,
	FW_PATH_FAST,
	FW_NUM_PATHS
} FwPath;

/* Classification of one HTTP attempt (README "Failure classes"). */
typedef enum FwOutcome
{
	FW_OK = 0,
	FW_RATE_LIMITED,			/* 429 */
	FW_OVERLOADED,				/* 503 whose body mentions "overload" */
	FW_UNAVAILABLE,				/* other 503, 500, 502, 504, proxy pages */
	FW_CLIENT_ERROR,			/* 4xx other than 429 */
	FW_TIMEOUT,					/* fw_tier.request_timeout or connect timeout */
	FW_TRANSPORT,				/* connection refused, reset, DNS, TLS ... */
	FW_CANCELLED,				/* statement cancel / timeout while in flight */
	FW_BAD_RESPONSE,			/* 200 without a usable completion */
	FW_BAD_OUTPUT,				/* issue 12: a typed answer that is not JSON,
								 * cut off, or not what the schema says */
	FW_REFUSED,					/* a budget refused it: nothing sent (issue 13) */
	FW_UNKNOWN,					/* issue 18: in flight when its process died
								 * (written at recovery, worst-case cost) */
	FW_NUM_OUTCOMES
} FwOutcome;

/* What a workload does when Standard is shed with 503 Overloaded. */
typedef enum FwOnOverload
{
	FW_ONOVERLOAD_PRIORITY = 0, /* escalate to Priority for a window */
	FW_ONOVERLOAD_RETRY,		/* stay on the path, back off and retry */
	FW_ONOVERLOAD_FAIL			/* raise at once */
} FwOnOverload;

/* How a Priority window ends (fw_tier.workloads.window_policy, issue 16). */
typedef enum FwWindowPolicy
{
	FW_WINDOW_FIXED = 0,		/* at its end, after the configured length */
	FW_WINDOW_PROBE				/* also early, after Standard probes succeed */
} FwWindowPolicy;

/* Why the current or last window ended (escalations.ended_by, issue 16). */
typedef enum FwWindowEnd
{
	FW_END_NONE = 0,			/* open, or ran to its end: "expired" */
	FW_END_PROBES,				/* closed early by a streak of probes */
	FW_END_DEESCALATED			/* fw_deescalate() */
} FwWindowEnd;

/* fw_tier.mode */
typedef enum FwMode
{
	FW_MODE_LIVE = 0,
	FW_MODE_RECORD,
	FW_MODE_REPLAY
} FwMode;

/*
 * What a request asks for (issue 12): a chat completion, embeddings or a
 * rerank.  Every kind goes through the same engine; the kind picks the
 * URL, the request body and the response check.
 */
typedef enum FwCallKind
{
	FW_KIND_CHAT = 0,			/* POST /chat/completions */
	FW_KIND_EMBED,				/* POST /embeddings */
	FW_KIND_RERANK,				/* POST /rerank */
	FW_NUM_KINDS
} FwCallKind;

/* fw_tier.on_error */
typedef enum FwOnError
{
	FW_ONERROR_RAISE = 0,
	FW_ONERROR_NULL
} FwOnError;

/* ---- fw_tier.c: GUC variables ---- */
extern char *fw_base_url;
extern char *fw_api_key;
extern char *fw_api_key_file;
extern char *fw_api_key_dir;
extern char *fw_default_model;
extern char *fw_database;
extern int	fw_connect_timeout_ms;
extern int	fw_request_timeout_ms;
extern int	fw_max_attempts;
extern int	fw_backoff_base_ms;
extern int	fw_backoff_cap_ms;
extern int	fw_retry_after_cap_ms;
extern int	fw_shared_pause_cap_ms;
extern int	fw_on_error;
extern int	fw_mode;
extern int	fw_priority_window_s;
extern int	fw_alert_windows;
extern int	fw_max_workloads;
extern int	fw_log_buffer_kb;
extern int	fw_flush_interval_ms;
extern bool fw_log_content;
extern int	fw_max_concurrency;
extern int	fw_max_concurrency_cap;
extern int	fw_log_spill_limit_kb;
extern int	fw_max_output_tokens;	/* issue 13: spend limits */
/* issue 12: embeddings and rerank */
extern char *fw_default_embedding_model;
extern char *fw_default_rerank_model;
extern int	fw_embed_batch_inputs;
extern int	fw_embed_batch_tokens;
extern int	fw_probe_interval_ms;	/* issue 16 */
extern int	fw_probe_successes;	/* issue 16 */
extern double fw_probe_share;	/* issue 16 */

extern bool fw_preloaded;

extern const char *fw_path_name(FwPath path);
extern const char *fw_outcome_name(FwOutcome outcome);
extern bool fw_parse_path(const char *s, FwPath *path);
extern bool fw_parse_on_overload(const char *s, FwOnOverload *policy);
extern const char *fw_kind_name(FwCallKind kind);
extern void fw_require_preload(void);
extern const char *fw_effective_api_key(void);

/* ---- shmem.c: shared state and its lifecycle ---- */
extern void fw_shmem_install_hooks(void);

/*
 * Shared state of one workload.  The locking protocol is in shmem.c's
 * header comment: priority_until, window_us and the attempt counters are
 * atomics read without a lock (the hot path); every other field is
 * protected by FwSharedState.wl_lock.
 */
typedef struct FwWorkload
{
	bool		in_use;
	char		name[FW_NAMELEN];
	pg_atomic_uint64 priority_until;	/* TimestampTz; 0 = never escalated */
	pg_atomic_uint64 window_us; /* window length, for the per-backend jitter;
								 * 0 after a de-escalation (no jitter) */
	TimestampTz window_started; /* start of the current/last window */
	TimestampTz last_overloaded;
	int64		escalations;
	int64		priority_overloaded;	/* 503 Overloaded while on Priority */
	int32		windows_in_row;
	bool		manual;			/* current window opened by fw_escalate() */
	bool		alerted;		/* alert raised for the current run */
	bool		alert_notified; /* worker has sent WARNING + NOTIFY */
	/* what the worker last wrote to fw_tier.escalations (worker only) */
	TimestampTz mirrored_started;
	TimestampTz mirrored_until;
	bool		mirrored_closed;
	pg_atomic_uint64 attempts[FW_NUM_PATHS][FW_NUM_OUTCOMES];
	/* the slot's key and reuse (escalation.c, "Slots" in its header) */
	Oid			dboid;			/* database of the workload */
	pg_atomic_uint32 generation;	/* bumped each time the slot is assigned */
	pg_atomic_uint64 last_used; /* TimestampTz of the last lookup or route */
	int64		run_window_us;	/* length of the last window opened or
								 * moved (kept after a de-escalation): the
								 * alert clears one such length after the
								 * run's last window ended; wl_lock */
	/*
	 * Issue 16, window policy probe (escalation.c, "Probes").  probe_next
	 * and probe_interval_us are atomics claimed without a lock (the hot
	 * path); the rest is under wl_lock.
	 */
	pg_atomic_uint64 probe_next;	/* TimestampTz: next probe may start;
									 * PG_UINT64_MAX = this window never
									 * probes (manual) */
	pg_atomic_uint64 probe_interval_us; /* current, backed off when shed */
	int32		probe_streak;	/* Standard successes in a row */
	int32		end_reason;		/* FwWindowEnd of the current/last window */
	int64		window_probes;	/* probes of the current/last window */
	int64		window_probes_shed;
	int64		probes;			/* since the slot was assigned */
	int64		probes_shed;
	int64		closed_by_probes;	/* windows ended early by probes */
	int64		priority_us_done;	/* length of the windows before the
									 * current/last one */
	/*
	 * The window before the current one, while the worker has not yet
	 * written its end (it reopened before the flusher woke): written
	 * before the current one (fw_windows_to_sync).  wl_lock.
	 */
	bool		prev_pending;
	TimestampTz prev_started;
	TimestampTz prev_until;
	int32		prev_end_reason;
	int64		prev_probes;
	int64		prev_probes_shed;
} FwWorkload;

typedef struct FwSharedState
{
	LWLock	   *wl_lock;		/* workload slots (escalation.c) */
	LWLock	   *ring_lock;		/* call-log ring head/tail (calllog.c) */
	pg_atomic_uint64 next_call_id;
	pg_atomic_uint32 flush_requested;	/* fw_flush() asks the worker */
	pg_atomic_uint32 worker_pid;	/* process draining the call log (the
									 * flusher, else the launcher); 0 = none */
	Latch	   *worker_latch;	/* the launcher's; read racily (a stale
								 * latch only costs a spurious wakeup) */
	/* launcher and flusher coordination (launcher.c, flusher.c) */
	Latch	   *flusher_latch;	/* the running flusher's, or NULL */
	pg_atomic_uint32 launcher_pid;	/* 0 = launcher not running */
	pg_atomic_uint32 worker_flags;	/* FW_WF_* bits, worker.h */
	ConditionVariable ring_space_cv;	/* broadcast when the tail moves */
	ConditionVariable ring_flushed_cv;	/* idem, for fw_flush() */
	pg_atomic_uint64 ring_waits;	/* writers that had to wait for space */
	pg_atomic_uint64 records_pushed;
	pg_atomic_uint64 records_flushed;
	pg_atomic_uint64 records_skipped;	/* unpublished after a crash, or
										 * rejected by the table */
	/*
	 * calllog.c / spill.c / flusher.c: damaged records, the spill and why
	 * the log does not drain.  Initialized by the postmaster in
	 * fw_calllog_startup(); the plain fields are under ring_lock.
	 */
	pg_atomic_uint64 records_corrupt;	/* damaged records skipped */
	pg_atomic_uint64 records_dropped;	/* ring and spill full: lost */
	pg_atomic_uint64 records_spilled;	/* went to the spill */
	pg_atomic_uint64 dead_letters;	/* rows the table refused */
	bool		spill_active;	/* new records go to the spill */
	uint64		spill_read_pos; /* logical positions, spill.c */
	uint64		spill_write_pos;
	uint64		spill_bytes;	/* undrained bytes in spill segments */
	uint64		spill_records;
	uint64		spill_corrupt_upto; /* damage before this was counted */
	bool		drain_ok;		/* drain_state is "ok" */
	char		drain_state[FW_ERRLEN]; /* for log_status */
	int			num_workloads;	/* slots in use; wl_lock */
	FwWorkload	workloads[FLEXIBLE_ARRAY_MEMBER];
} FwSharedState;

extern PGDLLIMPORT FwSharedState *fw_shared;

extern void fw_wake_worker(void);

/* ---- escalation.c: per-workload window state (shared) ---- */

/*
 * Snapshot of one workload's shared state, copied out under the lock for
 * the status view and the worker.
 */
typedef struct FwWorkloadSnapshot
{
	char		name[FW_NAMELEN];
	TimestampTz priority_until; /* 0 = not escalated */
	TimestampTz window_started; /* start of the current escalation, 0 = none */
	TimestampTz last_overloaded;
	int64		escalations;	/* windows opened since startup or restore */
	int32		windows_in_row; /* consecutive windows, 1 for a fresh one */
	bool		alerted;		/* alert raised for the current run */
	int64		attempts[FW_NUM_PATHS][FW_NUM_OUTCOMES];
	/* issue 16 */
	int64		probes;			/* probes sent on Standard in windows */
	int64		probes_shed;	/* of which shed with 503 Overloaded */
	int64		closed_by_probes;	/* windows the probes ended early */
	int64		priority_us;	/* time spent in windows so far */
} FwWorkloadSnapshot;

/*
 * A slot handle names a slot and the assignment it was given for (index and
 * generation): a slot reused for another workload invalidates old handles.
 * -1 = none.
 */
extern int64 fw_workload_slot(const char *name);
extern bool fw_workload_slot_valid(int64 slot);
/* these update *slot when its slot was reused and resolved again */
extern FwPath fw_route(int64 *slot, FwPath configured, TimestampTz now);
extern bool fw_on_overloaded(int64 *slot, FwPath path_used, FwOnOverload policy,
							 int window_s, TimestampTz now);
extern void fw_count_attempt(int64 *slot, FwPath path, FwOutcome outcome);
/* issue 16: window policy probe (escalation.c, "Probes") */
extern bool fw_claim_probe(int64 *slot, TimestampTz now);
extern void fw_probe_result(int64 *slot, FwOutcome outcome,
							TimestampTz sent_at, TimestampTz now);
extern TimestampTz fw_escalate_now(const char *workload, int64 window_ms);
extern void fw_deescalate_now(const char *workload);
extern int	fw_workload_snapshots(FwWorkloadSnapshot **out);

/*
 * Replay mode (fw_tier.mode = 'replay'): a replayed 503 opens a window in
 * this backend only, never in shared memory (escalation.c, "Replay").
 */
extern FwPath fw_replay_route(const char *workload, FwPath path, TimestampTz now);
extern bool fw_replay_overloaded(const char *workload, FwPath path_used,
								 FwOnOverload policy, int window_s,
								 TimestampTz now);
extern TimestampTz fw_replay_window_until(const char *workload);
extern void fw_replay_forget(const char *workload);

/* worker side: restore an open window read back from fw_tier.escalations */
extern void fw_restore_window(Oid dboid, const char *workload,
							  TimestampTz started, TimestampTz until,
							  int32 windows_in_row, bool manual);

/* worker side: windows whose state differs from fw_tier.escalations */
typedef struct FwWindowSync
{
	int64		slot;			/* handle */
	Oid			dboid;			/* the workload's database */
	char		name[FW_NAMELEN];
	TimestampTz started;
	TimestampTz until;
	bool		closed;			/* until <= now: write ended = until */
	bool		manual;
	int32		windows_in_row;
	bool		alert;			/* alert due: WARNING + NOTIFY */
	/* issue 16 */
	const char *ended_by;		/* closed: "expired", "probes",
								 * "deescalated"; NULL while open */
	int64		probes;			/* probes sent in this window */
	int64		probes_shed;	/* of which shed */
	bool		previous;		/* the closed window before the current */
} FwWindowSync;

extern int	fw_windows_to_sync(FwWindowSync *out, TimestampTz now,
							   TimestampTz *next_expiry);
extern void fw_windows_synced(const FwWindowSync *w);

/* ---- calllog.c: the shared ring of call records ---- */

/*
 * One HTTP attempt (or one replayed fixture).  Integer fields use -1 for
 * "unknown" (logged as NULL).  Strings are NUL-terminated and truncated.
 */
typedef struct FwCallRecord
{
	int64		call_id;		/* groups the attempts of one SQL call */
	int32		attempt;		/* 1-based */
	TimestampTz started_at;
	NameData	dbname;
	NameData	username;
	char		workload[FW_NAMELEN];
	char		model[FW_MODELLEN];
	int8		path;			/* FwPath */
	int8		outcome;		/* FwOutcome */
	bool		priority_sent;	/* service_tier "priority" was in the body */
	bool		escalated;		/* on Priority because of an escalation */
	int32		http_status;	/* 0 = no HTTP status */
	int32		prompt_tokens;
	int32		cached_prompt_tokens;
	int32		completion_tokens;
	int32		latency_us;
	int32		ttfb_us;
	char		request_id[FW_REQIDLEN];
	char		error[FW_ERRLEN];
	bool		replayed;		/* answered from a fixture (fw_tier.mode =
								 * 'replay'); in the struct's tail padding,
								 * so the ring layout is unchanged and older
								 * records (zeroed) read as false */
	int8		kind;			/* FwCallKind (issue 12); in the tail
								 * padding too, so an older record (zeroed)
								 * reads as chat */
	bool		probe;			/* issue 16: a Standard probe sent during a
								 * window (policy probe); tail padding too */
} FwCallRecord;

extern int64 fw_next_call_id(void);
extern void fw_calllog_push(const FwCallRecord *rec,
							const char *prompt, const char *answer);

/*
 * Write-ahead attempts (issue 18, calllog.c "Write-ahead attempts"): a
 * slot holds an attempt's 'unknown' record from before its first byte is
 * sent until its own record is pushed.
 */
extern int	fw_intent_begin(const FwCallRecord *rec);
extern char *fw_intent_request_id(int slot);
extern void fw_intent_end(int slot);
extern void fw_intents_abandon_mine(void);
extern void fw_intents_reap(void);
extern void fw_worst_case_tokens(size_t body_len, int max_tokens,
								 int32 *prompt, int32 *completion);

/* shmem.c calls these from the request and startup hooks */
extern Size fw_calllog_shmem_size(void);
extern void fw_calllog_startup(void);

/* A record copied out of the ring by the worker (palloc'd strings). */
typedef struct FwDrainedRecord
{
	FwCallRecord rec;
	int			encoding;		/* database encoding of the writer */
	char	   *prompt;			/* NULL when not logged */
	char	   *answer;
} FwDrainedRecord;

extern int	fw_calllog_read(FwDrainedRecord *out, int max, uint64 *end_pos);
extern int	fw_calllog_read_after(uint64 start, FwDrainedRecord *out, int max,
								  uint64 *end_pos);	/* issue 15 */
extern void fw_calllog_advance(uint64 end_pos, int nrecords);
extern void fw_calllog_usage(uint64 *size, uint64 *used, uint64 *head,
							 uint64 *tail);
extern bool fw_calllog_pending(void);
extern void fw_flush_wait(void);
extern void fw_calllog_sync(bool force);
extern void fw_set_drain_state(const char *state);
extern void fw_get_drain_state(char *buf, Size len);

/* record framing shared by the ring and the spill (calllog.c) */
extern Size fw_rec_header_size(void);
extern Size fw_rec_max_size(void);
extern uint32 fw_rec_len(const char *buf);
extern const char *fw_rec_check(const char *buf, uint64 avail);
extern void fw_rec_to_drained(const char *buf, FwDrainedRecord *out);
extern void fw_rec_frame(StringInfo buf, const FwDrainedRecord *d);	/* issue 11 */

/* ---- spill.c: the call log's overflow in pg_fw_tier/spill.* ---- */
extern void fw_spill_startup(void);
extern bool fw_spill_append_locked(const char *buf, uint32 len,
								   const char **why, int *save_errno);
extern bool fw_spill_pending(void);
extern int	fw_spill_read(FwDrainedRecord *out, int max, uint64 *end_pos,
						  uint64 *bytes);
extern void fw_spill_advance(uint64 end_pos, int nrecords, uint64 bytes);
extern void fw_spill_usage(uint64 *bytes, uint64 *records);
extern void fw_dead_letter_file(const char *line);

/* ---- origin.c: the server a row comes from (issue 11) ---- */
#define FW_NODELEN		64		/* node name, incl. terminator */
extern char *fw_node_name_guc;
extern void fw_origin_define_gucs(void);
extern void fw_origin_startup(void);
extern const char *fw_origin_node_name(void);
extern const char *fw_origin_node_id(void);
extern int64 fw_origin_sysid(void);
extern bool fw_origin_name_ok(const char *s);

/* ---- shipper.c: a standby's call log to the primary (issue 11) ---- */
extern char *fw_log_conninfo;
extern void fw_shipper_define_gucs(void);
extern PGDLLEXPORT void fw_shipper_main(Datum arg);

/* ---- launcher.c (no database) and flusher.c (fw_tier.database): the workers ---- */
extern void fw_register_worker(void);
extern PGDLLEXPORT void fw_launcher_main(Datum arg);
extern PGDLLEXPORT void fw_flusher_main(Datum arg);

/* ---- enrich.c: continuous enrichment (issue 14) ---- */
extern int	fw_enrich_workers;
extern void fw_enrich_init(void);
extern void fw_enrich_start_scout(void);
extern PGDLLEXPORT void fw_enrich_main(Datum arg);
extern PGDLLEXPORT void fw_enrich_scout_main(Datum arg);

#endif							/* FW_TIER_H */
