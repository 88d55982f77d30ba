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
 * Keywords checked: type (a name or an array of distinct names; "integer" is a
 * number without a fractional part, 1.0 included), enum, required
 * (distinct names), properties, additionalProperties (true, false or a
 * schema) and items (one schema).  true and false are schemas too, below the root.
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
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
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

static int	fw_json_cmp(const void *pa, const void *pb);

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
	int			seen = 0;

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
		int			i;

		if (tok != WJB_ELEM)
			continue;
		if (e.type != jbvString ||
			!fw_str_in(e.val.string.val, e.val.string.len, fw_type_names))
			fw_schema_invalid(path, "\"type\" must be a type name or an array of type names");
		/* no repeats (JSON Schema's rule): each answer value is tried on few names */
		for (i = 0; !fw_str_is(e.val.string.val, e.val.string.len, fw_type_names[i]); i++)
			;
		if (seen & (1 << i))
			fw_schema_invalid(path, "\"type\" must not name a type twice");
		seen |= 1 << i;
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
			JsonbValue *names;
			int			n = 0;

			if (!fw_is_container(&v, false))
				fw_schema_invalid(path, "\"required\" must be an array of property names");
			names = palloc(sizeof(JsonbValue) * (JsonContainerSize(v.val.binary.data) + 1));
			ai = JsonbIteratorInit(v.val.binary.data);
			while ((tok = JsonbIteratorNext(&ai, &e, true)) != WJB_DONE)
			{
				if (tok != WJB_ELEM)
					continue;
				if (e.type != jbvString)
					fw_schema_invalid(path, "\"required\" must be an array of property names");
				names[n++] = e;
			}

			/*
			 * No repeats (JSON Schema's rule): then an object the answer
			 * passes has as many keys as there are names, and checking
			 * them costs what the answer's size allows.
			 */
			qsort(names, n, sizeof(JsonbValue), fw_json_cmp);
			for (int i = 1; i < n; i++)
				if (fw_json_cmp(&names[i - 1], &names[i]) == 0)
					fw_schema_invalid(path, "\"required\" must not name a property twice");
			pfree(names);
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
 *
 * The answer can be 64 MB of network input and the schema 64 kB: no
 * work may grow with their product, nor memory with the answer's size.
 * Each answer value meets at most one schema node; at that node the work
 * is bounded by the schema's keywords (an "enum" is sorted once per check
 * and searched, "type" arrays and "required" repeat no name) plus the
 * value's own size (an object's keys, each looked up in "properties").
 * What one element allocates lives in a context reset after it, and
 * every node checks for interrupts, so a cancel or statement_timeout
 * stops a long check.
 * ---------------------------------------------------------------------
 */

/* An "enum" array, its values sorted by fw_json_cmp. */
typedef struct FwEnumSet
{
	JsonbContainer *array;		/* hash key: the enum in the schema */
	int			n;
	JsonbValue *values;			/* shallow: they point into the schema */
} FwEnumSet;

/* One fw_answer_check: what outlives an element's temporary context. */
typedef struct FwValidation
{
	MemoryContext cxt;			/* the problem and the enum sets live here */
	HTAB	   *enums;			/* FwEnumSet by container, built on demand */
	char	   *problem;
} FwValidation;

static bool
fw_numeric_integral(Numeric n)
{
	/* the smallest scale that keeps the value: no text, O(digits) */
	if (numeric_is_nan(n) || numeric_is_inf(n))
		return false;
	return DatumGetInt32(DirectFunctionCall1(numeric_min_scale,
											 NumericGetDatum(n))) == 0;
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

static int
fw_json_rank(const JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			return 0;
		case jbvBool:
			return 1;
		case jbvNumeric:
			return 2;
		case jbvString:
			return 3;
		default:
			return JsonContainerIsArray(v->val.binary.data) ? 4 : 5;
	}
}

/*
 * A total order on iterator values that is 0 exactly when jsonb's "="
 * says equal (1 = 1.0; strings byte for byte, as under the database's
 * deterministic default collation), without copying either side:
 * scalars compared in place, containers by compareJsonbContainers,
 * which stops at the first difference.
 */
static int
fw_json_cmp(const void *pa, const void *pb)
{
	const JsonbValue *a = pa;
	const JsonbValue *b = pb;
	int			ra = fw_json_rank(a);
	int			rb = fw_json_rank(b);

	if (ra != rb)
		return ra < rb ? -1 : 1;
	switch (a->type)
	{
		case jbvNull:
			return 0;
		case jbvBool:
			return (int) a->val.boolean - (int) b->val.boolean;
		case jbvNumeric:
			return DatumGetInt32(DirectFunctionCall2(numeric_cmp,
													 NumericGetDatum(a->val.numeric),
													 NumericGetDatum(b->val.numeric)));
		case jbvString:
			if (a->val.string.len != b->val.string.len)
				return a->val.string.len < b->val.string.len ? -1 : 1;
			return memcmp(a->val.string.val, b->val.string.val, a->val.string.len);
		default:
			return compareJsonbContainers(a->val.binary.data, b->val.binary.data);
	}
}

/* Is value one of the enum's?  Sorts the enum at its first use. */
static bool
fw_enum_has(FwValidation *st, JsonbContainer *array, const JsonbValue *value)
{
	FwEnumSet  *set;
	bool		found;

	if (st->enums == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(JsonbContainer *);
		ctl.entrysize = sizeof(FwEnumSet);
		ctl.hcxt = st->cxt;
		st->enums = hash_create("fw_tier enum sets", 16, &ctl,
								HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	set = hash_search(st->enums, &array, HASH_ENTER, &found);
	if (!found)
	{
		JsonbIterator *it = JsonbIteratorInit(array);
		JsonbValue	e;
		JsonbIteratorToken tok;

		set->n = 0;
		set->values = MemoryContextAlloc(st->cxt,
										 sizeof(JsonbValue) * JsonContainerSize(array));
		while ((tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
			if (tok == WJB_ELEM)
				set->values[set->n++] = e;
		qsort(set->values, set->n, sizeof(JsonbValue), fw_json_cmp);
	}
	return bsearch(value, set->values, set->n, sizeof(JsonbValue), fw_json_cmp) != NULL;
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

static bool fw_validate(FwValidation *st, JsonbValue *schema, JsonbValue *value,
						StringInfo path);

/* A context for what one element's check allocates, reset after it. */
static MemoryContext
fw_element_context(void)
{
	return AllocSetContextCreate(CurrentMemoryContext, "fw_tier answer element",
								 ALLOCSET_SMALL_SIZES);
}

/*
 * Validate value against the subschema sub, found at path + key/index,
 * allocating in elem (then reset).
 */
static bool
fw_validate_at(FwValidation *st, MemoryContext elem, JsonbValue *sub,
			   JsonbValue *value, StringInfo path,
			   const char *key, int keylen, int index)
{
	int			save = path->len;
	MemoryContext old = MemoryContextSwitchTo(elem);
	bool		ok;

	if (key)
		fw_path_key(path, key, keylen);
	else
		appendStringInfo(path, "[%d]", index);
	ok = fw_validate(st, sub, value, path);
	path->len = save;
	path->data[save] = '\0';
	MemoryContextSwitchTo(old);
	MemoryContextReset(elem);
	return ok;
}

/* Say where and how the answer fails; returns false for the caller. */
static bool fw_mismatch(FwValidation *st, StringInfo path, const char *fmt,...)
			pg_attribute_printf(3, 4);

static bool
fw_mismatch(FwValidation *st, StringInfo path, const char *fmt,...)
{
	MemoryContext old = MemoryContextSwitchTo(st->cxt);
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
	st->problem = buf.data;
	MemoryContextSwitchTo(old);
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

/*
 * "properties" and "additionalProperties" walk the object's keys, each
 * looked up in "properties": the object's keys, not the schema's, set
 * the count (an empty object against 5,000 properties is 0 lookups).
 * Both key lists are in jsonb's key order, so the first failure is the
 * one a walk over "properties" would find.
 */
static bool
fw_validate_object(FwValidation *st, JsonbContainer *schema, JsonbContainer *obj,
				   StringInfo path)
{
	JsonbValue	kw;
	JsonbValue	props;
	bool		has_props;
	bool		has_extra;
	JsonbIterator *it;
	JsonbValue	k;
	JsonbValue	v;
	JsonbValue	sub;
	JsonbIteratorToken tok;
	MemoryContext elem;
	bool		ok = true;

	if (getKeyJsonValueFromContainer(schema, "required", 8, &kw))
	{
		/* distinct names (fw_schema_check): at most one more than obj's keys */
		it = JsonbIteratorInit(kw.val.binary.data);
		while ((tok = JsonbIteratorNext(&it, &k, true)) != WJB_DONE)
		{
			if (tok != WJB_ELEM ||
				getKeyJsonValueFromContainer(obj, k.val.string.val, k.val.string.len, &v))
				continue;
			{
				int			n = pg_mbcliplen(k.val.string.val, k.val.string.len,
											 FW_PATH_KEY_BYTES);

				return fw_mismatch(st, path, "required property \"%.*s\" is missing",
								   n, k.val.string.val);
			}
		}
	}

	has_props = getKeyJsonValueFromContainer(schema, "properties", 10, &props) &&
		JsonContainerSize(props.val.binary.data) > 0;
	has_extra = getKeyJsonValueFromContainer(schema, "additionalProperties", 20, &kw) &&
		!(kw.type == jbvBool && kw.val.boolean);
	if (!has_props && !has_extra)
		return true;

	elem = fw_element_context();
	for (int pass = has_props ? 0 : 1; ok && pass < (has_extra ? 2 : 1); pass++)
	{
		it = JsonbIteratorInit(obj);
		(void) JsonbIteratorNext(&it, &k, true);
		while (ok && (tok = JsonbIteratorNext(&it, &k, true)) == WJB_KEY)
		{
			bool		declared;

			(void) JsonbIteratorNext(&it, &v, true);
			declared = has_props &&
				getKeyJsonValueFromContainer(props.val.binary.data, k.val.string.val,
											 k.val.string.len, &sub);
			/* pass 0: the declared properties; pass 1: the others */
			if (declared != (pass == 0))
				continue;
			if (pass == 1 && kw.type == jbvBool)
			{
				fw_path_key(path, k.val.string.val, k.val.string.len);
				ok = fw_mismatch(st, path, "property not allowed by \"additionalProperties\": false");
			}
			else
				ok = fw_validate_at(st, elem, pass == 0 ? &sub : &kw, &v, path,
									k.val.string.val, k.val.string.len, 0);
		}
	}
	MemoryContextDelete(elem);
	return ok;
}

static bool
fw_validate(FwValidation *st, JsonbValue *schema, JsonbValue *value, StringInfo path)
{
	JsonbContainer *sc;
	JsonbValue	kw;

	check_stack_depth();
	CHECK_FOR_INTERRUPTS();
	if (schema->type == jbvBool)
	{
		if (schema->val.boolean)
			return true;
		return fw_mismatch(st, path, "the schema is false: no value is allowed");
	}
	sc = schema->val.binary.data;

	if (getKeyJsonValueFromContainer(sc, "type", 4, &kw))
	{
		bool		ok = false;

		if (kw.type == jbvString)
			ok = fw_type_matches(kw.val.string.val, kw.val.string.len, value);
		else
		{
			/* at most seven names: fw_schema_check refuses repeats */
			JsonbIterator *it = JsonbIteratorInit(kw.val.binary.data);
			JsonbValue	e;
			JsonbIteratorToken tok;

			while (!ok && (tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
				if (tok == WJB_ELEM)
					ok = fw_type_matches(e.val.string.val, e.val.string.len, value);
		}
		if (!ok)
			return fw_mismatch(st, path, "\"type\" is %s, the answer has %s",
							   fw_type_text(&kw), fw_type_phrase(value));
	}

	if (getKeyJsonValueFromContainer(sc, "enum", 4, &kw) &&
		!fw_enum_has(st, kw.val.binary.data, value))
		return fw_mismatch(st, path, "the value is not one of the %d values of \"enum\"",
						   (int) JsonContainerSize(kw.val.binary.data));

	if (value->type == jbvBinary && JsonContainerIsObject(value->val.binary.data))
		return fw_validate_object(st, sc, value->val.binary.data, path);

	if (value->type == jbvBinary && getKeyJsonValueFromContainer(sc, "items", 5, &kw))
	{
		JsonbIterator *it = JsonbIteratorInit(value->val.binary.data);
		MemoryContext elem = fw_element_context();
		JsonbValue	e;
		JsonbIteratorToken tok;
		int			i = 0;
		bool		ok = true;

		while (ok && (tok = JsonbIteratorNext(&it, &e, true)) != WJB_DONE)
			if (tok == WJB_ELEM)
				ok = fw_validate_at(st, elem, &kw, &e, path, NULL, 0, i++);
		MemoryContextDelete(elem);
		return ok;
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
	FwValidation st;
	bool		ok;
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
	st.cxt = CurrentMemoryContext;
	st.enums = NULL;
	st.problem = NULL;
	initStringInfo(&path);
	appendStringInfoChar(&path, '$');
	ok = fw_validate(&st, &sv, &av, &path);
	if (st.enums)
		hash_destroy(st.enums);
	if (!ok)
	{
		parsed->problem = st.problem;
		return FW_OUTPUT_MISMATCH;
	}
	parsed->output = answer;
	return FW_OUTPUT_OK;
}
