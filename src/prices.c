/*-------------------------------------------------------------------------
 *
 * prices.c
 *		The flusher's cache of fw_tier.prices and the cost of one attempt
 *		(fw_tier.calls.cost_usd).
 *
 * The flusher prices every row it writes; a join per batch in SQL was a
 * good part of the insert's cost.  It keeps the table in a hash keyed by
 * (path, model) instead, read with a plain table scan (no SQL, no
 * operator of any role), and drops it when a relcache invalidation for
 * fw_tier.prices arrives.  As for fw_tier.workloads (workloads.c), row
 * changes do not invalidate the relcache by themselves: the statement
 * trigger prices_changed (fw_tier--0.2--0.3.sql, section A) sends one, and
 * the flusher receives it at the start of its next transaction or when it
 * takes a lock, that is before or during its next batch.  DDL on the
 * table, TRUNCATE, DROP invalidate by themselves.  Logical replication's
 * apply fires row triggers only, never statement triggers (ENABLE ALWAYS
 * does not change that): on a subscriber a replicated price change
 * reaches the cache only with the next invalidation (a local change, DDL,
 * the flusher's restart).
 *
 * The scan reads with a snapshot taken after the lock on fw_tier.prices,
 * not the flusher's transaction snapshot: that one is older than the
 * invalidations the lock (or the lock on fw_tier.calls before it)
 * consumed, and a change committed in between would be consumed yet not
 * seen, the old price kept until the next change.
 *
 * A price that is not a number below $1e9 per million tokens ('NaN',
 * 'Infinity', a row older than section D's prices_finite constraint) is
 * no price: the cost is NULL, as spend.c treats it, rather than a NaN or
 * an infinity that no sum of cost_usd survives.
 *
 * The cost is the arithmetic the SQL insert did before (fw_tier 0.2),
 * with the same numeric functions in the same order, so the figures are
 * the same to the last digit: 0 for a replayed attempt and for a failed
 * one without usage, NULL without a price, else
 * ((prompt - cached) * input + cached * cached_input + completion * output)
 * / 1e6 with unknown token counts taken as 0.
 *
 * Locking: the scan takes AccessShareLock on fw_tier.prices (under the
 * flusher's lock_timeout); no LWLock.  Process-local state only.
 *
 * Called by: loginsert.c, in the flusher's transaction.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "nodes/makefuncs.h"
#include "parser/parse_relation.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "worker.h"

/* key: the path's number, then the model id, NUL-terminated */
#define FW_PRICE_KEYLEN		(FW_MODELLEN + 1)

typedef struct FwPriceEntry
{
	char		key[FW_PRICE_KEYLEN];
	Datum		input;			/* numeric, in fw_price_cxt */
	Datum		cached_input;
	Datum		output;
} FwPriceEntry;

static HTAB *fw_price_cache = NULL;
static MemoryContext fw_price_cxt = NULL;
static Oid	fw_price_relid = InvalidOid;
static bool fw_price_valid = false;
static bool fw_price_callback = false;
static Datum fw_numeric_zero;
static Datum fw_numeric_million;

static void
fw_price_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == fw_price_relid)
		fw_price_valid = false;
}

static void
fw_price_key(char *key, FwPath path, const char *model)
{
	key[0] = (char) ('0' + (int) path);
	strlcpy(key + 1, model, FW_PRICE_KEYLEN - 1);
}

/* attribute number of a column of fw_tier.prices of the type expected */
static AttrNumber
fw_price_attnum(Relation rel, const char *name, Oid typid)
{
	int			attnum = attnameAttNum(rel, name, false);

	if (attnum <= 0 ||
		TupleDescAttr(RelationGetDescr(rel), attnum - 1)->atttypid != typid)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("fw_tier.prices has no column \"%s\" of type %s",
						name, format_type_be(typid)),
				 errhint("Run ALTER EXTENSION fw_tier UPDATE, or restore the table's definition.")));
	return (AttrNumber) attnum;
}

/*
 * The price in a column, copied; (Datum) 0 (no price) for NULL and for
 * anything outside [0, 1e9): 'NaN' sorts above every number, so this one
 * comparison also refuses it and 'Infinity' (prices_finite's rule).
 */
static Datum
fw_price_copy(TupleTableSlot *slot, AttrNumber attnum, Datum limit)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, attnum, &isnull);

	if (isnull)
		return (Datum) 0;		/* the table's NOT NULL forbids this */
	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, d, limit)) >= 0 ||
		DatumGetInt32(DirectFunctionCall2(numeric_cmp, d, fw_numeric_zero)) < 0)
		return (Datum) 0;
	return NumericGetDatum(DatumGetNumericCopy(d));
}

static void
fw_price_load(void)
{
	HASHCTL		ctl;
	HTAB	   *h;
	Relation	rel;
	TableScanDesc scan;
	TupleTableSlot *slot;
	AttrNumber	a_model,
				a_path,
				a_in,
				a_cached,
				a_out;
	MemoryContext old;
	Snapshot	snap;
	Datum		limit;

	if (!fw_price_callback)
	{
		CacheRegisterRelcacheCallback(fw_price_invalidate, (Datum) 0);
		fw_price_callback = true;
	}
	if (fw_price_cxt == NULL)
	{
		fw_price_cxt = AllocSetContextCreate(TopMemoryContext, "fw_tier prices",
											 ALLOCSET_SMALL_SIZES);
		old = MemoryContextSwitchTo(TopMemoryContext);
		fw_numeric_zero = DirectFunctionCall1(int4_numeric, Int32GetDatum(0));
		fw_numeric_million = DirectFunctionCall1(int4_numeric, Int32GetDatum(1000000));
		MemoryContextSwitchTo(old);
	}
	else
		MemoryContextReset(fw_price_cxt);
	fw_price_cache = NULL;

	/* under lock_timeout; a concurrent DROP is waited for, then an error */
	fw_price_relid = RangeVarGetRelid(makeRangeVar("fw_tier", "prices", -1),
									  AccessShareLock, false);
	/* valid first: an invalidation from here on marks it stale again */
	fw_price_valid = true;
	rel = table_open(fw_price_relid, NoLock);
	a_model = fw_price_attnum(rel, "model", TEXTOID);
	a_path = fw_price_attnum(rel, "path", TEXTOID);
	a_in = fw_price_attnum(rel, "input_usd_per_mtok", NUMERICOID);
	a_cached = fw_price_attnum(rel, "cached_input_usd_per_mtok", NUMERICOID);
	a_out = fw_price_attnum(rel, "output_usd_per_mtok", NUMERICOID);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = FW_PRICE_KEYLEN;
	ctl.entrysize = sizeof(FwPriceEntry);
	ctl.hcxt = fw_price_cxt;
	h = hash_create("fw_tier prices", 64, &ctl,
					HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	limit = DirectFunctionCall1(int4_numeric, Int32GetDatum(1000000000));
	slot = table_slot_create(rel, NULL);
	/* after the lock: sees every change whose invalidation was consumed */
	snap = RegisterSnapshot(GetLatestSnapshot());
	scan = table_beginscan(rel, snap, 0, NULL);
	while (table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		Datum		d;
		char	   *model;
		char	   *pathname;
		FwPath		path;
		char		key[FW_PRICE_KEYLEN];
		FwPriceEntry *e;

		d = slot_getattr(slot, a_model, &isnull);
		if (isnull)
			continue;
		model = TextDatumGetCString(d);
		d = slot_getattr(slot, a_path, &isnull);
		if (isnull)
			continue;
		pathname = TextDatumGetCString(d);
		/* a model id no record can carry, a path no record has: no match */
		if (strlen(model) >= FW_MODELLEN || !fw_parse_path(pathname, &path) ||
			strcmp(pathname, fw_path_name(path)) != 0)
			continue;
		fw_price_key(key, path, model);
		e = hash_search(h, key, HASH_ENTER, NULL);
		old = MemoryContextSwitchTo(fw_price_cxt);
		e->input = fw_price_copy(slot, a_in, limit);
		e->cached_input = fw_price_copy(slot, a_cached, limit);
		e->output = fw_price_copy(slot, a_out, limit);
		MemoryContextSwitchTo(old);
	}
	table_endscan(scan);
	UnregisterSnapshot(snap);
	ExecDropSingleTupleTableSlot(slot);
	table_close(rel, NoLock);
	/* published only when complete: an error above leaves no half cache */
	fw_price_cache = h;
}

/* tokens::numeric * price */
static Datum
fw_price_term(int32 tokens, Datum price)
{
	return DirectFunctionCall2(numeric_mul,
							   DirectFunctionCall1(int4_numeric, Int32GetDatum(tokens)),
							   price);
}

/*
 * cost_usd of one attempt.  Token counts below 0 are unknown (NULL in the
 * row); model is the text written to the row's model column.
 */
Datum
fw_price_cost(FwPath path, const char *model, FwOutcome outcome, bool replayed,
			  int32 prompt, int32 cached, int32 completion, bool *isnull)
{
	char		key[FW_PRICE_KEYLEN];
	FwPriceEntry *e = NULL;
	Datum		sum;

	if (!fw_price_valid || fw_price_cache == NULL)
		fw_price_load();
	*isnull = false;
	if (replayed || (prompt < 0 && completion < 0 && outcome != FW_OK))
		return fw_numeric_zero;
	if (strlen(model) < FW_MODELLEN)
	{
		fw_price_key(key, path, model);
		e = hash_search(fw_price_cache, key, HASH_FIND, NULL);
	}
	if (e == NULL || e->input == (Datum) 0 || e->cached_input == (Datum) 0 ||
		e->output == (Datum) 0)
	{
		*isnull = true;
		return (Datum) 0;
	}
	/* coalesce(x, 0): unknown counts are -1 */
	prompt = Max(prompt, 0);
	cached = Max(cached, 0);
	completion = Max(completion, 0);
	/* prompt - cached in int4, as the SQL did */
	sum = fw_price_term(DatumGetInt32(DirectFunctionCall2(int4mi,
														  Int32GetDatum(prompt),
														  Int32GetDatum(cached))),
						e->input);
	sum = DirectFunctionCall2(numeric_add, sum, fw_price_term(cached, e->cached_input));
	sum = DirectFunctionCall2(numeric_add, sum, fw_price_term(completion, e->output));
	return DirectFunctionCall2(numeric_div, sum, fw_numeric_million);
}
