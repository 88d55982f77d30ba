# Issue 16: window_policy 'probe'.
#
# Pins: a streak of fw_tier.probe_successes Standard probes closes the
# window in every backend at once (a backend that routed on Priority during
# the window is on Standard at its next call, long before the window's
# end), and says so in fw_tier.status, fw_tier.escalations and the call
# log; a shed probe is retried on Priority within the same call, and the
# next probe waits at least twice the interval; a window whose probes are
# all shed still ends at its configured length, never later; 'fixed'
# (the default) never probes, whatever the probe settings; a manual window
# never probes; replay never probes; a batch sends at most one probe per
# interval (probe_share 0); probe_share 1 makes every call of a window a
# probe; a window the probes closed that reopens before the worker wrote
# its end is still recorded as ended by probes, with its probes, and
# reopened within probe_interval it counts as one more in a row; an open
# window fw_escalate extends is the operator's: a probe in flight does not
# close it, none is sent later, nor after a restart.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use FwSim;

plan skip_all => 'fwsim not built' unless -x ($ENV{FWSIM} // '');

my $sim = FwSim->start('--time-scale', '0');
my $node = PostgreSQL::Test::Cluster->new('probe');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[ $sim->url ]}/inference/v1'
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '20ms'
fw_tier.flush_interval = '100ms'
fw_tier.max_attempts = 4
fw_tier.alert_windows = 100
fw_tier.probe_interval = '200ms'
fw_tier.probe_successes = 3
fw_tier.probe_share = 0
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.workloads (workload, on_overload, priority_window, window_policy) VALUES
	('pclose', 'priority', '60 seconds', 'probe'),
	('pshed', 'priority', '60 seconds', 'probe'),
	('pmax', 'priority', '2 seconds', 'probe'),
	('pfixed', 'priority', '60 seconds', 'fixed'),
	('pdefault', 'priority', '60 seconds', DEFAULT),
	('pmanual', 'priority', '60 seconds', 'probe'),
	('pbatch', 'priority', '60 seconds', 'probe'),
	('preplay', 'priority', '60 seconds', 'probe'),
	('pshare', 'priority', '60 seconds', 'probe'),
	('preopen', 'priority', '60 seconds', 'probe'),
	('pop', 'priority', '60 seconds', 'probe');
});

is( $node->safe_psql('postgres', "SELECT window_policy FROM fw_tier.workloads WHERE workload = 'pdefault'"),
	'fixed', "window_policy defaults to 'fixed'");
my ($rc, $out, $err) = $node->psql('postgres',
	"UPDATE fw_tier.workloads SET window_policy = 'sometimes' WHERE workload = 'pdefault'");
like($err, qr/workloads_window_policy_check/, 'window_policy is checked');

# open a window: the next Standard request of the workload is shed
sub open_window
{
	my ($wl) = @_;
	$sim->rule(fault => 'overload', path => 'standard', count => 1);
	is( $node->safe_psql('postgres', "SELECT fw_complete('open $wl', '$wl')"),
		"Echo: open $wl", "$wl: the shed call is answered on Priority");
	is( $node->safe_psql('postgres',
			"SELECT path, escalations FROM fw_tier.status WHERE workload = '$wl'"),
		'priority|1', "$wl: escalated");
}

# ---- a streak of probes closes the window in every backend -----------------
open_window('pclose');
# backend B routes on Priority during the window
my $b = $node->background_psql('postgres');
$b->query_safe("SELECT fw_complete('b before', 'pclose')");
# backend A calls every 50 ms (at most 10 s) until the window is over
$node->safe_psql('postgres', q{
DO $$
BEGIN
	FOR i IN 1 .. 200 LOOP
		PERFORM fw_complete('a ' || i, 'pclose');
		EXIT WHEN (SELECT path FROM fw_tier.status WHERE workload = 'pclose') = 'standard';
		PERFORM pg_sleep(0.05);
	END LOOP;
END $$});
my $left = $node->safe_psql('postgres',
	"SELECT extract(epoch FROM priority_until - window_started) < 30 FROM fw_tier.status WHERE workload = 'pclose'");
is($left, 't', 'the window closed long before its 60 s');
$b->query_safe("SELECT fw_complete('b after', 'pclose')");
$b->quit;
$node->safe_psql('postgres', 'SELECT fw_flush()');
my $probes = $node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE probe AND path = 'standard' AND outcome = 'ok'),
	       count(*) FILTER (WHERE probe AND (path <> 'standard' OR escalated))
	FROM fw_tier.calls WHERE workload = 'pclose'});
my ($okp, $badp) = split /\|/, $probes;
ok($okp >= 3, "at least 3 successful Standard probes in the log ($okp)");
is($badp, 0, 'probes go on Standard and are not marked escalated');
is( $node->safe_psql('postgres', q{
	SELECT count(*) FROM fw_tier.calls
	WHERE workload = 'pclose' AND NOT probe AND path = 'priority' AND escalated}) > 0 ? 'yes' : 'no',
	'yes', 'the other calls of the window went to Priority');
is( $node->safe_psql('postgres', q{
	SELECT path || ':' || attempt FROM fw_tier.calls
	WHERE workload = 'pclose' ORDER BY started_at DESC LIMIT 1}),
	'standard:1', 'backend B, on Priority in the window, is on Standard at its next call');
is( $node->safe_psql('postgres', q{
	SELECT closed_by_probes, probes >= 3, probes_shed, path, window_policy
	FROM fw_tier.status WHERE workload = 'pclose'}),
	'1|t|0|standard|probe', 'status: one window closed by probes');
ok( $node->poll_query_until('postgres', q{
	SELECT ended_by = 'probes' AND ended - started < interval '30 seconds'
	       AND ended = priority_until AND probes >= 3 AND probes_shed = 0
	FROM fw_tier.escalations WHERE workload = 'pclose'}),
	'escalations: ended_by probes, long before its 60 s');

# a window reopened more than probe_interval after the probes closed one is
# not one more "in a row"
usleep(300_000);
$sim->rule(fault => 'overload', path => 'standard', count => 1);
$node->safe_psql('postgres', "SELECT fw_complete('again', 'pclose')");
is( $node->safe_psql('postgres',
		"SELECT path, escalations, windows_in_row FROM fw_tier.status WHERE workload = 'pclose'"),
	'priority|2|1', 're-escalated: a second window, still 1 in a row');

# ---- a shed probe is retried on Priority within the same call --------------
open_window('pshed');
$sim->rule(fault => 'overload', path => 'standard', duration_ms => 2500);
my $answered = $node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE fw_complete('s ' || i, 'pshed') = 'Echo: s ' || i)
	FROM (SELECT i, pg_sleep(0.05) FROM generate_series(1, 40) i) g});
is($answered, 40, 'every call of the window answered while Standard sheds');
$node->safe_psql('postgres', 'SELECT fw_flush()');
my $pairs = $node->safe_psql('postgres', q{
	SELECT p.outcome, r.path, r.outcome, r.probe, r.escalated
	FROM fw_tier.calls p JOIN fw_tier.calls r
	  ON r.call_id = p.call_id AND r.attempt = p.attempt + 1
	WHERE p.workload = 'pshed' AND p.probe
	ORDER BY p.started_at LIMIT 1});
is($pairs, 'overloaded|priority|ok|f|t',
	'the shed probe is followed, in the same call, by an answered Priority attempt');
my $gaps = $node->safe_psql('postgres', q{
	SELECT count(*), coalesce(min(gap), 999)
	FROM (SELECT extract(epoch FROM started_at - lag(started_at) OVER (ORDER BY started_at)) AS gap
	      FROM fw_tier.calls WHERE workload = 'pshed' AND probe) g});
my ($nprobes, $mingap) = split /\|/, $gaps;
ok($nprobes >= 2, "several probes while Standard sheds ($nprobes)");
ok($mingap >= 0.35, "a shed probe doubles the interval: probes at least 400 ms apart ($mingap s)");
is( $node->safe_psql('postgres',
		"SELECT probes_shed = probes, path, closed_by_probes FROM fw_tier.status WHERE workload = 'pshed'"),
	't|priority|0', 'status: the shed probes are counted; the window stays open');

# ---- the window never outlives its maximum --------------------------------------
sleep(3) ;    # the pshed rule is over
open_window('pmax');
$sim->rule(fault => 'overload', path => 'standard', duration_ms => 4000);
$node->safe_psql('postgres', q{
DO $$
BEGIN
	FOR i IN 1 .. 60 LOOP
		PERFORM fw_complete('m ' || i, 'pmax');
		PERFORM pg_sleep(0.05);
	END LOOP;
END $$});
$node->safe_psql('postgres', 'SELECT fw_flush()');
ok( $node->poll_query_until('postgres', q{
	SELECT count(*) >= 2 FROM fw_tier.escalations WHERE workload = 'pmax' AND ended IS NOT NULL}),
	'pmax: the first window ended and Standard re-escalated');
is( $node->safe_psql('postgres', q{
	SELECT priority_until - started = interval '2 seconds', ended - started = interval '2 seconds',
	       ended_by, probes_shed > 0
	FROM fw_tier.escalations WHERE workload = 'pmax' ORDER BY id LIMIT 1}),
	't|t|expired|t', 'shed probes never extend it: 2 s, expired');
is( $node->safe_psql('postgres', q{
	SELECT count(*) FROM fw_tier.escalations
	WHERE workload = 'pmax' AND priority_until - started > interval '2 seconds'}),
	'0', 'no window of pmax is longer than its maximum');

# ---- fixed never probes --------------------------------------------------------
for my $wl ('pfixed', 'pdefault')
{
	open_window($wl);
	$node->safe_psql('postgres',
		"SELECT count(fw_complete('f ' || i, '$wl')) FROM (SELECT i, pg_sleep(0.05) FROM generate_series(1, 25) i) g");
	$node->safe_psql('postgres', 'SELECT fw_flush()');
	is( $node->safe_psql('postgres', qq{
		SELECT count(*) FILTER (WHERE probe), count(*) FILTER (WHERE path = 'standard')
		FROM fw_tier.calls WHERE workload = '$wl'}),
		'0|1', "$wl: no probe in 1.25 s of calls; only the shed first attempt went on Standard");
	is( $node->safe_psql('postgres',
			"SELECT path, probes, closed_by_probes FROM fw_tier.status WHERE workload = '$wl'"),
		'priority|0|0', "$wl: still on Priority");
}
ok( $node->poll_query_until('postgres', q{
	SELECT count(*) = 2 AND bool_and(ended IS NULL AND ended_by IS NULL AND probes = 0)
	FROM fw_tier.escalations WHERE workload IN ('pfixed', 'pdefault')}),
	'fixed windows: open, no probes, no ended_by');

# ---- a manual window never probes ------------------------------------------------
$node->safe_psql('postgres', "SELECT fw_escalate('pmanual', '60 seconds')");
$node->safe_psql('postgres',
	"SELECT count(fw_complete('x ' || i, 'pmanual')) FROM (SELECT i, pg_sleep(0.05) FROM generate_series(1, 15) i) g");
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE probe), count(*) FILTER (WHERE path = 'priority') FROM fw_tier.calls WHERE workload = 'pmanual'"),
	'0|15', 'a manual window never probes');

# ---- replay never probes: its fixtures were recorded on Priority ---------------
open_window('preplay');
$node->safe_psql('postgres', q{
	SET fw_tier.mode = 'record';
	SELECT fw_complete('replayed', 'preplay');});
is( $node->safe_psql('postgres', q{
	SET fw_tier.mode = 'replay';
	SELECT count(*) FILTER (WHERE fw_complete('replayed', 'preplay') = 'Echo: replayed')
	FROM (SELECT i, pg_sleep(0.05) FROM generate_series(1, 15) i) g}),
	'15', 'replay answers every call from its Priority fixture');
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE probe), count(*) FILTER (WHERE replayed) FROM fw_tier.calls WHERE workload = 'preplay'"),
	'0|15', 'no replayed attempt is a probe');

# ---- a batch: at most one probe per interval ----------------------------------
open_window('pbatch');
usleep(250_000);    # the first probe is due
$node->safe_psql('postgres',
	"SELECT fw_complete_batch(array_agg('batch ' || i), 'pbatch') FROM generate_series(1, 50) i");
$node->safe_psql('postgres', 'SELECT fw_flush()');
my $bp = $node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE probe), count(*) FILTER (WHERE outcome = 'ok')
	FROM fw_tier.calls WHERE workload = 'pbatch'});
my ($bprobes, $bok) = split /\|/, $bp;
is($bok, 51, 'the batch is answered');
ok($bprobes >= 1 && $bprobes <= 3, "a batch of 50 sends one probe per interval ($bprobes)");

# ---- probe_share: a share of the window's calls probe too -----------------------
$node->safe_psql('postgres', 'ALTER SYSTEM SET fw_tier.probe_share = 1');
$node->reload;
$node->poll_query_until('postgres', "SELECT current_setting('fw_tier.probe_share') = '1'");
open_window('pshare');
$node->safe_psql('postgres', "SELECT fw_complete('share ' || i, 'pshare') FROM generate_series(1, 3) i");
is( $node->safe_psql('postgres',
		"SELECT path, closed_by_probes, probes FROM fw_tier.status WHERE workload = 'pshare'"),
	'standard|1|3', 'probe_share 1: the next 3 calls probe and close the window');

# ---- closed by probes, reopened before the worker wrote it -----------------------
# (review 2, items 4 and 5) the worker cannot write fw_tier.escalations
# while this transaction holds its lock; a long interval: only the share probes
$node->safe_psql('postgres', "ALTER SYSTEM SET fw_tier.probe_interval = '60s'");
$node->reload;
$node->poll_query_until('postgres', "SELECT current_setting('fw_tier.probe_interval') = '1min'");
my $locker = $node->background_psql('postgres');
$locker->query_safe('BEGIN; LOCK TABLE fw_tier.escalations IN SHARE MODE');
open_window('preopen');
$node->safe_psql('postgres', "SELECT fw_complete('share ' || i, 'preopen') FROM generate_series(1, 3) i");
$sim->rule(fault => 'overload', path => 'standard', count => 1);
$node->safe_psql('postgres', "SELECT fw_complete('reopen', 'preopen')");
is( $node->safe_psql('postgres',
		"SELECT path, escalations, closed_by_probes, windows_in_row FROM fw_tier.status WHERE workload = 'preopen'"),
	'priority|2|1|2', 'closed by probes and reopened within probe_interval: 2 windows in a row');
is( $node->safe_psql('postgres', "SELECT count(*) FROM fw_tier.escalations WHERE workload = 'preopen'"),
	'0', 'the worker has written neither window yet');
$locker->query_safe('COMMIT');
$locker->quit;
ok( $node->poll_query_until('postgres', q{
	SELECT count(*) = 2
	   AND count(*) FILTER (WHERE ended_by = 'probes' AND probes = 3 AND probes_shed = 0
	                        AND ended = priority_until AND ended - started < interval '30 seconds') = 1
	   AND count(*) FILTER (WHERE ended IS NULL AND ended_by IS NULL AND windows_in_row = 2) = 1
	FROM fw_tier.escalations WHERE workload = 'preopen'}),
	'escalations: the reopened window ended by probes, with its 3 probes, then the open one');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET fw_tier.probe_share');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET fw_tier.probe_interval');
$node->reload;
$node->poll_query_until('postgres', "SELECT current_setting('fw_tier.probe_interval') = '200ms'");

# ---- fw_escalate on an open probe window: the operator's from then on -----------
# (review 2, item 2) two probes answered, the third (of 3) in flight
open_window('pop');
for my $i (1 .. 2)
{
	usleep(250_000);    # the interval's probe is due
	$node->safe_psql('postgres', "SELECT fw_complete('op $i', 'pop')");
}
usleep(250_000);
my $inflight = $node->background_psql('postgres');
$inflight->query_until(qr/sent/,
	"\\echo sent\nSELECT fw_complete('[fwsim:slow=1500] op 3', 'pop');\n");
usleep(500_000);    # at the simulator
$node->safe_psql('postgres', "SELECT fw_escalate('pop', '1 hour')");
$inflight->quit;
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.calls WHERE workload = 'pop' AND probe AND path = 'standard' AND outcome = 'ok'"),
	'3', 'three probes answered, the third after fw_escalate');
is( $node->safe_psql('postgres',
		"SELECT path, closed_by_probes, priority_until - window_started > interval '50 minutes' FROM fw_tier.status WHERE workload = 'pop'"),
	'priority|0|t', 'the probe in flight did not close the operator\'s hour');
sub no_more_probes
{
	my ($what) = @_;
	my $q = q{SELECT count(*) FILTER (WHERE probe), count(*) FILTER (WHERE path = 'priority')
		FROM fw_tier.calls WHERE workload = 'pop'};
	my ($p0, $pri0) = split /\|/, $node->safe_psql('postgres', $q);
	for my $i (1 .. 3)
	{
		usleep(250_000);
		$node->safe_psql('postgres', "SELECT fw_complete('later $i', 'pop')");
	}
	$node->safe_psql('postgres', 'SELECT fw_flush()');
	my ($p1, $pri1) = split /\|/, $node->safe_psql('postgres', $q);
	is("$p0 $p1 " . ($pri1 - $pri0), '3 3 3', "no probe $what: the 3 calls on Priority");
}
no_more_probes('after fw_escalate');
ok( $node->poll_query_until('postgres', q{
	SELECT trigger = 'manual' AND ended IS NULL
	FROM fw_tier.escalations WHERE workload = 'pop'}),
	'escalations: the extended window is recorded as manual');
$node->restart;
ok( $node->poll_query_until('postgres',
		"SELECT path = 'priority' FROM fw_tier.status WHERE workload = 'pop'"),
	'the window is restored after a restart');
no_more_probes('after a restart');

$node->stop;
done_testing();
