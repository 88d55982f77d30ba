/*-------------------------------------------------------------------------
 *
 * worker.h
 *		What the background-worker files share: launcher.c (the static
 *		worker and what both workers use), flusher.c (the database work),
 *		winsync.c (fw_tier.escalations), loginsert.c (rows of
 *		fw_tier.calls), prices.c (their cost), shipper.c (a standby's
 *		shipper and fw_tier.ingest_calls, issue 11).
 *
 * Private to those four files; the rest of fw_tier sees only the entry
 * points declared in fw_tier.h.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_WORKER_H
#define FW_WORKER_H

#include "fw_tier.h"
#include "postmaster/bgworker.h"

#define FW_BATCH_MAX		1000	/* records per transaction */
#define FW_RETRY_MAX_MS		10000	/* longest pause after a failed batch */

/* FwSharedState.worker_flags */
#define FW_WF_RESTORED		0x01	/* open windows read back after startup */
#define FW_WF_OLDEXT		0x04	/* the extension's SQL is older than this
									 * library (said once, until it changes) */
#define FW_WF_NOEXT			0x02	/* a flusher found no extension (and said
									 * so) */
/* either: the flusher cannot write there; the launcher backs off */
#define FW_WF_EXTWAIT		(FW_WF_NOEXT | FW_WF_OLDEXT)

/* launcher.c: shared by both workers */
extern void fw_worker_pin_search_path(void);
extern bool fw_database_busy(Oid dboid);
extern long fw_ms_until(TimestampTz deadline, TimestampTz now);
extern void fw_worker_describe(BackgroundWorker *worker, const char *function,
							   const char *name, int restart_time, pid_t notify_pid);

extern bool fw_launcher_database_ok(void);	/* issue 11 */

/* shipper.c: the launcher's part on a standby (issue 11) */
extern TimestampTz fw_shipper_launch(BackgroundWorkerHandle **handle,
									 TimestampTz now);

/* winsync.c: mirror the windows (and restore them at start), flusher only */
extern TimestampTz fw_winsync_windows(bool at_start, int *nsynced);

/* loginsert.c: the batch's rows into fw_tier.calls, flusher only */
extern uint64 fw_loginsert_batch(FwDrainedRecord *batch, int n, bool may_repeat);
extern void fw_loginsert_reset(void);
extern void fw_loginsert_set_origin(int64 sysid, const char *node);	/* issue 11 */

/* prices.c: cost_usd of an attempt, from the cache of fw_tier.prices */
extern Datum fw_price_cost(FwPath path, const char *model, FwOutcome outcome,
						   bool replayed, int32 prompt, int32 cached,
						   int32 completion, bool *isnull);

#endif							/* FW_WORKER_H */
