/*-------------------------------------------------------------------------
 *
 * jsonschema.h
 *		Typed answers (issue 12): a caller's JSON schema, and an answer
 *		checked against it, over jsonb.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_JSONSCHEMA_H
#define FW_JSONSCHEMA_H

#include "fwjson.h"

/* Bounds on what a caller may send as a schema. */
#define FW_SCHEMA_MAX_BYTES		(64 * 1024)
#define FW_SCHEMA_MAX_DEPTH		32

/* How a typed answer failed (outcome bad_output); 0 = it did not. */
typedef enum FwOutputCheck
{
	FW_OUTPUT_OK = 0,
	FW_OUTPUT_NOT_JSON,			/* the text does not parse */
	FW_OUTPUT_CUT_OFF,			/* finish_reason "length" */
	FW_OUTPUT_MISMATCH			/* valid JSON, not what the schema says */
} FwOutputCheck;

extern void fw_schema_check(Jsonb *schema);
extern FwOutputCheck fw_answer_check(Jsonb *schema, FwParsed *parsed);

#endif							/* FW_JSONSCHEMA_H */
