/*-------------------------------------------------------------------------
 *
 * budget.c
 *		The account's rate budget per model, shared by every backend.
 *
 * Fireworks enforces rate limits per account and model (Standard and
 * Priority share one; each Fast id has its own), so two backends running
 * batches against one model must pace themselves together.  Each (model
 * id, API key) pair gets a slot here (with fw_tier.api_key_dir two roles
 * may bill two accounts; the key is kept only as a 64-bit fingerprint,
 * never itself) with:
 *
 *	- paused_until: a 429's Retry-After, seen by every backend at once;
 *	- token buckets for prompt and generated tokens, filled at the
 *	  per-second limits the provider announces in X-Ratelimit-Limit-Tokens-*
 *	  headers (unknown until the first response: no pacing before that).
 *
 * Locking: one spinlock guards the whole table.  Every critical section is
 * a handful of arithmetic on one slot: no palloc, no ereport, no I/O.  A
 * full table simply stops pacing new models (the provider's 429s still
 * slow them down), never fails a call.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/timestamp.h"

#include "budget.h"

#define FW_BUDGET_SLOTS		64
/* Buckets hold at most this many seconds of tokens: a short burst. */
#define FW_BUDGET_BURST_S	2.0

typedef struct FwBudgetSlot
{
	char		model[FW_MODELLEN];
	uint64		key_fp;			/* fw_budget_key_fingerprint of the key */
	TimestampTz paused_until;
	TimestampTz refilled_at;
	double		prompt_per_s;	/* <= 0: unknown */
	double		generated_per_s;
	double		prompt_tokens;	/* bucket levels; may go negative (debt) */
	double		generated_tokens;
} FwBudgetSlot;

typedef struct FwBudgetTable
{
	slock_t		mutex;
	int			nslots;
	FwBudgetSlot slots[FW_BUDGET_SLOTS];
} FwBudgetTable;

static FwBudgetTable *fw_budget = NULL;

Size
fw_budget_shmem_size(void)
{
	return sizeof(FwBudgetTable);
}

/* Called from the shmem startup hook with AddinShmemInitLock held. */
void
fw_budget_shmem_init(void)
{
	bool		found;

	fw_budget = ShmemInitStruct("fw_tier budget", sizeof(FwBudgetTable), &found);
	if (!found)
	{
		memset(fw_budget, 0, sizeof(FwBudgetTable));
		SpinLockInit(&fw_budget->mutex);
	}
}

/*
 * Which account a key bills, as far as pacing cares: a seeded 64-bit hash,
 * so that shared memory never holds the key.  A collision only makes two
 * accounts pace together.
 */
uint64
fw_budget_key_fingerprint(const char *api_key)
{
	if (api_key == NULL)
		return 0;
	return hash_bytes_extended((const unsigned char *) api_key,
							   (int) strlen(api_key), UINT64CONST(0x66775f74696572));
}

/* Caller holds the spinlock.  NULL when the table is full. */
static FwBudgetSlot *
fw_budget_slot(const char *model, uint64 key_fp)
{
	for (int i = 0; i < fw_budget->nslots; i++)
		if (fw_budget->slots[i].key_fp == key_fp &&
			strcmp(fw_budget->slots[i].model, model) == 0)
			return &fw_budget->slots[i];
	if (fw_budget->nslots < FW_BUDGET_SLOTS && strlen(model) < FW_MODELLEN)
	{
		FwBudgetSlot *s = &fw_budget->slots[fw_budget->nslots++];

		memset(s, 0, sizeof(*s));
		strcpy(s->model, model);
		s->key_fp = key_fp;
		return s;
	}
	return NULL;
}

/* Caller holds the spinlock. */
static void
fw_budget_refill(FwBudgetSlot *s, TimestampTz now)
{
	double		secs = (s->refilled_at == 0) ? 0 : (now - s->refilled_at) / 1e6;

	if (secs > 0)
	{
		if (s->prompt_per_s > 0)
			s->prompt_tokens = Min(s->prompt_tokens + secs * s->prompt_per_s,
								   s->prompt_per_s * FW_BUDGET_BURST_S);
		if (s->generated_per_s > 0)
			s->generated_tokens = Min(s->generated_tokens + secs * s->generated_per_s,
									  s->generated_per_s * FW_BUDGET_BURST_S);
	}
	s->refilled_at = now;
}

/*
 * May a request of about est_prompt prompt tokens start now?  Returns 0
 * and takes the tokens, or the number of milliseconds to wait.
 */
int64
fw_budget_acquire(const char *model, uint64 key_fp, int est_prompt,
				  TimestampTz now)
{
	FwBudgetSlot *s;
	int64		wait_ms = 0;

	if (fw_budget == NULL)
		return 0;
	SpinLockAcquire(&fw_budget->mutex);
	s = fw_budget_slot(model, key_fp);
	if (s)
	{
		fw_budget_refill(s, now);
		if (s->paused_until > now)
			wait_ms = (s->paused_until - now + 999) / 1000;
		else if (s->prompt_per_s > 0 && s->prompt_tokens < est_prompt &&
				 s->prompt_tokens < s->prompt_per_s * FW_BUDGET_BURST_S)
			wait_ms = (int64) ((est_prompt - s->prompt_tokens) * 1000.0 / s->prompt_per_s) + 1;
		else if (s->generated_per_s > 0 && s->generated_tokens < 0)
			wait_ms = (int64) (-s->generated_tokens * 1000.0 / s->generated_per_s) + 1;
		else
			s->prompt_tokens -= est_prompt;
	}
	SpinLockRelease(&fw_budget->mutex);
	return wait_ms;
}

/*
 * After a response: learn the announced limits and settle what the
 * request really used (est_prompt was taken up front).
 */
void
fw_budget_settle(const char *model, uint64 key_fp, int est_prompt,
				 int prompt_tokens, int completion_tokens, int prompt_per_s,
				 int generated_per_s, TimestampTz now)
{
	FwBudgetSlot *s;

	if (fw_budget == NULL)
		return;
	SpinLockAcquire(&fw_budget->mutex);
	s = fw_budget_slot(model, key_fp);
	if (s)
	{
		fw_budget_refill(s, now);
		if (prompt_per_s > 0 && s->prompt_per_s <= 0)
			s->prompt_tokens = prompt_per_s;	/* first sight: a full bucket */
		if (generated_per_s > 0 && s->generated_per_s <= 0)
			s->generated_tokens = generated_per_s;
		if (prompt_per_s > 0)
			s->prompt_per_s = prompt_per_s;
		if (generated_per_s > 0)
			s->generated_per_s = generated_per_s;
		if (prompt_tokens >= 0 && s->prompt_per_s > 0)
			s->prompt_tokens -= (prompt_tokens - est_prompt);
		if (completion_tokens > 0 && s->generated_per_s > 0)
			s->generated_tokens -= completion_tokens;
	}
	SpinLockRelease(&fw_budget->mutex);
}

/* A 429: nobody starts a request on this model before until. */
void
fw_budget_pause(const char *model, uint64 key_fp, TimestampTz until)
{
	FwBudgetSlot *s;

	if (fw_budget == NULL)
		return;
	SpinLockAcquire(&fw_budget->mutex);
	s = fw_budget_slot(model, key_fp);
	if (s && s->paused_until < until)
		s->paused_until = until;
	SpinLockRelease(&fw_budget->mutex);
}
