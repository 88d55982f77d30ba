/*
 * Reference for bench/overhead and bench/calllog: the fastest honest C
 * client, a plain libcurl loop that does what a minimal correct client of
 * the API does for each call, and no more: builds the JSON body with the
 * prompt (escaped), POSTs it over one reused easy handle (so one
 * keep-alive connection, the same headers fw_tier sends), checks the
 * status and takes choices[0].message.content out of the answer as a C
 * string (unescaped).  It keeps no log, no budgets, no escalation: that
 * is fw_tier's extra work, what the benches measure.  Prints calls per
 * second.
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct Buf
{
	char	   *data;
	size_t		len;
	size_t		cap;
} Buf;

static void
buf_put(Buf *b, const char *p, size_t n)
{
	if (b->len + n + 1 > b->cap)
	{
		b->cap = (b->len + n + 1) * 2;
		b->data = realloc(b->data, b->cap);
		if (b->data == NULL)
			abort();
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = '\0';
}

static size_t
sink(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	buf_put((Buf *) userdata, ptr, size * nmemb);
	return size * nmemb;
}

/* s as a JSON string */
static void
put_json_string(Buf *b, const char *s)
{
	buf_put(b, "\"", 1);
	for (; *s; s++)
	{
		unsigned char c = (unsigned char) *s;
		char		esc[8];

		if (c == '"' || c == '\\')
		{
			esc[0] = '\\';
			esc[1] = (char) c;
			buf_put(b, esc, 2);
		}
		else if (c < 0x20)
		{
			snprintf(esc, sizeof(esc), "\\u%04x", c);
			buf_put(b, esc, 6);
		}
		else
			buf_put(b, s, 1);
	}
	buf_put(b, "\"", 1);
}

static int
hex4(const char *p)
{
	int			v = 0;

	for (int i = 0; i < 4; i++)
	{
		char		c = p[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

/*
 * The JSON string starting at p (at its opening quote), unescaped into
 * out (UTF-8).  Returns 0, or -1 when it is not a well-formed string.
 */
static int
get_json_string(const char *p, Buf *out)
{
	out->len = 0;
	if (*p++ != '"')
		return -1;
	for (;;)
	{
		const char *run = p;

		while (*p && *p != '"' && *p != '\\' && (unsigned char) *p >= 0x20)
			p++;
		buf_put(out, run, p - run);
		if (*p == '"')
			return 0;
		if (*p != '\\')
			return -1;
		p++;
		switch (*p)
		{
			case '"':
			case '\\':
			case '/':
				buf_put(out, p, 1);
				break;
			case 'b':
				buf_put(out, "\b", 1);
				break;
			case 'f':
				buf_put(out, "\f", 1);
				break;
			case 'n':
				buf_put(out, "\n", 1);
				break;
			case 'r':
				buf_put(out, "\r", 1);
				break;
			case 't':
				buf_put(out, "\t", 1);
				break;
			case 'u':
				{
					int			cp = hex4(p + 1);
					char		u[4];
					int			n;

					if (cp < 0)
						return -1;
					p += 4;
					if (cp >= 0xd800 && cp < 0xdc00 && p[1] == '\\' && p[2] == 'u')
					{
						int			lo = hex4(p + 3);

						if (lo < 0xdc00 || lo > 0xdfff)
							return -1;
						cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
						p += 6;
					}
					if (cp < 0x80)
						u[0] = (char) cp, n = 1;
					else if (cp < 0x800)
						u[0] = (char) (0xc0 | cp >> 6), u[1] = (char) (0x80 | (cp & 0x3f)), n = 2;
					else if (cp < 0x10000)
						u[0] = (char) (0xe0 | cp >> 12), u[1] = (char) (0x80 | ((cp >> 6) & 0x3f)),
							u[2] = (char) (0x80 | (cp & 0x3f)), n = 3;
					else
						u[0] = (char) (0xf0 | cp >> 18), u[1] = (char) (0x80 | ((cp >> 12) & 0x3f)),
							u[2] = (char) (0x80 | ((cp >> 6) & 0x3f)), u[3] = (char) (0x80 | (cp & 0x3f)), n = 4;
					buf_put(out, u, n);
					break;
				}
			default:
				return -1;
		}
		p++;
	}
}

/* choices[0].message.content, the way a small client finds it */
static int
answer_content(const char *body, Buf *out)
{
	const char *p = strstr(body, "\"choices\"");

	if (p == NULL || (p = strstr(p, "\"message\"")) == NULL ||
		(p = strstr(p, "\"content\"")) == NULL)
		return -1;
	p += strlen("\"content\"");
	while (*p == ' ' || *p == ':')
		p++;
	return get_json_string(p, out);
}

int
main(int argc, char **argv)
{
	const char *url;
	long		n;
	const char *prompt = "x";
	struct curl_slist *h = NULL;
	struct timespec t0, t1;
	Buf			body = {0};
	Buf			resp = {0};
	Buf			content = {0};
	size_t		answered = 0;
	CURL	   *c;

	if (argc != 3)
	{
		fprintf(stderr, "usage: curl_loop URL N\n");
		return 2;
	}
	url = argv[1];
	n = atol(argv[2]);
	curl_global_init(CURL_GLOBAL_ALL);
	c = curl_easy_init();
	h = curl_slist_append(h, "Content-Type: application/json");
	h = curl_slist_append(h, "Expect:");
	h = curl_slist_append(h, "Authorization: Bearer bench");
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &resp);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);
	curl_easy_setopt(c, CURLOPT_USERAGENT, "fw_tier/0.1");	/* same bytes */

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++)
	{
		long		status = 0;

		/* the body fw_tier sends for fw_complete('x', ...) */
		body.len = 0;
		buf_put(&body, "{\"model\": ", strlen("{\"model\": "));
		put_json_string(&body, "accounts/fireworks/models/kimi-k2p6");
		buf_put(&body, ", \"messages\": [{\"role\": \"user\", \"content\": ",
				strlen(", \"messages\": [{\"role\": \"user\", \"content\": "));
		put_json_string(&body, prompt);
		buf_put(&body, "}]}", 3);
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, body.data);
		curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long) body.len);

		resp.len = 0;
		if (curl_easy_perform(c) != CURLE_OK)
		{
			fprintf(stderr, "request %ld failed\n", i);
			return 1;
		}
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
		if (status != 200)
		{
			fprintf(stderr, "request %ld: HTTP %ld\n", i, status);
			return 1;
		}
		if (resp.data == NULL || answer_content(resp.data, &content) != 0)
		{
			fprintf(stderr, "request %ld: no choices[0].message.content\n", i);
			return 1;
		}
		answered += content.len;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.1f\n", n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
	if (answered == 0)
		fprintf(stderr, "every answer was empty\n");
	curl_slist_free_all(h);
	curl_easy_cleanup(c);
	return 0;
}
