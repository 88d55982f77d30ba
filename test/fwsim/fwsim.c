/*
 * fwsim - a Fireworks Serverless simulator for fw_tier's tests and benchmarks.
 *
 * Serves the OpenAI-compatible chat completions API the way Fireworks
 * Serverless does (Standard / Priority / Fast paths, 503 Overloaded vs 503
 * Unavailable vs 429, replica-local prompt caching, per-model rate limits)
 * with deterministic answers, injectable faults and a JSON control API.
 * See README.md next to this file for the contract.
 *
 * Concurrency model: libmicrohttpd thread-per-connection.  A request that
 * has to "take" N milliseconds simply sleeps in its own connection thread,
 * so slow requests overlap naturally.  Shared state is small and guarded by
 * a few short-held mutexes; counters are atomics.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Configuration                                                       */
/* ------------------------------------------------------------------ */

typedef struct sim_config {
    double time_scale;          /* multiplies every simulated latency; 0 = none */
    long ttft_ms;               /* time to first token */
    long tps;                   /* generated tokens/s on Standard and Priority */
    long capacity;              /* concurrent slots per base model (Std+Prio) */
    long fast_capacity;         /* concurrent slots per Fast model id */
    long prompt_tpm;            /* 0 = unlimited */
    long uncached_prompt_tpm;
    long generated_tpm;
} sim_config;

static sim_config g_cli_cfg = {1.0, 200, 50, 64, 64, 0, 0, 0};
static sim_config g_cfg;                      /* current, guarded by g_cfg_lock */
static pthread_mutex_t g_cfg_lock = PTHREAD_MUTEX_INITIALIZER;

static long g_max_body = 1048576;
static const char *g_api_key;                 /* NULL = no auth */
static int g_quiet;
static volatile sig_atomic_t g_stop;

#define MAX_JSON_DEPTH 64
#define MAX_MODELS 4096
#define MAX_LOADS 16
#define MAX_RULES 1024
#define CACHE_SLOTS 4096
#define LOG_RING 10000
#define HANG_MAX_MS 600000

enum path_kind { PATH_STANDARD, PATH_PRIORITY, PATH_FAST, PATH_COUNT };
static const char *const path_names[PATH_COUNT] = {"standard", "priority", "fast"};

enum outcome {
    OUT_OK, OUT_OVERLOADED, OUT_UNAVAILABLE, OUT_RATE_LIMITED, OUT_CLIENT_ERROR,
    OUT_OTHER, OUT_COUNT
};
static const char *const outcome_names[OUT_COUNT] = {
    "ok", "overloaded", "unavailable", "rate_limited", "client_error", "other"};

static const char MSG_OVERLOADED[] =
    "Service Overloaded: the serverless fleet is at capacity; retry with "
    "backoff or use service_tier priority";

static sim_config config_snapshot(void)
{
    pthread_mutex_lock(&g_cfg_lock);
    sim_config c = g_cfg;
    pthread_mutex_unlock(&g_cfg_lock);
    return c;
}

/* ------------------------------------------------------------------ */
/* Small utilities                                                      */
/* ------------------------------------------------------------------ */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fputs("fwsim: out of memory\n", stderr);
        abort();
    }
    return p;
}

static void *xrealloc(void *old, size_t n)
{
    void *p = realloc(old, n ? n : 1);
    if (!p) {
        fputs("fwsim: out of memory\n", stderr);
        abort();
    }
    return p;
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t len)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}
#define FNV_INIT 0xcbf29ce484222325ULL

static uint64_t mix64(uint64_t x)     /* splitmix64 finaliser */
{
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static int is_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* Growable byte buffer; always NUL-terminated after the first put. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static void sb_reserve(sbuf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void sb_put(sbuf *b, const char *s, size_t n)
{
    sb_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_putc(sbuf *b, char c) { sb_put(b, &c, 1); }

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    sb_reserve(b, 64);
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= b->cap - b->len) {
        sb_reserve(b, (size_t)n);
        va_start(ap, fmt);
        vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
}

/* Writes s as a JSON string literal (with quotes).  Bytes >= 0x80 pass
 * through untouched (UTF-8 in, UTF-8 out); control characters are escaped. */
static void sb_json_str(sbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    sb_reserve(b, n + 2);
    b->p[b->len++] = '"';
    size_t run = 0;                 /* start of the pending unescaped run */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        sb_put(b, s + run, i - run);
        run = i + 1;
        switch (c) {
        case '"': sb_put(b, "\\\"", 2); break;
        case '\\': sb_put(b, "\\\\", 2); break;
        case '\n': sb_put(b, "\\n", 2); break;
        case '\r': sb_put(b, "\\r", 2); break;
        case '\t': sb_put(b, "\\t", 2); break;
        case '\b': sb_put(b, "\\b", 2); break;
        case '\f': sb_put(b, "\\f", 2); break;
        default: {
            char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            sb_put(b, u, 6);
        }
        }
    }
    sb_put(b, s + run, n - run);
    sb_putc(b, '"');
}

static void sb_json_cstr_or_null(sbuf *b, const char *s, int present)
{
    if (present)
        sb_json_str(b, s, strlen(s));
    else
        sb_puts(b, "null");
}

/* ------------------------------------------------------------------ */
/* JSON parser: recursive descent, decodes strings in place             */
/* ------------------------------------------------------------------ */

enum jtype { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct jnode {
    enum jtype type;
    double num;
    char *str;                  /* J_STR: decoded, NUL-terminated in place */
    size_t len;
    char *key;                  /* member name when inside an object */
    size_t keylen;
    struct jnode *child;        /* first element / member */
    struct jnode *next;         /* next sibling */
} jnode;

/* Nodes come from a chain of blocks freed together with the request. */
typedef struct jblock {
    struct jblock *next;
    size_t used;
    jnode nodes[64];
} jblock;

typedef struct jparser {
    char *p, *end;
    int depth;
    jblock *blocks;
    const char *err;
} jparser;

static jnode *jp_new(jparser *jp, enum jtype t)
{
    if (!jp->blocks || jp->blocks->used == 64) {
        jblock *b = xmalloc(sizeof *b);
        b->next = jp->blocks;
        b->used = 0;
        jp->blocks = b;
    }
    jnode *n = &jp->blocks->nodes[jp->blocks->used++];
    memset(n, 0, sizeof *n);
    n->type = t;
    return n;
}

static void jp_free(jparser *jp)
{
    while (jp->blocks) {
        jblock *n = jp->blocks->next;
        free(jp->blocks);
        jp->blocks = n;
    }
}

static void jp_ws(jparser *jp)
{
    while (jp->p < jp->end && (*jp->p == ' ' || *jp->p == '\t' || *jp->p == '\n' || *jp->p == '\r'))
        jp->p++;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static char *put_utf8(char *w, unsigned cp)
{
    if (cp < 0x80) {
        *w++ = (char)cp;
    } else if (cp < 0x800) {
        *w++ = (char)(0xC0 | (cp >> 6));
        *w++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *w++ = (char)(0xE0 | (cp >> 12));
        *w++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *w++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *w++ = (char)(0xF0 | (cp >> 18));
        *w++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *w++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *w++ = (char)(0x80 | (cp & 0x3F));
    }
    return w;
}

/* Parses a string whose opening quote was consumed.  The decoded text is
 * never longer than its escaped source, so it is written over the source
 * and terminated where the closing quote (already consumed) used to be. */
static int jp_string(jparser *jp, char **out, size_t *outlen)
{
    char *w = jp->p, *start = jp->p;
    for (;;) {
        if (jp->p >= jp->end) { jp->err = "unterminated string"; return -1; }
        unsigned char c = (unsigned char)*jp->p++;
        if (c == '"')
            break;
        if (c < 0x20) { jp->err = "control character in string"; return -1; }
        if (c != '\\') { *w++ = (char)c; continue; }
        if (jp->p >= jp->end) { jp->err = "unterminated string"; return -1; }
        char e = *jp->p++;
        switch (e) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '/': *w++ = '/'; break;
        case 'b': *w++ = '\b'; break;
        case 'f': *w++ = '\f'; break;
        case 'n': *w++ = '\n'; break;
        case 'r': *w++ = '\r'; break;
        case 't': *w++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (jp->end - jp->p < 4 || hex4(jp->p, &cp)) { jp->err = "bad \\u escape"; return -1; }
            jp->p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                /* high surrogate: combine with a following low one */
                if (jp->end - jp->p >= 6 && jp->p[0] == '\\' && jp->p[1] == 'u' &&
                    !hex4(jp->p + 2, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                    jp->p += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else {
                    cp = 0xFFFD;        /* lone surrogate: replacement char */
                }
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                cp = 0xFFFD;
            }
            w = put_utf8(w, cp);
            break;
        }
        default:
            jp->err = "bad escape in string";
            return -1;
        }
    }
    *out = start;
    *outlen = (size_t)(w - start);
    *w = '\0';
    return 0;
}

static int jp_digits(jparser *jp)
{
    int n = 0;
    while (jp->p < jp->end && *jp->p >= '0' && *jp->p <= '9') {
        jp->p++;
        n++;
    }
    return n;
}

static jnode *jp_value(jparser *jp);

static jnode *jp_number(jparser *jp)
{
    char *start = jp->p;
    if (jp->p < jp->end && *jp->p == '-')
        jp->p++;
    if (jp->p < jp->end && *jp->p == '0') {
        jp->p++;
    } else if (jp_digits(jp) == 0) {
        jp->err = "bad number";
        return NULL;
    }
    if (jp->p < jp->end && *jp->p == '.') {
        jp->p++;
        if (jp_digits(jp) == 0) { jp->err = "bad number"; return NULL; }
    }
    if (jp->p < jp->end && (*jp->p == 'e' || *jp->p == 'E')) {
        jp->p++;
        if (jp->p < jp->end && (*jp->p == '+' || *jp->p == '-'))
            jp->p++;
        if (jp_digits(jp) == 0) { jp->err = "bad number"; return NULL; }
    }
    char tmp[64];
    size_t n = (size_t)(jp->p - start);
    jnode *v = jp_new(jp, J_NUM);
    if (n < sizeof tmp) {       /* strtod needs a terminator the body may lack */
        memcpy(tmp, start, n);
        tmp[n] = '\0';
        v->num = strtod(tmp, NULL);
    } else {
        char *big = xmalloc(n + 1);
        memcpy(big, start, n);
        big[n] = '\0';
        v->num = strtod(big, NULL);
        free(big);
    }
    return v;
}

static int jp_literal(jparser *jp, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(jp->end - jp->p) < n || memcmp(jp->p, word, n) != 0) {
        jp->err = "unexpected token";
        return -1;
    }
    jp->p += n;
    return 0;
}

static jnode *jp_container(jparser *jp, int is_obj)
{
    if (++jp->depth > MAX_JSON_DEPTH) { jp->err = "nesting too deep"; return NULL; }
    jnode *v = jp_new(jp, is_obj ? J_OBJ : J_ARR), *last = NULL;
    char close = is_obj ? '}' : ']';
    jp_ws(jp);
    if (jp->p < jp->end && *jp->p == close) {
        jp->p++;
        jp->depth--;
        return v;
    }
    for (;;) {
        char *key = NULL;
        size_t keylen = 0;
        jp_ws(jp);
        if (is_obj) {
            if (jp->p >= jp->end || *jp->p != '"') { jp->err = "expected member name"; return NULL; }
            jp->p++;
            if (jp_string(jp, &key, &keylen))
                return NULL;
            jp_ws(jp);
            if (jp->p >= jp->end || *jp->p != ':') { jp->err = "expected ':'"; return NULL; }
            jp->p++;
        }
        jnode *item = jp_value(jp);
        if (!item)
            return NULL;
        item->key = key;
        item->keylen = keylen;
        if (last) last->next = item; else v->child = item;
        last = item;
        jp_ws(jp);
        if (jp->p < jp->end && *jp->p == ',') { jp->p++; continue; }
        if (jp->p < jp->end && *jp->p == close) { jp->p++; break; }
        jp->err = is_obj ? "expected ',' or '}'" : "expected ',' or ']'";
        return NULL;
    }
    jp->depth--;
    return v;
}

static jnode *jp_value(jparser *jp)
{
    jp_ws(jp);
    if (jp->p >= jp->end) { jp->err = "unexpected end of input"; return NULL; }
    switch (*jp->p) {
    case '{': jp->p++; return jp_container(jp, 1);
    case '[': jp->p++; return jp_container(jp, 0);
    case '"': {
        jp->p++;
        jnode *v = jp_new(jp, J_STR);
        return jp_string(jp, &v->str, &v->len) ? NULL : v;
    }
    case 't': return jp_literal(jp, "true") ? NULL : jp_new(jp, J_TRUE);
    case 'f': return jp_literal(jp, "false") ? NULL : jp_new(jp, J_FALSE);
    case 'n': return jp_literal(jp, "null") ? NULL : jp_new(jp, J_NULL);
    default:
        if (*jp->p == '-' || (*jp->p >= '0' && *jp->p <= '9'))
            return jp_number(jp);
        jp->err = "unexpected character";
        return NULL;
    }
}

/* Parses buf[0..len) (modified in place).  Returns NULL and sets jp->err
 * on failure; the caller frees with jp_free() either way. */
static jnode *json_parse(jparser *jp, char *buf, size_t len)
{
    memset(jp, 0, sizeof *jp);
    jp->p = buf;
    jp->end = buf + len;
    jnode *v = jp_value(jp);
    if (!v)
        return NULL;
    jp_ws(jp);
    if (jp->p != jp->end) {
        jp->err = "trailing data after JSON value";
        return NULL;
    }
    return v;
}

/* Member lookup; the last duplicate wins, as in JavaScript. */
static jnode *jget(const jnode *obj, const char *key)
{
    if (!obj || obj->type != J_OBJ)
        return NULL;
    size_t kl = strlen(key);
    jnode *found = NULL;
    for (jnode *m = obj->child; m; m = m->next)
        if (m->keylen == kl && memcmp(m->key, key, kl) == 0)
            found = m;
    return found;
}

static int jis_int(const jnode *v, double lo, double hi)
{
    return v && v->type == J_NUM && v->num == floor(v->num) && v->num >= lo && v->num <= hi;
}

/* ------------------------------------------------------------------ */
/* Words, directives and answer text                                    */
/* ------------------------------------------------------------------ */

static long count_words(const char *s, size_t n)
{
    long words = 0;
    int in_word = 0;
    for (size_t i = 0; i < n; i++) {
        if (is_ws((unsigned char)s[i])) {
            in_word = 0;
        } else if (!in_word) {
            in_word = 1;
            words++;
        }
    }
    return words;
}

/* Calls fn for every word (for prompt-cache hashing). */
typedef struct u64vec {
    uint64_t *v;
    size_t n, cap;
} u64vec;

static void u64_push(u64vec *a, uint64_t x)
{
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 64;
        a->v = xrealloc(a->v, a->cap * sizeof *a->v);
    }
    a->v[a->n++] = x;
}

static void hash_words(u64vec *out, const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        while (i < n && is_ws((unsigned char)s[i])) i++;
        size_t st = i;
        while (i < n && !is_ws((unsigned char)s[i])) i++;
        if (i > st)
            u64_push(out, fnv1a(FNV_INIT, s + st, i - st));
    }
}

/* Fault kinds, shared by directives and control rules. */
enum fault {
    F_NONE, F_OVERLOAD, F_OVERLOAD_ALL, F_UNAVAILABLE, F_STATUS, F_RATELIMIT,
    F_HANG, F_HTML, /* the ones above answer with an error (or nothing) */
    F_SLOW, F_TRICKLE, F_RESET, F_TRUNCATED, F_MALFORMED, F_HTML200,
    F_EMPTY_CHOICES, F_NO_USAGE, F_HUGE, F_WORDS,
    F_JSON_INVALID, F_JSON_VIOLATE, F_JSON_CUT,  /* typed answers */
    /* embeddings and rerank only: answers fw_tier must refuse */
    F_DROP_ITEM, F_DUP_INDEX, F_BAD_INDEX, F_RAGGED, F_OVERFLOW
};

enum shape {
    SH_TRICKLE = 1, SH_RESET = 2, SH_TRUNCATED = 4, SH_MALFORMED = 8,
    SH_HTML200 = 16, SH_EMPTY_CHOICES = 32, SH_NO_USAGE = 64, SH_HUGE = 128,
    SH_JSON_INVALID = 256, SH_JSON_VIOLATE = 512, SH_JSON_CUT = 1024,
    SH_DROP_ITEM = 2048, SH_DUP_INDEX = 4096, SH_BAD_INDEX = 8192, SH_RAGGED = 16384,
    SH_OVERFLOW = 32768
};

/* Everything the faults of one request add up to. */
typedef struct fault_set {
    enum fault error;           /* first error-type fault, F_NONE if none */
    long status;                /* for F_STATUS */
    long retry_after;           /* for F_RATELIMIT */
    long slow_ms;               /* unscaled extra delay before answering */
    unsigned shape;             /* SH_* flags for a 200 answer */
    long huge_bytes;
    long words;                 /* -1 = echo mode */
    long trickle_ms;            /* trickle=MS: the body's duration, 0 = 1000 */
} fault_set;

typedef struct fault_spec {
    const char *name;
    enum fault kind;
    int arg;                    /* 0 none, 1 optional, 2 required */
    long lo, hi;
} fault_spec;

static const fault_spec fault_specs[] = {
    {"overload", F_OVERLOAD, 0, 0, 0},
    {"overloaded", F_OVERLOAD_ALL, 0, 0, 0},      /* control-API spelling */
    {"overload-all", F_OVERLOAD_ALL, 0, 0, 0},
    {"unavailable", F_UNAVAILABLE, 0, 0, 0},
    {"status", F_STATUS, 2, 400, 599},
    {"ratelimit", F_RATELIMIT, 1, 1, 86400},
    {"hang", F_HANG, 0, 0, 0},
    {"html", F_HTML, 0, 0, 0},
    {"slow", F_SLOW, 2, 0, HANG_MAX_MS},
    {"trickle", F_TRICKLE, 1, 20, HANG_MAX_MS},
    {"reset", F_RESET, 0, 0, 0},
    {"truncated", F_TRUNCATED, 0, 0, 0},
    {"malformed", F_MALFORMED, 0, 0, 0},
    {"html200", F_HTML200, 0, 0, 0},
    {"empty-choices", F_EMPTY_CHOICES, 0, 0, 0},
    {"no-usage", F_NO_USAGE, 0, 0, 0},
    {"huge", F_HUGE, 2, 1, 200000000},
    {"words", F_WORDS, 2, 0, 1000000},
    {"json-invalid", F_JSON_INVALID, 0, 0, 0},
    {"json-violate", F_JSON_VIOLATE, 0, 0, 0},
    {"json-cut", F_JSON_CUT, 0, 0, 0},
    {"drop-item", F_DROP_ITEM, 0, 0, 0},
    {"dup-index", F_DUP_INDEX, 0, 0, 0},
    {"bad-index", F_BAD_INDEX, 0, 0, 0},
    {"ragged", F_RAGGED, 0, 0, 0},
    {"overflow", F_OVERFLOW, 0, 0, 0},
};

static const fault_spec *find_fault(const char *name, size_t n)
{
    for (size_t i = 0; i < sizeof fault_specs / sizeof fault_specs[0]; i++)
        if (strlen(fault_specs[i].name) == n && memcmp(fault_specs[i].name, name, n) == 0)
            return &fault_specs[i];
    return NULL;
}

static void fault_set_init(fault_set *f)
{
    memset(f, 0, sizeof *f);
    f->error = F_NONE;
    f->words = -1;
}

/* Adds one fault; an error fault only lands if none is set yet. */
static void fault_add(fault_set *f, enum fault kind, long arg, int has_arg)
{
    switch (kind) {
    case F_OVERLOAD: case F_OVERLOAD_ALL: case F_UNAVAILABLE: case F_STATUS:
    case F_RATELIMIT: case F_HANG: case F_HTML:
        if (f->error == F_NONE) {
            f->error = kind;
            if (kind == F_STATUS) f->status = arg;
            if (kind == F_RATELIMIT) f->retry_after = has_arg ? arg : 1;
        }
        break;
    case F_SLOW: f->slow_ms += arg; break;
    case F_TRICKLE: f->shape |= SH_TRICKLE; if (has_arg) f->trickle_ms = arg; break;
    case F_RESET: f->shape |= SH_RESET; break;
    case F_TRUNCATED: f->shape |= SH_TRUNCATED; break;
    case F_MALFORMED: f->shape |= SH_MALFORMED; break;
    case F_HTML200: f->shape |= SH_HTML200; break;
    case F_EMPTY_CHOICES: f->shape |= SH_EMPTY_CHOICES; break;
    case F_NO_USAGE: f->shape |= SH_NO_USAGE; break;
    case F_HUGE: f->shape |= SH_HUGE; f->huge_bytes = arg; break;
    case F_WORDS: f->words = arg; break;
    case F_JSON_INVALID: f->shape |= SH_JSON_INVALID; break;
    case F_JSON_VIOLATE: f->shape |= SH_JSON_VIOLATE; break;
    case F_JSON_CUT: f->shape |= SH_JSON_CUT; break;
    case F_DROP_ITEM: f->shape |= SH_DROP_ITEM; break;
    case F_DUP_INDEX: f->shape |= SH_DUP_INDEX; break;
    case F_BAD_INDEX: f->shape |= SH_BAD_INDEX; break;
    case F_RAGGED: f->shape |= SH_RAGGED; break;
    case F_OVERFLOW: f->shape |= SH_OVERFLOW; break;
    case F_NONE: break;
    }
}

/* Strips [fwsim:...] directives out of text, collapsing whitespace runs,
 * and records the directives in f.  Returns NULL or an error message
 * (written to errbuf). */
static const char *scan_directives(const char *s, size_t n, sbuf *clean, fault_set *f,
                                   char *errbuf, size_t errlen)
{
    static const char tag[] = "[fwsim:";
    const size_t taglen = sizeof tag - 1;
    int pending_space = 0;
    size_t i = 0;
    while (i < n) {
        if (s[i] == '[' && n - i > taglen && memcmp(s + i, tag, taglen) == 0) {
            const char *close = memchr(s + i + taglen, ']', n - i - taglen);
            if (close) {
                const char *name = s + i + taglen;
                size_t body = (size_t)(close - name);
                const char *eq = memchr(name, '=', body);
                size_t namelen = eq ? (size_t)(eq - name) : body;
                const fault_spec *sp = find_fault(name, namelen);
                if (!sp || sp->kind == F_OVERLOAD_ALL) {
                    /* "overloaded" is the control-API spelling only */
                    if (!sp || namelen != strlen("overload-all")) {
                        snprintf(errbuf, errlen, "unknown fwsim directive \"%.*s\"",
                                 (int)(namelen > 40 ? 40 : namelen), name);
                        return errbuf;
                    }
                }
                long arg = 0;
                int has_arg = eq != NULL;
                if (has_arg && sp->arg == 0) {
                    snprintf(errbuf, errlen, "fwsim directive %s takes no argument", sp->name);
                    return errbuf;
                }
                if (!has_arg && sp->arg == 2) {
                    snprintf(errbuf, errlen, "fwsim directive %s needs =N", sp->name);
                    return errbuf;
                }
                if (has_arg) {
                    const char *a = eq + 1;
                    size_t al = (size_t)(close - a);
                    int ok = al > 0 && al <= 10;
                    for (size_t k = 0; ok && k < al; k++)
                        ok = a[k] >= '0' && a[k] <= '9';
                    if (ok)
                        arg = strtol(a, NULL, 10);
                    if (!ok || arg < sp->lo || arg > sp->hi) {
                        snprintf(errbuf, errlen,
                                 "fwsim directive %s: expected an integer between %ld and %ld",
                                 sp->name, sp->lo, sp->hi);
                        return errbuf;
                    }
                }
                fault_add(f, sp->kind, arg, has_arg);
                i = (size_t)(close - s) + 1;
                pending_space = clean->len > 0;   /* a directive separates words */
                continue;
            }
        }
        unsigned char c = (unsigned char)s[i++];
        if (is_ws(c)) {
            pending_space = clean->len > 0;
            continue;
        }
        if (pending_space) {
            sb_putc(clean, ' ');
            pending_space = 0;
        }
        sb_putc(clean, (char)c);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Per-model state: congestion pools, background load, rate windows     */
/* ------------------------------------------------------------------ */

typedef struct model_pool {
    char *id;
    size_t idlen;
    int is_fast;
    long in_flight;             /* Std+Prio (or Fast) requests being served */
    long in_flight_prio;
    struct { long slots; int64_t until; } loads[MAX_LOADS];
    int64_t win_start;          /* fixed rate-limit window */
    long used_prompt, used_uncached, used_generated;
} model_pool;

static pthread_mutex_t g_pool_lock = PTHREAD_MUTEX_INITIALIZER;
static model_pool *g_pools[MAX_MODELS * 2];  /* open addressing, never freed */
static long g_pool_count;

/* Returns the pool for a model id, creating it; NULL when the table is full.
 * Caller holds g_pool_lock.  Pools are never freed, so pointers stay valid
 * for in-flight requests even across /control/reset. */
static model_pool *pool_get_locked(const char *id, size_t len, int is_fast)
{
    size_t mask = MAX_MODELS * 2 - 1;
    size_t h = (size_t)fnv1a(FNV_INIT, id, len) & mask;
    for (;;) {
        model_pool *p = g_pools[h];
        if (!p)
            break;
        if (p->idlen == len && memcmp(p->id, id, len) == 0)
            return p;
        h = (h + 1) & mask;
    }
    if (g_pool_count >= MAX_MODELS)
        return NULL;
    model_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->id = xmalloc(len + 1);
    memcpy(p->id, id, len);
    p->id[len] = '\0';
    p->idlen = len;
    p->is_fast = is_fast;
    g_pools[h] = p;
    g_pool_count++;
    return p;
}

static long pool_load_locked(model_pool *p, int64_t now)
{
    long sum = 0;
    for (int i = 0; i < MAX_LOADS; i++) {
        if (p->loads[i].slots && p->loads[i].until > now)
            sum += p->loads[i].slots;
        else
            p->loads[i].slots = 0;
    }
    return sum;
}

/* ------------------------------------------------------------------ */
/* Congestion schedule (--schedule FILE): trace time -> Standard shed  */
/* ------------------------------------------------------------------ */

/*
 * A step function of trace time: each line "TIME_S MODEL FRACTION" sets,
 * from TIME_S on, the fraction of Standard requests of MODEL ("*" = every
 * model) shed with 503 Overloaded, until a later line matching the model.
 * One trace second lasts time_scale real seconds (1 s when time_scale is
 * 0: no latency, real time), the time_scale in force when the clock
 * (re)starts: at startup, /control/reset and POST /control/schedule.  So
 * --time-scale 0.001 plays a 24-hour trace in 86.4 s with every simulated
 * latency shrunk alike.
 * Each Standard arrival is shed with probability FRACTION, drawn from a
 * PRNG seeded with --seed at every clock (re)start: the same arrivals in
 * the same order get the same sheds, and a retry can be shed again, as on
 * a congested fleet (an even spreading would never shed two in a row).
 * FRACTION 0 and 1 are exact.
 */
#define MAX_SCHEDULE 100000

typedef struct sched_entry {
    double t_s;
    char *model;                /* NULL = every model */
    double frac;
} sched_entry;

static sched_entry *g_sched;
static long g_sched_n;
static int64_t g_sched_start;     /* now_ms() of the clock's start */
static double g_sched_scale = 1;  /* real seconds per trace second */
static uint64_t g_sched_seed = 1; /* --seed */
static uint64_t g_sched_rng;      /* splitmix64 state; g_pool_lock */

static void sched_restart(void)
{
    sim_config c = config_snapshot();
    pthread_mutex_lock(&g_pool_lock);
    g_sched_start = now_ms();
    g_sched_scale = c.time_scale > 0 ? c.time_scale : 1;
    g_sched_rng = g_sched_seed;
    pthread_mutex_unlock(&g_pool_lock);
}

/* trace seconds since the clock started; caller holds g_pool_lock */
static double sched_now_locked(int64_t now)
{
    return (double)(now - g_sched_start) / 1000.0 / g_sched_scale;
}

/* fraction of Standard shed for the model at trace time t; g_pool_lock */
static double sched_frac_locked(const char *id, size_t len, double t)
{
    long lo = 0, hi = g_sched_n;      /* first entry with t_s > t */
    while (lo < hi) {
        long mid = (lo + hi) / 2;
        if (g_sched[mid].t_s <= t)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (long i = lo - 1; i >= 0; i--) {
        const char *m = g_sched[i].model;
        if (!m || (strlen(m) == len && memcmp(m, id, len) == 0))
            return g_sched[i].frac;
    }
    return 0;
}

/* Reads the schedule; exits 2 with the line number on any error. */
static void sched_load(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "fwsim: --schedule: cannot open \"%s\": %s\n", path, strerror(errno));
        exit(2);
    }
    char line[1024];
    long lineno = 0;
    double last = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t n = strlen(line);
        if (n == sizeof line - 1 && line[n - 1] != '\n') {
            fprintf(stderr, "fwsim: --schedule %s:%ld: line too long\n", path, lineno);
            exit(2);
        }
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        char *save = NULL;
        char *a = strtok_r(line, " \t\r\n", &save);
        if (!a)
            continue;           /* blank or comment */
        char *b = strtok_r(NULL, " \t\r\n", &save);
        char *c = strtok_r(NULL, " \t\r\n", &save);
        char *extra = strtok_r(NULL, " \t\r\n", &save);
        char *end1 = NULL, *end2 = NULL;
        double t = a ? strtod(a, &end1) : NAN;
        double fr = c ? strtod(c, &end2) : NAN;
        const char *why = NULL;
        if (!b || !c || extra)
            why = "expected TIME_S MODEL FRACTION";
        else if (*end1 || !isfinite(t) || t < 0 || t > 1e9)
            why = "TIME_S must be a number of seconds between 0 and 1e9";
        else if (*end2 || !isfinite(fr) || fr < 0 || fr > 1)
            why = "FRACTION must be a number between 0 and 1";
        else if (t < last)
            why = "times must not decrease";
        else if (strlen(b) > 159)
            why = "MODEL is longer than 159 bytes";
        else if (g_sched_n >= MAX_SCHEDULE)
            why = "more than 100000 entries";
        if (why) {
            fprintf(stderr, "fwsim: --schedule %s:%ld: %s\n", path, lineno, why);
            exit(2);
        }
        g_sched = xrealloc(g_sched, sizeof(sched_entry) * (size_t)(g_sched_n + 1));
        g_sched[g_sched_n].t_s = t;
        g_sched[g_sched_n].model = strcmp(b, "*") == 0 ? NULL : strdup(b);
        g_sched[g_sched_n].frac = fr;
        g_sched_n++;
        last = t;
    }
    fclose(f);
    if (g_sched_n == 0) {
        fprintf(stderr, "fwsim: --schedule %s: no entries\n", path);
        exit(2);
    }
}

/* Standard arrival at pool p: shed it by the schedule?  g_pool_lock held. */
static int sched_sheds_locked(model_pool *p, int64_t now)
{
    if (g_sched_n == 0)
        return 0;
    double fr = sched_frac_locked(p->id, p->idlen, sched_now_locked(now));
    if (fr <= 0)
        return 0;
    if (fr >= 1)
        return 1;
    g_sched_rng += 0x9E3779B97F4A7C15ULL;
    return (double)(mix64(g_sched_rng) >> 11) * 0x1.0p-53 < fr;
}

static int64_t window_ms(const sim_config *c)
{
    /* 60 s windows shrink with time-scale; 0 means "no latency", not
     * "no window", so it keeps the real 60 s */
    double w = c->time_scale > 0 ? 60000.0 * c->time_scale : 60000.0;
    return w < 1 ? 1 : (int64_t)w;
}

enum admit { ADMIT_OK, ADMIT_RATE_LIMITED, ADMIT_OVERLOADED, ADMIT_NO_POOL };

/* Rate limits first (account level), then fleet congestion; tokens are
 * only counted when both pass. */
static enum admit pool_admit(model_pool *p, int path, const sim_config *c, long prompt,
                             long cached, long *retry_after)
{
    int64_t now = now_ms(), win = window_ms(c);
    enum admit r = ADMIT_OK;
    pthread_mutex_lock(&g_pool_lock);
    if (now >= p->win_start + win) {
        p->win_start = now;
        p->used_prompt = p->used_uncached = p->used_generated = 0;
    }
    if ((c->prompt_tpm && p->used_prompt + prompt > c->prompt_tpm) ||
        (c->uncached_prompt_tpm && p->used_uncached + (prompt - cached) > c->uncached_prompt_tpm) ||
        (c->generated_tpm && p->used_generated >= c->generated_tpm)) {
        int64_t left = p->win_start + win - now;
        *retry_after = (long)((left + 999) / 1000);
        if (*retry_after < 1)
            *retry_after = 1;
        r = ADMIT_RATE_LIMITED;
    } else {
        long load = pool_load_locked(p, now);
        if (path == PATH_FAST)
            r = p->in_flight + load >= c->fast_capacity ? ADMIT_OVERLOADED : ADMIT_OK;
        else if (path == PATH_PRIORITY)
            r = p->in_flight_prio >= c->capacity ? ADMIT_OVERLOADED : ADMIT_OK;
        else
            r = p->in_flight + load >= c->capacity || sched_sheds_locked(p, now)
                ? ADMIT_OVERLOADED : ADMIT_OK;
        if (r == ADMIT_OK) {
            p->in_flight++;
            if (path == PATH_PRIORITY)
                p->in_flight_prio++;
            p->used_prompt += prompt;
            p->used_uncached += prompt - cached;
        }
    }
    pthread_mutex_unlock(&g_pool_lock);
    return r;
}

static void pool_release(model_pool *p, int path, long completion)
{
    pthread_mutex_lock(&g_pool_lock);
    p->in_flight--;
    if (path == PATH_PRIORITY)
        p->in_flight_prio--;
    p->used_generated += completion;
    pthread_mutex_unlock(&g_pool_lock);
}

static int pool_add_load(const char *model, size_t len, long slots, int64_t duration)
{
    int is_fast = strncmp(model, "accounts/fireworks/routers/", 27) == 0;
    int64_t now = now_ms();
    pthread_mutex_lock(&g_pool_lock);
    model_pool *p = pool_get_locked(model, len, is_fast);
    if (p) {
        int slot = 0;
        pool_load_locked(p, now);               /* expires old entries */
        for (int i = 0; i < MAX_LOADS; i++) {
            if (!p->loads[i].slots) { slot = i; break; }
            if (p->loads[i].until < p->loads[slot].until) slot = i;
        }
        p->loads[slot].slots = slots;
        p->loads[slot].until = now + duration;
    }
    pthread_mutex_unlock(&g_pool_lock);
    return p ? 0 : -1;
}

static void pools_reset(void)
{
    pthread_mutex_lock(&g_pool_lock);
    for (size_t i = 0; i < MAX_MODELS * 2; i++) {
        model_pool *p = g_pools[i];
        if (!p)
            continue;
        memset(p->loads, 0, sizeof p->loads);
        p->win_start = 0;
        p->used_prompt = p->used_uncached = p->used_generated = 0;
    }
    pthread_mutex_unlock(&g_pool_lock);
}

/* ------------------------------------------------------------------ */
/* Replica-local prompt cache: key -> previous prompt's word hashes     */
/* ------------------------------------------------------------------ */

typedef struct cache_entry {
    char *key;
    size_t keylen;
    uint64_t *words;
    size_t nwords;
    uint64_t stamp;             /* insertion order, for FIFO eviction */
} cache_entry;

static pthread_mutex_t g_cache_lock = PTHREAD_MUTEX_INITIALIZER;
static cache_entry g_cache[CACHE_SLOTS];
static uint64_t g_cache_stamp;

/* Direct-mapped would collide; a small linear probe over 8 slots then
 * evicting the oldest of them keeps it bounded and simple. */
static cache_entry *cache_find_locked(const char *key, size_t len, int create)
{
    size_t h = (size_t)fnv1a(FNV_INIT, key, len) % CACHE_SLOTS;
    cache_entry *empty = NULL, *oldest = NULL;
    for (size_t i = 0; i < 8; i++) {
        cache_entry *e = &g_cache[(h + i) % CACHE_SLOTS];
        if (e->key && e->keylen == len && memcmp(e->key, key, len) == 0)
            return e;
        if (!e->key) {
            if (!empty)
                empty = e;
        } else if (!oldest || e->stamp < oldest->stamp) {
            oldest = e;
        }
    }
    cache_entry *victim = empty ? empty : oldest;
    if (!create)
        return NULL;
    free(victim->key);
    free(victim->words);
    victim->key = xmalloc(len + 1);
    memcpy(victim->key, key, len);
    victim->key[len] = '\0';
    victim->keylen = len;
    victim->words = NULL;
    victim->nwords = 0;
    victim->stamp = ++g_cache_stamp;
    return victim;
}

static long cache_peek(const char *key, size_t len, const u64vec *words)
{
    long common = 0;
    pthread_mutex_lock(&g_cache_lock);
    cache_entry *e = cache_find_locked(key, len, 0);
    if (e) {
        size_t n = e->nwords < words->n ? e->nwords : words->n;
        while ((size_t)common < n && e->words[common] == words->v[common])
            common++;
    }
    pthread_mutex_unlock(&g_cache_lock);
    return common;
}

static void cache_store(const char *key, size_t len, u64vec *words)
{
    pthread_mutex_lock(&g_cache_lock);
    cache_entry *e = cache_find_locked(key, len, 1);
    free(e->words);
    e->words = words->v;        /* takes ownership */
    e->nwords = words->n;
    words->v = NULL;
    words->n = words->cap = 0;
    pthread_mutex_unlock(&g_cache_lock);
}

static void cache_reset(void)
{
    pthread_mutex_lock(&g_cache_lock);
    for (size_t i = 0; i < CACHE_SLOTS; i++) {
        free(g_cache[i].key);
        free(g_cache[i].words);
        memset(&g_cache[i], 0, sizeof g_cache[i]);
    }
    pthread_mutex_unlock(&g_cache_lock);
}

/* ------------------------------------------------------------------ */
/* Control rules                                                        */
/* ------------------------------------------------------------------ */

typedef struct rule {
    enum fault kind;
    long arg;                   /* status / retry_after / ms / bytes / words */
    int has_arg;
    int path;                   /* -1 any */
    char *model;                /* NULL any */
    long count;                 /* remaining; -1 = unlimited (duration rules) */
    int64_t until;              /* 0 = no deadline */
} rule;

static pthread_mutex_t g_rule_lock = PTHREAD_MUTEX_INITIALIZER;
static rule g_rules[MAX_RULES];
static int g_rule_count;
static volatile int g_rules_active;   /* fast-path skip when there are none */

/* Applies the first active rule matching the request, consuming one use. */
static void rules_apply(const char *model, size_t mlen, int path, fault_set *f)
{
    if (!__atomic_load_n(&g_rules_active, __ATOMIC_RELAXED))
        return;
    int64_t now = now_ms();
    pthread_mutex_lock(&g_rule_lock);
    for (int i = 0; i < g_rule_count; i++) {
        rule *r = &g_rules[i];
        if (r->count == 0 || (r->until && now >= r->until))
            continue;
        if (r->path >= 0 && r->path != path)
            continue;
        if (r->model && (strlen(r->model) != mlen || memcmp(r->model, model, mlen) != 0))
            continue;
        if (r->count > 0)
            r->count--;
        fault_add(f, r->kind == F_OVERLOAD ? F_OVERLOAD_ALL : r->kind, r->arg, r->has_arg);
        break;
    }
    pthread_mutex_unlock(&g_rule_lock);
}

static void rules_reset(void)
{
    pthread_mutex_lock(&g_rule_lock);
    for (int i = 0; i < g_rule_count; i++)
        free(g_rules[i].model);
    g_rule_count = 0;
    __atomic_store_n(&g_rules_active, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&g_rule_lock);
}

/* ------------------------------------------------------------------ */
/* Stats and request log                                                */
/* ------------------------------------------------------------------ */

static struct {
    long in_flight, peak;        /* "total" is the sum of the outcome counters */
    long outcomes[PATH_COUNT][OUT_COUNT];
    long tok_prompt, tok_cached, tok_completion;
} g_stats;

static void stat_add(long *v, long d) { __atomic_add_fetch(v, d, __ATOMIC_RELAXED); }

static void in_flight_enter(void)
{
    long now = __atomic_add_fetch(&g_stats.in_flight, 1, __ATOMIC_RELAXED);
    long peak = __atomic_load_n(&g_stats.peak, __ATOMIC_RELAXED);
    while (now > peak &&
           !__atomic_compare_exchange_n(&g_stats.peak, &peak, now, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
        ;
}

typedef struct log_entry {
    uint64_t seq;
    int status;
    unsigned char path, outcome, authorized, has_tier, has_aff, has_user;
    long prompt, completion, cached;
    char model[160];            /* long values are truncated */
    char tier[32];
    char affinity[96];
    char user[96];
    char request_id[40];        /* x-request-id sent with a 200, else "" */
} log_entry;

static pthread_mutex_t g_log_lock = PTHREAD_MUTEX_INITIALIZER;
static log_entry g_log[LOG_RING];
static uint64_t g_log_seq;      /* entries ever written since reset */

static void copy_trunc(char *dst, size_t cap, const char *src, size_t len)
{
    if (!src) {
        dst[0] = '\0';
        return;
    }
    if (len >= cap)
        len = cap - 1;
    memcpy(dst, src, len);
    dst[len] = '\0';
}

/* ------------------------------------------------------------------ */
/* Per-request state and responses                                      */
/* ------------------------------------------------------------------ */

enum route {
    R_NOT_FOUND, R_CHAT, R_EMBED, R_RERANK, R_C_RESET, R_C_RULES, R_C_LOAD, R_C_CONFIG, R_C_STATS,
    R_C_STATS_RESET, R_C_LOG, R_C_HEALTH, R_C_SCHEDULE
};

typedef struct request_state {
    enum route route;
    int method_ok;
    int too_large;
    sbuf body;
} request_state;

typedef struct chat_ctx {
    struct MHD_Connection *conn;
    const char *model;
    size_t model_len;
    const char *tier;
    size_t tier_len;
    const char *affinity;
    size_t affinity_len;
    const char *user;
    size_t user_len;
    int path;
    int authorized;
    long prompt, completion, cached;
    char request_id[40];        /* x-request-id of a 200, else empty */
} chat_ctx;

static int connection_fd(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

/* Sleeps up to ms, returning -1 early if the client hangs up or fwsim is
 * stopping, so abandoned slow/hung requests free their thread promptly. */
static int sleep_watch(struct MHD_Connection *c, double ms)
{
    if (ms <= 0)
        return g_stop ? -1 : 0;
    int fd = connection_fd(c);
    struct timespec end, now;
    clock_gettime(CLOCK_MONOTONIC, &end);
    long long ns = (long long)(ms * 1e6);
    end.tv_sec += ns / 1000000000LL;
    end.tv_nsec += ns % 1000000000LL;
    if (end.tv_nsec >= 1000000000L) { end.tv_sec++; end.tv_nsec -= 1000000000L; }
    for (;;) {
        if (g_stop)
            return -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long long left = (long long)(end.tv_sec - now.tv_sec) * 1000000000LL + (end.tv_nsec - now.tv_nsec);
        if (left <= 0)
            return 0;
        if (left > 200000000LL)
            left = 200000000LL;     /* re-check g_stop at least 5x a second */
        struct timespec ts = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
        if (fd >= 0) {
            struct pollfd pfd = {fd, POLLRDHUP, 0};
            int n = ppoll(&pfd, 1, &ts, NULL);
            if (n > 0 && (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)))
                return -1;
        } else {
            nanosleep(&ts, NULL);
        }
    }
}

static enum MHD_Result queue_owned(struct MHD_Connection *c, unsigned status, sbuf *body,
                                   const char *ctype, struct MHD_Response **keep)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(body->len, body->p,
                                                             MHD_RESPMEM_MUST_FREE);
    body->p = NULL;
    body->len = body->cap = 0;
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (keep) {                 /* caller adds headers, queues and destroys */
        *keep = r;
        return MHD_YES;
    }
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static const char *error_type_for(long status)
{
    switch (status) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 402: return "payment_required";
    case 403: return "permission_denied";
    case 404: return "not_found";
    case 405: return "method_not_allowed";
    case 408: return "request_timeout";
    case 409: return "conflict";
    case 412: return "precondition_failed";
    case 413: return "request_too_large";
    case 422: return "unprocessable_entity";
    case 429: return "rate_limit_exceeded";
    case 500: return "internal_server_error";
    case 502: return "bad_gateway";
    case 503: return "service_unavailable";
    case 504: return "gateway_timeout";
    default: return status < 500 ? "client_error" : "server_error";
    }
}

static const char *default_message_for(long status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized: invalid or missing API key";
    case 402: return "Payment Required: account is suspended or out of credits";
    case 403: return "Forbidden: no access to this model";
    case 404: return "Model not found, inaccessible, and/or not deployed";
    case 412: return "Precondition Failed: billing account requires attention";
    case 413: return "Request body too large";
    case 422: return "Unprocessable Entity";
    case 429: return "Too many requests: account rate limit exceeded";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 500 ? "Client Error" : "Server Error";
    }
}

static void error_body(sbuf *b, const char *type, const char *msg)
{
    sb_puts(b, "{\"error\":{\"object\":\"error\",\"type\":");
    sb_json_str(b, type, strlen(type));
    sb_puts(b, ",\"code\":");
    sb_json_str(b, type, strlen(type));
    sb_puts(b, ",\"message\":");
    sb_json_str(b, msg, strlen(msg));
    sb_puts(b, "}}");
}

static enum MHD_Result send_error(struct MHD_Connection *c, unsigned status, const char *type,
                                  const char *msg, long retry_after)
{
    sbuf b = {0};
    struct MHD_Response *r = NULL;
    error_body(&b, type, msg);
    if (queue_owned(c, status, &b, "application/json", &r) != MHD_YES)
        return MHD_NO;
    if (retry_after > 0) {
        char ra[24];
        snprintf(ra, sizeof ra, "%ld", retry_after);
        MHD_add_response_header(r, "Retry-After", ra);
    }
    if (status == 405)
        MHD_add_response_header(r, "Allow", "POST");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, sbuf *b)
{
    return queue_owned(c, status, b, "application/json", NULL);
}

/* Streaming bodies for trickle / reset / truncated. */
typedef struct stream_body {
    char *data;
    size_t len;
    unsigned shape;
    int fd;
    struct MHD_Connection *conn;
    long piece_ms;              /* trickle: pause between pieces */
} stream_body;

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    stream_body *sb = cls;
    size_t limit = sb->shape & (SH_RESET | SH_TRUNCATED) ? sb->len / 2 : sb->len;
    if (pos >= limit) {
        if (limit == sb->len)
            return MHD_CONTENT_READER_END_OF_STREAM;
        if (sb->shape & SH_RESET) {
            /* give the half body time to reach the peer, then RST */
            struct timespec ts = {0, 50000000};
            nanosleep(&ts, NULL);
            struct linger lg = {1, 0};
            if (sb->fd >= 0)
                setsockopt(sb->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t n = limit - (size_t)pos;
    if (n > max)
        n = max;
    if (sb->shape & SH_TRICKLE) {
        size_t piece = sb->len / 20 + 1;    /* ~20 pieces, 50 ms apart: ~1 s */
        if (n > piece)
            n = piece;
        if (pos > 0) {
            struct timespec ts = {sb->piece_ms / 1000, (sb->piece_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
            if (g_stop)
                return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
    memcpy(buf, sb->data + pos, n);
    return (ssize_t)n;
}

static void stream_free(void *cls)
{
    stream_body *sb = cls;
    free(sb->data);
    free(sb);
}

/* ------------------------------------------------------------------ */
/* Chat completions                                                     */
/* ------------------------------------------------------------------ */

static int classify(unsigned status, int overloaded)
{
    if (status >= 200 && status < 300) return OUT_OK;
    if (status == 503) return overloaded ? OUT_OVERLOADED : OUT_UNAVAILABLE;
    if (status == 429) return OUT_RATE_LIMITED;
    if (status >= 400 && status < 500) return OUT_CLIENT_ERROR;
    return OUT_OTHER;
}

/* Records a finished chat request in stats and the log ring. */
static void record(const chat_ctx *cx, unsigned status, int outcome)
{
    stat_add(&g_stats.outcomes[cx->path][outcome], 1);
    if (outcome == OUT_OK) {
        stat_add(&g_stats.tok_prompt, cx->prompt);
        stat_add(&g_stats.tok_cached, cx->cached);
        stat_add(&g_stats.tok_completion, cx->completion);
    }
    pthread_mutex_lock(&g_log_lock);
    uint64_t seq = ++g_log_seq;
    log_entry *e = &g_log[seq % LOG_RING];
    e->seq = seq;
    e->status = (int)status;
    e->path = (unsigned char)cx->path;
    e->outcome = (unsigned char)outcome;
    e->authorized = (unsigned char)cx->authorized;
    e->prompt = cx->prompt;
    e->completion = cx->completion;
    e->cached = cx->cached;
    copy_trunc(e->model, sizeof e->model, cx->model ? cx->model : "", cx->model ? cx->model_len : 0);
    e->has_tier = cx->tier != NULL;
    copy_trunc(e->tier, sizeof e->tier, cx->tier, cx->tier_len);
    e->has_aff = cx->affinity != NULL;
    copy_trunc(e->affinity, sizeof e->affinity, cx->affinity, cx->affinity_len);
    e->has_user = cx->user != NULL;
    copy_trunc(e->user, sizeof e->user, cx->user, cx->user_len);
    memcpy(e->request_id, cx->request_id, sizeof e->request_id);
    pthread_mutex_unlock(&g_log_lock);
    if (!g_quiet)
        fprintf(stderr, "fwsim: #%" PRIu64 " %s %u %s\n", seq, path_names[cx->path], status,
                outcome_names[outcome]);
}

static enum MHD_Result chat_error(chat_ctx *cx, unsigned status, const char *type,
                                  const char *msg, long retry_after)
{
    int overloaded = strcmp(type, "service_overloaded") == 0;
    record(cx, status, classify(status, overloaded));
    return send_error(cx->conn, status, type, msg, retry_after);
}

/* The text of a message's content: a string, or the text parts of an
 * array joined by spaces.  Returns -1 for an invalid content shape. */
static int content_text(const jnode *content, sbuf *tmp, const char **s, size_t *n)
{
    if (!content || content->type == J_NULL) {
        *s = "";
        *n = 0;
        return 0;
    }
    if (content->type == J_STR) {
        *s = content->str;
        *n = content->len;
        return 0;
    }
    if (content->type != J_ARR)
        return -1;
    tmp->len = 0;
    sb_put(tmp, "", 0);
    for (const jnode *part = content->child; part; part = part->next) {
        if (part->type != J_OBJ)
            return -1;
        const jnode *t = jget(part, "type");
        const jnode *text = jget(part, "text");
        if (!t || t->type != J_STR)
            return -1;
        if (strcmp(t->str, "text") != 0)
            continue;           /* images etc.: no text, no tokens */
        if (!text || text->type != J_STR)
            return -1;
        if (tmp->len)
            sb_putc(tmp, ' ');
        sb_put(tmp, text->str, text->len);
    }
    *s = tmp->p;
    *n = tmp->len;
    return 0;
}

static void build_success(sbuf *b, const chat_ctx *cx, uint64_t id, const char *content,
                          size_t clen, int length_cut, unsigned shape)
{
    sb_reserve(b, clen + cx->model_len + 400);
    sb_printf(b, "{\"id\":\"fwsim-%016" PRIx64 "\",\"object\":\"chat.completion\",\"created\":%ld,"
                 "\"model\":", id, (long)time(NULL));
    sb_json_str(b, cx->model, cx->model_len);
    if (shape & SH_EMPTY_CHOICES) {
        sb_puts(b, ",\"choices\":[]");
    } else {
        sb_puts(b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
        sb_json_str(b, content, clen);
        sb_printf(b, "},\"finish_reason\":\"%s\"}]", length_cut ? "length" : "stop");
    }
    if (!(shape & SH_NO_USAGE))
        sb_printf(b, ",\"usage\":{\"prompt_tokens\":%ld,\"completion_tokens\":%ld,"
                     "\"total_tokens\":%ld,\"prompt_tokens_details\":{\"cached_tokens\":%ld}}",
                  cx->prompt, cx->completion, cx->prompt + cx->completion, cx->cached);
    sb_putc(b, '}');
    if (shape & SH_MALFORMED) {
        /* cut mid-object and add junk: unmistakably not JSON */
        b->len = b->len / 2;
        sb_puts(b, ",,]} <fwsim malformed>");
    }
}

/* ------------------------------------------------------------------ */
/* response_format json_schema: a deterministic value of the schema     */
/* ------------------------------------------------------------------ */

/* A schema's answer larger than this is refused (400): bounded work. */
#define SCHEMA_ANSWER_MAX (4 * 1024 * 1024)

typedef struct schema_gen {
    sbuf *out;
    const char *text;           /* strings: the echo answer */
    size_t text_len;
    long number;                /* integers: words of the prompt; numbers + 0.5 */
    int too_big;
} schema_gen;

/* Writes a parsed JSON value back out (numbers as %.15g). */
static void sb_jnode(sbuf *b, const jnode *v)
{
    switch (v->type) {
    case J_NULL: sb_puts(b, "null"); break;
    case J_TRUE: sb_puts(b, "true"); break;
    case J_FALSE: sb_puts(b, "false"); break;
    case J_NUM: sb_printf(b, "%.15g", v->num); break;
    case J_STR: sb_json_str(b, v->str, v->len); break;
    case J_ARR:
    case J_OBJ:
        sb_putc(b, v->type == J_ARR ? '[' : '{');
        for (const jnode *c = v->child; c; c = c->next) {
            if (c != v->child)
                sb_putc(b, ',');
            if (v->type == J_OBJ) {
                sb_json_str(b, c->key, c->keylen);
                sb_putc(b, ':');
            }
            sb_jnode(b, c);
        }
        sb_putc(b, v->type == J_ARR ? ']' : '}');
        break;
    }
}

static int type_listed(const jnode *t, const char *name)
{
    if (t && t->type == J_STR)
        return strcmp(t->str, name) == 0;
    for (const jnode *c = t && t->type == J_ARR ? t->child : NULL; c; c = c->next)
        if (c->type == J_STR && strcmp(c->str, name) == 0)
            return 1;
    return 0;
}

/* The type an answer takes: the first listed other than "null" (null if
 * only null), else what the keywords suggest, else string. */
static const char *schema_type(const jnode *s)
{
    const jnode *t = jget(s, "type");
    if (t && t->type == J_STR)
        return t->str;
    for (const jnode *c = t && t->type == J_ARR ? t->child : NULL; c; c = c->next)
        if (c->type == J_STR && strcmp(c->str, "null") != 0)
            return c->str;
    if (type_listed(t, "null"))
        return "null";
    if (jget(s, "properties"))
        return "object";
    if (jget(s, "items"))
        return "array";
    return "string";
}

/* Writes a value of schema s.  skip: a property of this object to leave
 * out (json-violate).  Recursion is bounded by the parser's depth limit. */
static void schema_value(schema_gen *g, const jnode *s, const char *skip)
{
    if (g->out->len > SCHEMA_ANSWER_MAX) {
        g->too_big = 1;
        return;
    }
    if (!s || s->type != J_OBJ) {       /* true (or anything else): a string */
        if (s && s->type == J_FALSE)
            sb_puts(g->out, "null");
        else
            sb_json_str(g->out, g->text, g->text_len);
        return;
    }
    const jnode *en = jget(s, "enum");
    if (en && en->type == J_ARR && en->child) {
        sb_jnode(g->out, en->child);
        return;
    }
    const char *t = schema_type(s);
    if (strcmp(t, "object") == 0) {
        const jnode *props = jget(s, "properties");
        int first = 1;
        sb_putc(g->out, '{');
        for (const jnode *p = props && props->type == J_OBJ ? props->child : NULL; p; p = p->next) {
            if (skip && strlen(skip) == p->keylen && memcmp(skip, p->key, p->keylen) == 0)
                continue;
            if (!first)
                sb_putc(g->out, ',');
            first = 0;
            sb_json_str(g->out, p->key, p->keylen);
            sb_putc(g->out, ':');
            schema_value(g, p, NULL);
        }
        sb_putc(g->out, '}');
    } else if (strcmp(t, "array") == 0) {
        const jnode *items = jget(s, "items");
        sb_putc(g->out, '[');
        if (items)
            schema_value(g, items, NULL);
        sb_putc(g->out, ']');
    } else if (strcmp(t, "integer") == 0) {
        sb_printf(g->out, "%ld", g->number);
    } else if (strcmp(t, "number") == 0) {
        sb_printf(g->out, "%ld.5", g->number);
    } else if (strcmp(t, "boolean") == 0) {
        sb_puts(g->out, "true");
    } else if (strcmp(t, "null") == 0) {
        sb_puts(g->out, "null");
    } else {
        sb_json_str(g->out, g->text, g->text_len);
    }
}

/* The answer to a json_schema request, in g->out.  violate: an object
 * root misses its first required property; any other root gets a value
 * of a type its schema does not list. */
static void schema_answer(schema_gen *g, const jnode *schema, int violate)
{
    if (!violate) {
        schema_value(g, schema, NULL);
        return;
    }
    const jnode *req = jget(schema, "required");
    if (strcmp(schema_type(schema), "object") == 0 && req && req->type == J_ARR &&
        req->child && req->child->type == J_STR) {
        schema_value(g, schema, req->child->str);
        return;
    }
    const jnode *t = jget(schema, "type");
    if (!type_listed(t, "number"))
        sb_puts(g->out, "12345.5");
    else if (!type_listed(t, "string"))
        sb_puts(g->out, "\"fwsim: not of the schema\"");
    else if (!type_listed(t, "object"))
        sb_puts(g->out, "{}");
    else
        sb_puts(g->out, "[]");
}

/* Keeps the first max words of single-space separated text; returns 1 if
 * it cut anything. */
static int cut_words(sbuf *content, long max)
{
    long seen = 0;
    for (size_t i = 0; i < content->len; i++)
        if (content->p[i] == ' ' && ++seen == max) {
            content->len = i;
            content->p[i] = '\0';
            return 1;
        }
    return 0;
}

/* Auth, affinity, model, tier and user of a request, for every endpoint;
 * the body is parsed into jp (root may be NULL: invalid JSON). */
static jnode *request_front(chat_ctx *cx, struct MHD_Connection *conn, request_state *rq,
                            jparser *jp)
{
    static char empty_body[1] = "";
    cx->conn = conn;
    cx->path = PATH_STANDARD;
    /* auth first, as the real API does */
    cx->authorized = 1;
    if (g_api_key) {
        const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
        size_t kl = strlen(g_api_key);
        cx->authorized = auth && strncmp(auth, "Bearer ", 7) == 0 && strlen(auth + 7) == kl &&
                         memcmp(auth + 7, g_api_key, kl) == 0;
    }
    cx->affinity = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "x-session-affinity");
    if (cx->affinity)
        cx->affinity_len = strlen(cx->affinity);
    if (rq->too_large)
        return NULL;
    jnode *root = json_parse(jp, rq->body.p ? rq->body.p : empty_body, rq->body.len);

    /* pick up what the log wants even when the request turns out invalid */
    const jnode *model = jget(root, "model");
    if (model && model->type == J_STR) {
        cx->model = model->str;
        cx->model_len = model->len;
        if (strncmp(cx->model, "accounts/fireworks/routers/", 27) == 0)
            cx->path = PATH_FAST;
    }
    const jnode *tier = jget(root, "service_tier");
    if (tier && tier->type == J_STR) {
        cx->tier = tier->str;
        cx->tier_len = tier->len;
        if (cx->path != PATH_FAST && strcmp(cx->tier, "priority") == 0)
            cx->path = PATH_PRIORITY;
    }
    const jnode *user = jget(root, "user");
    if (user && user->type == J_STR) {
        cx->user = user->str;
        cx->user_len = user->len;
    }
    return root;
}

/* Error faults answer before any admission or latency: returns 1 (and
 * *ret) when f made the answer. */
static int answer_error_fault(chat_ctx *cx, const fault_set *f, enum MHD_Result *ret)
{
    struct MHD_Connection *conn = cx->conn;
    switch (f->error) {
    case F_OVERLOAD:
        if (cx->path != PATH_STANDARD)
            return 0;
        /* fall through */
    case F_OVERLOAD_ALL:
        *ret = chat_error(cx, 503, "service_overloaded", MSG_OVERLOADED, 0);
        return 1;
    case F_UNAVAILABLE:
        *ret = chat_error(cx, 503, "service_unavailable", "Service Unavailable", 0);
        return 1;
    case F_STATUS:
        *ret = chat_error(cx, (unsigned)f->status, error_type_for(f->status),
                          default_message_for(f->status), f->status == 429 ? 1 : 0);
        return 1;
    case F_RATELIMIT:
        *ret = chat_error(cx, 429, "rate_limit_exceeded",
                          "Too many requests: account rate limit exceeded", f->retry_after);
        return 1;
    case F_HANG:
        sleep_watch(conn, HANG_MAX_MS);
        record(cx, 499, OUT_OTHER);
        *ret = MHD_NO;
        return 1;
    case F_HTML: {
        static const char html[] = "<html><body><h1>502 Bad Gateway</h1></body></html>";
        sbuf b = {0};
        sb_puts(&b, html);
        record(cx, 502, OUT_OTHER);
        *ret = queue_owned(conn, 502, &b, "text/html", NULL);
        return 1;
    }
    default:
        return 0;
    }
}

/* Sends a 200 body (streamed for trickle/reset/truncated) with the usage,
 * id and rate-limit headers, and records it. */
static enum MHD_Result send_answer(chat_ctx *cx, sbuf *body, unsigned shape, long trickle_ms,
                                   const char *ctype, uint64_t id, const sim_config *cfg)
{
    struct MHD_Connection *conn = cx->conn;
    struct MHD_Response *r;
    enum MHD_Result ret;
    if (shape & (SH_TRICKLE | SH_RESET | SH_TRUNCATED)) {
        stream_body *sbd = xmalloc(sizeof *sbd);
        sbd->data = body->p;
        sbd->len = body->len;
        sbd->shape = shape;
        sbd->fd = connection_fd(conn);
        sbd->conn = conn;
        sbd->piece_ms = trickle_ms > 0 ? trickle_ms / 20 : 50;
        body->p = NULL;
        /* reset: unknown size -> chunked; the others announce the full length */
        uint64_t size = (shape & SH_RESET) && !(shape & SH_TRUNCATED) ? MHD_SIZE_UNKNOWN : sbd->len;
        r = MHD_create_response_from_callback(size, 4096, stream_reader, sbd, stream_free);
        if (!r) {
            stream_free(sbd);
            return MHD_NO;
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    } else if (queue_owned(conn, 200, body, ctype, &r) != MHD_YES) {
        return MHD_NO;
    }
    char num[32], idhdr[40];
    snprintf(num, sizeof num, "%ld", cx->prompt);
    MHD_add_response_header(r, "fireworks-prompt-tokens", num);
    snprintf(num, sizeof num, "%ld", cx->cached);
    MHD_add_response_header(r, "fireworks-cached-prompt-tokens", num);
    snprintf(idhdr, sizeof idhdr, "fwsim-%016" PRIx64, id);
    MHD_add_response_header(r, "x-request-id", idhdr);
    snprintf(cx->request_id, sizeof cx->request_id, "%s", idhdr);
    if (cfg->prompt_tpm || cfg->uncached_prompt_tpm || cfg->generated_tpm) {
        long v[3] = {cfg->prompt_tpm, cfg->uncached_prompt_tpm, cfg->generated_tpm};
        static const char *const names[3] = {"X-Ratelimit-Limit-Tokens-Prompt",
                                             "X-Ratelimit-Limit-Tokens-Cache-Adjusted-Prompt",
                                             "X-Ratelimit-Limit-Tokens-Generated"};
        for (int i = 0; i < 3; i++) {
            if (!v[i])
                continue;   /* unlimited dimension: no header */
            snprintf(num, sizeof num, "%ld", v[i] / 60 > 0 ? v[i] / 60 : 1);
            MHD_add_response_header(r, names[i], num);
        }
    }
    record(cx, 200, OUT_OK);
    ret = MHD_queue_response(conn, 200, r);
    MHD_destroy_response(r);
    return ret;
}

static uint64_t g_id_seq;

static enum MHD_Result handle_chat(struct MHD_Connection *conn, request_state *rq)
{
    chat_ctx cx = {0};
    char errbuf[160];

    jparser jp;
    memset(&jp, 0, sizeof jp);
    jnode *root = request_front(&cx, conn, rq, &jp);
    if (rq->too_large)
        return chat_error(&cx, 413, "request_too_large", "Request body too large", 0);

    sbuf tmp = {0}, clean = {0};
    u64vec words = {0};
    enum MHD_Result ret;
    const jnode *tier = jget(root, "service_tier");
    const jnode *user = jget(root, "user");

    if (!cx.authorized) {
        ret = chat_error(&cx, 401, "authentication_error", "Unauthorized: invalid or missing API key", 0);
        goto out;
    }
    if (!root) {
        snprintf(errbuf, sizeof errbuf, "invalid JSON body: %s", jp.err ? jp.err : "parse error");
        ret = chat_error(&cx, 400, "invalid_request_error", errbuf, 0);
        goto out;
    }
#define BAD_REQUEST(msg) do { ret = chat_error(&cx, 400, "invalid_request_error", (msg), 0); goto out; } while (0)
    if (root->type != J_OBJ)
        BAD_REQUEST("request body must be a JSON object");
    if (!cx.model || cx.model_len == 0)
        BAD_REQUEST("\"model\" is required and must be a string");
    const jnode *messages = jget(root, "messages");
    if (!messages || messages->type != J_ARR || !messages->child)
        BAD_REQUEST("\"messages\" is required and must be a non-empty array");
    const jnode *stream = jget(root, "stream");
    if (stream && stream->type == J_TRUE)
        BAD_REQUEST("streaming not supported by fwsim");
    if (tier && tier->type != J_NULL) {
        if (tier->type != J_STR || (strcmp(tier->str, "priority") != 0 &&
                                    strcmp(tier->str, "default") != 0 && strcmp(tier->str, "auto") != 0))
            BAD_REQUEST("invalid service_tier: expected \"priority\", \"default\" or \"auto\"");
        if (cx.path == PATH_FAST && strcmp(tier->str, "priority") == 0)
            BAD_REQUEST("service_tier priority cannot be combined with a Fast (routers) model");
    }
    if (strncmp(cx.model, "accounts/fireworks/models/", 26) != 0 &&
        strncmp(cx.model, "accounts/fireworks/routers/", 27) != 0) {
        ret = chat_error(&cx, 404, "not_found", "Model not found, inaccessible, and/or not deployed", 0);
        goto out;
    }
    if ((cx.path == PATH_FAST && cx.model_len == 27) || (cx.path != PATH_FAST && cx.model_len == 26)) {
        ret = chat_error(&cx, 404, "not_found", "Model not found, inaccessible, and/or not deployed", 0);
        goto out;
    }
    long max_tokens = -1;
    const jnode *mt = jget(root, "max_tokens");
    if (mt && mt->type != J_NULL) {
        if (!jis_int(mt, 1, 1e9))
            BAD_REQUEST("max_tokens must be a positive integer");
        max_tokens = (long)mt->num;
    }
    const jnode *temp = jget(root, "temperature");
    if (temp && temp->type != J_NULL && (temp->type != J_NUM || temp->num < 0 || temp->num > 2))
        BAD_REQUEST("temperature must be a number between 0 and 2");
    if (user && user->type != J_NULL && user->type != J_STR)
        BAD_REQUEST("user must be a string");
    const jnode *rf = jget(root, "response_format");
    if (rf && rf->type != J_NULL && rf->type != J_OBJ)
        BAD_REQUEST("response_format must be an object");
    const jnode *rf_schema = NULL;      /* json_schema: the answer is a value of it */
    const jnode *rf_type = jget(rf, "type");
    if (rf_type && rf_type->type == J_STR && strcmp(rf_type->str, "json_schema") == 0) {
        const jnode *js = jget(rf, "json_schema");
        const jnode *name = jget(js, "name");
        rf_schema = jget(js, "schema");
        if (!js || js->type != J_OBJ || !name || name->type != J_STR || !name->len)
            BAD_REQUEST("response_format json_schema needs json_schema.name (a string)");
        if (!rf_schema || rf_schema->type != J_OBJ)
            BAD_REQUEST("response_format json_schema needs json_schema.schema (an object)");
    }

    /* prompt tokens, the last user message, and (when cached) word hashes */
    const char *cache_key = cx.affinity ? cx.affinity : cx.user;
    size_t cache_key_len = cx.affinity ? cx.affinity_len : cx.user_len;
    const char *last_user = NULL;
    size_t last_user_len = 0;
    sbuf last_user_buf = {0};
    for (const jnode *m = messages->child; m; m = m->next) {
        const jnode *role = m->type == J_OBJ ? jget(m, "role") : NULL;
        if (!role || role->type != J_STR) {
            free(last_user_buf.p);
            BAD_REQUEST("each message needs a string \"role\"");
        }
        const char *s;
        size_t n;
        if (content_text(jget(m, "content"), &tmp, &s, &n)) {
            free(last_user_buf.p);
            BAD_REQUEST("message content must be a string or an array of text parts");
        }
        cx.prompt += count_words(s, n) + 3;
        if (cache_key)
            hash_words(&words, s, n);
        if (strcmp(role->str, "user") == 0) {
            last_user_buf.len = 0;
            sb_put(&last_user_buf, s, n);   /* tmp is reused by the next message */
            last_user = last_user_buf.p;
            last_user_len = last_user_buf.len;
        }
    }

    fault_set f;
    fault_set_init(&f);
    const char *derr = scan_directives(last_user ? last_user : "", last_user_len, &clean, &f,
                                       errbuf, sizeof errbuf);
    free(last_user_buf.p);
    if (derr)
        BAD_REQUEST(derr);
    rules_apply(cx.model, cx.model_len, cx.path, &f);

    if (f.slow_ms > 0 && sleep_watch(conn, (double)f.slow_ms) < 0) {
        record(&cx, 499, OUT_OTHER);
        ret = MHD_NO;
        goto out;
    }

    if (answer_error_fault(&cx, &f, &ret))
        goto out;

    /* the answer text */
    sbuf content = {0};
    int length_cut = 0;
    if (f.shape & SH_HUGE) {
        static const char lorem[] = "lorem ipsum dolor sit amet ";
        sb_reserve(&content, (size_t)f.huge_bytes);
        for (long i = 0; i < f.huge_bytes; i++)
            content.p[i] = lorem[i % (sizeof lorem - 1)];
        content.len = (size_t)f.huge_bytes;
        if (content.p[content.len - 1] == ' ')
            content.p[content.len - 1] = 'x';
        content.p[content.len] = '\0';
        cx.completion = count_words(content.p, content.len);
    } else if (f.words >= 0) {
        long want = f.words + 1;
        if (max_tokens > 0 && max_tokens < want) {
            want = max_tokens;
            length_cut = 1;
        }
        sb_puts(&content, "Echo:");
        for (long i = 1; i < want; i++)
            sb_printf(&content, " w%ld", i);
        cx.completion = want;
    } else {
        sb_puts(&content, "Echo:");
        if (clean.len) {
            sb_putc(&content, ' ');
            sb_put(&content, clean.p, clean.len);
        }
        cx.completion = count_words(content.p, content.len);
        if (max_tokens > 0 && max_tokens < cx.completion) {
            /* words are single-space separated: cut before word max_tokens+1 */
            cut_words(&content, max_tokens);
            cx.completion = max_tokens;
            length_cut = 1;
        }
    }

    /* json_schema: the answer is a value of the schema, not the echo */
    if (rf_schema) {
        sbuf json = {0}, echo = {0};
        sb_puts(&echo, "Echo:");        /* the whole echo: max_tokens cuts the JSON */
        if (clean.len) {
            sb_putc(&echo, ' ');
            sb_put(&echo, clean.p, clean.len);
        }
        schema_gen g = {&json, echo.p, echo.len, count_words(clean.p ? clean.p : "", clean.len), 0};
        if (f.shape & SH_JSON_INVALID)
            sb_puts(&json, "Sure! Here is the JSON you asked for: ");
        schema_answer(&g, rf_schema, (f.shape & SH_JSON_VIOLATE) != 0);
        free(echo.p);
        free(content.p);
        if (g.too_big) {
            free(json.p);
            BAD_REQUEST("fwsim: the schema's answer would exceed 4 MiB");
        }
        content = json;
        length_cut = 0;
        cx.completion = count_words(content.p, content.len);
        if (max_tokens > 0 && max_tokens < cx.completion) {
            cut_words(&content, max_tokens);
            cx.completion = max_tokens;
            length_cut = 1;
        }
    }
    if ((f.shape & SH_JSON_CUT) && content.len > 1) {
        /* half the answer, cut between UTF-8 characters, as max_tokens would */
        size_t half = content.len / 2;
        while (half > 0 && ((unsigned char)content.p[half] & 0xC0) == 0x80)
            half--;
        content.len = half;
        content.p[half] = '\0';
        cx.completion = count_words(content.p, content.len);
        length_cut = 1;
    }

    /* admission: prompt cache peek, rate limits, congestion */
    sim_config cfg = config_snapshot();
    if (cache_key)
        cx.cached = cache_peek(cache_key, cache_key_len, &words);
    pthread_mutex_lock(&g_pool_lock);
    model_pool *pool = pool_get_locked(cx.model, cx.model_len, cx.path == PATH_FAST);
    pthread_mutex_unlock(&g_pool_lock);
    if (!pool) {
        free(content.p);
        ret = chat_error(&cx, 503, "service_unavailable", "Service Unavailable: fwsim model table full", 0);
        goto out;
    }
    long retry_after = 0;
    enum admit adm = pool_admit(pool, cx.path, &cfg, cx.prompt, cx.cached, &retry_after);
    if (adm != ADMIT_OK) {
        cx.cached = cx.completion = 0;     /* nothing served, nothing billed */
        free(content.p);
        if (adm == ADMIT_RATE_LIMITED)
            ret = chat_error(&cx, 429, "rate_limit_exceeded",
                             "Too many requests: account rate limit exceeded for this model "
                             "(prompt/generated tokens per minute)", retry_after);
        else
            ret = chat_error(&cx, 503, "service_overloaded", MSG_OVERLOADED, 0);
        goto out;
    }
    if (cache_key)
        cache_store(cache_key, cache_key_len, &words);

    /* simulated generation time */
    if (cfg.time_scale > 0) {
        double tps = (double)(cx.path == PATH_FAST ? cfg.tps * 2 : cfg.tps);
        long gen_words = (f.shape & SH_HUGE) ? 0 : cx.completion;
        double ms = ((double)cfg.ttft_ms + (double)gen_words * 1000.0 / tps) * cfg.time_scale;
        if (sleep_watch(conn, ms) < 0) {
            pool_release(pool, cx.path, 0);
            free(content.p);
            record(&cx, 499, OUT_OTHER);
            ret = MHD_NO;
            goto out;
        }
    }
    pool_release(pool, cx.path, cx.completion);

    uint64_t seq = __atomic_add_fetch(&g_id_seq, 1, __ATOMIC_RELAXED);
    uint64_t h = fnv1a(FNV_INIT, cx.model, cx.model_len);
    h = fnv1a(h, content.p, content.len);
    h = fnv1a(h, &max_tokens, sizeof max_tokens);
    h = fnv1a(h, &cx.prompt, sizeof cx.prompt);
    uint64_t id = mix64(h ^ mix64(seq));

    sbuf body = {0};
    const char *ctype = "application/json";
    if (f.shape & SH_HTML200) {
        sb_puts(&body, "<html><head><title>fwsim</title></head><body><h1>Welcome</h1>"
                       "<p>This is not the API you are looking for.</p></body></html>");
        ctype = "text/html";
    } else {
        build_success(&body, &cx, id, content.p, content.len, length_cut, f.shape);
    }
    free(content.p);

    ret = send_answer(&cx, &body, f.shape, f.trickle_ms, ctype, id, &cfg);
#undef BAD_REQUEST
out:
    free(tmp.p);
    free(clean.p);
    free(words.v);
    jp_free(&jp);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Embeddings and rerank                                                */
/* ------------------------------------------------------------------ */

/* Native dimensions of an embedding model, by its name. */
static long embed_native_dims(const char *m)
{
    if (strstr(m, "nomic")) return 768;
    if (strstr(m, "0p6b")) return 1024;
    if (strstr(m, "4b")) return 2560;
    if (strstr(m, "8b")) return 4096;
    return 1024;
}

/* "accounts/fireworks/models/NAME" or "fireworks/NAME", NAME containing
 * want ("embed" or "rerank"); a Fast router id never serves these. */
static int typed_model_ok(const chat_ctx *cx, const char *want)
{
    if (cx->path == PATH_FAST)
        return 0;
    const char *name = NULL;
    if (strncmp(cx->model, "accounts/fireworks/models/", 26) == 0)
        name = cx->model + 26;
    else if (strncmp(cx->model, "fireworks/", 10) == 0)
        name = cx->model + 10;
    return name && *name && strstr(name, want) != NULL;
}

/* A deterministic unit vector of dims numbers seeded by model and text:
 * the first k numbers of a longer vector are the same (renormalized), as
 * with Matryoshka models asked for fewer dimensions. */
static void unit_vector(float *out, long dims, const chat_ctx *cx, const char *s, size_t n)
{
    uint64_t h = fnv1a(fnv1a(FNV_INIT, cx->model, cx->model_len), s, n);
    double norm = 0;
    for (long i = 0; i < dims; i++) {
        uint64_t x = mix64(h + (uint64_t)i * 0x9E3779B97F4A7C15ULL);
        double v = ((double)(x >> 11) / 9007199254740992.0) * 2.0 - 1.0;
        out[i] = (float)v;
        norm += v * v;
    }
    norm = sqrt(norm);
    for (long i = 0; i < dims && norm > 0; i++)
        out[i] = (float)(out[i] / norm);
}

/* A number in [-1, 1] as fixed point with 7 decimals ("-0.1234567"):
 * printf would cost the simulator more CPU than the client it tests. */
static void sb_unit(sbuf *b, float v)
{
    long q = lrint((double)v * 1e7);
    char tmp[16], *w = tmp + sizeof tmp;
    int neg = q < 0;
    if (neg) q = -q;
    for (int i = 0; i < 7; i++) {
        *--w = (char)('0' + q % 10);
        q /= 10;
    }
    *--w = '.';
    do {
        *--w = (char)('0' + q % 10);
        q /= 10;
    } while (q);
    if (neg) *--w = '-';
    sb_put(b, w, (size_t)(tmp + sizeof tmp - w));
}

static void sb_base64(sbuf *b, const unsigned char *p, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    sb_reserve(b, (n + 2) / 3 * 4 + 2);
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)p[i] << 16 | (i + 1 < n ? (unsigned)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        sb_putc(b, tab[v >> 18 & 63]);
        sb_putc(b, tab[v >> 12 & 63]);
        sb_putc(b, i + 1 < n ? tab[v >> 6 & 63] : '=');
        sb_putc(b, i + 2 < n ? tab[v & 63] : '=');
    }
}

typedef struct rerank_hit { long index; double score; } rerank_hit;

static int hit_cmp(const void *a, const void *b)
{
    const rerank_hit *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

#define TYPED_MAX_ITEMS 2048

/* POST /embeddings and POST /rerank: the chat admission order (auth, 413,
 * validation, directives and rules, 429, 503 shedding, latency), with a
 * latency of ttft_ms (nothing is generated) and prompt tokens only. */
static enum MHD_Result handle_typed(struct MHD_Connection *conn, request_state *rq, int rerank)
{
    chat_ctx cx = {0};
    char errbuf[160];
    jparser jp;
    memset(&jp, 0, sizeof jp);
    jnode *root = request_front(&cx, conn, rq, &jp);
    if (rq->too_large)
        return chat_error(&cx, 413, "request_too_large", "Request body too large", 0);

    enum MHD_Result ret;
    sbuf clean = {0}, body = {0};
    float *vec = NULL;
    rerank_hit *hits = NULL;
    u64vec qwords = {0}, dwords = {0};
    const jnode *items[TYPED_MAX_ITEMS];
    long nitems = 0;
    fault_set f;
    fault_set_init(&f);

#define BAD_REQUEST(msg) do { ret = chat_error(&cx, 400, "invalid_request_error", (msg), 0); goto out; } while (0)
    if (!cx.authorized) {
        ret = chat_error(&cx, 401, "authentication_error", "Unauthorized: invalid or missing API key", 0);
        goto out;
    }
    if (!root) {
        snprintf(errbuf, sizeof errbuf, "invalid JSON body: %s", jp.err ? jp.err : "parse error");
        BAD_REQUEST(errbuf);
    }
    if (root->type != J_OBJ)
        BAD_REQUEST("request body must be a JSON object");
    if (!cx.model || cx.model_len == 0)
        BAD_REQUEST("\"model\" is required and must be a string");
    const jnode *tier = jget(root, "service_tier");
    if (tier && tier->type != J_NULL &&
        (tier->type != J_STR || (strcmp(tier->str, "priority") != 0 &&
                                 strcmp(tier->str, "default") != 0 && strcmp(tier->str, "auto") != 0)))
        BAD_REQUEST("invalid service_tier: expected \"priority\", \"default\" or \"auto\"");
    if (!typed_model_ok(&cx, rerank ? "rerank" : "embed")) {
        ret = chat_error(&cx, 404, "not_found", rerank ? "Model not found or not a rerank model"
                                                       : "Model not found or not an embedding model", 0);
        goto out;
    }

    /* the texts: input (embeddings) or query + documents (rerank) */
    const jnode *query = NULL;
    long dims = embed_native_dims(cx.model), top_n = -1;
    int b64 = 0, return_documents = 0;
    const jnode *list = jget(root, rerank ? "documents" : "input");
    if (rerank) {
        query = jget(root, "query");
        if (!query || query->type != J_STR)
            BAD_REQUEST("\"query\" is required and must be a string");
        const jnode *tn = jget(root, "top_n");
        if (tn && tn->type != J_NULL) {
            if (!jis_int(tn, 1, 1e9))
                BAD_REQUEST("top_n must be a positive integer");
            top_n = (long)tn->num;
        }
        const jnode *rd = jget(root, "return_documents");
        return_documents = rd && rd->type == J_TRUE;
    } else {
        const jnode *d = jget(root, "dimensions");
        if (d && d->type != J_NULL) {
            if (!jis_int(d, 1, (double)dims))
                BAD_REQUEST("dimensions must be an integer between 1 and the model's dimensions");
            dims = (long)d->num;
        }
        const jnode *ef = jget(root, "encoding_format");
        if (ef && ef->type != J_NULL) {
            if (ef->type != J_STR || (strcmp(ef->str, "float") != 0 && strcmp(ef->str, "base64") != 0))
                BAD_REQUEST("encoding_format must be \"float\" or \"base64\"");
            b64 = strcmp(ef->str, "base64") == 0;
        }
    }
    if (list && list->type == J_STR && !rerank) {
        items[nitems++] = list;
    } else if (list && list->type == J_ARR && list->child) {
        for (const jnode *e = list->child; e; e = e->next) {
            if (e->type != J_STR)
                BAD_REQUEST(rerank ? "documents must be strings" : "fwsim takes string inputs only");
            if (nitems == TYPED_MAX_ITEMS)
                BAD_REQUEST("at most 2048 items per request");
            items[nitems++] = e;
        }
    } else {
        BAD_REQUEST(rerank ? "\"documents\" is required and must be a non-empty array"
                           : "\"input\" is required: a string or a non-empty array of strings");
    }

    /* tokens (words) and directives: in every input, or in the query */
    for (long i = 0; i < nitems; i++)
        cx.prompt += count_words(items[i]->str, items[i]->len);
    if (rerank)
        cx.prompt += count_words(query->str, query->len) * nitems;
    for (long i = 0; i < (rerank ? 1 : nitems); i++) {
        const jnode *t = rerank ? query : items[i];
        clean.len = 0;
        const char *derr = scan_directives(t->str, t->len, &clean, &f, errbuf, sizeof errbuf);
        if (derr)
            BAD_REQUEST(derr);
    }
    rules_apply(cx.model, cx.model_len, cx.path, &f);
    if (f.slow_ms > 0 && sleep_watch(conn, (double)f.slow_ms) < 0) {
        record(&cx, 499, OUT_OTHER);
        ret = MHD_NO;
        goto out;
    }
    if (answer_error_fault(&cx, &f, &ret))
        goto out;

    /* admission: rate limits, congestion (as chat, nothing generated) */
    sim_config cfg = config_snapshot();
    pthread_mutex_lock(&g_pool_lock);
    model_pool *pool = pool_get_locked(cx.model, cx.model_len, 0);
    pthread_mutex_unlock(&g_pool_lock);
    if (!pool) {
        ret = chat_error(&cx, 503, "service_unavailable", "Service Unavailable: fwsim model table full", 0);
        goto out;
    }
    long retry_after = 0;
    enum admit adm = pool_admit(pool, cx.path, &cfg, cx.prompt, 0, &retry_after);
    if (adm != ADMIT_OK) {
        if (adm == ADMIT_RATE_LIMITED)
            ret = chat_error(&cx, 429, "rate_limit_exceeded",
                             "Too many requests: account rate limit exceeded for this model "
                             "(prompt tokens per minute)", retry_after);
        else
            ret = chat_error(&cx, 503, "service_overloaded", MSG_OVERLOADED, 0);
        goto out;
    }
    if (cfg.time_scale > 0 && sleep_watch(conn, (double)cfg.ttft_ms * cfg.time_scale) < 0) {
        pool_release(pool, cx.path, 0);
        record(&cx, 499, OUT_OTHER);
        ret = MHD_NO;
        goto out;
    }
    pool_release(pool, cx.path, 0);

    uint64_t seq = __atomic_add_fetch(&g_id_seq, 1, __ATOMIC_RELAXED);
    uint64_t id = mix64(fnv1a(FNV_INIT, cx.model, cx.model_len) ^ mix64(seq));
    const char *ctype = "application/json";
    unsigned sh = f.shape;
    long shown = nitems - ((sh & SH_DROP_ITEM) && nitems > 0 ? 1 : 0);

    if (sh & SH_HTML200) {
        sb_puts(&body, "<html><head><title>fwsim</title></head><body><h1>Welcome</h1>"
                       "<p>This is not the API you are looking for.</p></body></html>");
        ctype = "text/html";
        goto send;
    }
    sb_puts(&body, "{\"object\":\"list\",\"model\":");
    sb_json_str(&body, cx.model, cx.model_len);
    sb_puts(&body, ",\"data\":[");
    if (sh & SH_EMPTY_CHOICES)
        shown = 0;
    if (rerank) {
        hash_words(&qwords, query->str, query->len);
        hits = xmalloc(sizeof *hits * (size_t)nitems);
        for (long i = 0; i < nitems; i++) {
            /* token overlap: query words found in the document, over query words + 1 */
            dwords.n = 0;
            hash_words(&dwords, items[i]->str, items[i]->len);
            long common = 0;
            for (size_t q = 0; q < qwords.n; q++)
                for (size_t d = 0; d < dwords.n; d++)
                    if (qwords.v[q] == dwords.v[d]) {
                        common++;
                        break;
                    }
            hits[i].index = i;
            hits[i].score = (double)common / (double)(qwords.n + 1);
        }
        qsort(hits, (size_t)nitems, sizeof *hits, hit_cmp);
        if (top_n > 0 && top_n < shown)
            shown = top_n;
    } else {
        vec = xmalloc(sizeof *vec * (size_t)dims);
    }
    for (long k = 0; k < shown; k++) {
        long index = rerank ? hits[k].index : k;
        if ((sh & SH_DUP_INDEX) && k == 1)
            index = rerank ? hits[0].index : 0;
        if ((sh & SH_BAD_INDEX) && k == 0)
            index = nitems;
        if (k)
            sb_putc(&body, ',');
        if (rerank) {
            sb_printf(&body, "{\"index\":%ld,\"relevance_score\":", index);
            if ((sh & SH_OVERFLOW) && k == 0)
                sb_puts(&body, "1e999");
            else
                sb_printf(&body, "%.6f", hits[k].score);
            if (return_documents) {
                sb_puts(&body, ",\"document\":{\"text\":");
                sb_json_str(&body, items[hits[k].index]->str, items[hits[k].index]->len);
                sb_putc(&body, '}');
            }
            sb_putc(&body, '}');
            continue;
        }
        long d = dims - ((sh & SH_RAGGED) && k == shown - 1 && dims > 1 ? 1 : 0);
        unit_vector(vec, d, &cx, items[k]->str, items[k]->len);
        sb_printf(&body, "{\"object\":\"embedding\",\"index\":%ld,\"embedding\":", index);
        if (b64) {
            sb_putc(&body, '"');
            sb_base64(&body, (const unsigned char *)vec, sizeof *vec * (size_t)d);
            sb_putc(&body, '"');
        } else {
            sb_putc(&body, '[');
            for (long i = 0; i < d; i++) {
                if (i)
                    sb_putc(&body, ',');
                if ((sh & SH_OVERFLOW) && k == 0 && i == 0)
                    sb_puts(&body, "1e999");
                else
                    sb_unit(&body, vec[i]);
            }
            sb_putc(&body, ']');
        }
        sb_putc(&body, '}');
    }
    sb_putc(&body, ']');
    if (!(sh & SH_NO_USAGE))
        sb_printf(&body, ",\"usage\":{\"prompt_tokens\":%ld,\"total_tokens\":%ld}", cx.prompt, cx.prompt);
    sb_putc(&body, '}');
    if (sh & SH_MALFORMED) {
        body.len = body.len / 2;
        sb_puts(&body, ",,]} <fwsim malformed>");
    }
send:
    ret = send_answer(&cx, &body, sh, f.trickle_ms, ctype, id, &cfg);
#undef BAD_REQUEST
out:
    free(clean.p);
    free(body.p);
    free(vec);
    free(hits);
    free(qwords.v);
    free(dwords.v);
    jp_free(&jp);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Control API                                                          */
/* ------------------------------------------------------------------ */

static void stats_reset(void)
{
    for (int p = 0; p < PATH_COUNT; p++)
        for (int o = 0; o < OUT_COUNT; o++)
            __atomic_store_n(&g_stats.outcomes[p][o], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_stats.tok_prompt, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_stats.tok_cached, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_stats.tok_completion, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_stats.peak, __atomic_load_n(&g_stats.in_flight, __ATOMIC_RELAXED),
                     __ATOMIC_RELAXED);
}

static long stats_total(void)
{
    long t = 0;
    for (int p = 0; p < PATH_COUNT; p++)
        for (int o = 0; o < OUT_COUNT; o++)
            t += __atomic_load_n(&g_stats.outcomes[p][o], __ATOMIC_RELAXED);
    return t;
}

static void config_json(sbuf *b, const sim_config *c)
{
    sb_printf(b, "{\"time_scale\":%g,\"ttft_ms\":%ld,\"tps\":%ld,\"capacity\":%ld,"
                 "\"fast_capacity\":%ld,\"prompt_tpm\":%ld,\"uncached_prompt_tpm\":%ld,"
                 "\"generated_tpm\":%ld}",
              c->time_scale, c->ttft_ms, c->tps, c->capacity, c->fast_capacity, c->prompt_tpm,
              c->uncached_prompt_tpm, c->generated_tpm);
}

static enum MHD_Result control_bad(struct MHD_Connection *c, const char *msg)
{
    return send_error(c, 400, "invalid_request_error", msg, 0);
}

static enum MHD_Result control_ok(struct MHD_Connection *c)
{
    sbuf b = {0};
    sb_puts(&b, "{\"ok\":true}");
    return send_json(c, 200, &b);
}

static int path_from_name(const char *s)
{
    for (int i = 0; i < PATH_COUNT; i++)
        if (strcmp(s, path_names[i]) == 0)
            return i;
    return strcmp(s, "any") == 0 ? -1 : -2;
}

static enum MHD_Result control_rules(struct MHD_Connection *c, jnode *o)
{
    const jnode *fault = jget(o, "fault");
    if (!fault || fault->type != J_STR)
        return control_bad(c, "\"fault\" is required (e.g. \"overloaded\", \"unavailable\")");
    const fault_spec *sp = find_fault(fault->str, fault->len);
    if (!sp)
        return control_bad(c, "unknown fault name");
    rule r = {0};
    r.kind = sp->kind;
    r.path = sp->kind == F_OVERLOAD ? PATH_STANDARD : -1;
    r.count = 1;
    /* the argument comes from the field that fits the fault */
    const char *argfield = sp->kind == F_STATUS ? "status" : sp->kind == F_RATELIMIT ? "retry_after"
                         : sp->kind == F_SLOW ? "ms" : sp->kind == F_HUGE ? "bytes"
                         : sp->kind == F_WORDS ? "words" : NULL;
    const jnode *arg = argfield ? jget(o, argfield) : NULL;
    if (sp->kind == F_SLOW && !arg)
        arg = jget(o, "delay_ms");
    if (arg && arg->type != J_NULL) {
        if (!jis_int(arg, (double)sp->lo, (double)sp->hi))
            return control_bad(c, "fault argument out of range");
        r.arg = (long)arg->num;
        r.has_arg = 1;
    } else if (sp->arg == 2) {
        return control_bad(c, "this fault needs its argument (status / ms / bytes / words)");
    }
    const jnode *path = jget(o, "path");
    if (path && path->type != J_NULL) {
        int p = path->type == J_STR ? path_from_name(path->str) : -2;
        if (p == -2)
            return control_bad(c, "\"path\" must be standard, priority, fast or any");
        r.path = p;
    }
    const jnode *dur = jget(o, "duration_ms");
    const jnode *count = jget(o, "count");
    if (dur && dur->type != J_NULL) {
        if (!jis_int(dur, 1, 86400000))
            return control_bad(c, "\"duration_ms\" must be a positive integer");
        r.until = now_ms() + (int64_t)dur->num;
        r.count = -1;
    }
    if (count && count->type != J_NULL) {
        if (!jis_int(count, 1, 1e12))
            return control_bad(c, "\"count\" must be a positive integer");
        r.count = (long)count->num;
    }
    const jnode *model = jget(o, "model");
    if (model && model->type != J_NULL) {
        if (model->type != J_STR)
            return control_bad(c, "\"model\" must be a string");
        r.model = xmalloc(model->len + 1);
        memcpy(r.model, model->str, model->len + 1);
    }
    pthread_mutex_lock(&g_rule_lock);
    int idx = g_rule_count;
    if (idx < MAX_RULES) {
        g_rules[g_rule_count++] = r;
        __atomic_store_n(&g_rules_active, 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&g_rule_lock);
    if (idx >= MAX_RULES) {
        free(r.model);
        return control_bad(c, "too many rules; POST /control/reset first");
    }
    sbuf b = {0};
    sb_printf(&b, "{\"ok\":true,\"rule\":%d}", idx);
    return send_json(c, 200, &b);
}

static enum MHD_Result control_load(struct MHD_Connection *c, jnode *o)
{
    const jnode *model = jget(o, "model"), *load = jget(o, "load"), *dur = jget(o, "duration_ms");
    if (!model || model->type != J_STR || model->len == 0)
        return control_bad(c, "\"model\" is required");
    if (!jis_int(load, 0, 1e9))
        return control_bad(c, "\"load\" must be a non-negative integer");
    if (!jis_int(dur, 1, 86400000))
        return control_bad(c, "\"duration_ms\" must be a positive integer");
    if (pool_add_load(model->str, model->len, (long)load->num, (int64_t)dur->num))
        return control_bad(c, "too many models");
    return control_ok(c);
}

typedef struct cfg_field {
    const char *name;
    int is_double;
    long lo, hi;                /* integers; time_scale is 0..1000 */
    size_t off;
} cfg_field;

static const cfg_field cfg_fields[] = {
    {"time_scale", 1, 0, 1000, offsetof(sim_config, time_scale)},
    {"ttft_ms", 0, 0, 3600000, offsetof(sim_config, ttft_ms)},
    {"tps", 0, 1, 1000000000, offsetof(sim_config, tps)},
    {"capacity", 0, 1, 1000000000, offsetof(sim_config, capacity)},
    {"fast_capacity", 0, 1, 1000000000, offsetof(sim_config, fast_capacity)},
    {"prompt_tpm", 0, 0, 1000000000000L, offsetof(sim_config, prompt_tpm)},
    {"uncached_prompt_tpm", 0, 0, 1000000000000L, offsetof(sim_config, uncached_prompt_tpm)},
    {"generated_tpm", 0, 0, 1000000000000L, offsetof(sim_config, generated_tpm)},
};

static enum MHD_Result control_config(struct MHD_Connection *c, jnode *o, int is_get)
{
    sim_config next = config_snapshot();
    if (!is_get) {
        for (const jnode *m = o->child; m; m = m->next) {
            const cfg_field *fd = NULL;
            for (size_t i = 0; i < sizeof cfg_fields / sizeof cfg_fields[0]; i++)
                if (strcmp(cfg_fields[i].name, m->key) == 0)
                    fd = &cfg_fields[i];
            if (!fd)
                return control_bad(c, "unknown config field");
            if (fd->is_double) {
                if (m->type != J_NUM || !(m->num >= 0 && m->num <= 1000))
                    return control_bad(c, "time_scale must be a number between 0 and 1000");
                *(double *)((char *)&next + fd->off) = m->num;
            } else {
                if (!jis_int(m, (double)fd->lo, (double)fd->hi))
                    return control_bad(c, "config value must be an integer in range");
                *(long *)((char *)&next + fd->off) = (long)m->num;
            }
        }
        pthread_mutex_lock(&g_cfg_lock);
        g_cfg = next;
        pthread_mutex_unlock(&g_cfg_lock);
    }
    sbuf b = {0};
    sb_puts(&b, "{\"ok\":true,\"config\":");
    config_json(&b, &next);
    sb_putc(&b, '}');
    return send_json(c, 200, &b);
}

static enum MHD_Result control_stats(struct MHD_Connection *c)
{
    sbuf b = {0};
    sb_printf(&b, "{\"total\":%ld,\"in_flight\":%ld,\"peak_in_flight\":%ld,\"paths\":{", stats_total(),
              __atomic_load_n(&g_stats.in_flight, __ATOMIC_RELAXED),
              __atomic_load_n(&g_stats.peak, __ATOMIC_RELAXED));
    for (int p = 0; p < PATH_COUNT; p++) {
        sb_printf(&b, "%s\"%s\":{", p ? "," : "", path_names[p]);
        for (int o = 0; o < OUT_COUNT; o++)
            sb_printf(&b, "%s\"%s\":%ld", o ? "," : "", outcome_names[o],
                      __atomic_load_n(&g_stats.outcomes[p][o], __ATOMIC_RELAXED));
        sb_putc(&b, '}');
    }
    sb_printf(&b, "},\"tokens\":{\"prompt\":%ld,\"cached\":%ld,\"completion\":%ld}}",
              __atomic_load_n(&g_stats.tok_prompt, __ATOMIC_RELAXED),
              __atomic_load_n(&g_stats.tok_cached, __ATOMIC_RELAXED),
              __atomic_load_n(&g_stats.tok_completion, __ATOMIC_RELAXED));
    return send_json(c, 200, &b);
}

static enum MHD_Result control_log(struct MHD_Connection *c)
{
    long limit = 100;
    const char *ls = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "limit");
    if (ls) {
        char *end;
        errno = 0;
        limit = strtol(ls, &end, 10);
        if (errno || *end || end == ls || limit < 0)
            return control_bad(c, "limit must be a non-negative integer");
        if (limit > LOG_RING)
            limit = LOG_RING;
    }
    sbuf b = {0};
    sb_puts(&b, "{\"requests\":[");
    pthread_mutex_lock(&g_log_lock);
    uint64_t last = g_log_seq;
    uint64_t first = last > (uint64_t)limit ? last - (uint64_t)limit + 1 : 1;
    for (uint64_t s = first; s <= last && limit > 0; s++) {
        const log_entry *e = &g_log[s % LOG_RING];
        sb_printf(&b, "%s{\"seq\":%" PRIu64 ",\"model\":", s == first ? "" : ",", e->seq);
        sb_json_str(&b, e->model, strlen(e->model));
        sb_printf(&b, ",\"path\":\"%s\",\"service_tier\":", path_names[e->path]);
        sb_json_cstr_or_null(&b, e->tier, e->has_tier);
        sb_puts(&b, ",\"session_affinity\":");
        sb_json_cstr_or_null(&b, e->affinity, e->has_aff);
        sb_puts(&b, ",\"user\":");
        sb_json_cstr_or_null(&b, e->user, e->has_user);
        sb_printf(&b, ",\"status\":%d,\"outcome\":\"%s\",\"prompt_tokens\":%ld,"
                      "\"completion_tokens\":%ld,\"cached_tokens\":%ld,\"authorized\":%s,"
                      "\"request_id\":",
                  e->status, outcome_names[e->outcome], e->prompt, e->completion, e->cached,
                  e->authorized ? "true" : "false");
        sb_json_cstr_or_null(&b, e->request_id, e->request_id[0] != '\0');
        sb_puts(&b, "}");
    }
    pthread_mutex_unlock(&g_log_lock);
    sb_puts(&b, "]}");
    return send_json(c, 200, &b);
}

/* GET /control/schedule: where the schedule clock is and what it sheds */
static enum MHD_Result control_schedule(struct MHD_Connection *c)
{
    sbuf b = {0};
    pthread_mutex_lock(&g_pool_lock);
    double t = sched_now_locked(now_ms());
    double dur = g_sched_n ? g_sched[g_sched_n - 1].t_s : 0;
    double fr = g_sched_n ? sched_frac_locked("*", 1, t) : 0;
    sb_printf(&b, "{\"entries\":%ld,\"duration_s\":%.3f,\"scale\":%g,\"trace_time_s\":%.3f,"
                  "\"shed_fraction\":%g}",
              g_sched_n, dur, g_sched_scale, t, fr);
    pthread_mutex_unlock(&g_pool_lock);
    return send_json(c, 200, &b);
}

static enum MHD_Result handle_control(struct MHD_Connection *c, request_state *rq, int is_get)
{
    if (rq->route == R_C_STATS)
        return control_stats(c);
    if (rq->route == R_C_LOG)
        return control_log(c);
    if (rq->route == R_C_HEALTH)
        return control_ok(c);
    if (rq->route == R_C_CONFIG && is_get)
        return control_config(c, NULL, 1);
    if (rq->route == R_C_SCHEDULE && !is_get)
        sched_restart();
    if (rq->route == R_C_SCHEDULE)
        return control_schedule(c);
    if (rq->route == R_C_STATS_RESET) {
        stats_reset();
        return control_ok(c);
    }
    if (rq->route == R_C_RESET) {
        pthread_mutex_lock(&g_cfg_lock);
        g_cfg = g_cli_cfg;
        pthread_mutex_unlock(&g_cfg_lock);
        rules_reset();
        pools_reset();
        stats_reset();
        cache_reset();
        sched_restart();
        pthread_mutex_lock(&g_log_lock);
        g_log_seq = 0;
        pthread_mutex_unlock(&g_log_lock);
        return control_ok(c);
    }
    if (rq->too_large)
        return send_error(c, 413, "request_too_large", "Request body too large", 0);
    /* the rest take a JSON object (an empty body counts as {}) */
    jparser jp;
    char empty[] = "{}";
    jnode *o = rq->body.len ? json_parse(&jp, rq->body.p, rq->body.len) : json_parse(&jp, empty, 2);
    enum MHD_Result ret;
    if (!o || o->type != J_OBJ)
        ret = control_bad(c, "body must be a JSON object");
    else if (rq->route == R_C_RULES)
        ret = control_rules(c, o);
    else if (rq->route == R_C_LOAD)
        ret = control_load(c, o);
    else
        ret = control_config(c, o, 0);
    jp_free(&jp);
    return ret;
}

/* ------------------------------------------------------------------ */
/* libmicrohttpd glue                                                   */
/* ------------------------------------------------------------------ */

/* Maps URL + method to a route; *method_ok says whether the method fits. */
static enum route route_of(const char *url, const char *method, int *method_ok)
{
    static const struct { const char *url; enum route r; const char *method; } table[] = {
        {"/inference/v1/chat/completions", R_CHAT, "POST"},
        {"/v1/chat/completions", R_CHAT, "POST"},
        {"/inference/v1/embeddings", R_EMBED, "POST"},
        {"/v1/embeddings", R_EMBED, "POST"},
        {"/inference/v1/rerank", R_RERANK, "POST"},
        {"/v1/rerank", R_RERANK, "POST"},
        {"/control/reset", R_C_RESET, "POST"},
        {"/control/rules", R_C_RULES, "POST"},
        {"/control/load", R_C_LOAD, "POST"},
        {"/control/config", R_C_CONFIG, "POST GET"},
        {"/control/stats", R_C_STATS, "GET"},
        {"/control/stats/reset", R_C_STATS_RESET, "POST"},
        {"/control/log", R_C_LOG, "GET"},
        {"/control/health", R_C_HEALTH, "GET"},
        {"/control/schedule", R_C_SCHEDULE, "POST GET"},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcmp(url, table[i].url) != 0)
            continue;
        const char *m = strstr(table[i].method, method);
        size_t ml = strlen(method);
        *method_ok = ml > 0 && m && (m[ml] == '\0' || m[ml] == ' ');
        return table[i].r;
    }
    *method_ok = 1;
    return R_NOT_FOUND;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size, void **con_cls)
{
    (void)cls;
    (void)version;
    request_state *rq = *con_cls;
    if (!rq) {
        rq = calloc(1, sizeof *rq);
        if (!rq)
            return MHD_NO;
        rq->route = route_of(url, method, &rq->method_ok);
        *con_cls = rq;
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoll(cl, NULL, 10) > g_max_body)
            rq->too_large = 1;
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!rq->too_large && rq->route != R_NOT_FOUND && rq->method_ok) {
            if (rq->body.len + *upload_data_size > (size_t)g_max_body) {
                rq->too_large = 1;        /* keep draining, answer 413 at the end */
                free(rq->body.p);
                memset(&rq->body, 0, sizeof rq->body);
            } else {
                sb_put(&rq->body, upload_data, *upload_data_size);
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (rq->route == R_NOT_FOUND)
        return send_error(conn, 404, "not_found", "no such endpoint", 0);
    if (!rq->method_ok) {
        struct MHD_Response *r;
        sbuf b = {0};
        error_body(&b, "method_not_allowed", "method not allowed");
        if (queue_owned(conn, 405, &b, "application/json", &r) != MHD_YES)
            return MHD_NO;
        MHD_add_response_header(r, "Allow", rq->route <= R_RERANK ? "POST" :
                                (rq->route == R_C_CONFIG || rq->route == R_C_SCHEDULE) ? "GET, POST" :
                                (rq->route == R_C_STATS || rq->route == R_C_LOG ||
                                 rq->route == R_C_HEALTH) ? "GET" : "POST");
        enum MHD_Result ret = MHD_queue_response(conn, 405, r);
        MHD_destroy_response(r);
        return ret;
    }
    if (rq->route == R_CHAT || rq->route == R_EMBED || rq->route == R_RERANK) {
        in_flight_enter();
        enum MHD_Result ret = rq->route == R_CHAT ? handle_chat(conn, rq) :
                              handle_typed(conn, rq, rq->route == R_RERANK);
        __atomic_sub_fetch(&g_stats.in_flight, 1, __ATOMIC_RELAXED);
        return ret;
    }
    return handle_control(conn, rq, strcmp(method, "GET") == 0);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)conn;
    (void)toe;
    request_state *rq = *con_cls;
    if (rq) {
        free(rq->body.p);
        free(rq);
        *con_cls = NULL;
    }
}

/* ------------------------------------------------------------------ */
/* Command line                                                         */
/* ------------------------------------------------------------------ */

static void usage(FILE *out)
{
    fputs("usage: fwsim --port N [options]\n"
          "  --port N                 TCP port (0 = ephemeral)\n"
          "  --host H                 loopback address to bind (default 127.0.0.1)\n"
          "  --api-key K              require Authorization: Bearer K on chat requests\n"
          "  --time-scale F           multiply simulated latency (default 1.0, 0 = none)\n"
          "  --ttft-ms N              time to first token in ms (default 200)\n"
          "  --tps N                  generated tokens/s, Standard+Priority (default 50; Fast 2x)\n"
          "  --capacity N             concurrent slots per base model (default 64)\n"
          "  --fast-capacity N        concurrent slots per Fast model id (default 64)\n"
          "  --prompt-tpm N           prompt tokens per minute per model (0 = unlimited)\n"
          "  --uncached-prompt-tpm N  uncached prompt tokens per minute (0 = unlimited)\n"
          "  --generated-tpm N        generated tokens per minute (0 = unlimited)\n"
          "  --max-body BYTES         largest accepted request body (default 1048576)\n"
          "  --port-file F            write the bound port to F (atomically)\n"
          "  --schedule FILE          congestion schedule: lines TIME_S MODEL FRACTION\n"
          "  --seed N                 seed of the schedule's shedding (default 1)\n"
          "  --quiet                  no per-request log lines on stderr\n"
          "  --help                   this text\n",
          out);
}

static void die_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die_usage(const char *fmt, ...)
{
    va_list ap;
    fputs("fwsim: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

/* Parses a decimal integer in [lo, hi]; describes the expectation on error. */
static long parse_long_opt(const char *opt, const char *v, long lo, long hi)
{
    const char *what = lo > 0 ? "a positive integer" : "a non-negative integer";
    size_t n = strlen(v);
    int digits = n > 0 && n <= 18;
    for (size_t i = 0; digits && i < n; i++)
        digits = v[i] >= '0' && v[i] <= '9';
    if (!digits)
        die_usage("%s: expected %s, got \"%s\"", opt, what, v);
    long x = strtol(v, NULL, 10);
    if (x < lo || x > hi)
        die_usage("%s: expected an integer between %ld and %ld, got \"%s\"", opt, lo, hi, v);
    return x;
}

static double parse_double_opt(const char *opt, const char *v, double lo, double hi)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || errno || isnan(x) || isspace((unsigned char)*v))
        die_usage("%s: expected a non-negative number, got \"%s\"", opt, v);
    if (x < lo || x > hi)
        die_usage("%s: expected a number between %g and %g, got \"%s\"", opt, lo, hi, v);
    return x;
}

typedef struct options {
    long port;
    const char *host;
    const char *port_file;
} options;

static void parse_args(int argc, char **argv, options *o)
{
    o->port = -1;
    o->host = "127.0.0.1";
    for (int i = 1; i < argc; i++) {
        char *arg = argv[i];
        char *val = NULL;
        char namebuf[64];
        if (strncmp(arg, "--", 2) != 0)
            die_usage("unexpected argument \"%s\" (see --help)", arg);
        char *eq = strchr(arg, '=');
        if (eq && (size_t)(eq - arg) < sizeof namebuf) {    /* --opt=value */
            memcpy(namebuf, arg, (size_t)(eq - arg));
            namebuf[eq - arg] = '\0';
            val = eq + 1;
            arg = namebuf;
        }
        if (strcmp(arg, "--help") == 0 && !val) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(arg, "--quiet") == 0 && !val) {
            g_quiet = 1;
            continue;
        }
        static const char *const with_value[] = {
            "--port", "--host", "--api-key", "--time-scale", "--ttft-ms", "--tps", "--capacity",
            "--fast-capacity", "--prompt-tpm", "--uncached-prompt-tpm", "--generated-tpm",
            "--max-body", "--port-file", "--schedule", "--seed"};
        int known = 0;
        for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++)
            known |= strcmp(arg, with_value[k]) == 0;
        if (!known)
            die_usage("unknown option \"%s\" (see --help)", arg);
        if (!val) {
            if (i + 1 >= argc)
                die_usage("%s: missing value", arg);
            val = argv[++i];
        }
        if (strcmp(arg, "--port") == 0)
            o->port = parse_long_opt(arg, val, 0, 65535);
        else if (strcmp(arg, "--host") == 0)
            o->host = val;
        else if (strcmp(arg, "--api-key") == 0) {
            if (!*val)
                die_usage("--api-key: expected a non-empty key");
            g_api_key = val;
        } else if (strcmp(arg, "--time-scale") == 0)
            g_cli_cfg.time_scale = parse_double_opt(arg, val, 0, 1000);
        else if (strcmp(arg, "--ttft-ms") == 0)
            g_cli_cfg.ttft_ms = parse_long_opt(arg, val, 0, 3600000);
        else if (strcmp(arg, "--tps") == 0)
            g_cli_cfg.tps = parse_long_opt(arg, val, 1, 1000000000);
        else if (strcmp(arg, "--capacity") == 0)
            g_cli_cfg.capacity = parse_long_opt(arg, val, 1, 1000000000);
        else if (strcmp(arg, "--fast-capacity") == 0)
            g_cli_cfg.fast_capacity = parse_long_opt(arg, val, 1, 1000000000);
        else if (strcmp(arg, "--prompt-tpm") == 0)
            g_cli_cfg.prompt_tpm = parse_long_opt(arg, val, 0, 1000000000000L);
        else if (strcmp(arg, "--uncached-prompt-tpm") == 0)
            g_cli_cfg.uncached_prompt_tpm = parse_long_opt(arg, val, 0, 1000000000000L);
        else if (strcmp(arg, "--generated-tpm") == 0)
            g_cli_cfg.generated_tpm = parse_long_opt(arg, val, 0, 1000000000000L);
        else if (strcmp(arg, "--max-body") == 0)
            g_max_body = parse_long_opt(arg, val, 1, 1L << 30);
        else if (strcmp(arg, "--schedule") == 0)
            sched_load(val);
        else if (strcmp(arg, "--seed") == 0)
            g_sched_seed = (uint64_t)parse_long_opt(arg, val, 0, 1000000000000L);
        else if (strcmp(arg, "--port-file") == 0) {
            if (!*val)
                die_usage("--port-file: expected a file name");
            o->port_file = val;
        }
    }
    if (o->port < 0)
        die_usage("--port is required (use --port 0 for an ephemeral port)");
}

/* Creates the listening socket ourselves: loopback check, backlog, and
 * the real port for --port 0 all in one place. */
static int open_listener(const char *host, long port, int *bound_port, int *is_v6)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (strcmp(host, "localhost") == 0)
        host = "127.0.0.1";
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        if ((ntohl(a4->sin_addr.s_addr) >> 24) != 127)
            die_usage("--host: only loopback addresses are allowed, got \"%s\"", host);
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        sl = sizeof *a4;
        *is_v6 = 0;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr))
            die_usage("--host: only loopback addresses are allowed, got \"%s\"", host);
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        sl = sizeof *a6;
        *is_v6 = 1;
    } else {
        die_usage("--host: expected a loopback IP address (127.x.x.x, ::1 or localhost), got \"%s\"", host);
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, sl) < 0 || listen(fd, 4096) < 0) {
        close(fd);
        return -1;
    }
    sl = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &sl);
    *bound_port = ntohs(*is_v6 ? a6->sin6_port : a4->sin_port);
    return fd;
}

static int write_port_file(const char *path, int port)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -1;
    fprintf(f, "%d\n", port);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    options o = {0};
    parse_args(argc, argv, &o);
    g_cfg = g_cli_cfg;
    sched_restart();

    /* 1,000+ concurrent connections need more than the usual 1024 fds */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max > 65536 ? 65536 : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);

    /* Every thread inherits this mask, so only sigwait() below sees them. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    int port = 0, is_v6 = 0;
    int lfd = open_listener(o.host, o.port, &port, &is_v6);
    if (lfd < 0) {
        fprintf(stderr, "fwsim: cannot listen on %s:%ld: %s\n", o.host, o.port, strerror(errno));
        return 1;
    }
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL |
            (is_v6 ? MHD_USE_IPv6 : 0) | (g_quiet ? 0 : MHD_USE_ERROR_LOG),
        0, NULL, NULL, &on_request, NULL,
        MHD_OPTION_LISTEN_SOCKET, lfd,
        MHD_OPTION_NOTIFY_COMPLETED, &on_completed, NULL,
        MHD_OPTION_THREAD_STACK_SIZE, (size_t)256 * 1024,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned int)16000,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)300,
        MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "fwsim: cannot start the HTTP daemon\n");
        return 1;
    }
    if (o.port_file && write_port_file(o.port_file, port) != 0) {
        fprintf(stderr, "fwsim: cannot write --port-file %s: %s\n", o.port_file, strerror(errno));
        MHD_stop_daemon(d);
        return 1;
    }
    printf("fwsim listening on %s%s%s:%d\n", is_v6 ? "[" : "",
           strcmp(o.host, "localhost") == 0 ? "127.0.0.1" : o.host, is_v6 ? "]" : "", port);
    fflush(stdout);

    int sig = 0;
    while (sigwait(&sigs, &sig) != 0)
        ;
    g_stop = 1;                 /* sleeping handlers notice within 200 ms */
    MHD_stop_daemon(d);
    if (!g_quiet)
        fprintf(stderr, "fwsim: stopped (signal %d)\n", sig);
    return 0;
}
