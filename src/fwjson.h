/*-------------------------------------------------------------------------
 *
 * fwjson.h
 *		Request building and response parsing with PostgreSQL's jsonb.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_JSON_H
#define FW_JSON_H

#include "fw_tier.h"

/* What a 200 response yielded. */
typedef struct FwParsed
{
	Jsonb	   *response;		/* the whole body, NULL if not JSON */
	char	   *content;		/* choices[0].message.content, or NULL */
	int			prompt_tokens;	/* -1: unknown */
	int			cached_tokens;
	int			completion_tokens;
	const char *problem;		/* why it is not a usable completion */
	bool		cut_off;		/* choices[0].finish_reason is "length" */
	Jsonb	   *output;			/* a typed answer's value (jsonschema.c) */
	struct FwTyped *typed;		/* issue 12: embeddings or rerank (embed.c) */
} FwParsed;

extern Jsonb *fw_messages_from_prompt(const char *prompt);
extern void fw_check_messages(Jsonb *messages);
extern char *fw_option_text(Jsonb *options, const char *key);
extern char *fw_build_request(const char *model, Jsonb *messages,
							  Jsonb *options, bool priority, size_t *len);
extern Jsonb *fw_parse_json(const char *body, size_t len, const char **problem);
extern Jsonb *fw_parse_json_text(const char *text, size_t len, const char **problem);
extern Jsonb *fw_json_options(Jsonb *options, Jsonb *schema);
extern bool fw_parse_completion(const char *body, size_t len, bool need_text,
								FwParsed *out);
extern char *fw_error_excerpt(const char *body, size_t len);
extern char *fw_fingerprint(const char *model, Jsonb *messages, Jsonb *options);
/* issue 12: requests whose content is a set of body fields (embed.c) */
extern char *fw_build_fields_request(const char *model, Jsonb *fields,
									 Jsonb *options, bool priority, size_t *len);
extern char *fw_fingerprint_fields(const char *model, Jsonb *fields, Jsonb *options);
extern bool fw_json_depth_ok(const char *s, size_t len);
extern void fw_push_key(JsonbParseState **st, const char *key);

#endif							/* FW_JSON_H */
