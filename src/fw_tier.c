/*-------------------------------------------------------------------------
 *
 * fw_tier.c
 *		Module magic and _PG_init: GUCs, the preload check, shared memory
 *		hooks and the background worker registration.
 *
 * fw_tier needs shared memory (escalation windows, the call-log ring) and a
 * background worker, so it only works from shared_preload_libraries.  When
 * loaded any other way _PG_init returns quietly and every SQL function
 * raises ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE through
 * fw_require_preload().
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/stat.h>

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "fw_tier.h"
#include "utils/elog.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* GUC variables; see _PG_init for meaning and defaults */
char	   *fw_base_url = NULL;
char	   *fw_api_key = NULL;
char	   *fw_api_key_file = NULL;
char	   *fw_api_key_dir = NULL;
char	   *fw_default_model = NULL;
char	   *fw_default_embedding_model = NULL;
char	   *fw_default_rerank_model = NULL;
int			fw_embed_batch_inputs = 128;
int			fw_embed_batch_tokens = 32768;
char	   *fw_database = NULL;
int			fw_connect_timeout_ms = 10000;
int			fw_request_timeout_ms = 60000;
int			fw_max_attempts = 3;
int			fw_backoff_base_ms = 250;
int			fw_backoff_cap_ms = 8000;
int			fw_retry_after_cap_ms = 30000;
int			fw_shared_pause_cap_ms = 30000;
int			fw_on_error = FW_ONERROR_RAISE;
int			fw_mode = FW_MODE_LIVE;
int			fw_priority_window_s = 1800;
int			fw_alert_windows = 3;
int			fw_max_workloads = 64;
int			fw_log_buffer_kb = 4096;
int			fw_flush_interval_ms = 1000;
bool		fw_log_content = false;
int			fw_max_concurrency = 16;
int			fw_max_concurrency_cap = 64;
int			fw_log_spill_limit_kb = 256 * 1024;
int			fw_max_output_tokens = 4096;
int			fw_probe_interval_ms = 10000;	/* issue 16 */
int			fw_probe_successes = 2; /* issue 16 */
double		fw_probe_share = 0.5;	/* issue 16 */

bool		fw_preloaded = false;

static const struct config_enum_entry fw_on_error_options[] = {
	{"raise", FW_ONERROR_RAISE, false},
	{"null", FW_ONERROR_NULL, false},
	{NULL, 0, false}
};

static const struct config_enum_entry fw_mode_options[] = {
	{"live", FW_MODE_LIVE, false},
	{"record", FW_MODE_RECORD, false},
	{"replay", FW_MODE_REPLAY, false},
	{NULL, 0, false}
};

static const char *const fw_path_names[FW_NUM_PATHS] = {
	"standard", "priority", "fast"
};

static const char *const fw_outcome_names[FW_NUM_OUTCOMES] = {
	"ok", "rate_limited", "overloaded", "unavailable", "client_error",
	"timeout", "transport", "cancelled", "bad_response", "bad_output",
	"refused", "unknown"
};

/*
 * The key must never be readable back through SQL, not even by the
 * superuser who set it: SHOW, current_setting() and pg_settings all go
 * through this hook.
 */
static const char *
fw_api_key_show(void)
{
	return (fw_api_key && fw_api_key[0]) ? "********" : "";
}

/*
 * fw_tier.api_key may come from postgresql.conf (or ALTER SYSTEM), from
 * the command line, or from a superuser's SET in their own session.  Never
 * from ALTER ROLE / ALTER DATABASE ... SET, nor a function's SET clause:
 * those store the value in pg_db_role_setting or pg_proc.proconfig, which
 * every role can read.  Per-role keys are files in fw_tier.api_key_dir.
 *
 * Storing such a setting is validated with source PGC_S_TEST: refused with
 * an ERROR raised here, with errhidestmt so that log_min_error_statement
 * does not copy the statement, key included, into the server log.  A value
 * stored before 0.2 arrives at session start (PGC_S_DATABASE, PGC_S_USER,
 * PGC_S_DATABASE_USER, PGC_S_GLOBAL): it is ignored with a WARNING of ours
 * (the default message would quote the value).  Setting it to '' is
 * harmless and always allowed.
 */
static bool
fw_api_key_check(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
		return true;

	if (source == PGC_S_TEST)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("fw_tier.api_key cannot be stored with ALTER ROLE, ALTER DATABASE or a function's SET clause"),
				 errdetail("Such settings are readable by every role in pg_db_role_setting and pg_proc."),
				 errhint("Give a role its own key as a file named after the role in fw_tier.api_key_dir."),
				 errhidestmt(true)));

	if (source == PGC_S_GLOBAL || source == PGC_S_DATABASE ||
		source == PGC_S_USER || source == PGC_S_DATABASE_USER)
	{
		GUC_check_errcode(ERRCODE_INSUFFICIENT_PRIVILEGE);
		GUC_check_errmsg("fw_tier.api_key set with ALTER ROLE or ALTER DATABASE is ignored");
		GUC_check_errdetail("Such settings are readable by every role in pg_db_role_setting.");
		GUC_check_errhint("Remove it with ALTER ROLE ... RESET fw_tier.api_key (or ALTER DATABASE) and put the key in a file in fw_tier.api_key_dir.");
		return false;
	}
	return true;
}

/*
 * SET fw_tier.max_concurrency above fw_tier.max_concurrency_cap stores the
 * cap, with a NOTICE, so SHOW tells the value used.  Values from the
 * configuration file are kept as written (the cap may be read after them),
 * and the cap applies at use (sqlfuncs.c): a cap lowered later wins there.
 */
static bool
fw_check_max_concurrency(int *newval, void **extra, GucSource source)
{
	if (source > PGC_S_ARGV && *newval > fw_max_concurrency_cap)
	{
		/* said where a user typed it, not at every connection */
		ereport(source >= PGC_S_INTERACTIVE ? NOTICE : DEBUG1,
				(errmsg("fw_tier.max_concurrency is capped at %d",
						fw_max_concurrency_cap),
				 errdetail("fw_tier.max_concurrency_cap is %d; %d requests are used instead of %d.",
						   fw_max_concurrency_cap, fw_max_concurrency_cap, *newval)));
		*newval = fw_max_concurrency_cap;
	}
	return true;
}

/*
 * A role without EXECUTE on an entry point gets PostgreSQL's 42501 before
 * any of our code runs: this hook adds a HINT naming the GRANT.  It runs
 * inside EmitErrorReport, in the error's own context (edata->assoc_context,
 * ErrorContext), so a psprintf there is freed with the error.  No catalog
 * access: the transaction is failing, so the signatures are listed here
 * and the role is named only when it is the session's login role.
 */
static emit_log_hook_type fw_prev_emit_log_hook = NULL;

static const struct
{
	const char *name;
	const char *grant;			/* "FUNCTION f(args)" */
}			fw_entry_points[] =
{
	{"fw_complete", "FUNCTION fw_complete(text, text)"},
	{"fw_chat", "FUNCTION fw_chat(jsonb, text, jsonb)"},
	{"fw_complete_batch", "FUNCTION fw_complete_batch(text[], text, jsonb)"},
	{"fw_complete_json", "FUNCTION fw_complete_json(text, jsonb, text, jsonb)"},
	{"fw_complete_json_batch", "FUNCTION fw_complete_json_batch(text[], jsonb, text, jsonb)"},
	{"fw_enrich", "PROCEDURE fw_enrich(regclass, name, name, name, text, integer, jsonb)"},
	{"fw_escalate", "FUNCTION fw_escalate(text, interval)"},
	{"fw_deescalate", "FUNCTION fw_deescalate(text)"},
	{"purge_calls", "FUNCTION fw_tier.purge_calls(interval, integer)"},
	/* issue 12 */
	{"fw_embed", "FUNCTION fw_embed(text, text, jsonb)"},
	{"fw_embed_batch", "FUNCTION fw_embed_batch(text[], text, jsonb)"},
	{"fw_rerank", "FUNCTION fw_rerank(text, text[], integer, text, jsonb)"},
	/* issue 14 */
	{"fw_enrich_create", "FUNCTION fw_enrich_create(text, regclass, name, text, text, jsonb)"},
	{"fw_enrich_drop", "FUNCTION fw_enrich_drop(text)"},
	{"fw_enrich_pause", "FUNCTION fw_enrich_pause(text)"},
	{"fw_enrich_resume", "FUNCTION fw_enrich_resume(text)"},
	{"fw_enrich_retry", "FUNCTION fw_enrich_retry(text)"},
};

static void
fw_emit_log_hook(ErrorData *edata)
{
	if (edata->elevel == ERROR &&
		edata->sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE &&
		edata->hint == NULL && edata->message_id != NULL &&
		edata->message != NULL &&
		(strcmp(edata->message_id, "permission denied for function %s") == 0 ||
		 strcmp(edata->message_id, "permission denied for procedure %s") == 0))
	{
		/* the name ends the message, whatever the language */
		const char *name = strrchr(edata->message, ' ');
		const char *role = NULL;

		name = name ? name + 1 : edata->message;
		for (int i = 0; i < lengthof(fw_entry_points); i++)
		{
			if (strcmp(name, fw_entry_points[i].name) != 0)
				continue;

			/*
			 * The role as SET ROLE / SET SESSION AUTHORIZATION named it
			 * (GUC strings, no lookup); inside a SECURITY DEFINER function
			 * the current user is another one: leave the name out.
			 */
			if (GetUserId() == GetOuterUserId())
			{
				role = GetConfigOption("role", true, false);
				if (role == NULL || strcmp(role, "none") == 0)
					role = GetConfigOption("session_authorization", true, false);
			}
			edata->hint = psprintf("A superuser or the extension's owner can run GRANT EXECUTE ON %s TO %s.",
								   fw_entry_points[i].grant,
								   (role && role[0]) ? quote_identifier(role) : "<role>");
			break;
		}
	}
	if (fw_prev_emit_log_hook)
		fw_prev_emit_log_hook(edata);
}

void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomStringVariable("fw_tier.base_url",
							   "Base URL of the Fireworks OpenAI-compatible API.",
							   "Requests go to {base_url}/chat/completions.",
							   &fw_base_url,
							   "https://api.fireworks.ai/inference/v1",
							   PGC_SUSET, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("fw_tier.api_key",
							   "Fireworks API key (superuser only; never shown).",
							   "Empty: use fw_tier.api_key_file, then the server's FIREWORKS_API_KEY environment variable.",
							   &fw_api_key, "",
							   PGC_SUSET,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   fw_api_key_check, NULL, fw_api_key_show);

	DefineCustomStringVariable("fw_tier.api_key_file",
							   "File holding the Fireworks API key, read by the server.",
							   NULL,
							   &fw_api_key_file, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("fw_tier.api_key_dir",
							   "Directory of per-role API key files, one named after each role, read by the server.",
							   "A role's file wins over fw_tier.api_key; a role without one uses the server-wide key.",
							   &fw_api_key_dir, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("fw_tier.default_model",
							   "Model used by workloads whose model is NULL.",
							   NULL,
							   &fw_default_model,
							   "accounts/fireworks/models/kimi-k2p6",
							   PGC_USERSET, 0, NULL, NULL, NULL);

	/* issue 12: the models and request sizes of fw_embed* and fw_rerank */
	DefineCustomStringVariable("fw_tier.default_embedding_model",
							   "Model used by fw_embed and fw_embed_batch when the workload's embedding_model is NULL.",
							   NULL,
							   &fw_default_embedding_model,
							   "accounts/fireworks/models/qwen3-embedding-8b",
							   PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("fw_tier.default_rerank_model",
							   "Model used by fw_rerank when the workload's rerank_model is NULL.",
							   NULL,
							   &fw_default_rerank_model,
							   "accounts/fireworks/models/qwen3-reranker-8b",
							   PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.embed_batch_inputs",
							"Most inputs fw_embed_batch sends in one request.",
							NULL,
							&fw_embed_batch_inputs, 128, 1, 2048,
							PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.embed_batch_tokens",
							"Most estimated input tokens (bytes / 4) fw_embed_batch sends in one request.",
							"An input larger than this is sent alone.",
							&fw_embed_batch_tokens, 32768, 1, 1000000,
							PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("fw_tier.database",
							   "Database the fw_tier background worker connects to.",
							   "fw_tier must be created in this database; its tables receive the call log.",
							   &fw_database, "postgres",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.connect_timeout",
							"Time allowed to establish a connection to the API.",
							NULL,
							&fw_connect_timeout_ms, 10000, 100, 600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.request_timeout",
							"Time allowed for one HTTP attempt, from connect to last byte.",
							NULL,
							&fw_request_timeout_ms, 60000, 100, 3600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.max_attempts",
							"Maximum HTTP attempts for one call, retries included.",
							NULL,
							&fw_max_attempts, 3, 1, 100,
							PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.backoff_base",
							"Base delay of the exponential backoff between retries.",
							NULL,
							&fw_backoff_base_ms, 250, 0, 600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.backoff_cap",
							"Upper bound of one backoff delay.",
							NULL,
							&fw_backoff_cap_ms, 8000, 0, 3600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.retry_after_cap",
							"Upper bound on this session's wait for a Retry-After header.",
							NULL,
							&fw_retry_after_cap_ms, 30000, 0, 3600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.shared_pause_cap",
							"Upper bound on the pause a 429 imposes on every backend using the model.",
							"The pause is the server's Retry-After (1 s without one), never a user's backoff settings; 0 disables it.",
							&fw_shared_pause_cap_ms, 30000, 0, 3600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomEnumVariable("fw_tier.on_error",
							 "What a failed call returns: raise an error, or NULL.",
							 "Per call, options->>'on_error' overrides it.",
							 &fw_on_error, FW_ONERROR_RAISE, fw_on_error_options,
							 PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomEnumVariable("fw_tier.mode",
							 "live calls the API; record also stores fixtures; replay answers from fixtures only.",
							 NULL,
							 &fw_mode, FW_MODE_LIVE, fw_mode_options,
							 PGC_USERSET, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.priority_window",
							"How long a workload stays on Priority after 503 Service Overloaded.",
							"A workload's own priority_window overrides it.",
							&fw_priority_window_s, 1800, 1, 7 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);

	/* issue 16: window_policy probe (escalation.c, "Probes") */
	DefineCustomIntVariable("fw_tier.probe_interval",
							"Under window_policy probe, one call per interval is sent on Standard during a Priority window.",
							"Counted for every backend of the workload together; a probe shed with 503 Overloaded doubles it, up to 16 times this value.",
							&fw_probe_interval_ms, 10000, 1, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomRealVariable("fw_tier.probe_share",
							 "Under window_policy probe, the share of a window's other calls also sent on Standard as probes.",
							 "Halved each time probe_interval doubles; 0: only the interval's probes.",
							 &fw_probe_share, 0.5, 0.0, 1.0,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.probe_successes",
							"Under window_policy probe, this many Standard probes answered in a row end the Priority window early.",
							NULL,
							&fw_probe_successes, 2, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.alert_windows",
							"Consecutive Priority windows after which fw_tier raises a capacity alert.",
							NULL,
							&fw_alert_windows, 3, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.max_workloads",
							"Maximum number of workloads tracked in shared memory.",
							NULL,
							&fw_max_workloads, 64, 1, 10000,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.log_buffer",
							"Size of the shared ring that carries call-log records to the worker.",
							NULL,
							&fw_log_buffer_kb, 4096, 8, 1024 * 1024,
							PGC_POSTMASTER, GUC_UNIT_KB, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.flush_interval",
							"Longest time a call-log record waits in the ring before the worker writes it.",
							NULL,
							&fw_flush_interval_ms, 1000, 10, 600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.log_spill_limit",
							"Disk space the call log may use in pg_fw_tier when the ring is full and does not drain.",
							"Past it, call-log records are dropped (counted, with a WARNING).  0 disables the spill.",
							&fw_log_spill_limit_kb, 256 * 1024, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);

	DefineCustomBoolVariable("fw_tier.log_content",
							 "Store prompt and answer text in fw_tier.calls.",
							 NULL,
							 &fw_log_content, false,
							 PGC_SUSET, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("fw_tier.max_concurrency",
							"Requests one statement may have in flight at once (batch calls).",
							"Capped by fw_tier.max_concurrency_cap.",
							&fw_max_concurrency, 16, 1, 1024,
							PGC_USERSET, 0, fw_check_max_concurrency, NULL, NULL);

	DefineCustomIntVariable("fw_tier.max_concurrency_cap",
							"Upper bound a superuser puts on fw_tier.max_concurrency.",
							NULL,
							&fw_max_concurrency_cap, 64, 1, 1024,
							PGC_SUSET, 0, NULL, NULL, NULL);

	/*
	 * The worst case of an attempt that sets no max_tokens: a budget
	 * reserves it and sends it as max_tokens (issue 13); an attempt in
	 * flight when its process died is logged as 'unknown' at it (issue
	 * 18).  Superuser: no role may make its own unknown attempts look
	 * cheap (a call still lowers its own with options.max_tokens).
	 */
	DefineCustomIntVariable("fw_tier.max_output_tokens",
							"Completion tokens assumed for an attempt that sets no max_tokens.",
							"A budget reserves them and sends them as max_tokens; an attempt whose answer never came is logged as 'unknown' at them.",
							&fw_max_output_tokens, 4096, 1, 1000000,
							PGC_SUSET, 0, NULL, NULL, NULL);

	fw_origin_define_gucs();	/* issue 11: fw_tier.node_name */
	fw_shipper_define_gucs();	/* issue 11: fw_tier.log_conninfo */
	fw_enrich_init();			/* issue 14: its GUC and shared slots */

	MarkGUCPrefixReserved("fw_tier");

	fw_shmem_install_hooks();
	fw_register_worker();

	fw_prev_emit_log_hook = emit_log_hook;
	emit_log_hook = fw_emit_log_hook;

	fw_preloaded = true;
}

void
fw_require_preload(void)
{
	if (!fw_preloaded)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("fw_tier must be loaded via shared_preload_libraries"),
				 errhint("Add fw_tier to shared_preload_libraries in postgresql.conf and restart the server.")));
}

const char *
fw_path_name(FwPath path)
{
	Assert(path >= 0 && path < FW_NUM_PATHS);
	return fw_path_names[path];
}

const char *
fw_outcome_name(FwOutcome outcome)
{
	Assert(outcome >= 0 && outcome < FW_NUM_OUTCOMES);
	return fw_outcome_names[outcome];
}

/* fw_tier.calls.kind (issue 12) */
const char *
fw_kind_name(FwCallKind kind)
{
	static const char *const names[FW_NUM_KINDS] = {"chat", "embed", "rerank"};

	Assert(kind >= 0 && kind < FW_NUM_KINDS);
	return names[kind];
}

bool
fw_parse_path(const char *s, FwPath *path)
{
	for (int i = 0; i < FW_NUM_PATHS; i++)
	{
		if (strcmp(s, fw_path_names[i]) == 0)
		{
			*path = (FwPath) i;
			return true;
		}
	}
	return false;
}

bool
fw_parse_on_overload(const char *s, FwOnOverload *policy)
{
	if (strcmp(s, "priority") == 0)
		*policy = FW_ONOVERLOAD_PRIORITY;
	else if (strcmp(s, "retry") == 0)
		*policy = FW_ONOVERLOAD_RETRY;
	else if (strcmp(s, "fail") == 0)
		*policy = FW_ONOVERLOAD_FAIL;
	else
		return false;
	return true;
}

/*
 * The first line of a key file, trailing blanks removed, in
 * TopMemoryContext.  what names the setting in error messages, which give
 * the file's name, never its content.
 */
static char *
fw_read_key_file(const char *path, const char *what)
{
	FILE	   *f;
	char		buf[1024];
	size_t		len;
	char	   *key;

	f = AllocateFile(path, "r");
	if (f == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open %s \"%s\": %m", what, path)));
	if (fgets(buf, sizeof(buf), f) == NULL)
		buf[0] = '\0';
	FreeFile(f);
	len = strlen(buf);
	while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r' ||
					   buf[len - 1] == ' ' || buf[len - 1] == '\t'))
		buf[--len] = '\0';
	key = MemoryContextStrdup(TopMemoryContext, buf);
	explicit_bzero(buf, sizeof(buf));
	return key;
}

/*
 * The first line of an open key file, like fw_read_key_file.  On error the
 * descriptor is closed by the transaction's abort (a transient file).
 */
static char *
fw_read_key_fd(int fd, const char *path)
{
	char		buf[1024];
	ssize_t		n;
	size_t		len;
	char	   *nl;
	char	   *key;

	n = read(fd, buf, sizeof(buf) - 1);
	if (n < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read fw_tier key file \"%s\": %m", path)));
	buf[n] = '\0';
	nl = strchr(buf, '\n');
	if (nl)
		*nl = '\0';
	len = strlen(buf);
	while (len > 0 && (buf[len - 1] == '\r' ||
					   buf[len - 1] == ' ' || buf[len - 1] == '\t'))
		buf[--len] = '\0';
	key = MemoryContextStrdup(TopMemoryContext, buf);
	explicit_bzero(buf, sizeof(buf));
	return key;
}

/*
 * The calling role's own key: the file named after current_user in
 * fw_tier.api_key_dir, or NULL when there is none (no directory set, no
 * file, or a role name that is not a plain file name).  Read by the
 * backend itself, as the server's operating-system user: nothing of it is
 * reachable through SQL (the directory is set in postgresql.conf, the file
 * has no SQL interface), so no role can read another's key.  The file must
 * not be accessible by group or others, like a server's SSL key.  Cached
 * per backend; looked at once per statement, and re-read when the role or
 * the file (inode, size, times) changes.
 */
static const char *
fw_role_api_key(void)
{
	static Oid	cached_role = InvalidOid;
	static char *cached_path = NULL;
	static struct stat cached_st;
	static char *cached_key = NULL;
	static TimestampTz checked_stmt = 0;
	static Oid	checked_role = InvalidOid;
	static bool checked_found = false;
	Oid			role = GetUserId();
	TimestampTz stmt = GetCurrentStatementStartTimestamp();
	char	   *name;
	char	   *path;
	struct stat st;
	int			fd;

	if (fw_api_key_dir == NULL || fw_api_key_dir[0] == '\0')
		return NULL;
	/* once per statement and role: a statement of 20,000 calls stats once */
	if (checked_stmt == stmt && checked_role == role)
		return checked_found ? cached_key : NULL;
	checked_stmt = 0;
	name = GetUserNameFromId(role, true);
	/* a name that could leave the directory, or a hidden file: no key */
	if (name == NULL || name[0] == '\0' || name[0] == '.' ||
		strchr(name, '/') != NULL)
		return NULL;
	path = psprintf("%s/%s", fw_api_key_dir, name);

	/*
	 * Open first, then check what was opened: no symbolic link (it could
	 * point at any file the server can read), and the descriptor's own
	 * stat, so nothing can be swapped in between the check and the read.
	 */
	fd = OpenTransientFile(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
	{
		if (errno == ENOENT)
		{
			pfree(path);
			checked_stmt = stmt;
			checked_role = role;
			checked_found = false;
			return NULL;
		}
		if (errno == ELOOP)
			ereport(ERROR,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("fw_tier key file \"%s\" is a symbolic link", path),
					 errhint("Put the key itself in the directory, owned by the database server's user, mode 0600.")));
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open fw_tier key file \"%s\": %m", path)));
	}
	if (fstat(fd, &st) != 0)
	{
		int			save_errno = errno;

		CloseTransientFile(fd);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat fw_tier key file \"%s\": %m", path)));
	}
	if (!S_ISREG(st.st_mode))
	{
		CloseTransientFile(fd);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("fw_tier key file \"%s\" is not a regular file", path)));
	}
	if (st.st_mode & (S_IRWXG | S_IRWXO))
	{
		CloseTransientFile(fd);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("fw_tier key file \"%s\" has group or world access", path),
				 errdetail("Permissions should be u=rw (0600) or less."),
				 errhint("chmod 0600 the file; it must be readable by the database server's user only.")));
	}
	if (st.st_uid != geteuid())
	{
		CloseTransientFile(fd);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIG_FILE_ERROR),
				 errmsg("fw_tier key file \"%s\" is not owned by the database server's user", path),
				 errhint("chown the file to the operating-system user the server runs as.")));
	}

	if (cached_key == NULL || cached_role != role ||
		strcmp(cached_path, path) != 0 ||
		st.st_ino != cached_st.st_ino || st.st_dev != cached_st.st_dev ||
		st.st_size != cached_st.st_size ||
		st.st_mtime != cached_st.st_mtime || st.st_ctime != cached_st.st_ctime)
	{
		char	   *key = fw_read_key_fd(fd, path);

		if (cached_key)
		{
			explicit_bzero(cached_key, strlen(cached_key));
			pfree(cached_key);
		}
		if (cached_path)
			pfree(cached_path);
		cached_key = key;
		cached_path = MemoryContextStrdup(TopMemoryContext, path);
		cached_role = role;
		cached_st = st;
	}
	CloseTransientFile(fd);
	pfree(path);
	checked_stmt = stmt;
	checked_role = role;
	checked_found = true;
	return cached_key;
}

/*
 * The API key in force: the calling role's file in fw_tier.api_key_dir,
 * else fw_tier.api_key, else the first line of fw_tier.api_key_file, else
 * FIREWORKS_API_KEY from the server's environment.  Files are re-read only
 * when they change.  Returns "" when there is no key (the request then
 * goes out without Authorization, and the provider answers 401).
 */
const char *
fw_effective_api_key(void)
{
	static char *file_key = NULL;
	static char *file_name = NULL;
	static time_t file_mtime = 0;
	const char *role_key;
	const char *env;

	role_key = fw_role_api_key();
	if (role_key != NULL)
		return role_key;

	if (fw_api_key && fw_api_key[0])
		return fw_api_key;

	if (fw_api_key_file && fw_api_key_file[0])
	{
		struct stat st;

		if (stat(fw_api_key_file, &st) != 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not stat fw_tier.api_key_file \"%s\": %m",
							fw_api_key_file)));

		if (file_key == NULL || file_name == NULL ||
			strcmp(file_name, fw_api_key_file) != 0 || st.st_mtime != file_mtime)
		{
			char	   *key = fw_read_key_file(fw_api_key_file, "fw_tier.api_key_file");

			if (file_key)
			{
				explicit_bzero(file_key, strlen(file_key));
				pfree(file_key);
			}
			if (file_name)
				pfree(file_name);
			file_key = key;
			file_name = MemoryContextStrdup(TopMemoryContext, fw_api_key_file);
			file_mtime = st.st_mtime;
		}
		return file_key;
	}

	env = getenv("FIREWORKS_API_KEY");
	return env ? env : "";
}
