/*-------------------------------------------------------------------------
 *
 * http.h
 *		The HTTP transport: concurrent transfers on one libcurl multi handle
 *		per backend.  Callers never see curl types.
 *
 *-------------------------------------------------------------------------
 */
#ifndef FW_HTTP_H
#define FW_HTTP_H

#include "fw_tier.h"

typedef struct FwHttpXfer FwHttpXfer;

/* What one finished transfer produced; owned by the transfer. */
typedef struct FwHttpResult
{
	long		status;			/* HTTP status, 0 when none was received */
	char	   *body;			/* NUL-terminated response body */
	size_t		body_len;
	bool		failed;			/* transport-level failure (see errmsg) */
	bool		timed_out;		/* connect or request timeout */
	bool		cancelled;		/* aborted because an interrupt is pending */
	bool		too_large;		/* body over the 64 MB limit: aborted */
	char		errmsg[FW_ERRLEN];
	int			retry_after_ms; /* -1: no Retry-After */
	int			hdr_prompt_tokens;	/* fireworks-prompt-tokens, -1: none */
	int			hdr_cached_tokens;	/* fireworks-cached-prompt-tokens */
	int			rl_prompt_per_s;	/* X-Ratelimit-Limit-Tokens-Prompt */
	int			rl_generated_per_s; /* X-Ratelimit-Limit-Tokens-Generated */
	char		request_id[FW_REQIDLEN];
	int64		latency_us;
	int64		ttfb_us;
	bool		sent;			/* bytes of the request went out (spend.c) */
} FwHttpResult;

extern void fw_http_reserve(int n);
extern FwHttpXfer *fw_http_start(const char *url, const char *body, size_t len,
								 const char *api_key, const char *affinity,
								 long timeout_ms, void *owner);
extern void fw_http_set_request_id_sink(FwHttpXfer *xfer, char *sink);
extern void fw_http_poll(long timeout_ms);
extern FwHttpXfer *fw_http_next_done(void);
extern void *fw_http_owner(FwHttpXfer *xfer);
extern const FwHttpResult *fw_http_result(FwHttpXfer *xfer);
extern void fw_http_release(FwHttpXfer *xfer);
extern void fw_http_abort_all(void);
extern int	fw_http_in_flight(void);
extern bool fw_http_header_safe(const char *value);

#endif							/* FW_HTTP_H */
