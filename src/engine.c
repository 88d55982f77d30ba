/*-------------------------------------------------------------------------
 *
 * engine.c
 *		One SQL call, or a batch of them: route, attempt, classify, retry,
 *		log.
 *
 * fw_complete is a batch of one: every call runs through fw_engine_run,
 * which keeps up to `concurrency` attempts in flight on the backend's
 * libcurl multi handle, starts retries when their backoff ends, and never
 * sleeps past the statement's deadline.  No threads.
 *
 * Spend limits (spend.c): before a run its budgets are resolved; each
 * attempt reserves its worst case before it is sent (or is refused, logged
 * as refused, nothing sent) and settles from usage when it ends.
 *
 * A call has a kind (issue 12): a chat completion, embeddings or a rerank.
 * The kind picks the URL, the body (messages, or FwCall.fields) and the
 * check of a 2xx answer (fwjson.c for chat, embed.c for the others);
 * everything else below is the same for all three.
 *
 * Each attempt is classified (README "Failure classes"), counted in shared
 * memory, pushed to the call-log ring, and then decides what happens next:
 * done, fail, retry at once on Priority (escalation), or retry after a
 * backoff.  Cancel (pg_cancel_backend, statement_timeout) is noticed within
 * one poll: in-flight attempts are logged as cancelled, every transfer is
 * released, and CHECK_FOR_INTERRUPTS raises 57014.  Any other interrupt
 * (barriers, parallel worker messages, memory-context logging, client
 * checks) is serviced by CHECK_FOR_INTERRUPTS while the attempts go on.
 *
 * Write-ahead (issue 18): before an attempt's first byte is sent, its
 * record as outcome 'unknown' at the worst case (fw_worst_case_tokens)
 * goes to a slot of the intent file (calllog.c, "Write-ahead attempts");
 * logging the attempt frees it, after the push.  A crash of any process
 * in between leaves the slot for recovery to log.  Abort and exit paths
 * that lose a transfer without logging it hand their slots back as
 * 'unknown' records (fw_intents_abandon_mine).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "commands/dbcommands.h"
#include "common/pg_prng.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "access/xact.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/numeric.h"
#include "utils/syscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "budget.h"
#include "embed.h"
#include "engine.h"
#include "fixtures.h"
#include "fwjson.h"
#include "http.h"
#include "jsonschema.h"
#include "spend.h"

/* Longest single sleep: bounds cancel latency should a signal slip by. */
#define FW_POLL_SLICE_MS	20

/* Unavailable and transport failures get one short retry, then fail. */
#define FW_UNAVAILABLE_ATTEMPTS 2

/* A bad typed answer is asked for once more, at once, then fails. */
#define FW_BAD_OUTPUT_ATTEMPTS	2

/* A 429 without Retry-After pauses the model this long for everyone. */
#define FW_SHARED_PAUSE_MS	1000

static char *fw_dbname = NULL;

/* issue 14: the enrichment worker's per-turn hook (fw_engine_set_hook) */
static FwEngineHook fw_turn_hook = NULL;
static void *fw_turn_hook_arg = NULL;

void
fw_engine_set_hook(FwEngineHook hook, void *arg)
{
	fw_turn_hook = hook;
	fw_turn_hook_arg = arg;
}

/*
 * the user name of the records, for fw_uname_uid; forgotten when any role
 * changes (issue 15: looking it up for every statement was a catalog
 * lookup per fw_complete)
 */
static Oid	fw_uname_uid = InvalidOid;
static NameData fw_uname;

static void
fw_uname_forget(Datum arg, int cacheid, uint32 hashvalue)
{
	fw_uname_uid = InvalidOid;
}

static int	fw_option_max_tokens(Jsonb *options);

static TimestampTz
fw_statement_deadline(void)
{
	if (StatementTimeout <= 0)
		return DT_NOEND;
	return GetCurrentStatementStartTimestamp() +
		(TimestampTz) StatementTimeout * 1000;
}

FwOnError
fw_call_on_error(Jsonb *options)
{
	char	   *v = fw_option_text(options, "on_error");

	if (v == NULL)
		return (FwOnError) fw_on_error;
	if (strcmp(v, "null") == 0)
		return FW_ONERROR_NULL;
	if (strcmp(v, "raise") == 0)
		return FW_ONERROR_RAISE;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid on_error option \"%s\"", v),
			 errhint("Use \"raise\" or \"null\".")));
	return FW_ONERROR_RAISE;	/* keep compiler quiet */
}

/*
 * Resolve everything about a call that does not change between attempts.
 * Errors here (unknown workload, bad options) are the caller's mistakes and
 * are raised whatever on_error says.
 */
void
fw_call_init(FwCall *call, const char *workload, Jsonb *messages,
			 Jsonb *options, bool want_text)
{
	fw_call_init_kind(call, FW_KIND_CHAT, workload, messages, options);
	call->want_text = want_text;
}

/*
 * The same for any kind (issue 12): content is the messages of a chat, or
 * the body fields of embeddings and rerank (see FwCall.fields).
 */
void
fw_call_init_kind(FwCall *call, FwCallKind kind, const char *workload,
				  Jsonb *content, Jsonb *options)
{
	char	   *forced;
	char	   *model;
	const char *kind_model;

	memset(call, 0, sizeof(*call));
	call->intent = -1;
	fw_workload_get(workload, &call->wl);
	call->kind = kind;
	if (kind == FW_KIND_CHAT)
		call->messages = content;
	else
		call->fields = content;
	call->options = options;

	call->configured = call->wl.path;
	forced = fw_option_text(options, "path");
	if (forced && !fw_parse_path(forced, &call->configured))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid path option \"%s\"", forced),
				 errhint("Use \"standard\", \"priority\" or \"fast\".")));
	/* a forced path is sent as asked: never escalated (README "options") */
	call->forced = (forced != NULL);
	call->max_tokens = fw_option_max_tokens(options);

	model = fw_option_text(options, "model");
	kind_model = kind == FW_KIND_EMBED ?
		(call->wl.embedding_model ? call->wl.embedding_model : fw_default_embedding_model) :
		kind == FW_KIND_RERANK ?
		(call->wl.rerank_model ? call->wl.rerank_model : fw_default_rerank_model) :
		(call->wl.model ? call->wl.model : fw_default_model);
	call->model = model ? model : (char *) kind_model;
	if (call->model == NULL || call->model[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("no model for workload \"%s\"", call->wl.name),
				 errhint(kind == FW_KIND_EMBED ? "Set fw_tier.default_embedding_model or the workload's embedding_model." :
						 kind == FW_KIND_RERANK ? "Set fw_tier.default_rerank_model or the workload's rerank_model." :
						 "Set fw_tier.default_model or the workload's model.")));

	/*
	 * Fireworks' Fast routes are generation routers: no embedding or
	 * rerank model has one, so a Fast path cannot be honoured (issue 12).
	 */
	if (kind != FW_KIND_CHAT && call->configured == FW_PATH_FAST)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the Fast path has no route for %s model \"%s\"",
						kind == FW_KIND_EMBED ? "embedding" : "rerank", call->model),
				 errdetail("Workload \"%s\" %s the Fast path; Fireworks serves embeddings and rerank on Standard and Priority only.",
						   call->wl.name, call->forced ? "was asked for" : "is configured for"),
				 errhint("Use a workload whose path is standard or priority, or options.path.")));

	/* options.fast_model: the Fast model id for this call (README "path") */
	model = fw_option_text(options, "fast_model");
	if (model)
	{
		if (model[0] == '\0' || strlen(model) >= FW_MODELLEN)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("fast_model option must be 1 to %d bytes long", FW_MODELLEN - 1)));
		call->wl.fast_model = model;
	}

	if (call->configured == FW_PATH_FAST &&
		(call->wl.fast_model == NULL || call->wl.fast_model[0] == '\0'))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("workload \"%s\" has no fast_model", call->wl.name),
				 errhint("Set fast_model in fw_tier.workloads, or pass options.fast_model, to the Fast model id.")));

	call->affinity = fw_option_text(options, "session_affinity");
	if (call->affinity && !fw_http_header_safe(call->affinity))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("session_affinity must not contain control characters"),
				 errdetail("It is sent as the x-session-affinity header.")));
	call->budget_model = (call->configured == FW_PATH_FAST) ? call->wl.fast_model : call->model;
	/* about four bytes a token: only a pacing estimate, settled later */
	call->est_prompt = (int) (VARSIZE(content) / 4);
	call->body_path = FW_NUM_PATHS;
	call->outcome = FW_OK;
}

/* Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^n)]. */
static int64
fw_backoff_ms(int attempt)
{
	double		ceiling = (double) fw_backoff_base_ms;

	for (int i = 1; i < attempt && ceiling < fw_backoff_cap_ms; i++)
		ceiling *= 2;
	ceiling = Min(ceiling, (double) fw_backoff_cap_ms);
	return (int64) (pg_prng_double(&pg_global_prng_state) * ceiling);
}

static FwOutcome
fw_classify(const FwHttpResult *r, FwCall *call, FwParsed *parsed)
{
	memset(parsed, 0, sizeof(*parsed));
	parsed->prompt_tokens = parsed->cached_tokens = parsed->completion_tokens = -1;
	call->bad_output = FW_OUTPUT_OK;

	if (r->cancelled)
		return FW_CANCELLED;
	if (r->timed_out)
		return FW_TIMEOUT;
	if (r->failed)
		return r->too_large ? FW_BAD_RESPONSE : FW_TRANSPORT;
	if (r->status >= 200 && r->status < 300 && call->kind != FW_KIND_CHAT)
		return fw_parse_typed(call, r->body, r->body_len, parsed)
			? FW_OK : FW_BAD_RESPONSE;
	if (r->status >= 200 && r->status < 300)
	{
		if (!fw_parse_completion(r->body, r->body_len, call->want_text, parsed))
			return FW_BAD_RESPONSE;
		/* a typed answer must also be what the schema says (issue 12) */
		if (call->schema)
			call->bad_output = fw_answer_check(call->schema, parsed);
		return call->bad_output == FW_OUTPUT_OK ? FW_OK : FW_BAD_OUTPUT;
	}
	if (r->status == 429)
		return FW_RATE_LIMITED;
	if (r->status == 503)
		return (r->body && strcasestr(r->body, "overload")) ? FW_OVERLOADED : FW_UNAVAILABLE;
	if (r->status >= 500)
		return FW_UNAVAILABLE;
	/* 4xx, and 3xx: redirects are never followed, the URL is wrong. */
	return FW_CLIENT_ERROR;
}

/*
 * Copy text in the database encoding into a fixed-size record field, cut
 * between characters so the log (and any client) gets valid text.
 */
static void
fw_clip_copy(char *dst, const char *src, size_t size)
{
	int			n = pg_mbcliplen(src, strlen(src), size - 1);

	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* The call-log record of call's current attempt (r NULL: no response). */
static void
fw_fill_record(FwCall *call, const FwHttpResult *r, FwOutcome outcome,
			   const FwParsed *parsed, FwCallRecord *out)
{
	FwCallRecord rec;

	if (fw_dbname == NULL)
	{
		char	   *db = get_database_name(MyDatabaseId);

		fw_dbname = MemoryContextStrdup(TopMemoryContext, db ? db : "");
	}

	memset(&rec, 0, sizeof(rec));
	rec.call_id = call->call_id;
	rec.attempt = call->attempt;
	rec.started_at = call->attempt_start;
	namestrcpy(&rec.dbname, fw_dbname);
	{
		/*
		 * never raise here: this runs in cleanup paths (a dropped role).
		 * Looked up once per user until a role changes (each attempt
		 * fills two records: its write-ahead slot and its own).
		 */
		Oid			uid = GetUserId();

		if (uid != fw_uname_uid)
		{
			char	   *uname = GetUserNameFromId(uid, true);

			memset(&fw_uname, 0, sizeof(fw_uname));
			if (uname == NULL)
				snprintf(NameStr(fw_uname), NAMEDATALEN, "%u", uid);
			else
				namestrcpy(&fw_uname, uname);
			fw_uname_uid = uid;
		}
		rec.username = fw_uname;
	}
	fw_clip_copy(rec.workload, call->wl.name, sizeof(rec.workload));
	fw_clip_copy(rec.model, call->path_sent == FW_PATH_FAST ? call->wl.fast_model : call->model,
				 sizeof(rec.model));
	rec.path = (int8) call->path_sent;
	rec.outcome = (int8) outcome;
	rec.priority_sent = (call->path_sent == FW_PATH_PRIORITY);
	rec.escalated = call->escalated;
	rec.replayed = (fw_mode == FW_MODE_REPLAY);
	rec.kind = (int8) call->kind;
	rec.probe = call->probe;
	rec.http_status = r ? (int32) r->status : 0;
	rec.prompt_tokens = parsed->prompt_tokens >= 0 ? parsed->prompt_tokens :
		(r ? r->hdr_prompt_tokens : -1);
	rec.cached_prompt_tokens = parsed->cached_tokens >= 0 ? parsed->cached_tokens :
		(r ? r->hdr_cached_tokens : -1);
	/* an answer claiming more cached than prompt tokens: a negative cost */
	if (rec.prompt_tokens >= 0 && rec.cached_prompt_tokens > rec.prompt_tokens)
		rec.cached_prompt_tokens = rec.prompt_tokens;
	rec.completion_tokens = parsed->completion_tokens;
	rec.latency_us = r ? (int32) Min(r->latency_us, PG_INT32_MAX) :
		(int32) Min(GetCurrentTimestamp() - call->attempt_start, PG_INT32_MAX);
	rec.ttfb_us = r ? (int32) Min(r->ttfb_us, PG_INT32_MAX) : -1;
	if (r)						/* printable ASCII (http.c) */
		strlcpy(rec.request_id, r->request_id, sizeof(rec.request_id));
	if (outcome != FW_OK && call->detail)
		fw_clip_copy(rec.error, call->detail, sizeof(rec.error));
	memcpy(out, &rec, sizeof(rec));
}

/*
 * The attempt's record; then its write-ahead slot, if any, is done with
 * (pushed first: a crash in between finds the record in the ring, and
 * recovery writes no 'unknown' one).
 */
static void
fw_log_attempt(FwCall *call, const FwHttpResult *r, FwOutcome outcome,
			   const FwParsed *parsed)
{
	FwCallRecord rec;

	fw_fill_record(call, r, outcome, parsed, &rec);
	fw_calllog_push(&rec,
					fw_log_content ? call->prompt_text : NULL,
					fw_log_content ? call->content : NULL);
	if (call->intent >= 0)
	{
		fw_intent_end(call->intent);
		call->intent = -1;
	}
}

/*
 * Write-ahead (issue 18): before the attempt's first byte is sent, its
 * 'unknown' record at the worst case goes to a slot of the mapped intent
 * file (calllog.c), where a crash of any process finds it.  The response
 * headers' request id is copied into it in place (http.c).
 */
static pg_noinline void		/* a symbol of its own for perf (bench/chaos) */
fw_intend_attempt(FwCall *call)
{
	FwCallRecord rec;
	FwParsed	none;

	memset(&none, 0, sizeof(none));
	none.prompt_tokens = none.cached_tokens = none.completion_tokens = -1;
	fw_fill_record(call, NULL, FW_UNKNOWN, &none, &rec);
	fw_worst_case_tokens(call->body_len, call->max_tokens,
						 &rec.prompt_tokens, &rec.completion_tokens);
	rec.cached_prompt_tokens = -1;
	rec.latency_us = -1;
	strlcpy(rec.error, "no answer: in flight when its process died (or its transfer was lost); outcome unknown, tokens and cost at the worst case",
			sizeof(rec.error));
	call->intent = fw_intent_begin(&rec);
}

/* options.max_tokens when it is a positive number (rounded up); 0 otherwise */
static int
fw_option_max_tokens(Jsonb *options)
{
	JsonbValue	v;
	char	   *s;
	double		d;

	if (options == NULL || !JB_ROOT_IS_OBJECT(options))
		return 0;
	if (!getKeyJsonValueFromContainer(&options->root, "max_tokens",
									  strlen("max_tokens"), &v) ||
		v.type != jbvNumeric)
		return 0;
	s = DatumGetCString(DirectFunctionCall1(numeric_out,
											NumericGetDatum(v.val.numeric)));
	d = strtod(s, NULL);
	if (!(d > 0))
		return 0;
	return d >= (double) PG_INT32_MAX ? PG_INT32_MAX : (int) ceil(d);
}

/* The attempt goes on path: build (or reuse) its body. */
static void
fw_prepare_body(FwCall *call, FwPath path)
{
	call->path_sent = path;
	if (call->body_path != path)
	{
		const char *model = (path == FW_PATH_FAST) ? call->wl.fast_model : call->model;

		if (call->body)
			pfree(call->body);
		/*
		 * A budget's max_tokens cap is sent, not stored in call->options.
		 * Embeddings and rerank generate nothing: no cap (issue 12).
		 */
		call->body = call->kind == FW_KIND_CHAT ?
			fw_build_request(model, call->messages,
							 fw_spend_send_options(call),
							 path == FW_PATH_PRIORITY, &call->body_len) :
			fw_build_fields_request(model, call->fields, call->options,
									path == FW_PATH_PRIORITY, &call->body_len);
		call->body_path = path;
	}
}

/* Decide the path of this attempt, and build (or reuse) its body. */
static void
fw_prepare_attempt(FwCall *call)
{
	TimestampTz now = GetCurrentTimestamp();
	FwPath		path = call->configured;

	if (path == FW_PATH_STANDARD && !call->forced)
	{
		path = fw_route(&call->wl.slot, FW_PATH_STANDARD, now);
		if (fw_mode == FW_MODE_REPLAY)
			path = fw_replay_route(call->wl.name, path, now);
	}
	/*
	 * window_policy probe: now and then a call of an escalated workload
	 * goes to Standard to see whether it is back (escalation.c, "Probes").
	 * Replay never probes: a replayed run takes the paths its fixtures
	 * were recorded on, and its windows are the session's own.
	 */
	call->probe = false;
	if (path == FW_PATH_PRIORITY && call->configured == FW_PATH_STANDARD &&
		!call->forced && !call->no_probe &&
		call->wl.window_policy == FW_WINDOW_PROBE &&
		fw_mode != FW_MODE_REPLAY &&
		fw_claim_probe(&call->wl.slot, now))
	{
		path = FW_PATH_STANDARD;
		call->probe = true;
	}
	call->escalated = (call->configured == FW_PATH_STANDARD && path == FW_PATH_PRIORITY);
	/* a budget's premium is spent: escalation is off (README "Spend limits") */
	if (call->escalated && (call->premium_capped || fw_spend_premium_blocked(call)))
	{
		path = FW_PATH_STANDARD;
		call->escalated = false;
		call->premium_capped = true;
	}
	call->attempt++;
	call->attempt_start = now;
	if (call->call_id == 0)
		call->call_id = fw_next_call_id();
	fw_prepare_body(call, path);
}

/*
 * The attempt's own timeout is fw_tier.request_timeout; statement_timeout
 * is left to fire on its own, so that it reports 57014 like any cancel.
 */
static void
fw_start_attempt(FwCall *call, const char *url, const char *key)
{
	call->xfer = fw_http_start(url, call->body, call->body_len, key,
							   call->affinity, fw_request_timeout_ms, call);

	/*
	 * After fw_http_start, which only attaches the handle (the first byte
	 * goes at the next poll) and may raise: a slot taken before would be
	 * logged 'unknown' for a request never sent.
	 */
	fw_intend_attempt(call);
	fw_http_set_request_id_sink(call->xfer, fw_intent_request_id(call->intent));
}

/*
 * Decide what follows an attempt.  Returns true when the call is finished
 * (successfully or not); otherwise call->not_before says when to retry.
 */
static bool
fw_after_attempt(FwCall *call, const FwHttpResult *r, FwOutcome outcome,
				 FwParsed *parsed, TimestampTz deadline)
{
	TimestampTz now = GetCurrentTimestamp();
	int64		wait_ms = 0;
	int			limit = fw_max_attempts;

	call->outcome = outcome;
	call->http_status = r ? (int) r->status : 0;

	if (outcome == FW_OK)
	{
		call->ok = true;
		call->content = parsed->content;
		call->response = parsed->response;
		call->output = parsed->output;
		call->typed = parsed->typed;
		call->detail = NULL;
	}
	else if (r == NULL)
		;						/* detail set by the fixture source */
	else if (r->failed)
		call->detail = pstrdup(r->errmsg);
	else if (outcome == FW_BAD_RESPONSE || outcome == FW_BAD_OUTPUT)
		call->detail = pstrdup(parsed->problem ? parsed->problem : "unusable response");
	else
		call->detail = fw_error_excerpt(r->body, r->body_len);

	/* a replayed attempt is no production event: the log marks it */
	if (fw_mode != FW_MODE_REPLAY)
		fw_count_attempt(&call->wl.slot, call->path_sent, outcome);
	fw_log_attempt(call, r, outcome, parsed);

	/* a probe's outcome moves the window; a shed one retries on Priority */
	if (call->probe)
	{
		fw_probe_result(&call->wl.slot, outcome, call->attempt_start, now);
		if (outcome == FW_OVERLOADED)
			call->no_probe = true;
	}

	switch (outcome)
	{
		case FW_OK:
			call->finished = true;
			return true;

		case FW_RATE_LIMITED:
			/* The account's own limit: slow down, never change the path. */
			wait_ms = (r && r->retry_after_ms >= 0)
				? Min(r->retry_after_ms, fw_retry_after_cap_ms)
				: fw_backoff_ms(call->attempt);

			/*
			 * Every backend using this model pauses too, for a time taken
			 * only from the server's answer and superuser settings: this
			 * caller's backoff, caps and max_attempts shape its own wait,
			 * never anyone else's.  (A replayed 429 is a test's story, not
			 * the account's.)
			 */
			if (fw_mode != FW_MODE_REPLAY)
			{
				int64		shared_ms = (r && r->retry_after_ms >= 0)
					? r->retry_after_ms : FW_SHARED_PAUSE_MS;

				shared_ms = Min(shared_ms, fw_shared_pause_cap_ms);
				if (shared_ms > 0)
					fw_budget_pause(call->budget_model, call->budget_key, now + shared_ms * 1000);
			}
			break;

		case FW_OVERLOADED:
			/* a budget's spent premium makes on_overload = 'priority' back off */
			if (!call->premium_capped && call->spend &&
				call->wl.on_overload == FW_ONOVERLOAD_PRIORITY &&
				call->configured == FW_PATH_STANDARD && !call->forced &&
				fw_spend_premium_blocked(call))
				call->premium_capped = true;
			/* a forced Standard call never escalates: it backs off instead */
			if (call->configured == FW_PATH_STANDARD && !call->forced &&
				!call->premium_capped &&
				(fw_mode == FW_MODE_REPLAY ?
				 fw_replay_overloaded(call->wl.name, call->path_sent,
									  call->wl.on_overload,
									  call->wl.window_s > 0 ? call->wl.window_s : fw_priority_window_s,
									  now) :
				 fw_on_overloaded(&call->wl.slot, call->path_sent,
								  call->wl.on_overload,
								  call->wl.window_s > 0 ? call->wl.window_s : fw_priority_window_s,
								  now)))
				wait_ms = 0;	/* shed before generation: retry at once on Priority */
			else if (call->wl.on_overload == FW_ONOVERLOAD_FAIL)
				limit = 0;
			else
				wait_ms = fw_backoff_ms(call->attempt);
			break;

		case FW_UNAVAILABLE:
		case FW_TRANSPORT:
			limit = Min(limit, FW_UNAVAILABLE_ATTEMPTS);
			wait_ms = fw_backoff_ms(call->attempt);
			break;

		case FW_BAD_OUTPUT:

			/*
			 * The model answered, and was paid, but not in the shape asked
			 * for: sampling may do better once, so ask again at once (the
			 * fleet is fine); a second bad answer is the call's failure.
			 */
			limit = Min(limit, FW_BAD_OUTPUT_ATTEMPTS);
			break;

		case FW_CLIENT_ERROR:
		case FW_BAD_RESPONSE:
		case FW_TIMEOUT:
		case FW_CANCELLED:
		default:
			/* Fail fast: retrying would repeat the mistake or pay twice. */
			limit = 0;
			break;
	}

	if (call->attempt >= limit)
	{
		call->finished = true;
		return true;
	}
	if (deadline != DT_NOEND && now + wait_ms * 1000 >= deadline)
	{
		/* Waiting would outlast statement_timeout: fail now, and say so. */
		call->detail = psprintf("%s (no retry: the wait would outlast statement_timeout)",
								call->detail ? call->detail : fw_outcome_name(outcome));
		call->finished = true;
		return true;
	}
	call->not_before = now + wait_ms * 1000;
	return false;
}

/*
 * Does the shared rate budget of c's model let it start now?  If not, c
 * waits (not_before) and *wake learns when to look again.
 */
static bool
fw_budget_allows(FwCall *c, TimestampTz now, TimestampTz *wake)
{
	int64		wait_ms;

	if (fw_mode == FW_MODE_REPLAY)
		return true;
	wait_ms = fw_budget_acquire(c->budget_model, c->budget_key, c->est_prompt, now);
	if (wait_ms <= 0)
		return true;
	c->not_before = now + wait_ms * 1000;
	*wake = Min(*wake, c->not_before);
	return false;
}

/*
 * Start call c's next attempt.  In replay mode the answer comes from a
 * fixture at once and no connection is opened: returns true when the call
 * finished that way.  Otherwise the attempt is in flight; returns false
 * (a replayed failure that will be retried also returns false, with
 * nothing in flight).
 */
static bool
fw_launch(FwCall *c, const char *url, const char *key, TimestampTz deadline,
		  int *in_flight)
{
	fw_prepare_attempt(c);
	if (fw_mode == FW_MODE_REPLAY)
	{
		FwParsed	parsed;
		FwHttpResult *r = fw_fixture_replay(c);
		FwOutcome	o = fw_classify(r, c, &parsed);

		return fw_after_attempt(c, r, o, &parsed, deadline);
	}
	if (c->spend)
	{
		FwSpendResult sr = fw_spend_reserve(c, c->attempt_start);

		if (sr == FW_SPEND_STANDARD)
		{
			/*
			 * Another backend took the premium since fw_prepare_attempt
			 * looked: a standard_only budget keeps the call on Standard
			 * (README "Spend limits"), it is not refused.
			 */
			c->premium_capped = true;
			c->escalated = false;
			fw_prepare_body(c, FW_PATH_STANDARD);
			sr = fw_spend_reserve(c, c->attempt_start);
			Assert(sr != FW_SPEND_STANDARD);	/* nothing escalated left */
		}
		if (sr != FW_SPEND_OK)
		{
			FwParsed	none;

			/* refused before sending: give the rate budget its tokens back */
			fw_budget_settle(c->budget_model, c->budget_key, c->est_prompt, 0, 0,
							 0, 0, c->attempt_start);
			memset(&none, 0, sizeof(none));
			none.prompt_tokens = none.cached_tokens = none.completion_tokens = -1;
			return fw_after_attempt(c, NULL, FW_REFUSED, &none, deadline);
		}
	}
	fw_start_attempt(c, url, key);
	(*in_flight)++;
	return false;
}

/*
 * Log the attempts a cancel interrupts, after giving every handle back:
 * logging may raise (the ring, the catalog), and a handle left attached
 * would point into this run's memory for the next run's poll to return.
 */
static void
fw_cancel_in_flight(FwCall *calls, int ncalls, const char *why)
{
	FwParsed	none;

	/* No allocation before this: nothing may stop the release. */
	fw_http_abort_all();

	/*
	 * Then every reservation, still without allocating: logging below may
	 * raise, and a hold left behind would keep its slot from ever being
	 * reused.  An attempt in flight (xfer set) was sent: it keeps its
	 * worst case; one reserved but never started releases it.
	 */
	for (int i = 0; i < ncalls; i++)
		fw_spend_settle_aborted(&calls[i], calls[i].xfer != NULL);

	memset(&none, 0, sizeof(none));
	none.prompt_tokens = none.cached_tokens = none.completion_tokens = -1;
	for (int i = 0; i < ncalls; i++)
	{
		/* xfer is only a marker now: its handle is back in the pool */
		if (calls[i].xfer == NULL)
			continue;
		calls[i].xfer = NULL;
		calls[i].detail = pstrdup(why);
		fw_count_attempt(&calls[i].wl.slot, calls[i].path_sent, FW_CANCELLED);
		if (calls[i].probe)
			fw_probe_result(&calls[i].wl.slot, FW_CANCELLED,
							calls[i].attempt_start, GetCurrentTimestamp());
		fw_log_attempt(&calls[i], NULL, FW_CANCELLED, &none);
	}
}

/*
 * Is the statement being stopped?  Only a cancel, a statement_timeout (its
 * handler sets QueryCancelPending) or a terminate stops paid requests;
 * every other interrupt is serviced by CHECK_FOR_INTERRUPTS and the
 * requests go on.
 */
static bool
fw_cancel_pending(void)
{
	return QueryCancelPending || ProcDiePending;
}

/*
 * The run is ending (a cancel, or stop_on_error): the transfers that have
 * already finished were answered, and paid for, so each is classified and
 * logged with its real outcome (and recorded in record mode) before the
 * rest are cancelled.  No retry starts: the loop is over.
 */
static void
fw_collect_finished(int *in_flight)
{
	FwHttpXfer *x;

	while ((x = fw_http_next_done()) != NULL)
	{
		FwCall	   *c = (FwCall *) fw_http_owner(x);
		const FwHttpResult *r = fw_http_result(x);
		FwParsed	parsed;
		FwOutcome	o = fw_classify(r, c, &parsed);

		/* stopped by the cancel itself: fw_cancel_in_flight logs it */
		if (o == FW_CANCELLED)
			continue;
		if (fw_mode == FW_MODE_RECORD)
			fw_fixture_record(c, r);
		c->xfer = NULL;
		(*in_flight)--;
		fw_budget_settle(c->budget_model, c->budget_key, c->est_prompt,
						 parsed.prompt_tokens, parsed.completion_tokens,
						 r->rl_prompt_per_s, r->rl_generated_per_s,
						 GetCurrentTimestamp());
		fw_spend_settle(c, r, o, &parsed);
		(void) fw_after_attempt(c, r, o, &parsed, DT_NOEND);
		fw_http_release(x);
	}
}

/* Refuse values that would become protocol bytes unsafely. */
static void
fw_check_transport_settings(const char *key)
{
	if (!fw_http_header_safe(key))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the fw_tier API key contains control characters"),
				 errdetail("The key is sent in the Authorization header; it is not shown here."),
				 errhint("Check the role's file in fw_tier.api_key_dir, fw_tier.api_key, fw_tier.api_key_file or FIREWORKS_API_KEY.")));
	if (!fw_http_header_safe(fw_base_url))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("fw_tier.base_url must not contain control characters")));
}

/* The run's progress, shared by the loop and fw_fill_slots. */
typedef struct FwLoop
{
	FwCall	   *calls;
	int			ncalls;
	char	  **urls;			/* by FwCallKind */
	const char *key;
	TimestampTz deadline;
	int			next;			/* first call never started */
	int			remaining;
	int			in_flight;
	int			done;
	int			failed;
	int			limit;			/* lowered by 429s, regained slowly */
	bool		stop_on_error;	/* on_error = 'raise' */
	bool		refused;		/* a budget refused a call (issue 13) */
} FwLoop;

/*
 * Start due work: retries first (they hold a place), then new calls, while
 * the limit allows.  Returns when a waiting call is due (DT_NOEND: none).
 */
static TimestampTz
fw_fill_slots(FwLoop *s, TimestampTz now)
{
	TimestampTz wake = DT_NOEND;

	for (int i = 0; i < s->next && s->in_flight < s->limit; i++)
	{
		FwCall	   *c = &s->calls[i];

		if (c->finished || c->xfer != NULL)
			continue;
		if (c->not_before > now)
		{
			wake = Min(wake, c->not_before);
			continue;
		}
		if (!fw_budget_allows(c, now, &wake))
			continue;
		if (fw_launch(c, s->urls[c->kind], s->key, s->deadline, &s->in_flight))
		{
			s->remaining--;		/* answered from a fixture, or refused */
			s->done++;
			s->failed += c->ok ? 0 : 1;
			s->refused |= (c->outcome == FW_REFUSED);
		}
	}
	while (s->next < s->ncalls && s->in_flight < s->limit &&
		   !(s->refused && s->stop_on_error))
	{
		FwCall	   *c = &s->calls[s->next++];

		if (c->finished)
			s->remaining--;		/* NULL input: nothing to send */
		else if (!fw_budget_allows(c, now, &wake))
			continue;			/* picked up by the loop above when due */
		else if (fw_launch(c, s->urls[c->kind], s->key, s->deadline, &s->in_flight))
		{
			s->remaining--;		/* answered from a fixture, or refused */
			s->done++;
			s->failed += c->ok ? 0 : 1;
			s->refused |= (c->outcome == FW_REFUSED);
		}
	}
	return wake;
}

static void
fw_engine_loop(FwCall *calls, int ncalls, int concurrency, bool stop_on_error)
{
	/* one URL per kind (issue 12): FwCallKind order */
	char	   *urls[FW_NUM_KINDS] = {
		psprintf("%s/chat/completions", fw_base_url),
		psprintf("%s/embeddings", fw_base_url),
		psprintf("%s/rerank", fw_base_url)
	};
	const char *key = fw_effective_api_key();
	TimestampTz deadline = fw_statement_deadline();
	FwLoop		s = {calls, ncalls, urls, key, deadline, 0, ncalls, 0, 0, 0, concurrency,
					 stop_on_error, false};
	int			streak = 0;		/* successes since the limit last moved */

	if (fw_mode != FW_MODE_REPLAY)
		fw_check_transport_settings(key);
	/* issue 11: on a standby, record mode could keep nothing */
	if (fw_mode == FW_MODE_RECORD)
		fw_fixture_check_writable();

	/*
	 * The account's budget is the key's, not only the model's: roles with
	 * their own key files may bill different accounts.
	 */
	{
		uint64		key_fp = fw_budget_key_fingerprint(key);

		for (int i = 0; i < ncalls; i++)
			calls[i].budget_key = key_fp;
	}

	/* spend limits: before any call id is taken (spend.c, "Restore") */
	if (fw_mode != FW_MODE_REPLAY)
		fw_spend_begin(calls, ncalls);

	for (int i = 0; i < ncalls; i++)
		if (calls[i].wl.name[0])
		{
			fw_progress_begin(calls[i].wl.name, ncalls);
			break;
		}

	while (s.remaining > 0)
	{
		TimestampTz now = GetCurrentTimestamp();
		TimestampTz wake = fw_fill_slots(&s, now);
		long		sleep_ms;
		FwHttpXfer *x;

		if (s.refused && stop_on_error)
		{
			/* a budget refused a call: the statement fails, send no more */
			fw_collect_finished(&s.in_flight);
			fw_cancel_in_flight(calls, ncalls, "canceled by the statement");
			break;
		}
		if (s.remaining == 0)
			break;

		/* Sleep until activity, the next retry, or the poll slice. */
		sleep_ms = FW_POLL_SLICE_MS;
		if (wake != DT_NOEND)
			sleep_ms = Min(sleep_ms, Max((wake - now) / 1000, 0));
		if (s.in_flight > 0)
			fw_http_poll(sleep_ms);
		else if (sleep_ms > 0)
		{
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 sleep_ms, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}

		if (fw_cancel_pending())
		{
			fw_collect_finished(&s.in_flight);
			fw_cancel_in_flight(calls, ncalls, "canceled by the statement");
			CHECK_FOR_INTERRUPTS();
			/* Cancel held off (e.g. inside a commit): report it ourselves. */
			ereport(ERROR,
					(errcode(ERRCODE_QUERY_CANCELED),
					 errmsg("canceling statement due to user request")));
		}
		else if (InterruptPending)
			CHECK_FOR_INTERRUPTS();	/* barriers, parallel messages, ...: go on */

		while ((x = fw_http_next_done()) != NULL)
		{
			FwCall	   *c = (FwCall *) fw_http_owner(x);
			const FwHttpResult *r = fw_http_result(x);
			FwParsed	parsed;
			FwOutcome	o = fw_classify(r, c, &parsed);

			if (fw_mode == FW_MODE_RECORD && o != FW_CANCELLED)
				fw_fixture_record(c, r);
			c->xfer = NULL;
			s.in_flight--;
			fw_budget_settle(c->budget_model, c->budget_key, c->est_prompt,
							 parsed.prompt_tokens, parsed.completion_tokens,
							 r->rl_prompt_per_s, r->rl_generated_per_s,
							 GetCurrentTimestamp());
			fw_spend_settle(c, r, o, &parsed);
			if (fw_after_attempt(c, r, o, &parsed, deadline))
			{
				s.remaining--;
				s.done++;
				if (!c->ok)
					s.failed++;
			}

			/* AIMD on the account's limit: halve on 429, +1 per full round */
			if (o == FW_RATE_LIMITED)
			{
				s.limit = Max(1, s.limit / 2);
				streak = 0;
			}
			else if (o == FW_OK && s.limit < concurrency && ++streak >= s.limit)
			{
				s.limit++;
				streak = 0;
			}
			/* The result points into the transfer's buffer: release last. */
			fw_http_release(x);
			if (stop_on_error && c->finished && !c->ok)
			{
				/* The statement will fail: stop paying for the rest. */
				fw_collect_finished(&s.in_flight);
				fw_cancel_in_flight(calls, ncalls, "canceled by the statement");
				s.remaining = 0;
				break;
			}

			/*
			 * Refill the slot and put the request on the wire now, not
			 * after every answer of this wave has been read: reading a
			 * wave of large answers (embeddings) would otherwise hold the
			 * next wave back by the sum of their parse times.
			 */
			if (s.in_flight < s.limit && s.remaining > 0)
			{
				int			before = s.in_flight;

				(void) fw_fill_slots(&s, GetCurrentTimestamp());
				if (s.in_flight > before)
					fw_http_poll(0);
			}
			if (fw_cancel_pending())
				break;			/* the loop's top collects and cancels */
		}
		fw_progress_update(s.done, s.in_flight, s.failed, s.limit);
		if (fw_turn_hook)
			fw_turn_hook(calls, ncalls, fw_turn_hook_arg);
	}
	fw_progress_end();
	for (int k = 0; k < FW_NUM_KINDS; k++)
		pfree(urls[k]);
}

typedef struct FwRunCleanup
{
	FwCall	   *calls;
	int			ncalls;
	MemoryContext cxt;
} FwRunCleanup;

/* The run in progress, for the exit callback; NULL between runs. */
static FwRunCleanup *fw_running = NULL;

/*
 * An error (or FATAL exit) from elsewhere in the statement ended the run:
 * a parallel worker's error, a serviced interrupt's (a dead client found
 * by client_connection_check_interval ends the session).  The attempts in
 * flight were paid for, so they are logged before the handles go back.
 */
static void
fw_engine_cleanup(FwRunCleanup *c)
{
	MemoryContextSwitchTo(c->cxt);
	fw_cancel_in_flight(c->calls, c->ncalls, "interrupted by an error in the statement");
	fw_progress_end();
}

/*
 * before_shmem_exit callback, registered once per backend (not per run:
 * PG_ENSURE_ERROR_CLEANUP would require no other registration during the
 * run, and record mode's SPI may make one).  Runs before the transaction
 * is aborted, so the log push still works.
 */
static void
fw_engine_exit(int code, Datum arg)
{
	FwRunCleanup *c = fw_running;

	/* handles first: nothing below may leave one attached */
	fw_http_abort_all();
	if (c)
		fw_engine_cleanup(c);
	fw_running = NULL;
	/* slots of transfers gone without a record: 'unknown' (calllog.c) */
	fw_intents_abandon_mine();
}

/*
 * Backstop: whatever path an error took, no transfer survives its
 * transaction (a handle's owner points into per-call memory).  Only the
 * top-level abort: record mode's fixture writes use subtransactions while
 * transfers are legitimately in flight.
 */
static void
fw_engine_xact_cb(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
	{
		fw_http_abort_all();
		fw_running = NULL;
		/* no transfer is left: a slot still held lost its record */
		fw_intents_abandon_mine();
	}
}

/*
 * Run calls to completion, at most concurrency attempts at once.  Calls
 * already marked finished (NULL prompts) are skipped.  With stop_on_error
 * the run ends at the first failed call (the caller raises it).  On any
 * error, or a FATAL exit, the attempts in flight are logged and every
 * transfer is released before the error propagates.
 */
void
fw_engine_run(FwCall *calls, int ncalls, int concurrency, bool stop_on_error)
{
	static bool exit_hook = false;
	FwRunCleanup cleanup;
	FwRunCleanup *volatile prev = fw_running;

	concurrency = Max(1, Min(concurrency, ncalls));
	fw_http_reserve(concurrency);
	if (!exit_hook)
	{
		before_shmem_exit(fw_engine_exit, (Datum) 0);
		RegisterXactCallback(fw_engine_xact_cb, NULL);
		/* a role renamed since shows its new name */
		CacheRegisterSyscacheCallback(AUTHOID, fw_uname_forget, (Datum) 0);
		exit_hook = true;
	}

	cleanup.calls = calls;
	cleanup.ncalls = ncalls;
	cleanup.cxt = CurrentMemoryContext;
	fw_running = &cleanup;
	PG_TRY();
	{
		fw_engine_loop(calls, ncalls, concurrency, stop_on_error);
	}
	PG_CATCH();
	{
		/* the exit hook must not see this frame once it is gone */
		PG_TRY();
		{
			fw_engine_cleanup(&cleanup);
		}
		PG_FINALLY();
		{
			fw_running = prev;
		}
		PG_END_TRY();
		PG_RE_THROW();
	}
	PG_END_TRY();
	fw_running = prev;
}

/*
 * "connection refused", a DNS failure ...: name the setting and the host it
 * points at (only the host and port: a URL may carry user:password@).
 */
static const char *
fw_base_url_hint(void)
{
	const char *u = fw_base_url ? fw_base_url : "";
	const char *p = strstr(u, "://");
	const char *end;
	const char *at;

	p = p ? p + 3 : u;
	end = p + strcspn(p, "/?#");
	at = memchr(p, '@', end - p);
	if (at)
		p = at + 1;
	return psprintf("Check that fw_tier.base_url points at a reachable server: its host is \"%.*s\".",
					(int) (end - p), p);
}

/* Raise the error a failed call stands for (README "Failure classes"). */
void
fw_call_raise(FwCall *c)
{
	int			code;
	const char *what;
	const char *hint = NULL;

	switch (c->outcome)
	{
		case FW_CLIENT_ERROR:
			what = "fireworks rejected the request";
			switch (c->http_status)
			{
				case 401:
					code = ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION;
					hint = "Give the role a key file in fw_tier.api_key_dir, or set fw_tier.api_key, fw_tier.api_key_file or the server's FIREWORKS_API_KEY.";
					break;
				case 403:
					code = ERRCODE_INSUFFICIENT_PRIVILEGE;
					break;
				case 402:
				case 412:
					code = ERRCODE_INSUFFICIENT_RESOURCES;
					hint = "Check the Fireworks account's billing.";
					break;
				case 404:
					code = ERRCODE_UNDEFINED_OBJECT;
					hint = "Check the model id and fw_tier.base_url.";
					break;
				case 413:
					code = ERRCODE_PROGRAM_LIMIT_EXCEEDED;
					break;
				default:
					code = ERRCODE_INVALID_PARAMETER_VALUE;
					break;
			}
			break;
		case FW_RATE_LIMITED:
			code = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;
			what = "fireworks rate limit exceeded";
			hint = "Lower the request rate or raise the account's limits; fw_tier.max_attempts bounds the retries.";
			break;
		case FW_OVERLOADED:
			code = ERRCODE_INSUFFICIENT_RESOURCES;
			what = "fireworks is overloaded";

			/*
			 * The provider's body advises "use service_tier priority",
			 * which fw_tier only sends through a workload's escalation:
			 * the DETAIL says what happened, the HINT what to change.
			 */
			c->detail = pstrdup("503 Overloaded");
			if (c->path_sent == FW_PATH_FAST)
				hint = "The Fast path never escalates: retry later, or raise fw_tier.max_attempts.";
			else if (c->forced || c->configured != FW_PATH_STANDARD)
				hint = psprintf("The call's path is %s, which never escalates: let workload \"%s\" route it (path standard, on_overload = 'priority').",
								fw_path_name(c->path_sent), c->wl.name);
			else if (c->wl.on_overload == FW_ONOVERLOAD_PRIORITY)
				hint = "Priority was overloaded too: retry later, or raise fw_tier.max_attempts.";
			else
				hint = psprintf("Workload \"%s\" has on_overload = '%s': set it to 'priority' in fw_tier.workloads to escalate.",
								c->wl.name,
								c->wl.on_overload == FW_ONOVERLOAD_RETRY ? "retry" : "fail");
			break;
		case FW_UNAVAILABLE:
			code = ERRCODE_CONNECTION_FAILURE;
			what = "fireworks is unavailable";
			break;
		case FW_TIMEOUT:
			code = ERRCODE_CONNECTION_FAILURE;
			what = "fireworks request timed out";
			hint = "Raise fw_tier.request_timeout or fw_tier.connect_timeout.";
			break;
		case FW_TRANSPORT:
			code = ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION;
			what = "could not complete the request to fireworks";
			hint = fw_base_url_hint();
			break;
		case FW_CANCELLED:
			code = ERRCODE_QUERY_CANCELED;
			what = "fireworks request canceled";
			break;
		case FW_BAD_OUTPUT:
			/* the DETAIL (c->detail) names the JSON path and the rule */
			if (c->bad_output == FW_OUTPUT_CUT_OFF)
			{
				code = ERRCODE_STRING_DATA_RIGHT_TRUNCATION;
				what = "fireworks answer was cut off before the JSON was complete";
				hint = "Raise options.max_tokens, or ask for a shorter answer.";
			}
			else if (c->bad_output == FW_OUTPUT_NOT_JSON)
			{
				code = ERRCODE_INVALID_JSON_TEXT;
				what = "fireworks answer is not valid JSON";
				hint = "Say in the prompt that the answer is JSON.";
			}
			else
			{
				code = ERRCODE_INVALID_JSON_TEXT;
				what = "fireworks answer does not match the JSON schema";
			}
			break;
		case FW_REFUSED:
			/* nothing was sent: DETAIL names the budget or the price */
			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("fw_tier budget refused the call"),
					 errdetail("Workload \"%s\", path %s: %s", c->wl.name,
							   fw_path_name(c->path_sent),
							   c->detail ? c->detail : "refused"),
					 fw_spend_refusal_hint(c) ? errhint("%s", fw_spend_refusal_hint(c)) : 0));
			code = ERRCODE_CONFIGURATION_LIMIT_EXCEEDED;	/* not reached */
			what = "";
			break;
		case FW_BAD_RESPONSE:
		default:
			code = ERRCODE_DATA_EXCEPTION;
			what = "fireworks returned an unusable response";
			break;
	}

	ereport(ERROR,
			(errcode(code),
			 c->http_status ? errmsg("%s (HTTP %d)", what, c->http_status)
			 : errmsg("%s", what),
			 errdetail("Workload \"%s\", path %s, %d attempt%s: %s",
					   c->wl.name, fw_path_name(c->path_sent), c->attempt,
					   c->attempt == 1 ? "" : "s",
					   c->detail ? c->detail : fw_outcome_name(c->outcome)),
			 hint ? errhint("%s", hint) : 0));
}
