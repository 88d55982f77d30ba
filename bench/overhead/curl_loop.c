/*
 * Reference for bench/overhead: the fastest honest C client, a plain
 * libcurl loop that reuses one easy handle (so one keep-alive connection)
 * and POSTs the same body fw_tier sends, N times.  Prints calls per second.
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static size_t
sink(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	(void) ptr;
	*(size_t *) userdata += size * nmemb;
	return size * nmemb;
}

int
main(int argc, char **argv)
{
	const char *url;
	long		n;
	const char *body = "{\"model\": \"accounts/fireworks/models/kimi-k2p6\", "
		"\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}";
	struct curl_slist *h = NULL;
	struct timespec t0, t1;
	size_t		bytes = 0;
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
	curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &bytes);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < n; i++)
	{
		long		status = 0;

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
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%.1f\n", n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
	curl_slist_free_all(h);
	curl_easy_cleanup(c);
	return 0;
}
