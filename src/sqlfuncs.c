/*-------------------------------------------------------------------------
 *
 * sqlfuncs.c
 *		The SQL-callable calling functions: fw_complete, fw_chat,
 *		fw_complete_batch, and the typed answers fw_complete_json and
 *		fw_complete_json_batch (issue 12).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "engine.h"
#include "fwjson.h"
#include "jsonschema.h"

PG_FUNCTION_INFO_V1(fw_complete);
PG_FUNCTION_INFO_V1(fw_chat);
PG_FUNCTION_INFO_V1(fw_complete_batch);
PG_FUNCTION_INFO_V1(fw_complete_json);
PG_FUNCTION_INFO_V1(fw_complete_json_batch);
PG_FUNCTION_INFO_V1(fw_json_options_sql);

char *
fw_workload_arg(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("workload must not be NULL")));
	return text_to_cstring(PG_GETARG_TEXT_PP(argno));
}

/* fw_complete(prompt text, workload text DEFAULT 'default') RETURNS text */
Datum
fw_complete(PG_FUNCTION_ARGS)
{
	FwCall		call;
	char	   *prompt;
	char	   *workload;

	fw_require_preload();
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();		/* no prompt, no request */
	workload = fw_workload_arg(fcinfo, 1);
	prompt = text_to_cstring(PG_GETARG_TEXT_PP(0));

	fw_call_init(&call, workload, fw_messages_from_prompt(prompt), NULL, true);
	call.prompt_text = prompt;
	fw_engine_run(&call, 1, 1, true);

	if (call.ok)
		PG_RETURN_TEXT_P(cstring_to_text(call.content));
	if (fw_call_on_error(NULL) == FW_ONERROR_NULL)
		PG_RETURN_NULL();
	fw_call_raise(&call);
	PG_RETURN_NULL();			/* keep compiler quiet */
}

/*
 * fw_chat(messages jsonb, workload text DEFAULT 'default',
 *		   options jsonb DEFAULT '{}') RETURNS jsonb
 */
Datum
fw_chat(PG_FUNCTION_ARGS)
{
	FwCall		call;
	Jsonb	   *messages;
	Jsonb	   *options;
	char	   *workload;
	FwOnError	on_error;

	fw_require_preload();
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	workload = fw_workload_arg(fcinfo, 1);
	messages = PG_GETARG_JSONB_P(0);
	options = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);
	fw_check_messages(messages);
	on_error = fw_call_on_error(options);	/* checked before any request */

	fw_call_init(&call, workload, messages, options, false);
	if (fw_log_content)
		call.prompt_text = JsonbToCString(NULL, &messages->root, VARSIZE(messages));
	fw_engine_run(&call, 1, 1, true);

	if (call.ok)
		PG_RETURN_JSONB_P(call.response);
	if (on_error == FW_ONERROR_NULL)
		PG_RETURN_NULL();
	fw_call_raise(&call);
	PG_RETURN_NULL();			/* keep compiler quiet */
}

/*
 * The batch forms: answers in the prompts' order; NULL prompt -> NULL
 * answer and no request.  Requests run concurrently, at most
 * fw_tier.max_concurrency (capped by fw_tier.max_concurrency_cap) in
 * flight.  schema NULL: text answers (fw_complete_batch); otherwise jsonb
 * answers checked against it (fw_complete_json_batch, options already
 * carrying the response_format).
 */
static Datum
fw_batch(ArrayType *arr, const char *workload, Jsonb *options, Jsonb *schema)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	FwCall	   *calls;
	Datum	   *out;
	bool	   *outnulls;
	FwOnError	on_error;
	int			dims[1];
	int			lbs[1];
	int			concurrency;
	Oid			restype = schema ? JSONBOID : TEXTOID;

	on_error = fw_call_on_error(options);

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("prompts must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (n == 0)
		PG_RETURN_ARRAYTYPE_P(construct_empty_array(restype));

	calls = palloc(sizeof(FwCall) * n);
	for (int i = 0; i < n; i++)
	{
		char	   *prompt;

		if (nulls[i])
		{
			memset(&calls[i], 0, sizeof(FwCall));
			calls[i].finished = true;
			continue;
		}
		prompt = TextDatumGetCString(elems[i]);
		fw_call_init(&calls[i], workload, fw_messages_from_prompt(prompt),
					 options, true);
		calls[i].prompt_text = prompt;
		calls[i].schema = schema;
	}

	concurrency = Min(fw_max_concurrency, fw_max_concurrency_cap);
	fw_engine_run(calls, n, concurrency, on_error == FW_ONERROR_RAISE);

	out = palloc(sizeof(Datum) * n);
	outnulls = palloc(sizeof(bool) * n);
	for (int i = 0; i < n; i++)
	{
		if (calls[i].ok)
		{
			out[i] = schema ? JsonbPGetDatum(calls[i].output) :
				PointerGetDatum(cstring_to_text(calls[i].content));
			outnulls[i] = false;
			continue;
		}
		if (!nulls[i] && calls[i].finished && on_error == FW_ONERROR_RAISE)
			fw_call_raise(&calls[i]);
		out[i] = (Datum) 0;
		outnulls[i] = true;
	}

	dims[0] = n;
	lbs[0] = ARR_NDIM(arr) == 1 ? ARR_LBOUND(arr)[0] : 1;
	PG_RETURN_ARRAYTYPE_P(construct_md_array(out, outnulls, 1, dims, lbs,
											 restype, -1, false, TYPALIGN_INT));
}

/*
 * fw_complete_batch(prompts text[], workload text DEFAULT 'batch',
 *					 options jsonb DEFAULT '{}') RETURNS text[]
 */
Datum
fw_complete_batch(PG_FUNCTION_ARGS)
{
	char	   *workload;

	fw_require_preload();
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	workload = fw_workload_arg(fcinfo, 1);
	return fw_batch(PG_GETARG_ARRAYTYPE_P(0), workload,
					PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2), NULL);
}

/*
 * The schema argument of the typed forms: checked before anything is
 * sent (22004 NULL, 22023 invalid or unsupported, 54000 too large).
 */
static Jsonb *
fw_schema_arg(FunctionCallInfo fcinfo, int argno)
{
	Jsonb	   *schema;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("schema must not be NULL")));
	schema = PG_GETARG_JSONB_P(argno);
	fw_schema_check(schema);
	return schema;
}

/*
 * fw_complete_json(prompt text, schema jsonb, workload text DEFAULT
 *					'default', options jsonb DEFAULT '{}') RETURNS jsonb
 *
 * The answer as jsonb, a value of schema: sent as response_format
 * json_schema, and checked here, whatever the provider promises.  An
 * answer that is not JSON, cut off or not of the schema is outcome
 * bad_output: asked once more, then raised (or NULL under on_error null).
 */
Datum
fw_complete_json(PG_FUNCTION_ARGS)
{
	FwCall		call;
	Jsonb	   *schema;
	Jsonb	   *options;
	char	   *workload;
	char	   *prompt;
	FwOnError	on_error;

	fw_require_preload();
	schema = fw_schema_arg(fcinfo, 1);
	workload = fw_workload_arg(fcinfo, 2);
	options = fw_json_options(PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3), schema);
	on_error = fw_call_on_error(options);	/* checked before any request */
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();		/* no prompt, no request */
	prompt = text_to_cstring(PG_GETARG_TEXT_PP(0));

	fw_call_init(&call, workload, fw_messages_from_prompt(prompt), options, true);
	call.prompt_text = prompt;
	call.schema = schema;
	fw_engine_run(&call, 1, 1, true);

	if (call.ok)
		PG_RETURN_JSONB_P(call.output);
	if (on_error == FW_ONERROR_NULL)
		PG_RETURN_NULL();
	fw_call_raise(&call);
	PG_RETURN_NULL();			/* keep compiler quiet */
}

/*
 * fw_complete_json_batch(prompts text[], schema jsonb, workload text
 *						  DEFAULT 'batch', options jsonb DEFAULT '{}')
 *						  RETURNS jsonb[]
 */
Datum
fw_complete_json_batch(PG_FUNCTION_ARGS)
{
	Jsonb	   *schema;
	char	   *workload;
	Jsonb	   *options;

	fw_require_preload();
	schema = fw_schema_arg(fcinfo, 1);
	workload = fw_workload_arg(fcinfo, 2);
	options = fw_json_options(PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3), schema);
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	return fw_batch(PG_GETARG_ARRAYTYPE_P(0), workload, options, schema);
}

/*
 * fw_tier.json_options(schema jsonb, options jsonb DEFAULT '{}') RETURNS
 * jsonb: the options fw_complete_json sends (its response_format added),
 * for fw_fingerprint and hand-written fixtures.
 */
Datum
fw_json_options_sql(PG_FUNCTION_ARGS)
{
	Jsonb	   *schema = fw_schema_arg(fcinfo, 0);

	PG_RETURN_JSONB_P(fw_json_options(PG_ARGISNULL(1) ? NULL : PG_GETARG_JSONB_P(1),
									  schema));
}
