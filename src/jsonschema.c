/*-------------------------------------------------------------------------
 *
 * jsonschema.c
 *		Typed answers (issue 12): the JSON schema a caller gives
 *		fw_complete_json, checked before any request is sent, and each
 *		answer checked against it, both over jsonb.
 *
 * Both inputs cross a trust boundary: the schema comes from the caller,
 * the answer from the network.  A schema is at most FW_SCHEMA_MAX_BYTES
 * of jsonb and FW_SCHEMA_MAX_DEPTH nested schemas.  Validation descends
 * into the answer only where the schema does, so the answer's nesting
 * never drives the recursion deeper than the schema's (and its parse is
 * bounded by fwjson.c); check_stack_depth() guards both recursions anyway.
 * Paths in messages are clipped (keys to FW_PATH_KEY_BYTES) and escaped.
 *
 * Keywords checked: type (a name or an array of names; "integer" is a
 * number without a fractional part, 1.0 included), enum, required,
 * properties, additionalProperties (true, false or a schema) and items
 * (one schema).  true and false are schemas too, below the root.
 * Annotations (title, description, default, examples, $schema, $id,
 * $comment, deprecated, readOnly, writeOnly) are ignored.  Any other
 * keyword is refused (22023) before anything is sent: a schema fw_tier
 * accepts is a schema it enforces, never one it half-checks.
 *
 * Per backend, no shared state, no locking.  Callers: sqlfuncs.c (the
 * schema argument) and engine.c (the classification of a 200 answer).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "jsonschema.h"

/* A key is shown with at most this many bytes in a path. */
#define FW_PATH_KEY_BYTES	64
/* An unparsable answer is quoted with at most this many bytes. */
#define FW_EXCERPT_BYTES	40

static const char *const fw_schema_annotations[] = {
	"title", "description", "default", "examples", "$schema", "$id",
	"$comment", "deprecated", "readOnly", "writeOnly", NULL
};

static const char *const fw_type_names[] = {
	"object", "array", "string", "number", "integer", "boolean", "null", NULL
};

static bool
fw_str_is(const char *s, int len, const char *word)
{
	return len == (int) strlen(word) && memcmp(s, word, len) == 0;
}

static bool
fw_str_in(const char *s, int len, const char *const *list)
{
	for (int i = 0; list[i]; i++)
		if (fw_str_is(s, len, list[i]))
			return true;
	return false;
}

/* Append ".key" (or ."key" when it is no identifier) to a JSON path. */
static void
fw_path_key(StringInfo path, const char *key, int len)
{
	int			n = pg_mbcliplen(key, len, FW_PATH_KEY_BYTES);
	bool		ident = n > 0 && !(key[0] >= '0' && key[0] <= '9');
	char	   *s;

	/* ASCII only, whatever the locale: other bytes go in quotes */
	for (int i = 0; i < n && ident; i++)
		ident = (key[i] >= 'a' && key[i] <= 'z') || (key[i] >= 'A' && key[i] <= 'Z') ||
			(key[i] >= '0' && key[i] <= '9') || key[i] == '_';
	if (ident)
	{
		appendStringInfo(path, ".%.*s", n, key);
		return;
	}
	s = pnstrdup(key, n);
	appendStringInfoChar(path, '.');
	escape_json(path, s);
	pfree(s);
}

/* ---------------------------------------------------------------------
 * The schema, before anything is sent
 * ---------------------------------------------------------------------
 */

static void
fw_schema_invalid(StringInfo path, const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid JSON schema"),
			 errdetail("At %s: %s.", path->data, what)));
}

static bool
fw_is_container(const JsonbValue *v, bool object)
{
	return v->type == jbvBinary &&
		(object ? JsonContainerIsObject(v->val.binary.data) :
		 JsonContainerIsArray(v->val.binary.data));
}

/* "type": a type name, or a non-empty array of them. */
static void
fw_schema_check_type(JsonbValue *v, StringInfo path)
{
	JsonbIterator *it;
	JsonbValue	e;
	JsonbIteratorToken tok;
	int			n = 0;

	if (v->type == jbvString)
	{
		if (!fw_str_in(v->val.string.val, v->val.string.len, fw_type_names))
			fw_schema_invalid(path, "\"type\" must be one of object, array, string, number, integer, boolean, null");
		return;
	}
	if (!fw_is_container(v, false))
		fw_schema_invalid(path, "\"type\" must be a type name or an array of type names");
	it = JsonbIteratorInit(v->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
	{
		if (tok != WJB_ELEM)
			continue;
		if (e.type != jbvString ||
			!fw_str_in(e.val.string.val, e.val.string.len, fw_type_names))
			fw_schema_invalid(path, "\"type\" must be a type name or an array of type names");
		n++;
	}
	if (n == 0)
		fw_schema_invalid(path, "\"type\" must not be an empty array");
}

static void fw_schema_check_node(JsonbValue *node, StringInfo path, int depth);

/* Check the subschema v, found at path + suffix (+ key). */
static void
fw_schema_check_sub(JsonbValue *v, StringInfo path, const char *suffix,
					const char *key, int keylen, int depth)
{
	int			save = path->len;

	appendStringInfoString(path, suffix);
	if (key)
		fw_path_key(path, key, keylen);
	fw_schema_check_node(v, path, depth + 1);
	path->len = save;
	path->data[save] = '\0';
}

static void
fw_schema_check_node(JsonbValue *node, StringInfo path, int depth)
{
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;

	check_stack_depth();
	if (depth > FW_SCHEMA_MAX_DEPTH)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("JSON schema nests more than %d schemas deep", FW_SCHEMA_MAX_DEPTH),
				 errdetail("At %s.", path->data)));
	if (node->type == jbvBool && depth > 0)
		return;					/* true: anything; false: nothing */
	if (!fw_is_container(node, true))
		fw_schema_invalid(path, depth > 0 ? "a schema must be a JSON object, true or false" :
						  "the schema must be a JSON object");

	it = JsonbIteratorInit(node->val.binary.data);
	tok = JsonbIteratorNext(&it, &k, true);
	Assert(tok == WJB_BEGIN_OBJECT);
	while ((tok = JsonbIteratorNext(&it, &k, true)) == WJB_KEY)
	{
		const char *kw = k.val.string.val;
		int			len = k.val.string.len;

		tok = JsonbIteratorNext(&it, &v, true);
		Assert(tok == WJB_VALUE);

		if (fw_str_is(kw, len, "type"))
			fw_schema_check_type(&v, path);
		else if (fw_str_is(kw, len, "enum"))
		{
			if (!fw_is_container(&v, false) || JsonContainerSize(v.val.binary.data) == 0)
				fw_schema_invalid(path, "\"enum\" must be a non-empty array");
		}
		else if (fw_str_is(kw, len, "required"))
		{
			JsonbIterator *ai;
			JsonbValue	e;

			if (!fw_is_container(&v, false))
				fw_schema_invalid(path, "\"required\" must be an array of property names");
			ai = JsonbIteratorInit(v.val.binary.data);
			while ((tok = JsonbIteratorNext(&ai, &e, true)) != WJB_DONE)
				if (tok == WJB_ELEM && e.type != jbvString)
					fw_schema_invalid(path, "\"required\" must be an array of property names");
		}
		else if (fw_str_is(kw, len, "properties"))
		{
			JsonbIterator *pi;
			JsonbValue	pk;
			JsonbValue	pv;

			if (!fw_is_container(&v, true))
				fw_schema_invalid(path, "\"properties\" must be an object of schemas");
			pi = JsonbIteratorInit(v.val.binary.data);
			(void) JsonbIteratorNext(&pi, &pk, true);
			while ((tok = JsonbIteratorNext(&pi, &pk, true)) == WJB_KEY)
			{
				(void) JsonbIteratorNext(&pi, &pv, true);
				fw_schema_check_sub(&pv, path, ".properties",
									pk.val.string.val, pk.val.string.len, depth);
			}
		}
		else if (fw_str_is(kw, len, "additionalProperties") ||
				 fw_str_is(kw, len, "items"))
		{
			if (kw[0] == 'i' && fw_is_container(&v, false))
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("JSON schema \"items\" as an array (tuple form) is not supported"),
						 errdetail("At %s.", path->data),
						 errhint("Give \"items\" one schema for every element.")));
			fw_schema_check_sub(&v, path, kw[0] == 'i' ? ".items" : ".additionalProperties",
								NULL, 0, depth);
		}
		else if (!fw_str_in(kw, len, fw_schema_annotations))
		{
			int			n = pg_mbcliplen(kw, len, FW_PATH_KEY_BYTES);

			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unsupported JSON schema keyword \"%.*s\"", n, kw),
					 errdetail("At %s.", path->data),
					 errhint("fw_tier checks type, enum, required, properties, additionalProperties and items, and ignores annotations such as title and description; it refuses any other keyword rather than leave it unchecked.")));
		}
	}
}

/*
 * Raise (22023, 54000, 0A000) unless schema is one fw_tier can enforce.
 * Called before any request is sent.
 */
void
fw_schema_check(Jsonb *schema)
{
	StringInfoData path;
	JsonbValue	root;

	if (VARSIZE(schema) > FW_SCHEMA_MAX_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("JSON schema is too large"),
				 errdetail("It takes %zu bytes as jsonb; the limit is %d.",
						   (size_t) VARSIZE(schema), FW_SCHEMA_MAX_BYTES)));
	initStringInfo(&path);
	appendStringInfoChar(&path, '$');
	if (JB_ROOT_IS_SCALAR(schema))
		fw_schema_invalid(&path, "the schema must be a JSON object");
	root.type = jbvBinary;
	root.val.binary.data = &schema->root;
	root.val.binary.len = VARSIZE(schema) - VARHDRSZ;
	fw_schema_check_node(&root, &path, 0);
	pfree(path.data);
}

/* ---------------------------------------------------------------------
 * The answer, against a checked schema
 * ---------------------------------------------------------------------
 */

static bool
fw_numeric_integral(Numeric n)
{
	char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out,
														NumericGetDatum(n)));
	char	   *dot = strchr(s, '.');

	if (dot)
		for (char *p = dot + 1; *p; p++)
			if (*p != '0')
				return false;
	return true;
}

/* The JSON type of a value, as the schema names it ("integer" aside). */
static const char *
fw_value_type(const JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			return "null";
		case jbvString:
			return "string";
		case jbvNumeric:
			return "number";
		case jbvBool:
			return "boolean";
		case jbvBinary:
			return JsonContainerIsObject(v->val.binary.data) ? "object" : "array";
		default:
			return "object";	/* jbvObject/jbvArray: never from an iterator */
	}
}

static bool
fw_type_matches(const char *name, int len, const JsonbValue *v)
{
	if (fw_str_is(name, len, "integer"))
		return v->type == jbvNumeric && fw_numeric_integral(v->val.numeric);
	return fw_str_is(name, len, fw_value_type(v));
}

static bool
fw_json_equal(JsonbValue *a, JsonbValue *b)
{
	return DatumGetBool(DirectFunctionCall2(jsonb_eq,
											JsonbPGetDatum(JsonbValueToJsonb(a)),
											JsonbPGetDatum(JsonbValueToJsonb(b))));
}

/* The schema's "type" as JSON text, for a message. */
static char *
fw_type_text(JsonbValue *t)
{
	StringInfoData buf;

	if (t->type != jbvString)
		return JsonbToCString(NULL, t->val.binary.data, t->val.binary.len);
	initStringInfo(&buf);
	{
		char	   *s = pnstrdup(t->val.string.val, t->val.string.len);

		escape_json(&buf, s);
	}
	return buf.data;
}

static bool fw_validate(JsonbValue *schema, JsonbValue *value, StringInfo path,
						char **problem);

/* Validate value against the subschema sub, found at path + key/index. */
static bool
fw_validate_at(JsonbValue *sub, JsonbValue *value, StringInfo path,
			   const char *key, int keylen, int index, char **problem)
{
	int			save = path->len;
	bool		ok;

	if (key)
		fw_path_key(path, key, keylen);
	else
		appendStringInfo(path, "[%d]", index);
	ok = fw_validate(sub, value, path, problem);
	path->len = save;
	path->data[save] = '\0';
	return ok;
}

/* Say where and how the answer fails; returns false for the caller. */
static bool fw_mismatch(char **problem, StringInfo path, const char *fmt,...)
			pg_attribute_printf(3, 4);

static bool
fw_mismatch(char **problem, StringInfo path, const char *fmt,...)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfo(&buf, "answer does not match the schema at %s: ", path->data);
	for (;;)
	{
		va_list		args;
		int			needed;

		va_start(args, fmt);
		needed = appendStringInfoVA(&buf, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	*problem = buf.data;
	return false;
}

/* "an object", "a number", ...: what the answer has instead. */
static const char *
fw_type_phrase(const JsonbValue *v)
{
	const char *t = fw_value_type(v);

	if (strcmp(t, "null") == 0)
		return "null";
	if (t[0] == 'o' || t[0] == 'a')
		return psprintf("an %s", t);
	return psprintf("a %s", t);
}

static bool
fw_validate_object(JsonbContainer *schema, JsonbContainer *obj, StringInfo path,
				   char **problem)
{
	JsonbValue	kw;
	JsonbValue	props;
	bool		has_props;
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbIteratorToken tok;

	if (getKeyJsonValueFromContainer(schema, "required", 8, &kw))
	{
		it = JsonbIteratorInit(kw.val.binary.data);
		while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM ||
				getKeyJsonValueFromContainer(obj, k.val.string.val, k.val.string.len, &v))
				continue;
			{
				int			n = pg_mbcliplen(k.val.string.val, k.val.string.len,
											 FW_PATH_KEY_BYTES);

				return fw_mismatch(problem, path, "required property \"%.*s\" is missing",
								   n, k.val.string.val);
			}
		}
	}

	has_props = getKeyJsonValueFromContainer(schema, "properties", 10, &props);
	if (has_props)
	{
		JsonbValue	sub;

		it = JsonbIteratorInit(props.val.binary.data);
		(void) JsonbIteratorNext(&it, &k, true);
		while ((tok = JsonbIteratorNext(&it, &k, true)) == WJB_KEY)
		{
			(void) JsonbIteratorNext(&it, &sub, true);
			if (getKeyJsonValueFromContainer(obj, k.val.string.val, k.val.string.len, &v) &&
				!fw_validate_at(&sub, &v, path, k.val.string.val, k.val.string.len,
								0, problem))
				return false;
		}
	}

	if (getKeyJsonValueFromContainer(schema, "additionalProperties", 20, &kw) &&
		!(kw.type == jbvBool && kw.val.boolean))
	{
		it = JsonbIteratorInit(obj);
		(void) JsonbIteratorNext(&it, &k, true);
		while ((tok = JsonbIteratorNext(&it, &k, true)) == WJB_KEY)
		{
			JsonbValue	dummy;

			(void) JsonbIteratorNext(&it, &v, true);
			if (has_props &&
				getKeyJsonValueFromContainer(props.val.binary.data, k.val.string.val,
											 k.val.string.len, &dummy))
				continue;
			if (kw.type == jbvBool)
			{
				fw_path_key(path, k.val.string.val, k.val.string.len);
				return fw_mismatch(problem, path, "property not allowed by \"additionalProperties\": false");
			}
			if (!fw_validate_at(&kw, &v, path, k.val.string.val, k.val.string.len,
								0, problem))
				return false;
		}
	}
	return true;
}

static bool
fw_validate(JsonbValue *schema, JsonbValue *value, StringInfo path, char **problem)
{
	JsonbContainer *sc;
	JsonbValue	kw;

	check_stack_depth();
	if (schema->type == jbvBool)
	{
		if (schema->val.boolean)
			return true;
		return fw_mismatch(problem, path, "the schema is false: no value is allowed");
	}
	sc = schema->val.binary.data;

	if (getKeyJsonValueFromContainer(sc, "type", 4, &kw))
	{
		bool		ok = false;

		if (kw.type == jbvString)
			ok = fw_type_matches(kw.val.string.val, kw.val.string.len, value);
		else
		{
			JsonbIterator *it = JsonbIteratorInit(kw.val.binary.data);
			JsonbValue	e;
			JsonbIteratorToken tok;

			while (!ok && (tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
				if (tok == WJB_ELEM)
					ok = fw_type_matches(e.val.string.val, e.val.string.len, value);
		}
		if (!ok)
			return fw_mismatch(problem, path, "\"type\" is %s, the answer has %s",
							   fw_type_text(&kw), fw_type_phrase(value));
	}

	if (getKeyJsonValueFromContainer(sc, "enum", 4, &kw))
	{
		JsonbIterator *it = JsonbIteratorInit(kw.val.binary.data);
		JsonbValue	e;
		JsonbIteratorToken tok;
		bool		found = false;

		while (!found && (tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
			if (tok == WJB_ELEM)
				found = fw_json_equal(&e, value);
		if (!found)
			return fw_mismatch(problem, path, "the value is not one of the %d values of \"enum\"",
							   (int) JsonContainerSize(kw.val.binary.data));
	}

	if (value->type == jbvBinary && JsonContainerIsObject(value->val.binary.data))
		return fw_validate_object(sc, value->val.binary.data, path, problem);

	if (value->type == jbvBinary && getKeyJsonValueFromContainer(sc, "items", 5, &kw))
	{
		JsonbIterator *it = JsonbIteratorInit(value->val.binary.data);
		JsonbValue	e;
		JsonbIteratorToken tok;
		int			i = 0;

		while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM)
				continue;
			if (!fw_validate_at(&kw, &e, path, NULL, 0, i, problem))
				return false;
			i++;
		}
	}
	return true;
}

/* A short quote of an answer's start, for a message. */
static char *
fw_answer_excerpt(const char *content)
{
	int			len = strlen(content);
	int			n = pg_mbcliplen(content, len, FW_EXCERPT_BYTES);
	StringInfoData buf;
	char	   *s = pnstrdup(content, n);

	initStringInfo(&buf);
	escape_json(&buf, s);
	if (n < len)
		appendStringInfoString(&buf, "...");
	pfree(s);
	return buf.data;
}

/*
 * Is a usable 200 completion's answer a value of the (checked) schema?
 * FW_OUTPUT_OK with parsed->output set, or how it failed, with
 * parsed->problem saying exactly what: the JSON path and the rule.
 */
FwOutputCheck
fw_answer_check(Jsonb *schema, FwParsed *parsed)
{
	const char *problem;
	char	   *mismatch = NULL;
	Jsonb	   *answer;
	JsonbValue	sv;
	JsonbValue	av;
	StringInfoData path;

	if (parsed->cut_off)
	{
		parsed->problem = parsed->completion_tokens >= 0 ?
			psprintf("answer was cut off (finish_reason \"length\") after %d completion token%s",
					 parsed->completion_tokens, parsed->completion_tokens == 1 ? "" : "s") :
			"answer was cut off (finish_reason \"length\")";
		return FW_OUTPUT_CUT_OFF;
	}
	answer = fw_parse_json_text(parsed->content, strlen(parsed->content), &problem);
	if (answer == NULL)
	{
		parsed->problem = psprintf("%s; it begins %s", problem,
								   fw_answer_excerpt(parsed->content));
		return FW_OUTPUT_NOT_JSON;
	}

	sv.type = jbvBinary;
	sv.val.binary.data = &schema->root;
	sv.val.binary.len = VARSIZE(schema) - VARHDRSZ;
	if (JB_ROOT_IS_SCALAR(answer))
		(void) JsonbExtractScalar(&answer->root, &av);
	else
	{
		av.type = jbvBinary;
		av.val.binary.data = &answer->root;
		av.val.binary.len = VARSIZE(answer) - VARHDRSZ;
	}
	initStringInfo(&path);
	appendStringInfoChar(&path, '$');
	if (!fw_validate(&sv, &av, &path, &mismatch))
	{
		parsed->problem = mismatch;
		return FW_OUTPUT_MISMATCH;
	}
	parsed->output = answer;
	return FW_OUTPUT_OK;
}
