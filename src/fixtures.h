/*-------------------------------------------------------------------------
 *
 * fixtures.h
 *		Record and replay of request/response pairs (fw_tier.mode).
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_FIXTURES_H
#define FW_FIXTURES_H

#include "engine.h"
#include "http.h"

extern FwHttpResult *fw_fixture_replay(FwCall *call);
extern void fw_fixture_record(FwCall *call, const FwHttpResult *r);

#endif							/* FW_FIXTURES_H */
