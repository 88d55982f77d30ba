/*-------------------------------------------------------------------------
 *
 * engine.h
 *		One SQL call, or a batch of them: route, attempt, classify, retry,
 *		log.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_ENGINE_H
#define FW_ENGINE_H

#include "fmgr.h"

#include "fw_tier.h"
#include "workloads.h"

struct FwHttpXfer;

typedef struct FwCall
{
	/* ---- set by the caller ---- */
	FwWorkloadConf	wl;				/* copy of the workload's settings */
	Jsonb	   *messages;
	Jsonb	   *options;		/* may be NULL */
	bool		want_text;		/* fw_complete: need message.content */
	const char *prompt_text;	/* for the call log with log_content */
	Jsonb	   *schema;			/* fw_complete_json: the checked schema the
								 * answer must match (issue 12), or NULL */
	/* issue 12: embeddings and rerank (embed.c) */
	FwCallKind	kind;
	Jsonb	   *fields;			/* not chat: the body's own fields (input,
								 * or query and documents); NULL for chat */
	int			expect_n;		/* embed: vectors wanted; rerank: documents */
	int			expect_dims;	/* embed: options.dimensions, 0 = any */
	int			top_n;			/* rerank: results at most, 0 = expect_n */

	/* ---- results ---- */
	bool		finished;
	bool		ok;
	char	   *content;		/* want_text: the answer */
	Jsonb	   *response;		/* the provider's whole response */
	FwOutcome	outcome;		/* of the last attempt */
	int			http_status;
	char	   *detail;			/* provider's message or transport error */
	Jsonb	   *output;			/* schema set: the answer as jsonb */
	int			bad_output;		/* FwOutputCheck of the last attempt */
	struct FwTyped *typed;		/* not chat: the validated answer (embed.h) */

	/* ---- engine state ---- */
	FwPath		configured;
	bool		forced;			/* options.path given: never escalated */
	char	   *model;
	char	   *affinity;
	int64		call_id;
	int			attempt;
	TimestampTz not_before;		/* backoff: next attempt not before */
	TimestampTz attempt_start;
	FwPath		path_sent;
	bool		escalated;
	char	   *body;			/* request body for path_sent */
	size_t		body_len;
	FwPath		body_path;		/* path body was built for */
	struct FwHttpXfer *xfer;	/* in flight, or NULL */
	char	   *fingerprint;	/* record/replay key, computed on demand */
	const char *budget_model;	/* the model id the rate budget is kept for */
	uint64		budget_key;		/* fingerprint of the API key it bills */
	int			est_prompt;		/* prompt tokens taken from the budget */
	struct FwSpendCall *spend;	/* spend limits that apply (spend.c), or NULL */
	bool		premium_capped; /* a budget's premium is spent: no escalation */
	bool		probe;			/* issue 16: this attempt is a Standard probe */
	bool		no_probe;		/* issue 16: a probe of this call was shed:
								 * its retries stay on Priority */
	int			intent;			/* write-ahead slot of the attempt in
								 * flight, -1 = none (issue 18) */
	int			max_tokens;		/* options.max_tokens, 0 = not given */
} FwCall;

extern void fw_call_init(FwCall *call, const char *workload, Jsonb *messages,
						 Jsonb *options, bool want_text);
extern void fw_call_init_kind(FwCall *call, FwCallKind kind, const char *workload,
							  Jsonb *content, Jsonb *options);
extern void fw_engine_run(FwCall *calls, int ncalls, int concurrency,
						  bool stop_on_error);
/*
 * issue 14: called once per turn of the run's loop (and never while a
 * transfer is being read), so that a caller outside any statement (the
 * enrichment worker) can make each finished call durable at once.
 */
typedef void (*FwEngineHook) (FwCall *calls, int ncalls, void *arg);
extern void fw_engine_set_hook(FwEngineHook hook, void *arg);
extern FwOnError fw_call_on_error(Jsonb *options);
extern void fw_call_raise(FwCall *call);
extern char *fw_workload_arg(FunctionCallInfo fcinfo, int argno);

#endif							/* FW_ENGINE_H */
