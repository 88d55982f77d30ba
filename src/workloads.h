/*-------------------------------------------------------------------------
 *
 * workloads.h
 *		Backend-local cache of fw_tier.workloads.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_WORKLOADS_H
#define FW_WORKLOADS_H

#include "fw_tier.h"

typedef struct FwWorkloadConf
{
	char		name[FW_NAMELEN];	/* hash key */
	FwPath		path;			/* configured path */
	char	   *model;			/* NULL: fw_tier.default_model */
	char	   *fast_model;		/* model id on the Fast path */
	FwOnOverload on_overload;
	int			window_s;		/* 0: fw_tier.priority_window */
	int64		slot;			/* shared-memory slot (fw_workload_slot) */
	char	   *embedding_model;	/* issue 12; NULL: default_embedding_model */
	char	   *rerank_model;	/* issue 12; NULL: default_rerank_model */
	FwWindowPolicy window_policy;	/* issue 16: fixed or probe */
} FwWorkloadConf;

extern void fw_workload_get(const char *name, FwWorkloadConf *out);

#endif							/* FW_WORKLOADS_H */
