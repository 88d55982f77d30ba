/*-------------------------------------------------------------------------
 *
 * embed.c
 *		Embeddings and rerank (issue 12): fw_embed, fw_embed_batch and
 *		fw_rerank, their request fields, and the check of their answers.
 *
 * Each request is an FwCall of kind FW_KIND_EMBED or FW_KIND_RERANK and
 * runs through engine.c like a chat completion: the same paths and
 * escalation, pacing, failure classes, call log and record/replay.  What
 * differs is here: the body's own fields (FwCall.fields: "input", or
 * "query" and "documents"), and fw_parse_typed, which engine.c calls for
 * a 2xx answer of these kinds.
 *
 * A response body crosses a trust boundary.  It is read with
 * PostgreSQL's non-throwing JSON parser and semantic actions (no jsonb:
 * an answer of 128 vectors of 4,096 numbers would cost a numeric per
 * number), and accepted only when every vector or result is there once,
 * with an index in range, every vector has the same length (the one
 * options.dimensions asked for, if any) and every number is a finite
 * real.  Anything else is a bad_response, as a chat answer without
 * choices is.  Sizes are bounded by the inputs sent, FW_EMBED_MAX_DIMS and
 * http.c's body limit.
 *
 * fw_embed_batch cuts its inputs into requests of at most
 * fw_tier.embed_batch_inputs inputs and fw_tier.embed_batch_tokens
 * estimated tokens, and runs them all at once with the batch concurrency.
 *
 * No shared state, no locks; called by the SQL functions below and by
 * engine.c (fw_parse_typed).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <float.h>
#include <math.h>

#include "catalog/pg_type.h"
#include "common/jsonapi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"

#include "embed.h"

PG_FUNCTION_INFO_V1(fw_embed);
PG_FUNCTION_INFO_V1(fw_embed_batch);
PG_FUNCTION_INFO_V1(fw_rerank);

/* ---- reading an answer ---- */

/* What a JSON container is, as far as the answer is concerned. */
typedef enum FwTpRole
{
	FW_TP_OTHER = 0,
	FW_TP_ROOT,					/* the body's object */
	FW_TP_DATA,					/* root.data */
	FW_TP_ITEM,					/* one element of data */
	FW_TP_VECTOR,				/* item.embedding */
	FW_TP_USAGE					/* root.usage */
} FwTpRole;

#define FW_TP_DEPTH 8			/* roles are only kept this deep */

typedef struct FwTypedParse
{
	FwCallKind	kind;
	int			limit;			/* indexes run 0 .. limit-1 */
	int			max_items;		/* items allowed */
	int			expect_dims;	/* 0: any */
	int			depth;
	FwTpRole	role[FW_TP_DEPTH + 1];
	char	   *field;			/* the innermost object's current key */
	const char *problem;
	MemoryContext out_cxt;		/* where the answer is allocated */
	bool		saw_data;
	int			items;
	/* the item being read */
	int			item_index;
	bool		item_has_vector;
	bool		item_has_score;
	double		item_score;
	float4	   *scratch;		/* its vector, FW_EMBED_MAX_DIMS long */
	int			nvals;
	/* the answer */
	FwTyped    *t;
	bool	   *seen;
	int			prompt_tokens;
	int			total_tokens;
} FwTypedParse;

static FwTpRole
fw_tp_role(FwTypedParse *st)
{
	return (st->depth >= 0 && st->depth <= FW_TP_DEPTH) ? st->role[st->depth] : FW_TP_OTHER;
}

static bool
fw_tp_field_is(FwTypedParse *st, const char *name)
{
	return st->field != NULL && strcmp(st->field, name) == 0;
}

/* A non-negative integer token of at most 9 digits, else -1. */
static int
fw_tp_small_int(const char *token)
{
	size_t		len = strlen(token);

	if (len == 0 || len > 9 || strspn(token, "0123456789") != len)
		return -1;
	return atoi(token);
}

/*
 * A JSON number token as a double.  The common shape of an embedding
 * value (-0.1234567, 1.5e-05: at most 15 significant digits, a small
 * exponent) is read exactly without strtod, which is most of the parse
 * cost of a large answer: the digits are an integer below 2^53 and the
 * power of ten is exact, so one multiplication or division rounds once,
 * as strtod does.  Anything else goes to strtod.
 */
static double
fw_tp_number(const char *tok)
{
	static const double pow10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8,
		1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
	const char *p = tok;
	bool		neg = false;
	int64		mant = 0;
	int			digits = 0;
	int			scale = 0;		/* digits after the point */
	int			exp = 0;

	if (*p == '-')
	{
		neg = true;
		p++;
	}
	for (; *p >= '0' && *p <= '9'; p++)
	{
		if (digits > 0 || *p != '0')
			digits++;
		mant = mant * 10 + (*p - '0');
		if (digits > 15)
			return strtod(tok, NULL);
	}
	if (*p == '.')
		for (p++; *p >= '0' && *p <= '9'; p++, scale++)
		{
			if (digits > 0 || *p != '0')
				digits++;
			mant = mant * 10 + (*p - '0');
			if (digits > 15)
				return strtod(tok, NULL);
		}
	if (*p == 'e' || *p == 'E')
	{
		bool		eneg = false;
		int			e = 0;

		p++;
		if (*p == '+' || *p == '-')
			eneg = (*p++ == '-');
		for (; *p >= '0' && *p <= '9'; p++)
		{
			e = e * 10 + (*p - '0');
			if (e > 400)
				return strtod(tok, NULL);
		}
		exp = eneg ? -e : e;
	}
	if (*p != '\0')
		return strtod(tok, NULL);
	exp -= scale;
	if (exp < -22 || exp > 22)
		return strtod(tok, NULL);
	{
		double		v = (double) mant;

		v = exp < 0 ? v / pow10[-exp] : v * pow10[exp];
		return neg ? -v : v;
	}
}

/* Inside an embedding only numbers may come. */
static bool
fw_tp_in_vector(FwTypedParse *st)
{
	if (fw_tp_role(st) != FW_TP_VECTOR)
		return false;
	st->problem = "an embedding is not an array of numbers";
	return true;
}

static void
fw_tp_push(FwTypedParse *st, FwTpRole role)
{
	st->depth++;
	if (st->depth <= FW_TP_DEPTH)
		st->role[st->depth] = role;
}

static void
fw_tp_object_start(void *state)
{
	FwTypedParse *st = state;
	FwTpRole	parent = fw_tp_role(st);
	FwTpRole	role = FW_TP_OTHER;

	if (st->problem || fw_tp_in_vector(st))
		return;
	if (st->depth == 0)
		role = FW_TP_ROOT;
	else if (parent == FW_TP_ROOT && fw_tp_field_is(st, "usage"))
		role = FW_TP_USAGE;
	else if (parent == FW_TP_DATA)
	{
		role = FW_TP_ITEM;
		if (++st->items > st->max_items)
		{
			st->problem = psprintf("response has more than %d items in data", st->max_items);
			return;
		}
		st->item_index = -1;
		st->item_has_vector = st->item_has_score = false;
		st->nvals = 0;
	}
	fw_tp_push(st, role);
}

/* An item is complete: check it and file it under its index. */
static void
fw_tp_item_end(FwTypedParse *st)
{
	FwTyped    *t = st->t;
	int			i = st->item_index;

	if (i < 0)
	{
		st->problem = "an item in data has no valid index";
		return;
	}
	if (st->seen[i])
	{
		st->problem = psprintf("index %d appears twice in data", i);
		return;
	}
	st->seen[i] = true;

	if (st->kind == FW_KIND_RERANK)
	{
		if (!st->item_has_score)
		{
			st->problem = psprintf("result %d has no finite relevance_score", i);
			return;
		}
		t->index[t->n] = i;
		t->score[t->n] = st->item_score;
		t->n++;
		return;
	}

	if (!st->item_has_vector || st->nvals == 0)
	{
		st->problem = psprintf("item %d has no embedding", i);
		return;
	}
	if (t->dims == 0)
	{
		if (st->expect_dims > 0 && st->nvals != st->expect_dims)
		{
			st->problem = psprintf("embeddings have %d dimensions, %d were asked for",
								   st->nvals, st->expect_dims);
			return;
		}
		t->dims = st->nvals;
		t->vectors = MemoryContextAlloc(st->out_cxt,
										sizeof(float4) * (Size) st->limit * t->dims);
	}
	else if (st->nvals != t->dims)
	{
		st->problem = psprintf("embeddings differ in length (%d and %d dimensions)",
							   t->dims, st->nvals);
		return;
	}
	memcpy(t->vectors + (Size) i * t->dims, st->scratch, sizeof(float4) * t->dims);
	t->n++;
}

static void
fw_tp_object_end(void *state)
{
	FwTypedParse *st = state;

	if (st->problem)
		return;
	if (fw_tp_role(st) == FW_TP_ITEM)
		fw_tp_item_end(st);
	st->depth--;
}

static void
fw_tp_array_start(void *state)
{
	FwTypedParse *st = state;
	FwTpRole	parent = fw_tp_role(st);
	FwTpRole	role = FW_TP_OTHER;

	if (st->problem || fw_tp_in_vector(st))
		return;
	if (st->depth == 0)
	{
		st->problem = "response body is not a JSON object";
		return;
	}
	if (parent == FW_TP_ROOT && fw_tp_field_is(st, "data"))
	{
		if (st->saw_data)
		{
			st->problem = "response has two data arrays";
			return;
		}
		role = FW_TP_DATA;
		st->saw_data = true;
	}
	else if (parent == FW_TP_ITEM && st->kind == FW_KIND_EMBED &&
			 fw_tp_field_is(st, "embedding"))
	{
		role = FW_TP_VECTOR;
		st->item_has_vector = true;
		st->nvals = 0;
	}
	fw_tp_push(st, role);
}

static void
fw_tp_array_end(void *state)
{
	FwTypedParse *st = state;

	if (st->problem)
		return;
	st->depth--;
}

static void
fw_tp_field_start(void *state, char *fname, bool isnull)
{
	FwTypedParse *st = state;

	st->field = fname;
}

static void
fw_tp_scalar(void *state, char *token, JsonTokenType type)
{
	FwTypedParse *st = state;
	FwTpRole	role = fw_tp_role(st);

	if (st->problem)
		return;
	if (st->depth == 0)
	{
		st->problem = "response body is not a JSON object";
		return;
	}
	if (role == FW_TP_VECTOR)
	{
		double		v;

		if (type != JSON_TOKEN_NUMBER)
		{
			st->problem = "an embedding is not an array of numbers";
			return;
		}
		if (st->nvals >= FW_EMBED_MAX_DIMS)
		{
			st->problem = psprintf("an embedding has more than %d dimensions", FW_EMBED_MAX_DIMS);
			return;
		}
		v = fw_tp_number(token);
		if (!isfinite(v) || fabs(v) > FLT_MAX)
		{
			st->problem = "an embedding value is not a finite real number";
			return;
		}
		if (st->scratch == NULL)
			st->scratch = palloc(sizeof(float4) * FW_EMBED_MAX_DIMS);
		st->scratch[st->nvals++] = (float4) v;
	}
	else if (role == FW_TP_ITEM && fw_tp_field_is(st, "index"))
	{
		int			i = (type == JSON_TOKEN_NUMBER) ? fw_tp_small_int(token) : -1;

		if (type != JSON_TOKEN_NUMBER)
		{
			st->problem = "an index is not a number";
			return;
		}
		if (i < 0 || i >= st->limit)
		{
			st->problem = psprintf("index %s is not an integer in 0..%d", token, st->limit - 1);
			return;
		}
		st->item_index = i;
	}
	else if (role == FW_TP_ITEM && st->kind == FW_KIND_RERANK &&
			 fw_tp_field_is(st, "relevance_score"))
	{
		double		v = (type == JSON_TOKEN_NUMBER) ? strtod(token, NULL) : NAN;

		if (isfinite(v))
		{
			st->item_score = v;
			st->item_has_score = true;
		}
	}
	else if (role == FW_TP_USAGE && type == JSON_TOKEN_NUMBER)
	{
		if (fw_tp_field_is(st, "prompt_tokens"))
			st->prompt_tokens = fw_tp_small_int(token);
		else if (fw_tp_field_is(st, "total_tokens"))
			st->total_tokens = fw_tp_small_int(token);
	}
}

/* Rerank results by descending score, then by document position. */
static int
fw_rerank_cmp(const void *a, const void *b, void *arg)
{
	const FwTyped *t = arg;
	int			ia = *(const int *) a;
	int			ib = *(const int *) b;

	if (t->score[ia] != t->score[ib])
		return t->score[ia] > t->score[ib] ? -1 : 1;
	return t->index[ia] - t->index[ib];
}

/*
 * Is this 2xx body a usable answer of call's kind?  Fills out (usage and
 * out->typed, allocated in the current context); false with out->problem
 * set when not.  Never raises for anything in the body.
 */
bool
fw_parse_typed(FwCall *call, const char *body, size_t len, FwParsed *out)
{
	MemoryContext out_cxt = CurrentMemoryContext;
	MemoryContext cxt;
	FwTypedParse st;
	JsonSemAction sem;
	JsonLexContext *lex;
	JsonParseErrorType err;
	FwTyped    *t;

	out->prompt_tokens = out->cached_tokens = out->completion_tokens = -1;
	if (len == 0 || len > INT_MAX ||
		!pg_verify_mbstr(PG_UTF8, body, (int) len, true))
	{
		out->problem = "response body is not valid JSON";
		return false;
	}
	if (!fw_json_depth_ok(body, len))
	{
		out->problem = "response body nests too deeply";
		return false;
	}

	t = palloc0(sizeof(FwTyped));
	memset(&st, 0, sizeof(st));
	st.kind = call->kind;
	st.limit = Max(call->expect_n, 1);
	st.max_items = (call->kind == FW_KIND_RERANK && call->top_n > 0) ?
		Min(call->top_n, call->expect_n) : call->expect_n;
	st.expect_dims = call->expect_dims;
	st.out_cxt = out_cxt;
	st.t = t;
	st.seen = palloc0(sizeof(bool) * st.limit);
	st.prompt_tokens = st.total_tokens = -1;
	if (call->kind == FW_KIND_RERANK)
	{
		t->index = palloc(sizeof(int) * st.limit);
		t->score = palloc(sizeof(double) * st.limit);
	}

	memset(&sem, 0, sizeof(sem));
	sem.semstate = &st;
	sem.object_start = fw_tp_object_start;
	sem.object_end = fw_tp_object_end;
	sem.array_start = fw_tp_array_start;
	sem.array_end = fw_tp_array_end;
	sem.object_field_start = fw_tp_field_start;
	sem.scalar = fw_tp_scalar;

	/* the parser pallocs every token: a context of its own, dropped after */
	cxt = AllocSetContextCreate(CurrentMemoryContext, "fw_tier typed answer",
								ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(cxt);
	lex = makeJsonLexContextCstringLen((char *) body, (int) len, PG_UTF8, true);
	err = pg_parse_json(lex, &sem);
	MemoryContextSwitchTo(out_cxt);
	/* problems built in cxt must outlive it */
	if (st.problem)
		out->problem = pstrdup(st.problem);
	MemoryContextDelete(cxt);

	if (out->problem == NULL && err != JSON_SUCCESS)
		out->problem = "response body is not valid JSON";
	if (out->problem == NULL && !st.saw_data)
		out->problem = "response has no data array";
	if (out->problem == NULL && call->kind == FW_KIND_EMBED && t->n != call->expect_n)
		out->problem = psprintf("response has %d embeddings for %d inputs",
								t->n, call->expect_n);
	out->prompt_tokens = st.prompt_tokens >= 0 ? st.prompt_tokens : st.total_tokens;
	if (out->problem)
		return false;

	if (call->kind == FW_KIND_RERANK && t->n > 1)
	{
		int		   *order = palloc(sizeof(int) * t->n);
		int		   *idx = palloc(sizeof(int) * t->n);
		double	   *score = palloc(sizeof(double) * t->n);

		for (int i = 0; i < t->n; i++)
			order[i] = i;
		qsort_arg(order, t->n, sizeof(int), fw_rerank_cmp, t);
		for (int i = 0; i < t->n; i++)
		{
			idx[i] = t->index[order[i]];
			score[i] = t->score[order[i]];
		}
		t->index = idx;
		t->score = score;
	}
	out->typed = t;
	return true;
}

/* ---- building requests ---- */

/* A text datum as a JSON string value (or key) */
static void
fw_embed_push_text(JsonbParseState **st, JsonbIteratorToken tok, text *t)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = VARDATA_ANY(t);
	v.val.string.len = VARSIZE_ANY_EXHDR(t);
	pushJsonbValue(st, tok, &v);
}

/* Reserved fields of each kind: options may not set them. */
static const char *const fw_embed_fields[] = {"input", NULL};
static const char *const fw_rerank_fields[] = {"query", "documents", "top_n", "return_documents", NULL};

/*
 * Check options before any request: an object, none of the kind's own
 * fields, encoding_format "float" only (the answer is read as numbers),
 * dimensions a positive integer within bounds.  Returns dimensions, or 0.
 */
static int
fw_typed_options(Jsonb *options, FwCallKind kind)
{
	const char *const *own = kind == FW_KIND_EMBED ? fw_embed_fields : fw_rerank_fields;
	JsonbValue	v;
	char	   *fmt;
	int			dims = 0;

	if (options == NULL)
		return 0;
	if (!JB_ROOT_IS_OBJECT(options) || JB_ROOT_IS_SCALAR(options))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("options must be a JSON object")));
	for (int i = 0; own[i]; i++)
		if (getKeyJsonValueFromContainer(&options->root, own[i], strlen(own[i]), &v))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("options may not set \"%s\"", own[i]),
					 errdetail("fw_tier sends it from the function's arguments.")));
	fmt = fw_option_text(options, "encoding_format");
	if (fmt && strcmp(fmt, "float") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("encoding_format \"%s\" is not supported", fmt),
				 errhint("Leave encoding_format out: fw_tier reads embeddings as arrays of numbers.")));
	if (getKeyJsonValueFromContainer(&options->root, "dimensions", 10, &v) &&
		v.type != jbvNull)
	{
		bool		bad = (v.type != jbvNumeric);

		if (!bad)
			dims = numeric_int4_opt_error(v.val.numeric, &bad);
		if (bad || dims < 1 || dims > FW_EMBED_MAX_DIMS ||
			kind != FW_KIND_EMBED ||
			!DatumGetBool(DirectFunctionCall2(numeric_eq, NumericGetDatum(v.val.numeric),
											  DirectFunctionCall1(int4_numeric, Int32GetDatum(dims)))))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("option \"dimensions\" must be an integer between 1 and %d",
							FW_EMBED_MAX_DIMS),
					 kind != FW_KIND_EMBED ? errdetail("Only embeddings take dimensions.") : 0));
	}
	return dims;
}

/* One embeddings request for inputs pos[0..n-1] of elems. */
static void
fw_embed_call(FwCall *call, const char *workload, Datum *elems, int *pos, int n,
			  Jsonb *options, int dims)
{
	JsonbParseState *st = NULL;
	JsonbValue *res;

	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	fw_push_key(&st, "input");
	pushJsonbValue(&st, WJB_BEGIN_ARRAY, NULL);
	for (int i = 0; i < n; i++)
		fw_embed_push_text(&st, WJB_ELEM, DatumGetTextPP(elems[pos[i]]));
	pushJsonbValue(&st, WJB_END_ARRAY, NULL);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);

	fw_call_init_kind(call, FW_KIND_EMBED, workload, JsonbValueToJsonb(res), options);
	call->expect_n = n;
	call->expect_dims = dims;
	if (fw_log_content)
		call->prompt_text = JsonbToCString(NULL, &call->fields->root, VARSIZE(call->fields));
}

/* The vector of input i of a finished call, as real[]. */
static ArrayType *
fw_embed_vector(FwTyped *t, int i)
{
	Datum	   *d = palloc(sizeof(Datum) * t->dims);
	float4	   *v = t->vectors + (Size) i * t->dims;

	for (int k = 0; k < t->dims; k++)
		d[k] = Float4GetDatum(v[k]);
	return construct_array(d, t->dims, FLOAT4OID, sizeof(float4), true,
						   TYPALIGN_INT);
}

/*
 * issue 14 (enrich.c): one input's embeddings request, options checked as
 * fw_embed checks them, and its answer as real[].
 */
void
fw_embed_prepare(FwCall *call, const char *workload, const char *input,
				 Jsonb *options)
{
	Datum		elem = CStringGetTextDatum(input);
	int			pos = 0;

	fw_embed_call(call, workload, &elem, &pos, 1, options,
				  fw_typed_options(options, FW_KIND_EMBED));
}

ArrayType *
fw_embed_answer(FwCall *call)
{
	return fw_embed_vector(call->typed, 0);
}

/*
 * fw_embed(input text, workload text DEFAULT 'default',
 *			options jsonb DEFAULT '{}') RETURNS real[]
 */
Datum
fw_embed(PG_FUNCTION_ARGS)
{
	FwCall		call;
	Jsonb	   *options;
	char	   *workload;
	FwOnError	on_error;
	int			dims;
	Datum		elem;
	int			pos = 0;

	fw_require_preload();
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();		/* no input, no request */
	workload = fw_workload_arg(fcinfo, 1);
	options = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);
	on_error = fw_call_on_error(options);
	dims = fw_typed_options(options, FW_KIND_EMBED);

	elem = PG_GETARG_DATUM(0);
	fw_embed_call(&call, workload, &elem, &pos, 1, options, dims);
	fw_engine_run(&call, 1, 1, true);

	if (call.ok)
		PG_RETURN_ARRAYTYPE_P(fw_embed_vector(call.typed, 0));
	if (on_error == FW_ONERROR_NULL)
		PG_RETURN_NULL();
	fw_call_raise(&call);
	PG_RETURN_NULL();			/* keep compiler quiet */
}

/*
 * fw_embed_batch(inputs text[], workload text DEFAULT 'batch',
 *				  options jsonb DEFAULT '{}')
 *	RETURNS TABLE(ord int, embedding real[])
 *
 * One row per input, ord = its position counting from 1; a NULL input
 * (or, under on_error 'null', an input of a failed request) gives a NULL
 * embedding and is never sent.
 */
Datum
fw_embed_batch(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *arr;
	Jsonb	   *options;
	char	   *workload;
	FwOnError	on_error;
	int			dims;
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	FwCall	   *calls;
	int			ncalls = 0;
	int		   *pos;			/* non-NULL inputs, chunk after chunk */
	int		   *chunk_of;		/* input -> its call, -1 for NULL */
	int		   *slot_of;		/* input -> its place in the call */
	int			first = 0;
	int			ntokens = 0;
	int			npos = 0;
	int			common_dims = 0;

	fw_require_preload();
	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	workload = fw_workload_arg(fcinfo, 1);
	arr = PG_GETARG_ARRAYTYPE_P(0);
	options = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);
	on_error = fw_call_on_error(options);
	dims = fw_typed_options(options, FW_KIND_EMBED);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("inputs must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	if (n == 0)
		return (Datum) 0;

	/*
	 * Chunks: consecutive non-NULL inputs, cut at embed_batch_inputs
	 * inputs or embed_batch_tokens estimated tokens (about four bytes a
	 * token; an input over the limit goes alone).
	 */
	calls = palloc(sizeof(FwCall) * n);
	pos = palloc(sizeof(int) * n);
	chunk_of = palloc(sizeof(int) * n);
	slot_of = palloc(sizeof(int) * n);
	for (int i = 0; i <= n; i++)
	{
		int			est = 0;

		if (i < n && nulls[i])
		{
			chunk_of[i] = -1;
			continue;
		}
		if (i < n)
			est = (int) Min(VARSIZE_ANY_EXHDR(DatumGetPointer(elems[i])) / 4 + 1, INT_MAX / 2);
		if (npos > first &&
			(i == n || npos - first >= fw_embed_batch_inputs ||
			 ntokens + est > fw_embed_batch_tokens))
		{
			fw_embed_call(&calls[ncalls++], workload, elems, pos + first,
						  npos - first, options, dims);
			first = npos;
			ntokens = 0;
		}
		if (i == n)
			break;
		chunk_of[i] = ncalls;
		slot_of[i] = npos - first;
		pos[npos++] = i;
		ntokens += est;
	}
	if (ncalls == 0)
		goto emit;

	fw_engine_run(calls, ncalls, Min(fw_max_concurrency, fw_max_concurrency_cap),
				  on_error == FW_ONERROR_RAISE);
	for (int c = 0; c < ncalls; c++)
	{
		if (!calls[c].ok)
		{
			if (calls[c].finished && on_error == FW_ONERROR_RAISE)
				fw_call_raise(&calls[c]);
			continue;
		}
		/* without options.dimensions, requests could disagree */
		if (common_dims == 0)
			common_dims = calls[c].typed->dims;
		else if (calls[c].typed->dims != common_dims)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("fireworks returned embeddings of %d and %d dimensions in one batch",
							common_dims, calls[c].typed->dims),
					 errhint("Set options.dimensions, or use one model for the whole batch.")));
	}

emit:
	for (int i = 0; i < n; i++)
	{
		Datum		values[2];
		bool		isnull[2] = {false, false};
		FwCall	   *c = chunk_of[i] >= 0 ? &calls[chunk_of[i]] : NULL;

		values[0] = Int32GetDatum(i + 1);
		if (c && c->ok)
			values[1] = PointerGetDatum(fw_embed_vector(c->typed, slot_of[i]));
		else
			isnull[1] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, isnull);
	}
	return (Datum) 0;
}

/*
 * fw_rerank(query text, documents text[], top_n int DEFAULT NULL,
 *			 workload text DEFAULT 'default', options jsonb DEFAULT '{}')
 *	RETURNS TABLE(index int, score float8)
 *
 * index is the document's position in documents counting from 1 (so
 * documents[index] is the document), rows by descending score; at most
 * top_n of them.  NULL documents are never sent nor ranked; a NULL query
 * or no document gives no rows and no request.
 */
Datum
fw_rerank(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *arr;
	Jsonb	   *options;
	char	   *workload;
	FwOnError	on_error;
	Datum	   *elems;
	bool	   *nulls;
	int			n;
	int		   *pos;
	int			nsent = 0;
	int			top_n = 0;
	FwCall		call;
	JsonbParseState *st = NULL;
	JsonbValue *res;
	JsonbValue	v;

	fw_require_preload();
	InitMaterializedSRF(fcinfo, 0);
	if (!PG_ARGISNULL(2))
	{
		top_n = PG_GETARG_INT32(2);
		if (top_n < 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("top_n must be at least 1"),
					 errhint("Pass NULL to rank every document.")));
	}
	workload = fw_workload_arg(fcinfo, 3);
	options = PG_ARGISNULL(4) ? NULL : PG_GETARG_JSONB_P(4);
	on_error = fw_call_on_error(options);
	(void) fw_typed_options(options, FW_KIND_RERANK);
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		return (Datum) 0;
	arr = PG_GETARG_ARRAYTYPE_P(1);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("documents must be a one-dimensional array")));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);

	pos = palloc(sizeof(int) * Max(n, 1));
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	fw_push_key(&st, "query");
	fw_embed_push_text(&st, WJB_VALUE, PG_GETARG_TEXT_PP(0));
	fw_push_key(&st, "documents");
	pushJsonbValue(&st, WJB_BEGIN_ARRAY, NULL);
	for (int i = 0; i < n; i++)
		if (!nulls[i])
		{
			pos[nsent++] = i;
			fw_embed_push_text(&st, WJB_ELEM, DatumGetTextPP(elems[i]));
		}
	pushJsonbValue(&st, WJB_END_ARRAY, NULL);
	if (nsent == 0)
		return (Datum) 0;		/* nothing to rank */
	if (top_n > 0)
	{
		fw_push_key(&st, "top_n");
		v.type = jbvNumeric;
		v.val.numeric = DatumGetNumeric(DirectFunctionCall1(int4_numeric,
															Int32GetDatum(Min(top_n, nsent))));
		pushJsonbValue(&st, WJB_VALUE, &v);
	}
	fw_push_key(&st, "return_documents");
	v.type = jbvBool;
	v.val.boolean = false;
	pushJsonbValue(&st, WJB_VALUE, &v);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);

	fw_call_init_kind(&call, FW_KIND_RERANK, workload, JsonbValueToJsonb(res), options);
	call.expect_n = nsent;
	call.top_n = top_n;
	if (fw_log_content)
		call.prompt_text = JsonbToCString(NULL, &call.fields->root, VARSIZE(call.fields));
	fw_engine_run(&call, 1, 1, true);

	if (!call.ok)
	{
		if (on_error == FW_ONERROR_NULL)
			return (Datum) 0;
		fw_call_raise(&call);
	}
	for (int i = 0; i < call.typed->n; i++)
	{
		Datum		values[2];
		bool		isnull[2] = {false, false};

		values[0] = Int32GetDatum(pos[call.typed->index[i]] + 1);
		values[1] = Float8GetDatum(call.typed->score[i]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, isnull);
	}
	return (Datum) 0;
}
