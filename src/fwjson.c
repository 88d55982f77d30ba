/*-------------------------------------------------------------------------
 *
 * fwjson.c
 *		Request building and response parsing with PostgreSQL's jsonb.
 *
 * Bodies are built with pushJsonbValue and printed with JsonbToCString;
 * responses are checked with the non-throwing JSON parser first, so a
 * provider that answers with HTML or half a body is classified as
 * bad_response instead of raising a parse error, and only then turned
 * into jsonb.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "common/cryptohash.h"
#include "common/jsonapi.h"
#include "common/sha2.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "fwjson.h"

/*
 * Option keys fw_tier consumes itself.  Everything else in options is
 * passed through to the provider.
 */
static const char *const fw_own_keys[] = {
	"path", "on_error", "model", "fast_model", "session_affinity", NULL
};

/* Keys that do not change the answer: left out of fixture fingerprints. */
static const char *const fw_unfingerprinted_keys[] = {
	"path", "on_error", "session_affinity", "user", "service_tier", NULL
};

static bool
fw_key_in(const JsonbValue *k, const char *const *list)
{
	for (int i = 0; list[i]; i++)
		if (k->val.string.len == (int) strlen(list[i]) &&
			memcmp(k->val.string.val, list[i], k->val.string.len) == 0)
			return true;
	return false;
}

void
fw_push_key(JsonbParseState **st, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	pushJsonbValue(st, WJB_KEY, &k);
}

static void
fw_push_string(JsonbParseState **st, const char *key, const char *val)
{
	JsonbValue	v;

	fw_push_key(st, key);
	v.type = jbvString;
	v.val.string.val = (char *) val;
	v.val.string.len = strlen(val);
	pushJsonbValue(st, WJB_VALUE, &v);
}

static void
fw_push_container(JsonbParseState **st, const char *key, Jsonb *jb)
{
	JsonbValue	v;

	fw_push_key(st, key);
	v.type = jbvBinary;
	v.val.binary.data = &jb->root;
	v.val.binary.len = VARSIZE(jb) - VARHDRSZ;
	pushJsonbValue(st, WJB_VALUE, &v);
}

/* [{"role": "user", "content": prompt}] */
Jsonb *
fw_messages_from_prompt(const char *prompt)
{
	JsonbParseState *st = NULL;
	JsonbValue *res;

	pushJsonbValue(&st, WJB_BEGIN_ARRAY, NULL);
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	fw_push_string(&st, "role", "user");
	fw_push_string(&st, "content", prompt);
	pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	res = pushJsonbValue(&st, WJB_END_ARRAY, NULL);
	return JsonbValueToJsonb(res);
}

void
fw_check_messages(Jsonb *messages)
{
	if (!JB_ROOT_IS_ARRAY(messages) || JB_ROOT_IS_SCALAR(messages) ||
		JB_ROOT_COUNT(messages) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("messages must be a non-empty JSON array"),
				 errhint("Pass messages like '[{\"role\": \"user\", \"content\": \"Hello\"}]'.")));
}

static void
fw_check_options(Jsonb *options)
{
	if (options && (!JB_ROOT_IS_OBJECT(options) || JB_ROOT_IS_SCALAR(options)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("options must be a JSON object")));
}

/* options->>key as a palloc'd string, NULL when absent or JSON null. */
char *
fw_option_text(Jsonb *options, const char *key)
{
	JsonbValue	v;

	if (options == NULL || !JB_ROOT_IS_OBJECT(options))
		return NULL;
	if (!getKeyJsonValueFromContainer(&options->root, key, strlen(key), &v))
		return NULL;
	if (v.type == jbvString)
		return pnstrdup(v.val.string.val, v.val.string.len);
	if (v.type == jbvNull)
		return NULL;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("option \"%s\" must be a string", key)));
	return NULL;				/* keep compiler quiet */
}

/*
 * Push options' top-level pairs, skipping the keys in skip.  Nested values
 * arrive as jbvBinary and pushJsonbValue copies them whole.
 */
static void
fw_push_options(JsonbParseState **st, Jsonb *options, const char *const *skip,
				bool check)
{
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;

	if (options == NULL)
		return;
	it = JsonbIteratorInit(&options->root);
	tok = JsonbIteratorNext(&it, &k, true);
	Assert(tok == WJB_BEGIN_OBJECT);
	while ((tok = JsonbIteratorNext(&it, &k, true)) == WJB_KEY)
	{
		tok = JsonbIteratorNext(&it, &v, true);
		Assert(tok == WJB_VALUE);
		if (check)
		{
			if (k.val.string.len == 12 &&
				memcmp(k.val.string.val, "service_tier", 12) == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("options may not set service_tier"),
						 errdetail("fw_tier chooses the serving tier from the workload and its escalation state."),
						 errhint("Use \"path\": \"priority\" to force the Priority path.")));
			if (k.val.string.len == 6 &&
				memcmp(k.val.string.val, "stream", 6) == 0 &&
				!(v.type == jbvBool && !v.val.boolean) && v.type != jbvNull)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("streaming responses are not supported")));
		}
		if (fw_key_in(&k, skip))
			continue;
		pushJsonbValue(st, WJB_KEY, &k);
		pushJsonbValue(st, WJB_VALUE, &v);
	}
}

/* No keys skipped: a request's own fields (issue 12) are pushed whole. */
static const char *const fw_no_keys[] = {NULL};

/*
 * The request body: model, messages (chat) or the kind's own fields
 * (embeddings, rerank), pass-through options and, on the Priority path
 * only, "service_tier": "priority".  A Fast model id never carries
 * service_tier; the caller guarantees priority is false there.
 */
static char *
fw_build_body(const char *model, Jsonb *messages, Jsonb *fields,
			  Jsonb *options, bool priority, size_t *len)
{
	JsonbParseState *st = NULL;
	JsonbValue *res;
	Jsonb	   *jb;
	StringInfoData buf;

	fw_check_options(options);
	initStringInfo(&buf);
	if (messages && (options == NULL || JB_ROOT_COUNT(options) == 0))
	{
		/*
		 * No options: the text the jsonb below would print, written
		 * directly (issue 15: the object's round trip through jsonb was a
		 * few percent of a call).  jsonb orders keys by length, so model,
		 * messages, service_tier is its order too.
		 */
		appendStringInfoString(&buf, "{\"model\": ");
		escape_json(&buf, model);
		appendStringInfoString(&buf, ", \"messages\": ");
		(void) JsonbToCString(&buf, &messages->root, VARSIZE(messages));
		if (priority)
			appendStringInfoString(&buf, ", \"service_tier\": \"priority\"");
		appendStringInfoChar(&buf, '}');
	}
	else
	{
		pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
		fw_push_string(&st, "model", model);
		if (messages)
			fw_push_container(&st, "messages", messages);
		else
			fw_push_options(&st, fields, fw_no_keys, false);
		fw_push_options(&st, options, fw_own_keys, true);
		if (priority)
			fw_push_string(&st, "service_tier", "priority");
		res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
		jb = JsonbValueToJsonb(res);
		JsonbToCString(&buf, &jb->root, VARSIZE(jb));
		pfree(jb);
	}

	/*
	 * JSON on the wire is UTF-8 (RFC 8259): text of another database
	 * encoding is converted, or a LATIN1 "é" would reach the provider as a
	 * byte that is no UTF-8 (found with issue 12's LATIN1 test).
	 */
	if (GetDatabaseEncoding() != PG_UTF8 && GetDatabaseEncoding() != PG_SQL_ASCII)
	{
		char	   *utf8 = pg_server_to_any(buf.data, buf.len, PG_UTF8);

		if (utf8 != buf.data)
		{
			pfree(buf.data);
			*len = strlen(utf8);
			return utf8;
		}
	}
	*len = buf.len;
	return buf.data;
}

char *
fw_build_request(const char *model, Jsonb *messages, Jsonb *options,
				 bool priority, size_t *len)
{
	return fw_build_body(model, messages, NULL, options, priority, len);
}

char *
fw_build_fields_request(const char *model, Jsonb *fields, Jsonb *options,
						bool priority, size_t *len)
{
	return fw_build_body(model, NULL, fields, options, priority, len);
}

/*
 * fw_complete_json's request options (issue 12): the caller's, without
 * schema_name, plus "response_format": {"type": "json_schema",
 * "json_schema": {"name": ..., "schema": ...}}, the shape Fireworks takes
 * (FIREWORKS.md, structured output).  Being options, the schema is part of
 * the fixture fingerprint like any generation option.  The caller's own
 * response_format is refused: the schema argument is the one sent.
 */
Jsonb *
fw_json_options(Jsonb *options, Jsonb *schema)
{
	static const char *const skip[] = {"schema_name", NULL};
	JsonbParseState *st = NULL;
	JsonbValue *res;
	JsonbValue	v;
	char	   *name;

	fw_check_options(options);
	if (options &&
		getKeyJsonValueFromContainer(&options->root, "response_format", 15, &v))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("options may not set response_format here"),
				 errdetail("fw_complete_json sends the schema argument as response_format."),
				 errhint("Use fw_chat to send a response_format of your own.")));
	name = fw_option_text(options, "schema_name");
	if (name == NULL)
		name = "answer";
	/* OpenAI's rule for the name, which Fireworks follows */
	if (name[0] == '\0' || strlen(name) > 64 ||
		strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") != strlen(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("schema_name must be 1 to 64 letters, digits, underscores or hyphens")));

	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	fw_push_options(&st, options, skip, false);
	fw_push_key(&st, "response_format");
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	fw_push_string(&st, "type", "json_schema");
	fw_push_key(&st, "json_schema");
	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	fw_push_string(&st, "name", name);
	fw_push_container(&st, "schema", schema);
	pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(res);
}

/*
 * Deeper bodies than this are refused before parsing: PostgreSQL's JSON
 * parser recurses per level and would raise "stack depth limit exceeded"
 * (no completion nests more than a handful of levels).
 */
#define FW_MAX_JSON_DEPTH	256

/* One pass over the bytes: is the nesting of [ and { within bounds? */
bool
fw_json_depth_ok(const char *s, size_t len)
{
	int			depth = 0;
	bool		in_str = false;
	size_t		opens = 0;

	/*
	 * Fewer brackets than the limit in all cannot nest deeper than it:
	 * memchr finds the few of an answer of a normal size at once.
	 */
	for (const char *open = "[{"; *open && opens <= FW_MAX_JSON_DEPTH; open++)
		for (const char *p = s, *end = s + len;
			 opens <= FW_MAX_JSON_DEPTH && (p = memchr(p, *open, end - p)) != NULL;
			 p++)
			opens++;
	if (opens <= FW_MAX_JSON_DEPTH)
		return true;

	for (size_t i = 0; i < len; i++)
	{
		char		c = s[i];

		if (in_str)
		{
			if (c == '\\')
				i++;
			else if (c == '"')
				in_str = false;
		}
		else if (c == '"')
			in_str = true;
		else if (c == '[' || c == '{')
		{
			if (++depth > FW_MAX_JSON_DEPTH)
				return false;
		}
		else if (c == ']' || c == '}')
			depth--;
	}
	return true;
}

/*
 * Parse JSON without ever raising on bad input: false, with *problem
 * saying why, when it is not usable JSON.  from_utf8: the bytes come off
 * the wire (UTF-8 by the protocol); otherwise they are text already in
 * the database encoding (a typed answer taken out of a parsed response).
 * With sem, its actions see the document and nothing is built; without,
 * *jb is its jsonb.
 *
 * The cheap checks come first (encoding, nesting depth, the non-throwing
 * parser); what can still raise (conversion to a non-UTF-8 database
 * encoding, a number numeric cannot hold) runs under PG_TRY, and the
 * error becomes the problem text.  Those errors are raised by plain
 * conversion and input code that holds no resources, so flushing them is
 * safe.
 */
static bool
fw_parse_json_sem(const char *body, size_t len, bool from_utf8,
				  JsonSemAction *sem, Jsonb **jb, const char **problem)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile JsonParseErrorType err = JSON_SUCCESS;

	/* constants on the hot path: every response is parsed here */
	*problem = from_utf8 ? "response body is not valid JSON" : "answer is not valid JSON";
	/* pg_verify_mbstr also refuses NUL bytes */
	if (len == 0 || len > INT_MAX ||
		!pg_verify_mbstr(from_utf8 ? PG_UTF8 : GetDatabaseEncoding(), body, (int) len, true))
		return false;
	if (!fw_json_depth_ok(body, len))
	{
		*problem = from_utf8 ? "response body nests too deeply" : "answer nests too deeply";
		return false;
	}

	PG_TRY();
	{
		/*
		 * Already verified: text in the database encoding is taken as it
		 * is (the caller NUL-terminates body at len).
		 */
		char	   *text = (!from_utf8 || GetDatabaseEncoding() == PG_UTF8) ?
			(char *) body : pg_any_to_server(body, (int) len, PG_UTF8);
		JsonLexContext *lex = makeJsonLexContextCstringLen(text, strlen(text),
														   GetDatabaseEncoding(),
														   sem != NULL);

		err = pg_parse_json(lex, sem ? sem : &nullSemAction);
		if (err == JSON_SUCCESS && sem == NULL)
			*jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
													 CStringGetDatum(text)));
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		/* never swallow a stop (none of this code checks, but be sure) */
		if (geterrcode() == ERRCODE_QUERY_CANCELED)
			PG_RE_THROW();
		edata = CopyErrorData();
		FlushErrorState();
		*problem = psprintf("%s could not be read: %s",
							from_utf8 ? "response body" : "answer", edata->message);
		FreeErrorData(edata);
		return false;
	}
	PG_END_TRY();
	return err == JSON_SUCCESS;
}

/* As jsonb: NULL, with *problem (if not NULL) set, when not usable JSON. */
static Jsonb *
fw_parse_json_enc(const char *body, size_t len, bool from_utf8,
				  const char **problem)
{
	Jsonb	   *jb = NULL;
	const char *dummy;

	if (!fw_parse_json_sem(body, len, from_utf8, NULL, &jb,
						   problem ? problem : &dummy))
		return NULL;
	return jb;
}

/* A provider body (UTF-8 bytes) as jsonb; see fw_parse_json_enc. */
Jsonb *
fw_parse_json(const char *body, size_t len, const char **problem)
{
	return fw_parse_json_enc(body, len, true, problem);
}

/* An answer's text (database encoding) as jsonb; see fw_parse_json_enc. */
Jsonb *
fw_parse_json_text(const char *text, size_t len, const char **problem)
{
	return fw_parse_json_enc(text, len, false, problem);
}

/*
 * An integer field as a token count: -1 unless a number in 0..INT_MAX
 * (a count beyond int4, negative or NaN is unknown, not an error).
 */
static int
fw_int_field(JsonbContainer *c, const char *key)
{
	JsonbValue	v;
	bool		bad = false;
	int32		n;

	if (c == NULL || !getKeyJsonValueFromContainer(c, key, strlen(key), &v) ||
		v.type != jbvNumeric)
		return -1;
	n = numeric_int4_opt_error(v.val.numeric, &bad);
	return (bad || n < 0) ? -1 : n;
}

static JsonbContainer *
fw_object_field(JsonbContainer *c, const char *key)
{
	JsonbValue	v;

	if (c && getKeyJsonValueFromContainer(c, key, strlen(key), &v) &&
		v.type == jbvBinary && JsonContainerIsObject(v.val.binary.data))
		return v.val.binary.data;
	return NULL;
}

/*
 * fw_complete's answer in one pass (issue 15).  Building the jsonb of the
 * whole body (a validating pass, then jsonb_in's own parse, key sorting
 * and a numeric per number) was an eighth of a call's CPU; when only the
 * text and the usage are wanted, the same non-throwing parser with
 * semantic actions picks them up as it validates.  What it yields is what
 * the jsonb path yields: a key given twice counts by its last value (each
 * key's fields are reset when it starts), and a token count is -1 unless
 * a number in 0..INT_MAX (rounded, as numeric_int4 does).
 */
typedef enum FwCpRole
{
	FW_CP_OTHER = 0,
	FW_CP_ROOT,					/* the body's object */
	FW_CP_USAGE,				/* root.usage */
	FW_CP_DETAILS,				/* root.usage.prompt_tokens_details */
	FW_CP_CHOICES,				/* root.choices */
	FW_CP_CHOICE0,				/* root.choices[0] */
	FW_CP_MESSAGE				/* root.choices[0].message */
} FwCpRole;

#define FW_CP_DEPTH 4			/* roles are only kept this deep */

typedef struct FwCompletionParse
{
	int			depth;
	FwCpRole	role[FW_CP_DEPTH + 1];
	char	   *field;			/* the innermost object's current key */
	bool		not_object;		/* the body is no JSON object */
	int			nchoices;		/* elements of the last root.choices */
	bool		choices_array;	/* the last root.choices is an array */
	FwParsed   *out;
} FwCompletionParse;

static FwCpRole
fw_cp_role(FwCompletionParse *st)
{
	return (st->depth >= 0 && st->depth <= FW_CP_DEPTH) ? st->role[st->depth] : FW_CP_OTHER;
}

static bool
fw_cp_field_is(FwCompletionParse *st, const char *name)
{
	return st->field != NULL && strcmp(st->field, name) == 0;
}

static void
fw_cp_push(FwCompletionParse *st, FwCpRole role)
{
	st->depth++;
	if (st->depth <= FW_CP_DEPTH)
		st->role[st->depth] = role;
}

static void
fw_cp_pop(void *state)
{
	((FwCompletionParse *) state)->depth--;
}

/* The role of a container that starts now, from its parent and key. */
static FwCpRole
fw_cp_child(FwCompletionParse *st, bool is_object)
{
	switch (fw_cp_role(st))
	{
		case FW_CP_ROOT:
			if (is_object && fw_cp_field_is(st, "usage"))
				return FW_CP_USAGE;
			if (!is_object && fw_cp_field_is(st, "choices"))
			{
				st->choices_array = true;
				return FW_CP_CHOICES;
			}
			break;
		case FW_CP_USAGE:
			if (is_object && fw_cp_field_is(st, "prompt_tokens_details"))
				return FW_CP_DETAILS;
			break;
		case FW_CP_CHOICES:
			/* array_element_start counted it: the first is number 1 */
			if (is_object && st->nchoices == 1)
				return FW_CP_CHOICE0;
			break;
		case FW_CP_CHOICE0:
			if (is_object && fw_cp_field_is(st, "message"))
				return FW_CP_MESSAGE;
			break;
		default:
			break;
	}
	return FW_CP_OTHER;
}

static void
fw_cp_object_start(void *state)
{
	FwCompletionParse *st = state;

	fw_cp_push(st, st->depth == 0 ? FW_CP_ROOT : fw_cp_child(st, true));
}

static void
fw_cp_array_start(void *state)
{
	FwCompletionParse *st = state;

	if (st->depth == 0)
		st->not_object = true;
	fw_cp_push(st, fw_cp_child(st, false));
}

static void
fw_cp_element_start(void *state, bool isnull)
{
	FwCompletionParse *st = state;

	if (fw_cp_role(st) == FW_CP_CHOICES)
		st->nchoices++;
}

/* A key starts: what it named before is replaced (jsonb keeps the last). */
static void
fw_cp_field_start(void *state, char *fname, bool isnull)
{
	FwCompletionParse *st = state;
	FwParsed   *out = st->out;

	st->field = fname;
	switch (fw_cp_role(st))
	{
		case FW_CP_ROOT:
			if (fw_cp_field_is(st, "usage"))
				out->prompt_tokens = out->completion_tokens = out->cached_tokens = -1;
			else if (fw_cp_field_is(st, "choices"))
			{
				st->nchoices = 0;
				st->choices_array = false;
				out->content = NULL;
				out->cut_off = false;
			}
			break;
		case FW_CP_USAGE:
			if (fw_cp_field_is(st, "prompt_tokens"))
				out->prompt_tokens = -1;
			else if (fw_cp_field_is(st, "completion_tokens"))
				out->completion_tokens = -1;
			else if (fw_cp_field_is(st, "prompt_tokens_details"))
				out->cached_tokens = -1;
			break;
		case FW_CP_DETAILS:
			if (fw_cp_field_is(st, "cached_tokens"))
				out->cached_tokens = -1;
			break;
		case FW_CP_CHOICE0:
			if (fw_cp_field_is(st, "message"))
				out->content = NULL;
			else if (fw_cp_field_is(st, "finish_reason"))
				out->cut_off = false;
			break;
		case FW_CP_MESSAGE:
			if (fw_cp_field_is(st, "content"))
				out->content = NULL;
			break;
		default:
			break;
	}
}

/* A number token as a token count: fw_int_field's rule, without numeric. */
static int
fw_cp_count(const char *tok)
{
	size_t		len = strlen(tok);
	double		d;

	if (len > 0 && len <= 9 && strspn(tok, "0123456789") == len)
		return atoi(tok);
	d = strtod(tok, NULL);
	/* numeric_int4 rounds half away from zero; -0.4 is 0 */
	if (!(d > -0.5) || d >= (double) PG_INT32_MAX + 0.5)
		return -1;
	return (int) floor(d + 0.5);
}

static void
fw_cp_scalar(void *state, char *token, JsonTokenType type)
{
	FwCompletionParse *st = state;
	FwParsed   *out = st->out;

	if (st->depth == 0)
	{
		st->not_object = true;
		return;
	}
	switch (fw_cp_role(st))
	{
		case FW_CP_USAGE:
			if (type != JSON_TOKEN_NUMBER)
				break;
			if (fw_cp_field_is(st, "prompt_tokens"))
				out->prompt_tokens = fw_cp_count(token);
			else if (fw_cp_field_is(st, "completion_tokens"))
				out->completion_tokens = fw_cp_count(token);
			break;
		case FW_CP_DETAILS:
			if (type == JSON_TOKEN_NUMBER && fw_cp_field_is(st, "cached_tokens"))
				out->cached_tokens = fw_cp_count(token);
			break;
		case FW_CP_CHOICE0:
			if (type == JSON_TOKEN_STRING && fw_cp_field_is(st, "finish_reason"))
				out->cut_off = strcmp(token, "length") == 0;
			break;
		case FW_CP_MESSAGE:
			if (type == JSON_TOKEN_STRING && fw_cp_field_is(st, "content"))
				out->content = token;	/* the parser's own copy */
			break;
		default:
			break;
	}
}

/*
 * fw_parse_completion for need_text, in one pass (see FwCompletionParse).
 * Never raises for anything in the body (fw_parse_json_sem).
 */
static bool
fw_parse_completion_text(const char *body, size_t len, FwParsed *out)
{
	FwCompletionParse st;
	JsonSemAction sem;

	memset(&st, 0, sizeof(st));
	st.out = out;
	memset(&sem, 0, sizeof(sem));
	sem.semstate = &st;
	sem.object_start = fw_cp_object_start;
	sem.object_end = fw_cp_pop;
	sem.array_start = fw_cp_array_start;
	sem.array_end = fw_cp_pop;
	sem.array_element_start = fw_cp_element_start;
	sem.object_field_start = fw_cp_field_start;
	sem.scalar = fw_cp_scalar;

	if (!fw_parse_json_sem(body, len, true, &sem, NULL, &out->problem))
	{
		out->content = NULL;
		out->cut_off = false;
		return false;
	}
	out->problem = NULL;
	if (st.not_object)
		out->problem = "response body is not a JSON object";
	else if (!st.choices_array || st.nchoices == 0)
		out->problem = "response has no choices";
	else if (out->content == NULL)
		out->problem = "choices[0].message.content is not a string";
	if (out->problem)
	{
		out->content = NULL;
		out->cut_off = false;
		return false;
	}
	return true;
}

/*
 * Is this 200 body a usable chat completion?  Fills out; returns false
 * with out->problem set when not.  need_text: fw_complete wants
 * choices[0].message.content as a string, and not the whole response
 * (out->response stays NULL; see fw_parse_completion_text).
 */
bool
fw_parse_completion(const char *body, size_t len, bool need_text, FwParsed *out)
{
	JsonbValue	v;
	JsonbContainer *root;
	JsonbContainer *usage;

	memset(out, 0, sizeof(*out));
	out->prompt_tokens = out->cached_tokens = out->completion_tokens = -1;

	if (need_text)
		return fw_parse_completion_text(body, len, out);

	out->response = fw_parse_json(body, len, &out->problem);
	if (out->response == NULL)
		return false;
	if (!JB_ROOT_IS_OBJECT(out->response))
	{
		out->problem = "response body is not a JSON object";
		return false;
	}
	root = &out->response->root;

	usage = fw_object_field(root, "usage");
	if (usage)
	{
		JsonbContainer *details = fw_object_field(usage, "prompt_tokens_details");

		out->prompt_tokens = fw_int_field(usage, "prompt_tokens");
		out->completion_tokens = fw_int_field(usage, "completion_tokens");
		out->cached_tokens = fw_int_field(details, "cached_tokens");
	}

	if (!getKeyJsonValueFromContainer(root, "choices", 7, &v) ||
		v.type != jbvBinary || !JsonContainerIsArray(v.val.binary.data) ||
		JsonContainerSize(v.val.binary.data) == 0)
	{
		out->problem = "response has no choices";
		return false;
	}
	return true;
}

/*
 * A short, printable excerpt of an error body for errdetail and the call
 * log: error.message when the body is JSON, else the start of the text.
 */
char *
fw_error_excerpt(const char *body, size_t len)
{
	Jsonb	   *jb = fw_parse_json(body, len, NULL);
	StringInfoData buf;

	if (jb && JB_ROOT_IS_OBJECT(jb))
	{
		JsonbContainer *err = fw_object_field(&jb->root, "error");
		JsonbValue	v;

		if ((err && getKeyJsonValueFromContainer(err, "message", 7, &v) &&
			 v.type == jbvString) ||
			(getKeyJsonValueFromContainer(&jb->root, "message", 7, &v) &&
			 v.type == jbvString) ||
			(getKeyJsonValueFromContainer(&jb->root, "error", 5, &v) &&
			 v.type == jbvString))
			/* jsonb text is in the database encoding: cut between characters */
			return pnstrdup(v.val.string.val,
							pg_mbcliplen(v.val.string.val, v.val.string.len,
										 FW_ERRLEN - 1));
	}

	initStringInfo(&buf);
	for (size_t i = 0; i < len && buf.len < 200; i++)
	{
		unsigned char c = (unsigned char) body[i];

		if (c == '\n' || c == '\r' || c == '\t')
			c = ' ';
		if (c >= 0x20 && c < 0x7f)
			appendStringInfoChar(&buf, (char) c);
	}
	return buf.data;
}

/*
 * Fixture key: SHA-256 of the canonical jsonb text of what decides the
 * answer (model, messages or the kind's fields, generation options) but
 * not the key, the tier or routing hints.  Embeddings and rerank bodies
 * have no "messages", so their keys never meet a chat's.
 */
static char *
fw_fingerprint_body(const char *model, Jsonb *messages, Jsonb *fields,
					Jsonb *options)
{
	JsonbParseState *st = NULL;
	JsonbValue *res;
	Jsonb	   *jb;
	char	   *text;
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	char	   *hex;
	pg_cryptohash_ctx *ctx;

	pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	fw_push_string(&st, "model", model);
	if (messages)
		fw_push_container(&st, "messages", messages);
	else
		fw_push_options(&st, fields, fw_no_keys, false);
	fw_push_options(&st, options, fw_unfingerprinted_keys, false);
	res = pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	jb = JsonbValueToJsonb(res);
	text = JsonbToCString(NULL, &jb->root, VARSIZE(jb));

	ctx = pg_cryptohash_create(PG_SHA256);
	if (pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (uint8 *) text, strlen(text)) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
	{
		pg_cryptohash_free(ctx);
		elog(ERROR, "could not compute SHA-256 fingerprint");
	}
	pg_cryptohash_free(ctx);

	hex = palloc(PG_SHA256_DIGEST_LENGTH * 2 + 1);
	hex_encode((char *) digest, PG_SHA256_DIGEST_LENGTH, hex);
	hex[PG_SHA256_DIGEST_LENGTH * 2] = '\0';
	return hex;
}

char *
fw_fingerprint(const char *model, Jsonb *messages, Jsonb *options)
{
	return fw_fingerprint_body(model, messages, NULL, options);
}

char *
fw_fingerprint_fields(const char *model, Jsonb *fields, Jsonb *options)
{
	return fw_fingerprint_body(model, NULL, fields, options);
}
