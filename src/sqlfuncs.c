/*-------------------------------------------------------------------------
 *
 * sqlfuncs.c
 *		The SQL-callable calling functions: fw_complete, fw_chat,
 *		fw_complete_batch.
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

PG_FUNCTION_INFO_V1(fw_complete);
PG_FUNCTION_INFO_V1(fw_chat);
PG_FUNCTION_INFO_V1(fw_complete_batch);

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
 * fw_complete_batch(prompts text[], workload text DEFAULT 'batch',
 *					 options jsonb DEFAULT '{}') RETURNS text[]
 *
 * The answers in the prompts' order; NULL prompt -> NULL answer and no
 * request.  Requests run concurrently, at most fw_tier.max_concurrency
 * (capped by fw_tier.max_concurrency_cap) in flight.
 */
Datum
fw_complete_batch(PG_FUNCTION_ARGS)
{
	ArrayType  *arr;
	Jsonb	   *options;
	char	   *workload;
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

	fw_require_preload();
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	workload = fw_workload_arg(fcinfo, 1);
	arr = PG_GETARG_ARRAYTYPE_P(0);
	options = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);
	on_error = fw_call_on_error(options);

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("prompts must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (n == 0)
		PG_RETURN_ARRAYTYPE_P(construct_empty_array(TEXTOID));

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
	}

	concurrency = Min(fw_max_concurrency, fw_max_concurrency_cap);
	fw_engine_run(calls, n, concurrency, on_error == FW_ONERROR_RAISE);

	out = palloc(sizeof(Datum) * n);
	outnulls = palloc(sizeof(bool) * n);
	for (int i = 0; i < n; i++)
	{
		if (calls[i].ok)
		{
			out[i] = PointerGetDatum(cstring_to_text(calls[i].content));
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
											 TEXTOID, -1, false, TYPALIGN_INT));
}
