/*-------------------------------------------------------------------------
 *
 * budget.h
 *		The account's rate budget per model, shared by every backend,
 *		and per-backend batch progress.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_BUDGET_H
#define FW_BUDGET_H

#include "fw_tier.h"

/* budget.c */
extern Size fw_budget_shmem_size(void);
extern void fw_budget_shmem_init(void);
extern uint64 fw_budget_key_fingerprint(const char *api_key);
extern int64 fw_budget_acquire(const char *model, uint64 key_fp, int est_prompt,
							   TimestampTz now);
extern void fw_budget_settle(const char *model, uint64 key_fp, int est_prompt,
							 int prompt_tokens, int completion_tokens,
							 int prompt_per_s, int generated_per_s,
							 TimestampTz now);
extern void fw_budget_pause(const char *model, uint64 key_fp, TimestampTz until);

/* progress.c */
extern Size fw_progress_shmem_size(void);
extern void fw_progress_shmem_init(void);
extern void fw_progress_begin(const char *workload, int ncalls);
extern void fw_progress_update(int done, int in_flight, int failed, int limit);
extern void fw_progress_end(void);

#endif							/* FW_BUDGET_H */
