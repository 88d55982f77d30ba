/*-------------------------------------------------------------------------
 *
 * spend.h
 *		Spend limits (fw_tier.budgets): reserve, then settle, in shared
 *		memory.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_SPEND_H
#define FW_SPEND_H

#include "fw_tier.h"
#include "utils/jsonb.h"

struct FwCall;
struct FwHttpResult;
struct FwParsed;

/* shmem.c */
extern Size fw_spend_shmem_size(void);
extern void fw_spend_shmem_init(void);

/* engine.c, around each run and each attempt */
extern void fw_spend_begin(struct FwCall *calls, int ncalls);
extern bool fw_spend_premium_blocked(struct FwCall *c);
typedef enum FwSpendResult
{
	FW_SPEND_OK,				/* reserved */
	FW_SPEND_REFUSED,			/* refused: c->detail says why */
	FW_SPEND_STANDARD			/* premium spent (standard_only): go on Standard */
} FwSpendResult;

extern FwSpendResult fw_spend_reserve(struct FwCall *c, TimestampTz now);
extern Jsonb *fw_spend_send_options(struct FwCall *c);
extern void fw_spend_settle(struct FwCall *c, const struct FwHttpResult *r,
							FwOutcome outcome, const struct FwParsed *parsed);
extern void fw_spend_settle_aborted(struct FwCall *c, bool sent);
extern const char *fw_spend_refusal_hint(struct FwCall *c);

/* worker.c (the flusher): restore spend from fw_tier.calls, send alerts */
extern bool fw_spend_worker_pending(void);
extern void fw_spend_worker_run(void);

#endif							/* FW_SPEND_H */
