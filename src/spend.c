/*-------------------------------------------------------------------------
 *
 * spend.c
 *		Spend limits: fw_tier.budgets, enforced in shared memory by
 *		reserving each attempt's worst-case cost before it is sent and
 *		settling it from the response's usage afterwards.
 *
 * What it owns
 * ------------
 * - a backend cache of fw_tier.budgets and fw_tier.prices, dropped by a
 *   relcache invalidation that the tables' statement triggers send (as
 *   workloads.c does for fw_tier.workloads);
 * - the shared table of budget slots, one per (database, budget and its
 *   scope: workload, role, period), holding the current UTC period's
 *   settled spend, outstanding reservations, premium and refusals;
 * - the restore of a slot's spend from fw_tier.calls, run by the flusher
 *   (the only process that can read the call log of every database), and
 *   the budget alerts (NOTIFY fw_tier_alert), sent by the flusher too.
 *   Issue 11: the restore counts the rows of this server's lineage:
 *   every origin_node of its system identifier (a primary, its standbys,
 *   the standby promoted after a failover, the server under an older
 *   name), so a failover or a rename does not forget the period's spend
 *   (README "Spend limits", budget scope); on a hot standby the shipper
 *   runs it (shipper.c; the shipped rows are replayed there before the
 *   ring's tail moves), and alerts wait for a promotion (no NOTIFY
 *   during recovery).
 *
 * Money is counted in integer nano-USD.  Reservations round up, settled
 * costs round up: the shared figure is never below what fw_tier.calls says.
 *
 * Reserve, then settle (README "Spend limits")
 * --------------------------------------------
 * Before an attempt is sent, fw_spend_reserve() adds its worst case to
 * `reserved` of every budget that applies, in one critical section, or
 * refuses it if any refusing budget would go over its limit: spent +
 * reserved never exceeds limit_usd, whatever the number of backends.  The
 * worst case is prompt tokens <= one per byte of the messages and options
 * jsonb, plus 64 (every token of a byte-level BPE tokenizer covers at
 * least one byte; 64 for the chat template), at max(input, cached input)
 * price, plus max_tokens * n at the output price, at the price of the path
 * the attempt is sent on.  A call without max_tokens is sent with
 * max_tokens = fw_tier.max_output_tokens, so the completion is bounded too.
 * fw_spend_settle() replaces the reservation with the real cost from
 * usage; an error answer (a status other than 2xx) or a request never
 * sent releases it; an attempt whose outcome is unknown (timeout, cancel,
 * reset after sending, an answer without usage) is settled at its
 * reservation.
 *
 * Restore
 * -------
 * A slot is created in state RESTORING by the first backend that needs
 * it, which notes the call-log positions (ring head, spill write position)
 * and the next call id.  The flusher, once the ring's tail and the spill's
 * read position have passed those positions (every record pushed before
 * the slot existed has been committed to fw_tier.calls), sums the cost of
 * the period's rows in scope with call_id below the noted id, and marks
 * the slot READY.  Calls that reserve against the slot wait for READY, so
 * their call ids are above the noted one and their costs, settled in
 * memory, are never counted twice.  After a restart no call is in flight,
 * so the restored figure is exactly the logged spend of the period.
 *
 * Locking
 * -------
 * One spinlock guards the slot table: every critical section is a few
 * additions over at most FW_SPEND_MAX slots; no palloc, ereport or I/O
 * inside.  The call-log positions are read under ring_lock (shared)
 * before the spinlock is taken, never while it is held.  A condition
 * variable wakes backends waiting for a restore.
 *
 * Callers: engine.c (fw_spend_begin per run, premium check and reserve
 * per attempt, settle per answer or cancel), shmem.c (size, init),
 * worker.c's flusher (fw_spend_worker_run), the SQL functions below.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "commands/async.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/condition_variable.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "budget.h"
#include "engine.h"
#include "fwjson.h"
#include "http.h"
#include "spend.h"

#define FW_SPEND_SLOTS		128
#define FW_SPEND_MAX		8	/* budgets that may apply to one call */
#define FW_SPEND_RESTORE_WAIT_MS	30000
/* a slot unused this long, with nothing reserved, may be given away */
#define FW_SPEND_REUSE_IDLE_US	((int64) 600 * USECS_PER_SEC)
#define FW_NUSD_PER_USD		1000000000.0

typedef enum FwPeriod
{
	FW_PERIOD_HOUR = 0,
	FW_PERIOD_DAY,
	FW_PERIOD_MONTH
} FwPeriod;

typedef enum FwBudgetAction
{
	FW_ACTION_REFUSE = 0,
	FW_ACTION_STANDARD_ONLY,
	FW_ACTION_WARN
} FwBudgetAction;

typedef enum FwSlotState
{
	FW_SS_EMPTY = 0,
	FW_SS_RESTORING,
	FW_SS_READY
} FwSlotState;

/* alert bits, once per period each */
#define FW_AL_80		0x01
#define FW_AL_100		0x02
#define FW_AL_PREMIUM	0x04

static const char *const fw_period_names[] = {"hour", "day", "month"};
static const char *const fw_alert_names[] = {"80%", "100%", "premium"};

typedef struct FwSpendSlot
{
	FwSlotState state;
	uint32		generation;		/* bumped when the slot is (re)assigned */
	/* the key */
	Oid			dboid;
	char		budget[FW_NAMELEN];
	char		workload[FW_NAMELEN];	/* "" = any */
	Oid			role;			/* InvalidOid = any */
	int			period;
	/* for the flusher's restore and alerts */
	NameData	dbname;
	NameData	rolname;
	int64		cutoff_call_id;
	uint64		ring_head_at;
	uint64		spill_write_at;
	/* the current period */
	TimestampTz period_start;
	TimestampTz period_end;
	int64		spent;			/* nano-USD settled */
	int64		reserved;		/* nano-USD held by attempts in flight */
	int64		premium_spent;
	int64		premium_reserved;
	int64		refusals;
	int64		limit_seen;		/* the limit when an alert was raised */
	uint32		alerted;		/* FW_AL_* raised this period */
	uint32		notify_pending; /* FW_AL_* the flusher has to NOTIFY */
	TimestampTz last_used;
} FwSpendSlot;

typedef struct FwSpendTable
{
	slock_t		mutex;
	ConditionVariable restored_cv;
	FwSpendSlot slots[FW_SPEND_SLOTS];
} FwSpendTable;

static FwSpendTable *fw_spend = NULL;

/* ---- backend cache of fw_tier.budgets and fw_tier.prices ---- */

typedef struct FwBudgetDef
{
	char		name[FW_NAMELEN];
	char		workload[FW_NAMELEN];	/* "" = any */
	Oid			role;
	int			period;
	int64		limit;			/* nano-USD */
	int64		premium_limit;	/* -1: none */
	int			action;
} FwBudgetDef;

typedef struct FwPriceEntry
{
	char		key[FW_MODELLEN + 2];	/* path digit, then the model id */
	double		price[3];		/* nano-USD per token: input, cached, output */
} FwPriceEntry;

static MemoryContext fw_sc_cxt = NULL;
static FwBudgetDef *fw_bd = NULL;
static int	fw_nbd = 0;
static HTAB *fw_prices = NULL;
static bool fw_sc_valid = false;
static uint64 fw_sc_invals = 0;	/* invalidations seen, for fw_sc_load */
static bool fw_sc_callback = false;
static Oid	fw_budgets_relid = InvalidOid;
static Oid	fw_prices_relid = InvalidOid;

/*
 * The budgets that apply to the calls of one run sharing a workload and
 * models, with their slots and the models' prices.
 */
typedef struct FwSpendSet
{
	int			n;
	FwBudgetDef def[FW_SPEND_MAX];
	int			slot[FW_SPEND_MAX];
	uint32		gen[FW_SPEND_MAX];
	TimestampTz pstart[FW_SPEND_MAX];
	TimestampTz pend[FW_SPEND_MAX];
	bool		any_premium_cap;	/* a standard_only budget caps premium */
	bool		priced[FW_NUM_PATHS];
	double		price[FW_NUM_PATHS][3];
	char		model[FW_NUM_PATHS][FW_MODELLEN];
} FwSpendSet;

/*
 * The sets built for recent (workload, models, role) keys, in fw_sc_cxt:
 * a reload of the tables drops them.  set NULL = no budget applies.
 */
#define FW_SET_CACHE	8
typedef struct FwSetCacheEntry
{
	bool		used;
	Oid			user;
	char		workload[FW_NAMELEN];
	char		model[FW_MODELLEN];
	char		fast_model[FW_MODELLEN];
	FwSpendSet *set;
} FwSetCacheEntry;

static FwSetCacheEntry fw_set_cache[FW_SET_CACHE];
static int	fw_set_cache_next = 0;

/* One call's view: its set, its worst case, the attempt's hold. */
typedef struct FwSpendCall
{
	FwSpendSet *set;
	int64		est_prompt;
	int64		max_out;
	Jsonb	   *send_options;	/* c->options plus the max_tokens cap */
	bool		held;
	FwPath		held_path;
	bool		held_escalated;
	int64		amount;
	int64		premium;
	TimestampTz held_pstart[FW_SPEND_MAX];
	const char *hint;			/* of the last refusal */
} FwSpendCall;

/* ---------------------------------------------------------------- */

Size
fw_spend_shmem_size(void)
{
	return MAXALIGN(sizeof(FwSpendTable));
}

/* Under AddinShmemInitLock, from shmem.c's startup hook. */
void
fw_spend_shmem_init(void)
{
	bool		found;

	fw_spend = ShmemInitStruct("fw_tier spend", sizeof(FwSpendTable), &found);
	if (!found)
	{
		memset(fw_spend, 0, sizeof(FwSpendTable));
		SpinLockInit(&fw_spend->mutex);
		ConditionVariableInit(&fw_spend->restored_cv);
	}
}

/* ---- periods ---- */

static bool
fw_parse_period(const char *s, int *period)
{
	for (int i = 0; i < lengthof(fw_period_names); i++)
		if (strcmp(s, fw_period_names[i]) == 0)
		{
			*period = i;
			return true;
		}
	return false;
}

/*
 * The UTC period containing at: [start, end).  timestamp2tm without a
 * time zone gives the UTC fields; hours and days have fixed lengths in UTC.
 */
static void
fw_spend_period(int period, TimestampTz at, TimestampTz *start, TimestampTz *end)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(at) ||
		timestamp2tm(at, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	tm.tm_min = 0;
	tm.tm_sec = 0;
	if (period != FW_PERIOD_HOUR)
		tm.tm_hour = 0;
	if (period == FW_PERIOD_MONTH)
		tm.tm_mday = 1;
	if (tm2timestamp(&tm, 0, NULL, start) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	if (period == FW_PERIOD_HOUR)
		*end = *start + USECS_PER_HOUR;
	else if (period == FW_PERIOD_DAY)
		*end = *start + USECS_PER_DAY;
	else
	{
		if (++tm.tm_mon > MONTHS_PER_YEAR)
		{
			tm.tm_mon = 1;
			tm.tm_year++;
		}
		if (tm2timestamp(&tm, 0, NULL, end) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
					 errmsg("timestamp out of range")));
	}
}

/* A slot whose period is over starts the new one from zero (spinlock held). */
static void
fw_spend_roll(FwSpendSlot *s, TimestampTz start, TimestampTz end)
{
	if (s->period_start == start)
		return;
	if (start < s->period_start)
		return;					/* a backend with an older clock reading */
	s->period_start = start;
	s->period_end = end;
	s->spent = s->reserved = 0;
	s->premium_spent = s->premium_reserved = 0;
	s->refusals = 0;
	s->alerted = 0;
	s->notify_pending = 0;
}

/* ---- the cache ---- */

static void
fw_sc_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == fw_budgets_relid || relid == fw_prices_relid)
	{
		fw_sc_valid = false;
		fw_sc_invals++;
	}
}

static int64
fw_datum_int8(HeapTuple tup, TupleDesc desc, int col, int64 isnull_value)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	return isnull ? isnull_value : DatumGetInt64(d);
}

/* *usable is cleared by a NULL */
static double
fw_datum_float8(HeapTuple tup, TupleDesc desc, int col, bool *usable)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);

	if (isnull)
		*usable = false;
	return isnull ? 0.0 : DatumGetFloat8(d);
}

/*
 * Read both tables.  Runs with the caller's rights and search_path: every
 * name is qualified.  Without fw_tier.budgets (an extension not yet
 * updated) there are no budgets, and the table is looked for again at the
 * next call.
 */
static void
fw_sc_load(void)
{
	Oid			nsp;
	HASHCTL		ctl;
	HTAB	   *h;
	FwBudgetDef *defs;
	int			ndefs;
	int			ret;
	uint64		invals_at;

	/*
	 * Not valid until the read has completed: a read that raises (cancel,
	 * lock_timeout, statement_timeout) leaves no budgets, and the next call
	 * must read again rather than run without them.
	 */
	fw_sc_valid = false;
	if (!fw_sc_callback)
	{
		CacheRegisterRelcacheCallback(fw_sc_invalidate, (Datum) 0);
		fw_sc_callback = true;
	}
	nsp = get_namespace_oid("fw_tier", true);
	fw_budgets_relid = OidIsValid(nsp) ? get_relname_relid("budgets", nsp) : InvalidOid;
	fw_prices_relid = OidIsValid(nsp) ? get_relname_relid("prices", nsp) : InvalidOid;
	if (fw_sc_cxt == NULL)
		fw_sc_cxt = AllocSetContextCreate(TopMemoryContext, "fw_tier budgets",
										  ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(fw_sc_cxt);
	fw_bd = NULL;
	fw_nbd = 0;
	fw_prices = NULL;
	memset(fw_set_cache, 0, sizeof(fw_set_cache));
	if (!OidIsValid(fw_budgets_relid) || !OidIsValid(fw_prices_relid))
		return;					/* not valid: looked up again next time */

	invals_at = fw_sc_invals;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	ret = SPI_execute("SELECT budget, coalesce(workload, ''::pg_catalog.text),"
					  " coalesce(role::pg_catalog.oid, 0::pg_catalog.oid), period,"
					  " pg_catalog.floor(LEAST(limit_usd, 1000000000::pg_catalog.numeric)"
					  "   OPERATOR(pg_catalog.*) 1000000000::pg_catalog.numeric)::pg_catalog.int8,"
					  " pg_catalog.floor(LEAST(premium_limit_usd, 1000000000::pg_catalog.numeric)"
					  "   OPERATOR(pg_catalog.*) 1000000000::pg_catalog.numeric)::pg_catalog.int8,"
					  " action FROM fw_tier.budgets", true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read fw_tier.budgets: %s", SPI_result_code_string(ret));
	ndefs = 0;
	defs = MemoryContextAllocZero(fw_sc_cxt, sizeof(FwBudgetDef) * Max(SPI_processed, 1));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *name = SPI_getvalue(tup, desc, 1);
		char	   *wl = SPI_getvalue(tup, desc, 2);
		char	   *period = SPI_getvalue(tup, desc, 4);
		char	   *action = SPI_getvalue(tup, desc, 7);
		FwBudgetDef *d = &defs[ndefs];

		/* the table's CHECKs forbid what is skipped here */
		if (strlen(name) >= FW_NAMELEN || strlen(wl) >= FW_NAMELEN ||
			!fw_parse_period(period, &d->period))
			continue;
		strlcpy(d->name, name, sizeof(d->name));
		strlcpy(d->workload, wl, sizeof(d->workload));
		d->role = DatumGetObjectId(SPI_getbinval(tup, desc, 3, &(bool){false}));
		d->limit = fw_datum_int8(tup, desc, 5, 0);
		d->premium_limit = fw_datum_int8(tup, desc, 6, -1);
		d->action = strcmp(action, "warn") == 0 ? FW_ACTION_WARN :
			strcmp(action, "standard_only") == 0 ? FW_ACTION_STANDARD_ONLY :
			FW_ACTION_REFUSE;
		ndefs++;
	}

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = FW_MODELLEN + 2;
	ctl.entrysize = sizeof(FwPriceEntry);
	ctl.hcxt = fw_sc_cxt;
	h = hash_create("fw_tier prices", 16, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	if (ndefs > 0)
	{
		/*
		 * A price that is not a finite number below $1e9 per million tokens
		 * (NaN, Infinity, or too large for float8: rows older than the CHECK
		 * of 0.3) reads as NULL: the model is unpriced, never free.
		 */
		ret = SPI_execute("SELECT model, path,"
						  " CASE WHEN input_usd_per_mtok OPERATOR(pg_catalog.<) 1000000000::pg_catalog.numeric"
						  "  THEN input_usd_per_mtok::pg_catalog.float8 END,"
						  " CASE WHEN cached_input_usd_per_mtok OPERATOR(pg_catalog.<) 1000000000::pg_catalog.numeric"
						  "  THEN cached_input_usd_per_mtok::pg_catalog.float8 END,"
						  " CASE WHEN output_usd_per_mtok OPERATOR(pg_catalog.<) 1000000000::pg_catalog.numeric"
						  "  THEN output_usd_per_mtok::pg_catalog.float8 END"
						  " FROM fw_tier.prices",
						  true, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "could not read fw_tier.prices: %s", SPI_result_code_string(ret));
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			TupleDesc	desc = SPI_tuptable->tupdesc;
			char	   *model = SPI_getvalue(tup, desc, 1);
			char	   *path = SPI_getvalue(tup, desc, 2);
			FwPath		p;
			char		key[FW_MODELLEN + 2];
			FwPriceEntry *e;
			double		price[3];
			bool		usable = true;

			if (strlen(model) >= FW_MODELLEN || !fw_parse_path(path, &p))
				continue;		/* no call can use it */
			for (int k = 0; k < 3; k++)
			{
				/* USD per million tokens -> nano-USD per token */
				price[k] = fw_datum_float8(tup, desc, 3 + k, &usable) * 1000.0;
				usable = usable && isfinite(price[k]) && price[k] >= 0;
			}
			if (!usable)
				continue;		/* unpriced: refused under a budget */
			snprintf(key, sizeof(key), "%d%s", (int) p, model);
			e = hash_search(h, key, HASH_ENTER, NULL);
			memcpy(e->price, price, sizeof(price));
		}
	}
	SPI_finish();
	fw_bd = defs;
	fw_nbd = ndefs;
	fw_prices = h;
	/* an invalidation that arrived during the read: read again next time */
	fw_sc_valid = (fw_sc_invals == invals_at);
}

static bool
fw_price_get(FwPath path, const char *model, double *out)
{
	char		key[FW_MODELLEN + 2];
	FwPriceEntry *e;

	if (model == NULL || strlen(model) >= FW_MODELLEN || fw_prices == NULL)
		return false;
	snprintf(key, sizeof(key), "%d%s", (int) path, model);
	e = hash_search(fw_prices, key, HASH_FIND, NULL);
	if (e == NULL)
		return false;
	memcpy(out, e->price, sizeof(e->price));
	return true;
}

/* ---- slots ---- */

static FwSpendSlot *
fw_slot_checked(int idx, uint32 gen)
{
	FwSpendSlot *s = &fw_spend->slots[idx];

	return (s->generation == gen && s->state != FW_SS_EMPTY) ? s : NULL;
}

/*
 * The call log's logical positions: the ring's head and tail, the spill's
 * write and read positions (each only grows; ring_lock, shared).
 */
static void
fw_log_positions(uint64 *head, uint64 *tail, uint64 *spill_write, uint64 *spill_read)
{
	uint64		size,
				used;

	fw_calllog_usage(&size, &used, head, tail);
	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	if (spill_write)
		*spill_write = fw_shared->spill_write_pos;
	if (spill_read)
		*spill_read = fw_shared->spill_read_pos;
	LWLockRelease(fw_shared->ring_lock);
}

/* Is s the slot of budget d of this database?  (spinlock held) */
static bool
fw_slot_is(const FwSpendSlot *s, const FwBudgetDef *d)
{
	return s->dboid == MyDatabaseId && s->role == d->role &&
		s->period == d->period && strcmp(s->budget, d->name) == 0 &&
		strcmp(s->workload, d->workload) == 0;
}

/* Ask the flusher to come (restore, alerts): like fw_flush(). */
static void
fw_spend_call_worker(void)
{
	pg_atomic_write_u32(&fw_shared->flush_requested, 1);
	fw_wake_worker();
}

static void
fw_spend_wait_restored(const FwBudgetDef *d, int idx, uint32 gen)
{
	TimestampTz until = GetCurrentTimestamp() +
		(int64) FW_SPEND_RESTORE_WAIT_MS * 1000;

	ConditionVariablePrepareToSleep(&fw_spend->restored_cv);
	for (;;)
	{
		FwSlotState st;
		FwSpendSlot *s;

		SpinLockAcquire(&fw_spend->mutex);
		s = fw_slot_checked(idx, gen);
		st = s ? s->state : FW_SS_EMPTY;
		SpinLockRelease(&fw_spend->mutex);
		if (st == FW_SS_READY)
			break;
		if (st == FW_SS_EMPTY || GetCurrentTimestamp() >= until)
		{
			char		drain[FW_ERRLEN];

			ConditionVariableCancelSleep();
			fw_get_drain_state(drain, sizeof(drain));
			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("fw_tier budget \"%s\": the period's spend is not known yet", d->name),
					 errdetail("It is rebuilt from fw_tier.calls once the call log written before has landed; the call log's drain_state is \"%s\".", drain),
					 errhint("Check fw_tier.log_status; nothing was sent.")));
		}
		fw_spend_call_worker();
		(void) ConditionVariableTimedSleep(&fw_spend->restored_cv, 100,
										   PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();
}

/*
 * The slot of budget d in this database: found, or assigned and restored
 * (the wait above).  ERROR 54000 when every slot is taken.
 */
static void
fw_spend_slot_get(const FwBudgetDef *d, int *idx, uint32 *gen)
{
	uint64		head,
				tail,
				spill_at;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz pstart,
				pend;
	char	   *dbname;
	char	   *rolname;
	FwSpendSlot *s = NULL;
	FwSpendSlot *victim = NULL;
	FwSlotState st;

	/* the common case first: the slot is there and restored */
	SpinLockAcquire(&fw_spend->mutex);
	for (int i = 0; i < FW_SPEND_SLOTS; i++)
	{
		FwSpendSlot *c = &fw_spend->slots[i];

		if (c->state == FW_SS_READY && fw_slot_is(c, d))
		{
			c->last_used = now;
			*idx = i;
			*gen = c->generation;
			s = c;
			break;
		}
	}
	SpinLockRelease(&fw_spend->mutex);
	if (s != NULL)
		return;

	dbname = get_database_name(MyDatabaseId);
	rolname = OidIsValid(d->role) ? GetUserNameFromId(d->role, true) : NULL;
	fw_spend_period(d->period, now, &pstart, &pend);
	/* first the positions: every record pushed before the slot exists */
	fw_log_positions(&head, &tail, &spill_at, NULL);

	SpinLockAcquire(&fw_spend->mutex);
	for (int i = 0; i < FW_SPEND_SLOTS; i++)
	{
		FwSpendSlot *c = &fw_spend->slots[i];

		if (c->state == FW_SS_EMPTY)
		{
			if (victim == NULL || victim->state != FW_SS_EMPTY)
				victim = c;
			continue;
		}
		if (fw_slot_is(c, d))
		{
			s = c;
			break;
		}
		if (c->state == FW_SS_READY && c->reserved == 0 &&
			c->premium_reserved == 0 &&
			c->last_used < now - FW_SPEND_REUSE_IDLE_US &&
			(victim == NULL ||
			 (victim->state != FW_SS_EMPTY && c->last_used < victim->last_used)))
			victim = c;
	}
	if (s == NULL && victim != NULL)
	{
		s = victim;
		s->state = FW_SS_RESTORING;
		s->generation++;
		s->dboid = MyDatabaseId;
		strlcpy(s->budget, d->name, sizeof(s->budget));
		strlcpy(s->workload, d->workload, sizeof(s->workload));
		s->role = d->role;
		s->period = d->period;
		namestrcpy(&s->dbname, dbname ? dbname : "");
		namestrcpy(&s->rolname, rolname ? rolname : "");
		s->cutoff_call_id = (int64) pg_atomic_read_u64(&fw_shared->next_call_id);
		s->ring_head_at = head;
		s->spill_write_at = spill_at;
		s->period_start = pstart;
		s->period_end = pend;
		s->spent = s->reserved = s->premium_spent = s->premium_reserved = 0;
		s->refusals = 0;
		s->limit_seen = 0;
		s->alerted = s->notify_pending = 0;
	}
	if (s != NULL)
	{
		s->last_used = now;
		*idx = s - fw_spend->slots;
		*gen = s->generation;
		st = s->state;
	}
	SpinLockRelease(&fw_spend->mutex);

	if (s == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("too many fw_tier budgets in use"),
				 errdetail("Shared memory tracks %d budgets across all databases.", FW_SPEND_SLOTS)));
	if (st == FW_SS_RESTORING)
		fw_spend_wait_restored(d, *idx, *gen);
}

/* ---- per run ---- */

/*
 * A top-level number in options, or -1 when the key is absent.  Under a
 * budget anything else is refused: "n": "8" would be reserved as one
 * completion, and a server that coerces it returns eight.
 */
static double
fw_option_number(Jsonb *options, const char *key)
{
	JsonbValue	v;
	double		d;

	if (options == NULL || !JB_ROOT_IS_OBJECT(options))
		return -1;
	if (!getKeyJsonValueFromContainer(&options->root, key, strlen(key), &v))
		return -1;
	if (v.type != jbvNumeric)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" must be a JSON number when a fw_tier budget applies", key),
				 errhint("The budget reserves its value: write it without quotes.")));
	d = DatumGetFloat8(DirectFunctionCall1(numeric_float8_no_overflow,
										   NumericGetDatum(v.val.numeric)));
	if (isnan(d) || d < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("option \"%s\" must not be negative when a fw_tier budget applies", key)));
	return d;
}

/*
 * {"max_tokens": fw_tier.max_output_tokens}, kept while the setting stays
 * (a call without options needs it each time: no parse per call).
 */
static Jsonb *
fw_cap_options(void)
{
	static Jsonb *cap = NULL;
	static int	cap_for = -1;

	if (cap == NULL || cap_for != fw_max_output_tokens)
	{
		char	   *js = psprintf("{\"max_tokens\": %d}", fw_max_output_tokens);
		Jsonb	   *jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(js)));
		Jsonb	   *copy = MemoryContextAlloc(TopMemoryContext, VARSIZE(jb));

		memcpy(copy, jb, VARSIZE(jb));
		if (cap)
			pfree(cap);
		cap = copy;
		cap_for = fw_max_output_tokens;
	}
	return cap;
}

/* The set's current periods at now (a period is recomputed once it ends). */
static void
fw_set_periods(FwSpendSet *set, TimestampTz now)
{
	for (int j = 0; j < set->n; j++)
		if (now >= set->pend[j])
			fw_spend_period(set->def[j].period, now, &set->pstart[j], &set->pend[j]);
}

static FwSpendSet *
fw_spend_make_set(FwCall *c, Oid user)
{
	FwSpendSet *set = NULL;
	const char *fast = c->wl.fast_model ? c->wl.fast_model : "";
	FwSetCacheEntry *e;
	bool		valid = true;

	for (int i = 0; i < FW_SET_CACHE; i++)
	{
		e = &fw_set_cache[i];
		if (!e->used || e->user != user || strcmp(e->workload, c->wl.name) != 0 ||
			strcmp(e->model, c->model) != 0 || strcmp(e->fast_model, fast) != 0)
			continue;
		if (e->set == NULL)
			return NULL;
		/* its slots may have been given away meanwhile: look again then */
		SpinLockAcquire(&fw_spend->mutex);
		for (int j = 0; j < e->set->n && valid; j++)
		{
			FwSpendSlot *s = fw_slot_checked(e->set->slot[j], e->set->gen[j]);

			valid = (s != NULL && s->state == FW_SS_READY);
		}
		SpinLockRelease(&fw_spend->mutex);
		if (!valid)
			for (int j = 0; j < e->set->n; j++)
				fw_spend_slot_get(&e->set->def[j], &e->set->slot[j], &e->set->gen[j]);
		return e->set;
	}
	/*
	 * c->wl.name is a char[FW_NAMELEN]: a longer workload name never gets
	 * here (fw_workload_get refuses it as unknown), so only model ids can
	 * be too long.
	 */
	StaticAssertStmt(sizeof(c->wl.name) == FW_NAMELEN, "workload name fits a budget slot");
	if (strlen(c->model) >= FW_MODELLEN || strlen(fast) >= FW_MODELLEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("model id too long for a budgeted call")));

	for (int i = 0; i < fw_nbd; i++)
	{
		FwBudgetDef *d = &fw_bd[i];

		if (d->workload[0] && strcmp(d->workload, c->wl.name) != 0)
			continue;
		if (OidIsValid(d->role) && d->role != user)
			continue;
		if (set == NULL)
			set = MemoryContextAllocZero(fw_sc_cxt, sizeof(FwSpendSet));
		if (set->n >= FW_SPEND_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("more than %d fw_tier budgets apply to workload \"%s\"",
							FW_SPEND_MAX, c->wl.name)));
		set->def[set->n++] = *d;
	}
	e = &fw_set_cache[fw_set_cache_next];
	fw_set_cache_next = (fw_set_cache_next + 1) % FW_SET_CACHE;
	e->used = false;
	if (set == NULL)
	{
		e->used = true;
		e->user = user;
		strlcpy(e->workload, c->wl.name, sizeof(e->workload));
		strlcpy(e->model, c->model, sizeof(e->model));
		strlcpy(e->fast_model, fast, sizeof(e->fast_model));
		e->set = NULL;
		return NULL;
	}

	strlcpy(set->model[FW_PATH_STANDARD], c->model, FW_MODELLEN);
	strlcpy(set->model[FW_PATH_PRIORITY], c->model, FW_MODELLEN);
	strlcpy(set->model[FW_PATH_FAST], fast, FW_MODELLEN);
	for (int p = 0; p < FW_NUM_PATHS; p++)
		set->priced[p] = set->model[p][0] != '\0' &&
			fw_price_get((FwPath) p, set->model[p], set->price[p]);
	fw_set_periods(set, GetCurrentTimestamp());
	for (int j = 0; j < set->n; j++)
	{
		if (set->def[j].premium_limit >= 0 &&
			set->def[j].action == FW_ACTION_STANDARD_ONLY)
			set->any_premium_cap = true;
	}
	/* may wait for a restore: before any call id of this run is taken */
	for (int j = 0; j < set->n; j++)
		fw_spend_slot_get(&set->def[j], &set->slot[j], &set->gen[j]);
	/* cached once complete: an error above leaves no half entry */
	e->used = true;
	e->user = user;
	strlcpy(e->workload, c->wl.name, sizeof(e->workload));
	strlcpy(e->model, c->model, sizeof(e->model));
	strlcpy(e->fast_model, fast, sizeof(e->fast_model));
	e->set = set;
	return set;
}

/*
 * Before the run's first attempt: find the budgets that apply to each
 * call (a batch shares one set), make sure their slots are restored, and
 * bound each call's output: a call without max_tokens is sent with
 * max_tokens = fw_tier.max_output_tokens.
 */
void
fw_spend_begin(FwCall *calls, int ncalls)
{
	FwSpendSet *set = NULL;
	FwCall	   *set_for = NULL;
	Jsonb	   *opts_in = NULL;
	Jsonb	   *opts_out = NULL;
	Oid			user;

	if (!fw_sc_valid)
		fw_sc_load();
	if (fw_nbd == 0)
		return;
	user = GetUserId();

	for (int i = 0; i < ncalls; i++)
	{
		FwCall	   *c = &calls[i];
		FwSpendCall *sc;
		double		max_tokens;
		double		n;

		if (c->finished)
			continue;
		if (set_for == NULL || strcmp(set_for->wl.name, c->wl.name) != 0 ||
			strcmp(set_for->model, c->model) != 0 ||
			(set_for->wl.fast_model == NULL) != (c->wl.fast_model == NULL) ||
			(c->wl.fast_model && strcmp(set_for->wl.fast_model, c->wl.fast_model) != 0))
		{
			set = fw_spend_make_set(c, user);
			set_for = c;
		}
		if (set == NULL)
			continue;

		if (c->options && JB_ROOT_IS_OBJECT(c->options) &&
			getKeyJsonValueFromContainer(&c->options->root, "max_completion_tokens",
										 strlen("max_completion_tokens"), &(JsonbValue) {0}))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("option \"max_completion_tokens\" is not accepted when a fw_tier budget applies"),
					 errhint("Use \"max_tokens\": the budget reserves it at the output price.")));
		sc = palloc0(sizeof(FwSpendCall));
		sc->set = set;
		sc->send_options = c->options;
		if (c->kind != FW_KIND_CHAT)
		{
			/*
			 * Embeddings and rerank (issue 12) generate nothing: the worst
			 * case is the input alone (counted from the body when it is
			 * built), and no max_tokens is sent.
			 */
			sc->max_out = 0;
			sc->est_prompt = (int64) (c->fields ? VARSIZE(c->fields) : 0) +
				(int64) (c->options ? VARSIZE(c->options) : 0) +
				FW_TEMPLATE_TOKENS;
			c->spend = sc;
			continue;
		}
		max_tokens = fw_option_number(c->options, "max_tokens");
		if (max_tokens < 0)
		{
			/*
			 * Sent with the cap, so the completion is bounded.  Only the
			 * request gets it: c->options stays the caller's, which the
			 * fixture fingerprint (record mode) and fw_tier.fixture_key use.
			 */
			if (c->options != opts_in || opts_out == NULL)
			{
				opts_in = c->options;
				opts_out = c->options == NULL ? fw_cap_options() :
					DatumGetJsonbP(DirectFunctionCall2(jsonb_concat,
													   JsonbPGetDatum(c->options),
													   JsonbPGetDatum(fw_cap_options())));
			}
			sc->send_options = opts_out;
			max_tokens = fw_max_output_tokens;
		}
		n = fw_option_number(c->options, "n");
		max_tokens = Min(max_tokens, 1e9);
		n = Min(n, 1e6);

		sc->max_out = (int64) ceil(max_tokens) * (n > 1 ? (int64) ceil(n) : 1);
		/* until the body is built (fw_spend_reserve counts its bytes) */
		sc->est_prompt = (int64) VARSIZE(c->messages) +
			(int64) VARSIZE(sc->send_options) + FW_TEMPLATE_TOKENS;
		c->spend = sc;
	}
}

static int64
fw_worst(const FwSpendCall *sc, FwPath path)
{
	const double *p = sc->set->price[path];
	double		worst = ceil((double) sc->est_prompt * Max(p[0], p[1]) +
							 (double) sc->max_out * p[2]);

	/* past any limit the table can hold (1e9 USD): refused, no overflow */
	return (int64) Min(worst, 4e18);
}

static int64
fw_real(const FwSpendSet *set, FwPath path, int prompt, int cached, int completion)
{
	const double *p = set->price[path];

	cached = Min(Max(cached, 0), prompt);
	return (int64) ceil((double) (prompt - cached) * p[0] + (double) cached * p[1] +
						(double) completion * p[2]);
}

static char *
fw_usd(int64 nusd)
{
	return psprintf("$%.6f", (double) nusd / FW_NUSD_PER_USD);
}

/* Saturating: a warn budget adds worst cases without a limit. */
static inline int64
fw_sat_add(int64 a, int64 b)
{
	int64		r;

	if (pg_add_s64_overflow(a, b, &r))
		return (b > 0) ? PG_INT64_MAX : PG_INT64_MIN;
	return r;
}

/* The once-per-period WARNING that budget j's premium is spent. */
static void
fw_spend_premium_warn(FwCall *c, int j)
{
	FwSpendSet *set = c->spend->set;

	ereport(WARNING,
			(errmsg("fw_tier budget \"%s\": the premium limit of %s is spent; workload \"%s\" stays on Standard",
					set->def[j].name, fw_usd(set->def[j].premium_limit), c->wl.name),
			 errdetail("Escalation to Priority resumes when the period ends, at %s.",
					   timestamptz_to_str(set->pend[j]))));
	fw_spend_call_worker();
}

/*
 * An escalated attempt's premium would go over a standard_only budget's
 * premium_limit_usd: it stays on Standard.  The first time in a period
 * says so (WARNING here, NOTIFY by the flusher).
 */
bool
fw_spend_premium_blocked(FwCall *c)
{
	FwSpendCall *sc = c->spend;
	FwSpendSet *set;
	int64		premium;
	bool		blocked = false;
	int			first = -1;
	TimestampTz now = GetCurrentTimestamp();

	if (sc == NULL || !sc->set->any_premium_cap)
		return false;
	set = sc->set;
	if (!set->priced[FW_PATH_PRIORITY] || !set->priced[FW_PATH_STANDARD])
		return false;			/* fw_spend_reserve refuses, naming the price */
	premium = Max(fw_worst(sc, FW_PATH_PRIORITY) - fw_worst(sc, FW_PATH_STANDARD), 0);
	fw_set_periods(set, now);

	SpinLockAcquire(&fw_spend->mutex);
	for (int j = 0; j < set->n; j++)
	{
		FwBudgetDef *d = &set->def[j];
		FwSpendSlot *s;

		if (d->premium_limit < 0 || d->action != FW_ACTION_STANDARD_ONLY)
			continue;
		s = fw_slot_checked(set->slot[j], set->gen[j]);
		if (s == NULL || s->state != FW_SS_READY)
			continue;
		fw_spend_roll(s, set->pstart[j], set->pend[j]);
		if (fw_sat_add(s->premium_spent, s->premium_reserved) + premium > d->premium_limit)
		{
			blocked = true;
			if (!(s->alerted & FW_AL_PREMIUM))
			{
				s->alerted |= FW_AL_PREMIUM;
				s->notify_pending |= FW_AL_PREMIUM;
				s->limit_seen = d->premium_limit;
				if (first < 0)
					first = j;
			}
		}
	}
	SpinLockRelease(&fw_spend->mutex);

	if (first >= 0)
		fw_spend_premium_warn(c, first);
	return blocked;
}

/*
 * Reserve the attempt's worst case against every budget, or refuse it
 * (FW_SPEND_REFUSED, c->detail says why).  Nothing has been sent yet.
 * FW_SPEND_STANDARD: an escalated attempt's premium does not fit a
 * standard_only budget (another backend took it since
 * fw_spend_premium_blocked looked): nothing is reserved, and the caller
 * prepares the attempt on Standard and reserves again.
 */
FwSpendResult
fw_spend_reserve(FwCall *c, TimestampTz now)
{
	FwSpendCall *sc = c->spend;
	FwSpendSet *set;
	FwPath		path = c->path_sent;
	int64		cost;
	int64		premium = 0;
	int			refused = -1;
	int			downgrade = -1;
	bool		warn_premium = false;
	bool		lost = false;
	bool		over_premium = false;
	bool		notify = false;
	int64		fig_spent = 0,
				fig_reserved = 0;

	if (sc == NULL)
		return FW_SPEND_OK;
	set = sc->set;
	Assert(!sc->held);
	sc->hint = NULL;

	if (!set->priced[path] ||
		(c->escalated && !set->priced[FW_PATH_STANDARD]))
	{
		FwPath		missing = set->priced[path] ? FW_PATH_STANDARD : path;

		c->detail = psprintf("no price for model \"%s\" on path %s in fw_tier.prices: a call a budget applies to (\"%s\") cannot be priced, so it is not sent",
							 set->model[missing],
							 fw_path_name(missing), set->def[0].name);
		sc->hint = "Add the price with fw_tier.set_price(model, path, input, cached_input, output), in USD per million tokens.";
		return FW_SPEND_REFUSED;
	}

	/*
	 * The body is built (fw_prepare_attempt): its bytes, as sent (UTF-8,
	 * whatever the database encoding), bound the prompt tokens.
	 */
	Assert(c->body != NULL);
	sc->est_prompt = (int64) c->body_len + FW_TEMPLATE_TOKENS;
	cost = fw_worst(sc, path);
	if (c->escalated)
		premium = Max(cost - fw_worst(sc, FW_PATH_STANDARD), 0);
	fw_set_periods(set, now);

	SpinLockAcquire(&fw_spend->mutex);
	for (int j = 0; j < set->n; j++)
	{
		FwBudgetDef *d = &set->def[j];
		FwSpendSlot *s = fw_slot_checked(set->slot[j], set->gen[j]);
		bool		premium_over;

		if (s == NULL || s->state != FW_SS_READY)
		{
			refused = j;
			lost = true;
			break;
		}
		fw_spend_roll(s, set->pstart[j], set->pend[j]);
		s->last_used = now;
		if (d->action == FW_ACTION_WARN)
			continue;
		premium_over = premium > 0 && d->premium_limit >= 0 &&
			fw_sat_add(fw_sat_add(s->premium_spent, s->premium_reserved), premium) > d->premium_limit;
		if (premium_over && d->action == FW_ACTION_STANDARD_ONLY)
		{
			/* README: standard_only keeps the call on Standard */
			downgrade = j;
			if (!(s->alerted & FW_AL_PREMIUM))
			{
				s->alerted |= FW_AL_PREMIUM;
				s->notify_pending |= FW_AL_PREMIUM;
				s->limit_seen = d->premium_limit;
				warn_premium = true;
			}
			break;
		}
		if (fw_sat_add(fw_sat_add(s->spent, s->reserved), cost) > d->limit)
			refused = j;
		else if (premium_over)
		{
			refused = j;
			over_premium = true;
		}
		if (refused >= 0)
		{
			uint32		bit;

			s->refusals++;
			fig_spent = over_premium ? s->premium_spent : s->spent;
			fig_reserved = over_premium ? s->premium_reserved : s->reserved;

			/*
			 * Alert only when the budget is really used up: one attempt
			 * too large for what is left is no "100%".
			 */
			bit = over_premium ? FW_AL_PREMIUM : FW_AL_100;
			if (!(s->alerted & bit) &&
				fw_sat_add(fig_spent, fig_reserved) >=
				(over_premium ? d->premium_limit : d->limit))
			{
				s->alerted |= bit;
				s->notify_pending |= bit;
				s->limit_seen = over_premium ? d->premium_limit : d->limit;
				notify = true;
			}
			break;
		}
	}
	if (refused < 0 && downgrade < 0)
	{
		for (int j = 0; j < set->n; j++)
		{
			FwSpendSlot *s = &fw_spend->slots[set->slot[j]];

			s->reserved = fw_sat_add(s->reserved, cost);
			s->premium_reserved = fw_sat_add(s->premium_reserved, premium);
			sc->held_pstart[j] = s->period_start;
		}
	}
	SpinLockRelease(&fw_spend->mutex);

	if (notify)
		fw_spend_call_worker();
	if (downgrade >= 0)
	{
		if (warn_premium)
			fw_spend_premium_warn(c, downgrade);
		return FW_SPEND_STANDARD;
	}
	if (refused >= 0)
	{
		FwBudgetDef *d = &set->def[refused];

		if (lost)
			c->detail = psprintf("the shared state of budget \"%s\" was reassigned during the statement", d->name);
		else
			c->detail = psprintf("budget \"%s\" (%s ending %s): %s%s spent and %s reserved of its %slimit %s; this attempt may cost up to %s",
								 d->name, fw_period_names[d->period],
								 timestamptz_to_str(set->pend[refused]),
								 over_premium ? "premium " : "",
								 fw_usd(fig_spent), fw_usd(fig_reserved),
								 over_premium ? "premium " : "",
								 fw_usd(over_premium ? d->premium_limit : d->limit),
								 fw_usd(over_premium ? premium : cost));
		sc->hint = over_premium ?
			"Escalation's premium is capped by premium_limit_usd in fw_tier.budgets (action standard_only keeps the workload on Standard instead)." :
			"Raise limit_usd in fw_tier.budgets, lower max_tokens, or wait for the period to end.";
		return FW_SPEND_REFUSED;
	}
	sc->held = true;
	sc->held_path = path;
	sc->held_escalated = c->escalated;
	sc->amount = cost;
	sc->premium = premium;
	return FW_SPEND_OK;
}

/* The options the request is built with (engine.c, fw_prepare_attempt). */
Jsonb *
fw_spend_send_options(FwCall *c)
{
	return c->spend ? c->spend->send_options : c->options;
}

const char *
fw_spend_refusal_hint(FwCall *c)
{
	return c->spend ? c->spend->hint : NULL;
}

/*
 * Replace the hold by real and real_premium (nano-USD).  quiet: no
 * WARNING, so no allocation (fw_spend_settle_aborted).
 */
static void
fw_spend_apply(FwCall *c, int64 real, int64 real_premium, bool quiet)
{
	FwSpendCall *sc = c->spend;
	FwSpendSet *set = sc->set;
	bool		notify = false;
	int			warn_over = -1;

	SpinLockAcquire(&fw_spend->mutex);
	for (int j = 0; j < set->n; j++)
	{
		FwSpendSlot *s = fw_slot_checked(set->slot[j], set->gen[j]);
		FwBudgetDef *d = &set->def[j];

		/* a period that ended meanwhile keeps the cost (fw_tier.calls) */
		if (s == NULL || s->period_start != sc->held_pstart[j])
			continue;
		/*
		 * Saturating: a warn budget's worst cases (up to 4e18 each) have
		 * no limit.  A saturated reserved is then understated as holds
		 * leave; never below 0.
		 */
		s->reserved = Max(s->reserved - sc->amount, 0);
		s->premium_reserved = Max(s->premium_reserved - sc->premium, 0);
		s->spent = fw_sat_add(s->spent, real);
		s->premium_spent = fw_sat_add(s->premium_spent, real_premium);
		if (d->limit > 0 && s->spent >= d->limit - d->limit / 5 && !(s->alerted & FW_AL_80))
		{
			s->alerted |= FW_AL_80;
			s->notify_pending |= FW_AL_80;
			s->limit_seen = d->limit;
			notify = true;
		}
		if (s->spent >= d->limit && !(s->alerted & FW_AL_100))
		{
			s->alerted |= FW_AL_100;
			s->notify_pending |= FW_AL_100;
			s->limit_seen = d->limit;
			notify = true;
			if (d->action == FW_ACTION_WARN)
				warn_over = j;
		}
	}
	SpinLockRelease(&fw_spend->mutex);
	sc->held = false;
	if (notify)
		fw_spend_call_worker();
	if (warn_over >= 0 && !quiet)
		ereport(WARNING,
				(errmsg("fw_tier budget \"%s\" is exceeded", set->def[warn_over].name),
				 errdetail("Its action is warn: calls go on.  Limit %s in the %s ending %s.",
						   fw_usd(set->def[warn_over].limit),
						   fw_period_names[set->def[warn_over].period],
						   timestamptz_to_str(set->pend[warn_over]))));
}

/*
 * An attempt ended: its real cost (usage at the path's prices, cached
 * tokens at the cached price) replaces the reservation.
 */
void
fw_spend_settle(FwCall *c, const FwHttpResult *r, FwOutcome outcome,
				const FwParsed *parsed)
{
	FwSpendCall *sc = c->spend;
	int64		real;
	int64		real_premium;

	if (sc == NULL || !sc->held)
		return;
	if (r == NULL)
		real = real_premium = 0;	/* nothing was sent */
	else if (r->status >= 200 && r->status < 300)
	{
		int			prompt = parsed->prompt_tokens >= 0 ? parsed->prompt_tokens : r->hdr_prompt_tokens;
		int			cached = parsed->cached_tokens >= 0 ? parsed->cached_tokens : r->hdr_cached_tokens;
		int			completion = parsed->completion_tokens;

		if (prompt >= 0 && completion >= 0 && !r->failed)
		{
			real = fw_real(sc->set, sc->held_path, prompt, cached, completion);
			real_premium = sc->held_escalated ?
				Max(real - fw_real(sc->set, FW_PATH_STANDARD, prompt, cached, completion), 0) : 0;
		}
		else
		{
			/* answered, but the usage is unknown: the worst case stands */
			real = sc->amount;
			real_premium = sc->premium;
		}
	}
	else if (r->status > 0 && !r->failed)
		real = real_premium = 0;	/* an error answer bills nothing */
	else if (r->sent)
	{
		/* sent, outcome unknown (timeout, reset, cancel) */
		real = sc->amount;
		real_premium = sc->premium;
	}
	else
		real = real_premium = 0;	/* never reached the provider */
	fw_spend_apply(c, real, real_premium, false);
}

/*
 * A run ended by a cancel or an error: an attempt in flight (sent, outcome
 * unknown) keeps its worst case; one reserved but never started (its
 * transfer could not be set up) releases it.  No allocation.
 */
void
fw_spend_settle_aborted(FwCall *c, bool sent)
{
	if (c->spend == NULL || !c->spend->held)
		return;
	if (sent)
		fw_spend_apply(c, c->spend->amount, c->spend->premium, true);
	else
		fw_spend_apply(c, 0, 0, true);
}

/* ---- the flusher's side ---- */

bool
fw_spend_worker_pending(void)
{
	bool		pending = false;
	bool		in_recovery;

	if (fw_spend == NULL)
		return false;
	/* not under the spinlock: it may take one of its own */
	in_recovery = RecoveryInProgress();
	SpinLockAcquire(&fw_spend->mutex);
	for (int i = 0; i < FW_SPEND_SLOTS && !pending; i++)
	{
		FwSpendSlot *s = &fw_spend->slots[i];

		/* issue 11: no NOTIFY during recovery; alerts wait for promotion */
		pending = s->state == FW_SS_RESTORING ||
			(s->state != FW_SS_EMPTY && s->notify_pending != 0 &&
			 !in_recovery);
	}
	SpinLockRelease(&fw_spend->mutex);
	return pending;
}

/*
 * The period's spend of a budget, as fw_tier.calls has it: the rows of
 * its database, period and scope, written before the slot was created.
 * Premium: what escalated attempts cost over the Standard price (all of
 * it when there is no Standard price).
 */
static const char *fw_restore_sql =
"SELECT pg_catalog.ceil(coalesce(pg_catalog.sum(c.cost_usd), 0::pg_catalog.numeric)"
"         OPERATOR(pg_catalog.*) 1000000000::pg_catalog.numeric)::pg_catalog.int8,"
"       pg_catalog.ceil(coalesce(pg_catalog.sum(c.cost_usd OPERATOR(pg_catalog.-)"
"         coalesce((((coalesce(c.prompt_tokens, 0) OPERATOR(pg_catalog.-)"
"                     coalesce(c.cached_prompt_tokens, 0))::pg_catalog.numeric"
"                    OPERATOR(pg_catalog.*) ps.input_usd_per_mtok)"
"                  OPERATOR(pg_catalog.+) (coalesce(c.cached_prompt_tokens, 0)::pg_catalog.numeric"
"                    OPERATOR(pg_catalog.*) ps.cached_input_usd_per_mtok)"
"                  OPERATOR(pg_catalog.+) (coalesce(c.completion_tokens, 0)::pg_catalog.numeric"
"                    OPERATOR(pg_catalog.*) ps.output_usd_per_mtok))"
"                 OPERATOR(pg_catalog./) 1000000::pg_catalog.numeric, 0::pg_catalog.numeric))"
"         FILTER (WHERE c.escalated), 0::pg_catalog.numeric)"
"         OPERATOR(pg_catalog.*) 1000000000::pg_catalog.numeric)::pg_catalog.int8"
"  FROM fw_tier.calls c"
"  LEFT JOIN fw_tier.prices ps ON ps.model OPERATOR(pg_catalog.=) c.model"
"   AND ps.path OPERATOR(pg_catalog.=) 'standard'::pg_catalog.text"
" WHERE c.database OPERATOR(pg_catalog.=) $1"
"   AND c.started_at OPERATOR(pg_catalog.>=) $2"
"   AND c.started_at OPERATOR(pg_catalog.<) $3"
"   AND c.call_id OPERATOR(pg_catalog.<) $4"
"   AND ($5 IS NULL OR c.workload OPERATOR(pg_catalog.=) $5)"
"   AND ($6 IS NULL OR c.username OPERATOR(pg_catalog.=) $6)"
/*
 * issue 11: the lineage's calls: every node of this system identifier
 * (call ids are start-time microseconds plus a counter, so another node's
 * ids of the period fall below the cutoff too)
 */
"   AND c.origin_sysid OPERATOR(pg_catalog.=) $7"
"   AND NOT c.replayed AND c.cost_usd IS NOT NULL";

typedef struct FwSpendJob
{
	int			idx;
	uint32		gen;
	bool		restore;
	uint32		notify;
	NameData	dbname;
	NameData	rolname;
	char		budget[FW_NAMELEN];
	char		workload[FW_NAMELEN];
	bool		any_role;
	int			period;
	TimestampTz start;
	TimestampTz end;
	int64		cutoff;
	uint64		ring_head_at;
	uint64		spill_write_at;
	int64		spent;
	int64		premium_spent;
	int64		limit_seen;
} FwSpendJob;

static void
fw_spend_notify(const FwSpendJob *j, int bit)
{
	StringInfoData payload;

	initStringInfo(&payload);
	appendStringInfoString(&payload, "{\"database\": ");
	escape_json(&payload, NameStr(j->dbname));
	appendStringInfoString(&payload, ", \"budget\": ");
	escape_json(&payload, j->budget);
	appendStringInfoString(&payload, ", \"event\": ");
	escape_json(&payload, fw_alert_names[bit]);
	appendStringInfo(&payload, ", \"spent_usd\": %.9f, \"premium_spent_usd\": %.9f, \"limit_usd\": %.9f, \"period_end\": ",
					 j->spent / FW_NUSD_PER_USD, j->premium_spent / FW_NUSD_PER_USD,
					 j->limit_seen / FW_NUSD_PER_USD);
	escape_json(&payload, timestamptz_to_str(j->end));
	appendStringInfoChar(&payload, '}');
	/* delivered at COMMIT, in fw_tier.database (like the capacity alert) */
	Async_Notify("fw_tier_alert", payload.data);
}

/*
 * Restore the slots whose call log has landed, and send the alerts due.
 * One transaction; errors propagate to the flusher, which logs them and
 * goes on (a slot left RESTORING makes its callers wait, then refuse).
 */
void
fw_spend_worker_run(void)
{
	FwSpendJob *jobs = palloc(sizeof(FwSpendJob) * FW_SPEND_SLOTS);
	int			njobs = 0;
	uint64		head,
				tail,
				spill_read;
	bool		spill_active;
	bool		any = false;
	bool		in_recovery = RecoveryInProgress();	/* issue 11 */

	fw_log_positions(&head, &tail, NULL, &spill_read);
	LWLockAcquire(fw_shared->ring_lock, LW_SHARED);
	spill_active = fw_shared->spill_active;
	LWLockRelease(fw_shared->ring_lock);

	SpinLockAcquire(&fw_spend->mutex);
	for (int i = 0; i < FW_SPEND_SLOTS; i++)
	{
		FwSpendSlot *s = &fw_spend->slots[i];
		FwSpendJob *j = &jobs[njobs];

		if (s->state == FW_SS_EMPTY)
			continue;
		/*
		 * fw_flush's condition (calllog.c): a damaged ring header resets
		 * head and tail to 0, and what was below the noted head is gone
		 * (records_corrupt); nothing is left to wait for then.
		 */
		j->restore = s->state == FW_SS_RESTORING &&
			(tail >= s->ring_head_at || head < s->ring_head_at) &&
			(spill_read >= s->spill_write_at || !spill_active);
		/* cleared once the NOTIFYs are committed, below (none on a standby) */
		j->notify = (s->state == FW_SS_READY && !in_recovery) ? s->notify_pending : 0;
		if (!j->restore && j->notify == 0)
			continue;
		j->idx = i;
		j->gen = s->generation;
		j->dbname = s->dbname;
		j->rolname = s->rolname;
		strlcpy(j->budget, s->budget, sizeof(j->budget));
		strlcpy(j->workload, s->workload, sizeof(j->workload));
		j->any_role = !OidIsValid(s->role);
		j->period = s->period;
		j->start = s->period_start;
		j->end = s->period_end;
		j->cutoff = s->cutoff_call_id;
		j->spent = s->spent;
		j->premium_spent = s->premium_spent;
		j->limit_seen = s->limit_seen;
		njobs++;
		any = true;
	}
	SpinLockRelease(&fw_spend->mutex);
	if (!any)
	{
		pfree(jobs);
		return;
	}

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "fw_tier: restoring budgets");
	for (int k = 0; k < njobs; k++)
	{
		FwSpendJob *j = &jobs[k];

		if (j->restore)
		{
			Oid			types[7] = {NAMEOID, TIMESTAMPTZOID, TIMESTAMPTZOID, INT8OID, TEXTOID, NAMEOID,
			INT8OID};
			Datum		args[7];
			char		nulls[7] = {' ', ' ', ' ', ' ', ' ', ' ', ' '};
			int			ret;
			bool		isnull;

			args[0] = NameGetDatum(&j->dbname);
			args[1] = TimestampTzGetDatum(j->start);
			args[2] = TimestampTzGetDatum(j->end);
			args[3] = Int64GetDatum(j->cutoff);
			args[4] = CStringGetTextDatum(j->workload);
			if (j->workload[0] == '\0')
				nulls[4] = 'n';
			args[5] = NameGetDatum(&j->rolname);
			if (j->any_role)
				nulls[5] = 'n';
			args[6] = Int64GetDatum(fw_origin_sysid());
			ret = SPI_execute_with_args(fw_restore_sql, 7, types, args, nulls, true, 1);
			if (ret != SPI_OK_SELECT || SPI_processed != 1)
				elog(ERROR, "fw_tier: reading the spend of budget \"%s\" failed: %s",
					 j->budget, SPI_result_code_string(ret));
			j->spent = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
												   SPI_tuptable->tupdesc, 1, &isnull));
			j->premium_spent = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
														   SPI_tuptable->tupdesc, 2, &isnull));
		}
		for (int bit = 0; bit < lengthof(fw_alert_names); bit++)
			if (j->notify & (1 << bit))
				fw_spend_notify(j, bit);
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);

	SpinLockAcquire(&fw_spend->mutex);
	for (int k = 0; k < njobs; k++)
	{
		FwSpendJob *j = &jobs[k];
		FwSpendSlot *s = &fw_spend->slots[j->idx];

		if (s->generation != j->gen)
			continue;
		if (j->notify != 0 && s->period_start == j->start)
			s->notify_pending &= ~j->notify;
		if (!j->restore || s->state != FW_SS_RESTORING)
			continue;
		/* nobody reserves while RESTORING: these are the whole figures */
		s->spent = j->spent;
		s->premium_spent = j->premium_spent;
		s->state = FW_SS_READY;
	}
	SpinLockRelease(&fw_spend->mutex);
	ConditionVariableBroadcast(&fw_spend->restored_cv);
	pfree(jobs);
}

/* ---- SQL ---- */

PG_FUNCTION_INFO_V1(fw_tier_budget_period);
PG_FUNCTION_INFO_V1(fw_tier_budget_state);

/* fw_tier.budget_period(period text, at timestamptz) */
Datum
fw_tier_budget_period(PG_FUNCTION_ARGS)
{
	char	   *p = text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz at = PG_GETARG_TIMESTAMPTZ(1);
	int			period;
	TimestampTz start,
				end;
	TupleDesc	desc;
	Datum		values[2];
	bool		nulls[2] = {false, false};

	if (!fw_parse_period(p, &period))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid budget period \"%s\"", p),
				 errhint("Use \"hour\", \"day\" or \"month\".")));
	fw_spend_period(period, at, &start, &end);
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = TimestampTzGetDatum(start);
	values[1] = TimestampTzGetDatum(end);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

static Datum
fw_nusd_numeric(int64 v)
{
	return DirectFunctionCall2(numeric_div,
							   NumericGetDatum(int64_to_numeric(v)),
							   NumericGetDatum(int64_to_numeric(1000000000)));
}

/* This database's budgets (as the table has them now) and their state. */
Datum
fw_tier_budget_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TimestampTz now = GetCurrentTimestamp();

	fw_require_preload();
	InitMaterializedSRF(fcinfo, 0);
	if (!fw_sc_valid)
		fw_sc_load();
	for (int i = 0; i < fw_nbd; i++)
	{
		FwBudgetDef *d = &fw_bd[i];
		Datum		values[8];
		bool		nulls[8];
		TimestampTz pstart,
					pend;
		FwSpendSlot copy;
		bool		found = false;

		fw_spend_period(d->period, now, &pstart, &pend);
		SpinLockAcquire(&fw_spend->mutex);
		for (int k = 0; k < FW_SPEND_SLOTS; k++)
		{
			FwSpendSlot *s = &fw_spend->slots[k];

			if (s->state != FW_SS_EMPTY && fw_slot_is(s, d))
			{
				copy = *s;
				found = true;
				break;
			}
		}
		SpinLockRelease(&fw_spend->mutex);
		if (!found)
			continue;
		if (copy.period_start != pstart)
		{
			/* the period ended: the next call starts the new one at 0 */
			copy.spent = copy.reserved = copy.premium_spent = copy.refusals = 0;
		}
		memset(nulls, 0, sizeof(nulls));
		values[0] = CStringGetTextDatum(d->name);
		values[1] = TimestampTzGetDatum(pstart);
		values[2] = TimestampTzGetDatum(pend);
		values[3] = BoolGetDatum(copy.state == FW_SS_READY);
		values[4] = fw_nusd_numeric(copy.spent);
		values[5] = fw_nusd_numeric(copy.reserved);
		values[6] = fw_nusd_numeric(copy.premium_spent);
		values[7] = Int64GetDatum(copy.refusals);
		if (copy.state != FW_SS_READY)
			nulls[4] = nulls[5] = nulls[6] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
