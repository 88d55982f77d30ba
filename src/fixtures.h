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

extern void fw_fixture_check_writable(void);	/* issue 11 */

#endif							/* FW_FIXTURES_H */
