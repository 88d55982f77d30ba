/*-------------------------------------------------------------------------
 *
 * workloads.c
 *		Backend-local cache of fw_tier.workloads.
 *
 * Reading the table with SPI on every call would cost more than the HTTP
 * round trip to a local endpoint, so each backend keeps a copy and drops
 * it when a relcache invalidation for the table arrives.  Row changes do
 * not invalidate the relcache by themselves, so a statement trigger on the
 * table (fw_workloads_changed) sends one: it reaches the changing session
 * at its next command and every other session when the change commits,
 * with no restart and no polling.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#include "workloads.h"

static HTAB *fw_wl_cache = NULL;
static MemoryContext fw_wl_cxt = NULL;
static Oid	fw_wl_relid = InvalidOid;
static bool fw_wl_valid = false;
static bool fw_wl_callback_registered = false;

/* Shared-memory slot handle per name; survives cache rebuilds. */
typedef struct FwSlotEntry
{
	char		name[FW_NAMELEN];
	int64		slot;
} FwSlotEntry;

static HTAB *fw_slot_cache = NULL;

PG_FUNCTION_INFO_V1(fw_workloads_changed);

/* AFTER ... FOR EACH STATEMENT trigger on fw_tier.workloads. */
Datum
fw_workloads_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("fw_workloads_changed must be called as a trigger")));
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trigdata->tg_relation));
	return PointerGetDatum(NULL);
}

static void
fw_wl_invalidate(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == fw_wl_relid)
		fw_wl_valid = false;
}

static void
fw_wl_load(void)
{
	HASHCTL		ctl;
	HTAB	   *h;
	Oid			nsp;
	int			ret;
	bool		has_models;
	bool		has_policy;

	if (!fw_wl_callback_registered)
	{
		CacheRegisterRelcacheCallback(fw_wl_invalidate, (Datum) 0);
		fw_wl_callback_registered = true;
	}

	nsp = get_namespace_oid("fw_tier", true);
	fw_wl_relid = OidIsValid(nsp) ? get_relname_relid("workloads", nsp) : InvalidOid;
	if (!OidIsValid(fw_wl_relid))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("table fw_tier.workloads does not exist"),
				 errhint("Run CREATE EXTENSION fw_tier in this database.")));

	if (fw_wl_cxt == NULL)
		fw_wl_cxt = AllocSetContextCreate(TopMemoryContext, "fw_tier workloads",
										  ALLOCSET_SMALL_SIZES);
	else
		MemoryContextReset(fw_wl_cxt);
	fw_wl_cache = NULL;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = FW_NAMELEN;
	ctl.entrysize = sizeof(FwWorkloadConf);
	ctl.hcxt = fw_wl_cxt;

	/* Mark valid first: an invalidation during the read marks it stale. */
	fw_wl_valid = true;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/*
	 * Columns that came with 0.3 (issue 12: embedding_model, rerank_model;
	 * issue 16: window_policy): a new library over older SQL (before ALTER
	 * EXTENSION UPDATE) still calls, with the default models and 'fixed'
	 * windows.
	 */
	has_models = (get_attnum(fw_wl_relid, "embedding_model") != InvalidAttrNumber);
	has_policy = (get_attnum(fw_wl_relid, "window_policy") != InvalidAttrNumber);
	ret = SPI_execute(psprintf("SELECT workload, path, model, fast_model, on_overload,"
							   " extract(epoch FROM priority_window)::pg_catalog.int8,"
							   " %s, %s FROM fw_tier.workloads",
							   has_models ? "embedding_model, rerank_model" :
							   "NULL::pg_catalog.text, NULL::pg_catalog.text",
							   has_policy ? "window_policy" : "'fixed'::pg_catalog.text"),
					  true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not read fw_tier.workloads: %s", SPI_result_code_string(ret));

	h = hash_create("fw_tier workloads", Max(SPI_processed, 8), &ctl,
					HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *name = SPI_getvalue(tup, desc, 1);
		char	   *path = SPI_getvalue(tup, desc, 2);
		char	   *model = SPI_getvalue(tup, desc, 3);
		char	   *fast = SPI_getvalue(tup, desc, 4);
		char	   *policy = SPI_getvalue(tup, desc, 5);
		char	   *window = SPI_getvalue(tup, desc, 6);
		char	   *emodel = SPI_getvalue(tup, desc, 7);
		char	   *rmodel = SPI_getvalue(tup, desc, 8);
		char	   *wpolicy = SPI_getvalue(tup, desc, 9);
		FwWorkloadConf *wl;
		bool		found;

		if (strlen(name) >= FW_NAMELEN)
			continue;			/* the table's CHECK forbids this */
		wl = hash_search(h, name, HASH_ENTER, &found);
		if (!fw_parse_path(path, &wl->path))
			wl->path = FW_PATH_STANDARD;
		if (!fw_parse_on_overload(policy, &wl->on_overload))
			wl->on_overload = FW_ONOVERLOAD_RETRY;
		wl->model = model ? MemoryContextStrdup(fw_wl_cxt, model) : NULL;
		wl->fast_model = fast ? MemoryContextStrdup(fw_wl_cxt, fast) : NULL;
		wl->window_s = window ? (int) Min(strtol(window, NULL, 10), INT_MAX) : 0;
		wl->embedding_model = emodel ? MemoryContextStrdup(fw_wl_cxt, emodel) : NULL;
		wl->rerank_model = rmodel ? MemoryContextStrdup(fw_wl_cxt, rmodel) : NULL;
		/* the table's CHECK allows these two only; anything else: fixed */
		wl->window_policy = (wpolicy && strcmp(wpolicy, "probe") == 0) ?
			FW_WINDOW_PROBE : FW_WINDOW_FIXED;
	}
	SPI_finish();
	/* Published only when complete: an error above leaves no half cache. */
	fw_wl_cache = h;
}

/*
 * Copy the named workload's settings into *out (strings palloc'd in the
 * current context, so a cache rebuild during the call cannot pull them
 * away).  Unknown workload: ERROR 22023 naming it.
 */
void
fw_workload_get(const char *name, FwWorkloadConf *out)
{
	FwWorkloadConf *wl = NULL;
	FwSlotEntry *se;
	bool		found;

	if (!fw_wl_valid || fw_wl_cache == NULL)
		fw_wl_load();
	if (strlen(name) < FW_NAMELEN)
		wl = hash_search(fw_wl_cache, name, HASH_FIND, NULL);
	if (wl == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown fw_tier workload \"%s\"", name),
				 errhint("Workloads are rows of fw_tier.workloads.")));

	memcpy(out, wl, sizeof(FwWorkloadConf));
	out->model = wl->model ? pstrdup(wl->model) : NULL;
	out->fast_model = wl->fast_model ? pstrdup(wl->fast_model) : NULL;
	out->embedding_model = wl->embedding_model ? pstrdup(wl->embedding_model) : NULL;
	out->rerank_model = wl->rerank_model ? pstrdup(wl->rerank_model) : NULL;

	if (fw_slot_cache == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = FW_NAMELEN;
		ctl.entrysize = sizeof(FwSlotEntry);
		fw_slot_cache = hash_create("fw_tier workload slots", 16, &ctl,
									HASH_ELEM | HASH_STRINGS);
	}
	se = hash_search(fw_slot_cache, out->name, HASH_FIND, &found);
	/* a slot left idle may have been given to another workload since */
	if (se == NULL || !fw_workload_slot_valid(se->slot))
	{
		int64		slot = fw_workload_slot(out->name);

		se = hash_search(fw_slot_cache, out->name, HASH_ENTER, &found);
		se->slot = slot;
	}
	out->slot = se->slot;
}
