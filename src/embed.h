/*-------------------------------------------------------------------------
 *
 * embed.h
 *		Embeddings and rerank (issue 12): the validated answers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_EMBED_H
#define FW_EMBED_H

#include "engine.h"
#include "fwjson.h"
#include "utils/array.h"

/* Bounds on what a response may make us allocate. */
#define FW_EMBED_MAX_DIMS	16000	/* pgvector's vector type holds 16,000 */
#define FW_EMBED_MAX_INPUTS 2048	/* per request: the API's own limit */

/*
 * What one 200 answer of /embeddings or /rerank holds once checked: every
 * number finite, every index present once.
 */
typedef struct FwTyped
{
	int			n;				/* vectors (embed) or results (rerank) */
	int			dims;			/* embed: length of every vector */
	float4	   *vectors;		/* embed: n * dims, by index */
	int		   *index;			/* rerank: 0-based document positions, by
								 * descending score */
	double	   *score;
} FwTyped;

/* issue 14: one input's request and its vector, for enrich.c */
extern void fw_embed_prepare(FwCall *call, const char *workload, const char *input,
							 Jsonb *options);
extern ArrayType *fw_embed_answer(FwCall *call);

extern bool fw_parse_typed(FwCall *call, const char *body, size_t len,
						   FwParsed *out);

#endif							/* FW_EMBED_H */
