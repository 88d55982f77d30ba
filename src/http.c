/*-------------------------------------------------------------------------
 *
 * http.c
 *		The only file that includes curl.h: handle lifecycle, timeouts,
 *		cancel, wait event.
 *
 * Each backend owns one CURLM multi handle and a pool of easy handles, all
 * created on first use and kept for the life of the process, so that
 * connections stay alive across calls (the connection cache lives in the
 * multi handle).  Single calls and batches go through the same path: a
 * single call is a batch of one.
 *
 * Error discipline: curl callbacks never raise; they write into malloc'd
 * buffers and return a failure code that aborts the transfer.  Only a
 * stop (QueryCancelPending, ProcDiePending) aborts; callers check those
 * after fw_http_poll() returns, call fw_http_abort_all() and only then
 * CHECK_FOR_INTERRUPTS(), so a cancel reports SQLSTATE 57014 with every
 * handle back in the pool; any other interrupt is serviced by the
 * caller's CHECK_FOR_INTERRUPTS() while the transfers go on.  A pending
 * signal (SIGINT, the statement_timeout alarm) makes poll() return EINTR,
 * which libcurl treats as "nothing happened", so cancel is prompt.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "http.h"

/* Bodies beyond this are refused: nothing legitimate is that large. */
#define FW_MAX_BODY			(64 * 1024 * 1024)
/* Buffers larger than this are given back after use, keeping RSS flat. */
#define FW_KEEP_BUFFER		(256 * 1024)

struct FwHttpXfer
{
	CURL	   *easy;
	struct curl_slist *headers;
	void	   *owner;
	char	   *request_id_sink;	/* issue 18: the attempt's write-ahead
									 * slot (shared), FW_REQIDLEN, or NULL */
	bool		in_use;			/* handed out by fw_http_start */
	bool		attached;		/* added to the multi handle */
	bool		done;			/* finished, not yet collected */
	char	   *buf;			/* malloc'd response body */
	size_t		buf_len;
	size_t		buf_cap;
	bool		too_large;
	char		curl_err[CURL_ERROR_SIZE];
	FwHttpResult result;
};

static CURLM *fw_multi = NULL;
static FwHttpXfer *fw_pool = NULL;
static int	fw_pool_size = 0;
static int	fw_attached = 0;

static void
fw_http_global_init(void)
{
	if (fw_multi)
		return;
	if (curl_global_init(CURL_GLOBAL_ALL) != CURLE_OK)
		elog(ERROR, "curl_global_init failed");
	fw_multi = curl_multi_init();
	if (fw_multi == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl multi handle")));
	/* Plenty of idle connections for batches at full concurrency. */
	curl_multi_setopt(fw_multi, CURLMOPT_MAXCONNECTS, 1024L);
}

static size_t
fw_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	FwHttpXfer *x = (FwHttpXfer *) userdata;
	size_t		n = size * nmemb;

	if (x->buf_len + n + 1 > FW_MAX_BODY)
	{
		x->too_large = true;
		return 0;				/* aborts the transfer: CURLE_WRITE_ERROR */
	}
	if (x->buf_len + n + 1 > x->buf_cap)
	{
		size_t		cap = Max(x->buf_cap * 2, 8192);
		char	   *nb;

		while (cap < x->buf_len + n + 1)
			cap *= 2;
		nb = realloc(x->buf, cap);
		if (nb == NULL)
			return 0;
		x->buf = nb;
		x->buf_cap = cap;
	}
	memcpy(x->buf + x->buf_len, ptr, n);
	x->buf_len += n;
	x->buf[x->buf_len] = '\0';
	return n;
}

/*
 * Replace every byte outside printable ASCII with '?', in place: for text
 * from the network or libcurl (request ids, transport errors) that reaches
 * errdetail or the call log and may be in no known encoding.  ASCII is
 * valid in every server encoding, so any later cut is on a boundary.
 */
static void
fw_ascii_only(char *s)
{
	for (; *s; s++)
		if ((unsigned char) *s < 0x20 || (unsigned char) *s > 0x7e)
			*s = '?';
}

/*
 * May value be sent as (part of) a header line or URL?  No control
 * characters (CR, LF, NUL-free by construction, TAB, DEL): they would end
 * the header and start another.  Values are refused, never escaped.
 */
bool
fw_http_header_safe(const char *value)
{
	if (value == NULL)
		return true;
	for (const unsigned char *p = (const unsigned char *) value; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			return false;
	return true;
}

/* Does header line h (length len) start with name (lower case)? */
static const char *
fw_header_value(const char *h, size_t len, const char *name)
{
	size_t		nlen = strlen(name);

	if (len <= nlen + 1 || pg_strncasecmp(h, name, nlen) != 0 || h[nlen] != ':')
		return NULL;
	h += nlen + 1;
	while (*h == ' ' || *h == '\t')
		h++;
	return h;
}

static int
fw_header_int(const char *v)
{
	long		n = strtol(v, NULL, 10);

	return (n < 0 || n > INT_MAX) ? -1 : (int) n;
}

static size_t
fw_header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	FwHttpXfer *x = (FwHttpXfer *) userdata;
	FwHttpResult *r = &x->result;
	size_t		len = size * nitems;
	const char *v;

	/* Header lines are not NUL-terminated; copy the short ones we want. */
	if (len < 2 || len > 512)
		return len;

	if ((v = fw_header_value(buffer, len, "retry-after")) != NULL)
	{
		char		tmp[128];
		size_t		vlen = Min(len - (v - buffer), sizeof(tmp) - 1);

		memcpy(tmp, v, vlen);
		tmp[vlen] = '\0';
		if (tmp[0] >= '0' && tmp[0] <= '9')
			r->retry_after_ms = Min(fw_header_int(tmp), INT_MAX / 1000) * 1000;
		else
		{
			time_t		t = curl_getdate(tmp, NULL);

			if (t > 0)
				r->retry_after_ms = (int) Min(Max(t - time(NULL), 0), INT_MAX / 1000) * 1000;
		}
	}
	else if ((v = fw_header_value(buffer, len, "fireworks-prompt-tokens")) != NULL)
		r->hdr_prompt_tokens = fw_header_int(v);
	else if ((v = fw_header_value(buffer, len, "fireworks-cached-prompt-tokens")) != NULL)
		r->hdr_cached_tokens = fw_header_int(v);
	else if ((v = fw_header_value(buffer, len, "x-ratelimit-limit-tokens-prompt")) != NULL)
		r->rl_prompt_per_s = fw_header_int(v);
	else if ((v = fw_header_value(buffer, len, "x-ratelimit-limit-tokens-generated")) != NULL)
		r->rl_generated_per_s = fw_header_int(v);
	else if ((v = fw_header_value(buffer, len, "x-request-id")) != NULL)
	{
		size_t		vlen = len - (v - buffer);

		while (vlen > 0 && (v[vlen - 1] == '\r' || v[vlen - 1] == '\n'))
			vlen--;
		vlen = Min(vlen, FW_REQIDLEN - 1);
		memcpy(r->request_id, v, vlen);
		r->request_id[vlen] = '\0';
		/* foreign bytes headed for the call log: printable ASCII only */
		fw_ascii_only(r->request_id);
		/* in place in the write-ahead slot: its last byte stays NUL */
		if (x->request_id_sink)
			strlcpy(x->request_id_sink, r->request_id, FW_REQIDLEN - 1);
	}
	return len;
}

/*
 * Abort a transfer only when the statement is being stopped: a cancel, a
 * statement_timeout (its handler sets QueryCancelPending) or a terminate.
 * Other interrupts (barriers, a parallel worker exiting, memory-context
 * logging, client connection checks) are serviced by the engine's
 * CHECK_FOR_INTERRUPTS and must not throw away a paid request.  Only the
 * flags are read here: a callback never raises.
 */
static int
fw_progress_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
			   curl_off_t ultotal, curl_off_t ulnow)
{
	return (QueryCancelPending || ProcDiePending) ? 1 : 0;
}

static FwHttpXfer *
fw_pool_get(void)
{
	for (int i = 0; i < fw_pool_size; i++)
		if (!fw_pool[i].in_use)
			return &fw_pool[i];
	/* fw_http_reserve() sizes the pool for the engine's concurrency. */
	elog(ERROR, "fw_tier transfer pool exhausted");
	return NULL;				/* keep compiler quiet */
}

/*
 * Make room for n concurrent transfers.  Easy handles point at their
 * FwHttpXfer (private data, write/header targets), so the pool may only
 * move while nothing runs; the engine calls this before starting work.
 */
void
fw_http_reserve(int n)
{
	int			want;
	FwHttpXfer *np;

	fw_http_global_init();
	if (fw_pool_size >= n)
		return;
	if (fw_attached > 0)
		elog(ERROR, "cannot grow the fw_tier transfer pool while transfers run");

	want = fw_pool_size ? fw_pool_size : 4;
	while (want < n)
		want *= 2;
	np = MemoryContextAllocZero(TopMemoryContext, sizeof(FwHttpXfer) * want);
	if (fw_pool)
	{
		memcpy(np, fw_pool, sizeof(FwHttpXfer) * fw_pool_size);
		pfree(fw_pool);
	}
	fw_pool = np;
	for (int i = 0; i < fw_pool_size; i++)
	{
		FwHttpXfer *x = &fw_pool[i];

		if (x->easy == NULL)
			continue;
		curl_easy_setopt(x->easy, CURLOPT_WRITEDATA, x);
		curl_easy_setopt(x->easy, CURLOPT_HEADERDATA, x);
		curl_easy_setopt(x->easy, CURLOPT_PRIVATE, x);
		curl_easy_setopt(x->easy, CURLOPT_ERRORBUFFER, x->curl_err);
	}
	fw_pool_size = want;
}

static void
fw_easy_setup(FwHttpXfer *x)
{
	CURL	   *e = curl_easy_init();

	if (e == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl handle")));
	x->easy = e;
	/* Options that never change for this handle. */
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "fw_tier/0.1");
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, fw_write_cb);
	curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, fw_header_cb);
	curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, fw_progress_cb);
	curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
	curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
	curl_easy_setopt(e, CURLOPT_PRIVATE, x);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->curl_err);
	curl_easy_setopt(e, CURLOPT_POST, 1L);
}

/*
 * Copy the request id into sink as soon as the headers bring it, for a
 * crash before the body ends (calllog.c "Write-ahead attempts").  Set
 * before the next poll: nothing is received before.
 */
void
fw_http_set_request_id_sink(FwHttpXfer *xfer, char *sink)
{
	if (xfer)
		xfer->request_id_sink = sink;
}

FwHttpXfer *
fw_http_start(const char *url, const char *body, size_t len,
			  const char *api_key, const char *affinity,
			  long timeout_ms, void *owner)
{
	FwHttpXfer *x;
	struct curl_slist *h = NULL;
	struct curl_slist *t;
	char	   *line;
	CURLMcode	mc;

	fw_http_global_init();
	x = fw_pool_get();
	if (x->easy == NULL)
		fw_easy_setup(x);

	/* Headers: curl copies each string, so the key leaves no palloc copy. */
	h = curl_slist_append(h, "Content-Type: application/json");
	if (h && (t = curl_slist_append(h, "Expect:")) != NULL)
		h = t;
	if (h && api_key && api_key[0])
	{
		line = psprintf("Authorization: Bearer %s", api_key);
		t = curl_slist_append(h, line);
		explicit_bzero(line, strlen(line));
		pfree(line);
		if (t == NULL)
		{
			curl_slist_free_all(h);
			h = NULL;
		}
	}
	if (h && affinity && affinity[0])
	{
		line = psprintf("x-session-affinity: %s", affinity);
		t = curl_slist_append(h, line);
		pfree(line);
		if (t == NULL)
		{
			curl_slist_free_all(h);
			h = NULL;
		}
	}
	if (h == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory building request headers")));

	x->headers = h;
	x->owner = owner;
	x->request_id_sink = NULL;
	x->in_use = true;
	x->done = false;
	x->too_large = false;
	x->buf_len = 0;
	if (x->buf)
		x->buf[0] = '\0';
	x->curl_err[0] = '\0';
	memset(&x->result, 0, sizeof(x->result));
	x->result.retry_after_ms = -1;
	x->result.hdr_prompt_tokens = -1;
	x->result.hdr_cached_tokens = -1;
	x->result.rl_prompt_per_s = -1;
	x->result.rl_generated_per_s = -1;

	curl_easy_setopt(x->easy, CURLOPT_URL, url);
	curl_easy_setopt(x->easy, CURLOPT_HTTPHEADER, h);
	/* The body outlives the transfer: the engine keeps it until done. */
	curl_easy_setopt(x->easy, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(x->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) len);
	curl_easy_setopt(x->easy, CURLOPT_CONNECTTIMEOUT_MS, (long) fw_connect_timeout_ms);
	curl_easy_setopt(x->easy, CURLOPT_TIMEOUT_MS, Max(timeout_ms, 1L));

	mc = curl_multi_add_handle(fw_multi, x->easy);
	if (mc != CURLM_OK)
	{
		curl_slist_free_all(x->headers);
		x->headers = NULL;
		x->in_use = false;
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not start request: %s", curl_multi_strerror(mc))));
	}
	x->attached = true;
	fw_attached++;
	return x;
}

static void
fw_finish(FwHttpXfer *x, CURLcode rc)
{
	FwHttpResult *r = &x->result;
	curl_off_t	total = 0;
	curl_off_t	ttfb = 0;

	curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &r->status);
	curl_easy_getinfo(x->easy, CURLINFO_TOTAL_TIME_T, &total);
	curl_easy_getinfo(x->easy, CURLINFO_STARTTRANSFER_TIME_T, &ttfb);
	{
		long		req_size = 0;

		curl_easy_getinfo(x->easy, CURLINFO_REQUEST_SIZE, &req_size);
		r->sent = req_size > 0;
	}
	r->latency_us = (int64) total;
	r->ttfb_us = (int64) ttfb;
	r->body = x->buf ? x->buf : "";
	r->body_len = x->buf_len;

	if (rc != CURLE_OK)
	{
		r->failed = true;
		if (rc == CURLE_OPERATION_TIMEDOUT)
			r->timed_out = true;
		else if (rc == CURLE_ABORTED_BY_CALLBACK)
			r->cancelled = true;
		r->too_large = x->too_large;
		if (x->too_large)
			strlcpy(r->errmsg, "response body exceeds 64 MB", sizeof(r->errmsg));
		else
		{
			snprintf(r->errmsg, sizeof(r->errmsg), "%s",
					 x->curl_err[0] ? x->curl_err : curl_easy_strerror(rc));
			fw_ascii_only(r->errmsg);
		}
	}
	x->done = true;
}

/*
 * Wait up to timeout_ms for socket activity and drive every transfer.
 * Returns early when a signal arrives, so callers check InterruptPending.
 */
void
fw_http_poll(long timeout_ms)
{
	int			running;
	CURLMsg    *msg;
	int			left;

	if (fw_multi == NULL)
		return;

	curl_multi_perform(fw_multi, &running);
	/* Any pending interrupt returns to the caller at once to be serviced. */
	if (running > 0 && !InterruptPending)
	{
		long		curl_ms = -1;

		curl_multi_timeout(fw_multi, &curl_ms);
		if (curl_ms >= 0 && curl_ms < timeout_ms)
			timeout_ms = curl_ms;
		if (timeout_ms > 0)
		{
			pgstat_report_wait_start(PG_WAIT_EXTENSION);
			curl_multi_poll(fw_multi, NULL, 0, (int) timeout_ms, NULL);
			pgstat_report_wait_end();
		}
		curl_multi_perform(fw_multi, &running);
	}

	while ((msg = curl_multi_info_read(fw_multi, &left)) != NULL)
	{
		FwHttpXfer *x = NULL;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &x);
		if (x && !x->done)
			fw_finish(x, msg->data.result);
	}
}

FwHttpXfer *
fw_http_next_done(void)
{
	for (int i = 0; i < fw_pool_size; i++)
		if (fw_pool[i].in_use && fw_pool[i].done)
		{
			fw_pool[i].done = false;	/* collected once */
			return &fw_pool[i];
		}
	return NULL;
}

void *
fw_http_owner(FwHttpXfer *xfer)
{
	return xfer->owner;
}

const FwHttpResult *
fw_http_result(FwHttpXfer *xfer)
{
	return &xfer->result;
}

/* Detach a transfer and put its handle back in the pool. */
void
fw_http_release(FwHttpXfer *x)
{
	if (!x->in_use)
		return;
	if (x->attached)
	{
		curl_multi_remove_handle(fw_multi, x->easy);
		x->attached = false;
		fw_attached--;
	}
	curl_easy_setopt(x->easy, CURLOPT_HTTPHEADER, NULL);
	if (x->headers)
	{
		curl_slist_free_all(x->headers);
		x->headers = NULL;
	}
	if (x->buf_cap > FW_KEEP_BUFFER)
	{
		free(x->buf);
		x->buf = NULL;
		x->buf_cap = 0;
	}
	x->buf_len = 0;
	x->owner = NULL;
	x->request_id_sink = NULL;
	x->done = false;
	x->in_use = false;
}

/* Called on every error path: no transfer survives its statement. */
void
fw_http_abort_all(void)
{
	for (int i = 0; i < fw_pool_size; i++)
		fw_http_release(&fw_pool[i]);
}

int
fw_http_in_flight(void)
{
	return fw_attached;
}
