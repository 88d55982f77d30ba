# Escalation windows under load, and across restarts.
#
# Pins: exactly one escalation when many backends see 503 Overloaded at
# once; 429 and 503 Unavailable never escalate; a workload whose policy is
# "retry" (batch) never escalates; a 2 s window expires on time and is
# closed in fw_tier.escalations; a server restart inside a window keeps
# the workload on Priority.
use strict;
use warnings;
use File::Temp qw(tempdir);
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $fwsim = $ENV{FWSIM} // "$ENV{TESTDIR}/test/fwsim/fwsim";
plan skip_all => "fwsim not built ($fwsim)" unless -x $fwsim;

# the simulator, on an ephemeral port
my $simdir = tempdir(CLEANUP => 1);
my $sim_pid = fork();
die "fork: $!" unless defined $sim_pid;
if ($sim_pid == 0)
{
	open(STDOUT, '>', '/dev/null');
	open(STDERR, '>', '/dev/null');
	exec($fwsim, '--port', '0', '--port-file', "$simdir/port",
		'--time-scale', '0', '--quiet')
	  or die "exec fwsim: $!";
}
END { kill 'TERM', $sim_pid if $sim_pid; }
for (1 .. 200) { last if -s "$simdir/port"; usleep(50_000); }
die "fwsim did not start" unless -s "$simdir/port";
my $port = slurp_file("$simdir/port");
chomp $port;

my $node = PostgreSQL::Test::Cluster->new('escalation');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = 'http://127.0.0.1:$port/inference/v1'
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '20ms'
fw_tier.retry_after_cap = '20ms'
fw_tier.flush_interval = '100ms'
fw_tier.max_attempts = 4
fw_tier.alert_windows = 2
max_connections = 40
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.workloads (workload, on_overload, priority_window) VALUES
	('wconc', 'priority', NULL),
	('w429', 'priority', NULL),
	('w503u', 'priority', NULL),
	('w2s', 'priority', '2 seconds'),
	('wrestart', 'priority', NULL),
	('walert', 'priority', NULL);
});

# ---- exactly one escalation for many concurrent 503s --------------------
$node->pgbench(
	'--no-vacuum --client=16 --jobs=4 --transactions=5',
	0,
	[qr{processed: 80/80}],
	[qr{}],
	'16 backends hit 503 Overloaded on standard at once',
	{
		'020_overload' =>
		  q{SELECT fw_complete('storm [fwsim:overload]', 'wconc');}
	});
$node->safe_psql('postgres', 'SELECT fw_flush()');

is( $node->safe_psql('postgres',
		"SELECT path, escalations, windows_in_row FROM fw_tier.status WHERE workload = 'wconc'"),
	'priority|1|1',
	'one escalation, workload now on priority');
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 1 AND bool_and(ended IS NULL AND trigger = 'overloaded')"
		  . " FROM fw_tier.escalations WHERE workload = 'wconc'"),
	'exactly one open row in fw_tier.escalations');
is( $node->safe_psql('postgres',
		"SELECT count(DISTINCT call_id) FILTER (WHERE outcome = 'ok'),"
		  . " count(*) FILTER (WHERE outcome = 'ok' AND path <> 'priority'),"
		  . " count(*) FILTER (WHERE outcome = 'overloaded' AND path <> 'standard')"
		  . " FROM fw_tier.calls WHERE workload = 'wconc'"),
	'80|0|0',
	'every call succeeded on priority; every 503 came from standard');
is( $node->safe_psql('postgres',
		"SELECT s.overloaded_503 = (SELECT count(*) FROM fw_tier.calls"
		  . " WHERE workload = 'wconc' AND outcome = 'overloaded')"
		  . " FROM fw_tier.status s WHERE workload = 'wconc'"),
	't',
	'shared counters agree with the call log');

# ---- 429 and 503 Unavailable never escalate -----------------------------
$node->psql('postgres', q{SELECT fw_complete('slow down [fwsim:ratelimit]', 'w429')});
$node->psql('postgres', q{SELECT fw_complete('broken [fwsim:unavailable]', 'w503u')});
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT workload, path, escalations, rate_limited_429 > 0, unavailable_503 > 0"
		  . " FROM fw_tier.status WHERE workload IN ('w429', 'w503u') ORDER BY 1"),
	"w429|standard|0|t|f\nw503u|standard|0|f|t",
	'429 and 503 unavailable leave the workload on standard');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.calls WHERE workload IN ('w429', 'w503u')"
		  . " AND (path <> 'standard' OR service_tier IS NOT NULL)"),
	'0', 'no attempt of theirs went to priority');

# ---- batch (policy retry) never escalates --------------------------------
my ($ret) = $node->psql('postgres',
	q{SELECT fw_complete('nightly [fwsim:overload]', 'batch')});
isnt($ret, 0, 'batch call fails after its retries on standard');
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT path, escalations, overloaded_503 > 1 FROM fw_tier.status WHERE workload = 'batch'"),
	'standard|0|t', 'batch stays on standard');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.escalations WHERE workload = 'batch'"),
	'0', 'no escalation row for batch');

# ---- a 2 s window expires on time ----------------------------------------
my $t0 = time();
is( $node->safe_psql('postgres',
		q{SELECT fw_complete('spike [fwsim:overload]', 'w2s') IS NOT NULL}),
	't', 'w2s escalates and succeeds');
is($node->safe_psql('postgres',
		"SELECT path FROM fw_tier.status WHERE workload = 'w2s'"),
	'priority', 'w2s is on priority inside its window')
  if time() - $t0 < 1.5;
ok( $node->poll_query_until('postgres',
		"SELECT path = 'standard' FROM fw_tier.status WHERE workload = 'w2s'"),
	'w2s is back on standard');
ok(time() - $t0 >= 1.9, 'not before the window ended');
ok( $node->poll_query_until('postgres',
		"SELECT ended IS NOT NULL FROM fw_tier.escalations WHERE workload = 'w2s'"),
	'the worker closed the window');
my $closed_after = time() - $t0;
ok($closed_after < 15, "closed within a generous margin ($closed_after s)");
is( $node->safe_psql('postgres',
		"SELECT ended = priority_until, priority_until - started,"
		  . " trigger, windows_in_row FROM fw_tier.escalations WHERE workload = 'w2s'"),
	't|00:00:02|overloaded|1',
	'the row records a 2 s window ended at priority_until');
# past the window and its per-backend jitter (at most 10% = 0.2 s)
usleep(500_000) while time() - $t0 < 2.6;
$node->safe_psql('postgres', q{SELECT fw_complete('calm again', 'w2s')});
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT path, service_tier IS NULL FROM fw_tier.calls WHERE workload = 'w2s'"
		  . " ORDER BY started_at DESC, attempt DESC LIMIT 1"),
	'standard|t', 'a new call after the window goes to standard');

# ---- restart inside a window keeps priority -----------------------------
$node->safe_psql('postgres', q{SELECT fw_escalate('wrestart', '10 minutes')});
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM fw_tier.escalations WHERE workload = 'wrestart' AND ended IS NULL"),
	'manual window recorded');
$node->restart;
is( $node->safe_psql('postgres',
		"SELECT path FROM fw_tier.status WHERE workload = 'wrestart'"),
	'priority', 'still on priority after a restart')
  or diag $node->safe_psql('postgres', 'SELECT * FROM fw_tier.status');
$node->safe_psql('postgres', q{SELECT fw_complete('after restart', 'wrestart')});
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT path, service_tier FROM fw_tier.calls WHERE workload = 'wrestart'"),
	'priority|priority', 'the first call after the restart goes to priority');
is( $node->safe_psql('postgres',
		"SELECT count(*), bool_and(trigger = 'manual') FROM fw_tier.escalations WHERE workload = 'wrestart'"),
	'1|t', 'still one row for the window');
# the windows that were open before the restart and are over now are closed
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.escalations WHERE ended IS NULL AND priority_until <= now()"),
	'0', 'no stale open row');

# ---- de-escalation ends the window now -----------------------------------
$node->safe_psql('postgres', q{SELECT fw_deescalate('wrestart')});
is( $node->safe_psql('postgres',
		"SELECT path FROM fw_tier.status WHERE workload = 'wrestart'"),
	'standard', 'fw_deescalate ends the window');
ok( $node->poll_query_until('postgres',
		"SELECT ended IS NOT NULL FROM fw_tier.escalations WHERE workload = 'wrestart'"),
	'row closed');
my ($rc, $out, $err) = $node->psql('postgres', q{SELECT fw_escalate('no_such_workload')},
	extra_params => ['-v', 'VERBOSITY=verbose']);
like($err, qr/22023/, 'unknown workload is 22023');

# ---- two windows in a row raise the alert, once ------------------------
$node->safe_psql('postgres', q{SELECT fw_escalate('walert', '2 seconds')});
ok( $node->poll_query_until('postgres',
		"SELECT path = 'standard' FROM fw_tier.status WHERE workload = 'walert'"),
	'first window over');
my $alert_out = $node->safe_psql('postgres', q{
LISTEN fw_tier_alert;
SELECT fw_escalate('walert', '2 seconds') IS NOT NULL;
SELECT pg_sleep(1);
SELECT 1;
});
is( $node->safe_psql('postgres',
		"SELECT windows_in_row, alert FROM fw_tier.status WHERE workload = 'walert'"),
	'2|t', 'second window in a row: alert flag');
like($alert_out, qr/fw_tier_alert.*walert.*windows_in_row.*2/,
	'NOTIFY fw_tier_alert with a JSON payload');
ok( $node->wait_for_log(
		qr/WARNING:  fw_tier: workload "walert" has been escalated to priority for 2 windows in a row/),
	'WARNING in the server log');

# ... and clears once the workload has been back on Standard for one full
# window length (2 s here): a window opened later starts a new run
ok( $node->poll_query_until('postgres',
		"SELECT path = 'standard' FROM fw_tier.status WHERE workload = 'walert'"),
	'second window over');
is($node->safe_psql('postgres', "SELECT alert FROM fw_tier.status WHERE workload = 'walert'"),
	't', 'alert still raised right after the run');
ok( $node->poll_query_until('postgres',
		"SELECT NOT alert FROM fw_tier.status WHERE workload = 'walert'"),
	'alert clears one window length after the run');
is($node->safe_psql('postgres',
		"SELECT priority_until < now() - interval '2 seconds' FROM fw_tier.status WHERE workload = 'walert'"),
	't', 'not before that window length');

$node->stop;
done_testing();
