/*-------------------------------------------------------------------------
 *
 * fleetsim.c
 *		Escalation across a fleet of servers sharing one Fireworks account,
 *		on paper: a deterministic discrete-event simulation (docs/fleet.md).
 *
 * It owns nothing of fw_tier and links nothing of it: it models the rules
 * of src/escalation.c for one workload on each of N servers, driven by a
 * congestion trace of bench/economics/traces (fwsim's schedule format:
 * "TIME_S MODEL FRACTION", the share of Standard requests shed with 503
 * Service Overloaded from TIME_S on; Priority is never shed), and counts
 * the 503 Overloaded answers the fleet receives, per spike.
 *
 * Model (every number is an option):
 *  - Calls arrive as one Poisson stream of --rate calls/s per server
 *    (drawn as the fleet's stream, each call given to a uniformly drawn
 *    server: the same thing).  A server is one fw_tier instance: its
 *    backends share one window in shared memory, so the server is the
 *    unit of escalation.
 *  - A call routed to Standard is shed with the trace's probability at
 *    send time (fwsim draws at admission).  The shed answer arrives
 *    --shed-latency s later; only then does the server learn of it: its
 *    window opens (if not already open), and the call is retried at once
 *    on Priority.  Calls sent on Standard in the meantime may be shed too.
 *  - Window policy "fixed": a window lasts --window s.  "probe" (issue
 *    16): while open, the first call once probe_next is due is a probe
 *    (probe_next = now + interval), and besides each call is a probe with
 *    probability share * base / interval; a shed probe (answer after
 *    --shed-latency) resets the streak, doubles the interval (at most 16x)
 *    and is retried on Priority; an answered probe (answer after
 *    --ok-latency) resets the interval and, --probe-successes in a row,
 *    closes the window.  Probes of an earlier window move nothing.
 *  - Signal "local": each server learns only from its own 503s (fw_tier
 *    today).  "shared": a server that opens a window publishes it (its
 *    end); every other server sees it at its first poll at least --delay s
 *    after the publication (polls every --poll s, each server with its
 *    own random phase; --poll 0: at once after --delay) and opens its own
 *    window with that end, fresh probe state.  Closes are not shared: each
 *    server ends a window early only on its own probes' evidence.
 *  - Not modelled: the per-backend drift-back jitter at a window's end
 *    (at most 30 s; with many backends the first one back re-learns), 429
 *    pacing, capacity (the trace is the whole congestion model).
 *
 * Output: one line "key=value ..." (see main()).  Deterministic for a
 * given seed: its own PRNG (splitmix64), no clock, no threads.  Bounded:
 * --max-calls (default 50,000,000) stops a run with exit 3.
 *
 * Build: cc -O2 -o fleetsim fleetsim.c -lm   (bench/fleet/run.sh does it)
 *
 *-------------------------------------------------------------------------
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_STEPS	4096
#define MAX_PUBS	65536
#define BACKOFF_MAX 16

typedef struct Step
{
	double		t;
	double		frac;
} Step;

typedef struct Server
{
	double		until;			/* window end; <= now: closed */
	double		started;		/* window start (probes sent before move nothing) */
	double		probe_next;
	double		interval;
	int			streak;
	int			pub_seen;		/* index+1 of the last publication adopted */
	double		phase;			/* poll phase, [0, poll) */
} Server;

typedef struct Event
{
	double		t;				/* the answer arrives */
	double		sent;
	int			server;
	int			probe;
	int			shed;
} Event;

static Step steps[MAX_STEPS];
static int	nsteps;
static double trace_len;

static Event *heap;
static int	heap_n, heap_cap;

static double pub_t[MAX_PUBS];
static double pub_until[MAX_PUBS];
static int	npubs;

static uint64_t rng_state;

static uint64_t
splitmix64(void)
{
	uint64_t	z = (rng_state += 0x9E3779B97F4A7C15ULL);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/* uniform in [0, 1) */
static double
rnd(void)
{
	return (double) (splitmix64() >> 11) * (1.0 / 9007199254740992.0);
}

static void
die(const char *msg, const char *arg)
{
	fprintf(stderr, "fleetsim: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
	exit(2);
}

static void
load_trace(const char *path)
{
	FILE	   *f = fopen(path, "r");
	char		line[512];

	if (f == NULL)
		die("cannot open trace", path);
	while (fgets(line, sizeof(line), f) != NULL)
	{
		double		t,
					frac;
		char		model[256];
		char	   *p = line;

		while (*p == ' ' || *p == '\t')
			p++;
		if (*p == '#' || *p == '\n' || *p == '\0')
			continue;
		if (sscanf(p, "%lf %255s %lf", &t, model, &frac) != 3 ||
			t < 0 || frac < 0 || frac > 1 ||
			(nsteps > 0 && t < steps[nsteps - 1].t))
			die("bad trace line", line);
		if (nsteps >= MAX_STEPS)
			die("trace too long", path);
		steps[nsteps].t = t;
		steps[nsteps].frac = frac;
		nsteps++;
	}
	fclose(f);
	if (nsteps < 2)
		die("trace needs two lines at least", path);
	trace_len = steps[nsteps - 1].t;
}

/* the share shed at trace time t (the last line at or before t wins) */
static double
frac_at(double t)
{
	static int	i = 0;			/* calls come in time order: a cursor */

	while (i + 1 < nsteps && steps[i + 1].t <= t)
		i++;
	while (i > 0 && steps[i].t > t)
		i--;
	return steps[i].t <= t ? steps[i].frac : 0.0;
}

/* Standard requests a fleet that never escalates would see shed (expected) */
static double
shed_never(double fleet_rate)
{
	double		sum = 0;

	for (int i = 0; i + 1 < nsteps; i++)
		sum += steps[i].frac * (steps[i + 1].t - steps[i].t);
	return sum * fleet_rate;
}

static int
count_spikes(void)
{
	int			n = 0;

	for (int i = 0; i < nsteps; i++)
		if (steps[i].frac > 0 && (i == 0 || steps[i - 1].frac == 0))
			n++;
	return n;
}

static void
heap_push(Event e)
{
	int			i;

	if (heap_n == heap_cap)
	{
		heap_cap = heap_cap ? heap_cap * 2 : 1024;
		heap = realloc(heap, sizeof(Event) * heap_cap);
		if (heap == NULL)
			die("out of memory", NULL);
	}
	i = heap_n++;
	while (i > 0 && heap[(i - 1) / 2].t > e.t)
	{
		heap[i] = heap[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	heap[i] = e;
}

static Event
heap_pop(void)
{
	Event		top = heap[0];
	Event		last = heap[--heap_n];
	int			i = 0;

	for (;;)
	{
		int			c = 2 * i + 1;

		if (c >= heap_n)
			break;
		if (c + 1 < heap_n && heap[c + 1].t < heap[c].t)
			c++;
		if (heap[c].t >= last.t)
			break;
		heap[i] = heap[c];
		i = c;
	}
	if (heap_n > 0)
		heap[i] = last;
	return top;
}

/* options */
static int	n_servers = 1;
static double rate = 1.0;		/* calls/s per server */
static int	probe_policy = 0;
static int	shared = 0;
static double poll_s = 1.0;
static double delay_s = 0.05;
static double shed_lat = 0.2;
static double ok_lat = 2.0;
static double window_s = 1800;
static double probe_base = 10;
static double probe_share = 0.5;
static int	probe_successes = 2;
static long long max_calls = 50000000LL;

/* results */
static long long calls, std_sent, shed, prio_served, std_served;
static long long windows, probes, probes_shed, closes;

static Server *srv;

static void
open_window(Server *s, double now, double until)
{
	s->until = until;
	s->started = now;
	s->streak = 0;
	s->interval = probe_base;
	s->probe_next = now + probe_base;
}

/* when server s sees publication p: its first poll >= pub + delay */
static double
visible_at(const Server *s, int p)
{
	double		t = pub_t[p] + delay_s;

	if (poll_s <= 0)
		return t;
	return s->phase + ceil((t - s->phase) / poll_s) * poll_s;
}

/* shared signal: adopt the newest publication this server can see now */
static void
adopt(Server *s, double now)
{
	int			p;

	for (p = npubs - 1; p >= s->pub_seen; p--)
		if (visible_at(s, p) <= now)
			break;
	if (p < s->pub_seen)
		return;
	s->pub_seen = p + 1;
	if (pub_until[p] <= now)
		return;
	if (s->until <= now)
		open_window(s, now, pub_until[p]);
	else if (pub_until[p] > s->until)
		s->until = pub_until[p];
}

static void
publish(Server *s, double now)
{
	if (npubs >= MAX_PUBS)
		die("too many publications", NULL);
	pub_t[npubs] = now;
	pub_until[npubs] = s->until;
	npubs++;
	s->pub_seen = npubs;		/* its own */
}

/* an answer (shed or probe) reaches its server */
static void
deliver(Event e)
{
	Server	   *s = &srv[e.server];
	double		now = e.t;
	int			current = (e.sent >= s->started && s->until > now);

	if (e.probe)
	{
		if (e.shed)
		{
			if (current)
			{
				s->streak = 0;
				s->interval = fmin(s->interval * 2, probe_base * BACKOFF_MAX);
				s->probe_next = now + s->interval;
			}
			prio_served++;		/* retried at once on Priority */
		}
		else if (current)
		{
			s->interval = probe_base;
			if (++s->streak >= probe_successes)
			{
				s->until = now;
				s->streak = 0;
				closes++;
			}
		}
		return;
	}
	/* a plain Standard call shed: the server learns of the overload now */
	if (s->until <= now)
	{
		open_window(s, now, now + window_s);
		windows++;
		if (shared)
			publish(s, now);
	}
	prio_served++;				/* retried at once on Priority */
}

static void
one_call(double now)
{
	int			i = (int) (rnd() * n_servers);
	Server	   *s = &srv[i];
	int			probe = 0;
	double		f;
	Event		e;

	calls++;
	if (shared)
		adopt(s, now);
	if (s->until > now)
	{
		if (!probe_policy)
		{
			prio_served++;
			return;
		}
		if (now >= s->probe_next)
		{
			s->probe_next = now + s->interval;
			probe = 1;
		}
		else if (probe_share > 0 &&
				 rnd() < probe_share * probe_base / s->interval)
			probe = 1;
		if (!probe)
		{
			prio_served++;
			return;
		}
		probes++;
	}
	std_sent++;
	f = frac_at(now);
	e.sent = now;
	e.server = i;
	e.probe = probe;
	e.shed = (f > 0 && rnd() < f);
	if (e.shed)
	{
		shed++;
		if (probe)
			probes_shed++;
		e.t = now + shed_lat;
		heap_push(e);
	}
	else
	{
		std_served++;
		if (probe)
		{
			e.t = now + ok_lat;
			heap_push(e);
		}
	}
}

static double
num_arg(const char *name, const char *v, double lo, double hi)
{
	char	   *end;
	double		d = strtod(v, &end);

	if (*v == '\0' || *end != '\0' || d < lo || d > hi)
		die("bad value for", name);
	return d;
}

int
main(int argc, char **argv)
{
	const char *trace = NULL;
	uint64_t	seed = 1;
	double		now = 0;
	double		fleet_rate;
	int			spikes;

	for (int a = 1; a < argc; a++)
	{
		const char *o = argv[a];
		const char *v = (a + 1 < argc) ? argv[a + 1] : NULL;

		if (strcmp(o, "--help") == 0)
		{
			printf("usage: fleetsim --trace FILE [--servers N] [--rate CALLS_PER_S_PER_SERVER]\n"
				   "  [--policy fixed|probe] [--signal local|shared] [--poll S] [--delay S]\n"
				   "  [--shed-latency S] [--ok-latency S] [--window S] [--probe-interval S]\n"
				   "  [--probe-share X] [--probe-successes N] [--seed N] [--max-calls N]\n");
			return 0;
		}
		if (v == NULL)
			die("missing value for", o);
		a++;
		if (strcmp(o, "--trace") == 0)
			trace = v;
		else if (strcmp(o, "--servers") == 0)
			n_servers = (int) num_arg(o, v, 1, 100000);
		else if (strcmp(o, "--rate") == 0)
			rate = num_arg(o, v, 1e-6, 1e6);
		else if (strcmp(o, "--policy") == 0)
		{
			if (strcmp(v, "fixed") == 0)
				probe_policy = 0;
			else if (strcmp(v, "probe") == 0)
				probe_policy = 1;
			else
				die("--policy is fixed or probe, got", v);
		}
		else if (strcmp(o, "--signal") == 0)
		{
			if (strcmp(v, "local") == 0)
				shared = 0;
			else if (strcmp(v, "shared") == 0)
				shared = 1;
			else
				die("--signal is local or shared, got", v);
		}
		else if (strcmp(o, "--poll") == 0)
			poll_s = num_arg(o, v, 0, 3600);
		else if (strcmp(o, "--delay") == 0)
			delay_s = num_arg(o, v, 0, 3600);
		else if (strcmp(o, "--shed-latency") == 0)
			shed_lat = num_arg(o, v, 0, 600);
		else if (strcmp(o, "--ok-latency") == 0)
			ok_lat = num_arg(o, v, 0, 600);
		else if (strcmp(o, "--window") == 0)
			window_s = num_arg(o, v, 1, 86400);
		else if (strcmp(o, "--probe-interval") == 0)
			probe_base = num_arg(o, v, 0.001, 3600);
		else if (strcmp(o, "--probe-share") == 0)
			probe_share = num_arg(o, v, 0, 1);
		else if (strcmp(o, "--probe-successes") == 0)
			probe_successes = (int) num_arg(o, v, 1, 1000);
		else if (strcmp(o, "--seed") == 0)
			seed = (uint64_t) num_arg(o, v, 0, 1e15);
		else if (strcmp(o, "--max-calls") == 0)
			max_calls = (long long) num_arg(o, v, 1, 1e12);
		else
			die("unknown option", o);
	}
	if (trace == NULL)
		die("--trace FILE is required", NULL);
	load_trace(trace);
	spikes = count_spikes();

	rng_state = seed;
	srv = calloc(n_servers, sizeof(Server));
	if (srv == NULL)
		die("out of memory", NULL);
	for (int i = 0; i < n_servers; i++)
	{
		srv[i].phase = rnd() * poll_s;
		srv[i].interval = probe_base;
	}

	fleet_rate = rate * n_servers;
	for (;;)
	{
		now += -log(1.0 - rnd()) / fleet_rate;
		/* answers due before this call first: they change routing */
		while (heap_n > 0 && heap[0].t <= now)
			deliver(heap_pop());
		if (now >= trace_len)
			break;
		one_call(now);
		if (calls >= max_calls)
		{
			fprintf(stderr, "fleetsim: --max-calls %lld reached\n", max_calls);
			return 3;
		}
	}

	printf("servers=%d rate=%g policy=%s signal=%s poll=%g spikes=%d calls=%lld "
		   "standard_sent=%lld shed=%lld shed_per_spike=%.1f windows=%lld "
		   "probes=%lld probes_shed=%lld closes=%lld priority_share=%.5f "
		   "cost_ratio=%.5f shed_never_per_spike=%.1f\n",
		   n_servers, rate, probe_policy ? "probe" : "fixed",
		   shared ? "shared" : "local", poll_s, spikes, calls, std_sent, shed,
		   spikes ? (double) shed / spikes : 0.0, windows, probes, probes_shed,
		   closes, calls ? (double) prio_served / calls : 0.0,
		   calls ? (std_served + 1.5 * prio_served) / (double) calls : 0.0,
		   spikes ? shed_never(fleet_rate) / spikes : 0.0);
	return 0;
}
