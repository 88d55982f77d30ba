# Write-ahead attempts (issue 18): an attempt in flight when its process
# dies is still one row.
#
# Pins: a backend SIGKILLed while the provider trickles its answer (the
# headers, with x-request-id, have arrived) leaves exactly one 'unknown'
# row after the crash-restart, with that request id, its max_tokens and a
# worst-case cost at the path's prices; one killed before any header
# leaves one 'unknown' row without a request id, at
# fw_tier.max_output_tokens; while an attempt is in flight the flusher
# writes the records behind it (no stall) and never the in-flight one; an
# immediate stop (pg_ctl stop -m immediate) leaves the same 'unknown' row
# after a restart with another max_connections (the intent file is
# re-sized); nothing is duplicated and every sim request is a row.
use strict;
use warnings;
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

plan skip_all => 'FWSIM is not set' unless $ENV{FWSIM} && -x $ENV{FWSIM};

my $sim = FwSim->start('--time-scale', '0');
my $model = 'accounts/fireworks/models/kimi-k2p6';

my $node = PostgreSQL::Test::Cluster->new('inflight');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.flush_interval = '100ms'
fw_tier.request_timeout = '300s'
fw_tier.max_output_tokens = 777
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', qq{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.prices VALUES ('$model', 'standard', 1.0, 0.5, 2.0);
});

sub flush
{
	$node->safe_psql('postgres', "SET statement_timeout = '120s'; SELECT fw_flush()");
}

sub wait_until
{
	my ($what, $cond) = @_;
	my $t0 = time;
	while (time - $t0 < 120)
	{
		return 1 if $cond->();
		usleep(50_000);
	}
	diag("timed out waiting for $what");
	return 0;
}

sub sim_log { return $sim->log_requests; }

# wait for the server to accept connections again after a crash
sub wait_up
{
	return wait_until('the server to come back', sub {
		my ($rc) = $node->psql('postgres', 'SELECT 1', timeout => 10);
		return defined $rc && $rc == 0;
	});
}

# Start one call in a background session; returns (session, pid).
sub start_call
{
	my ($sql) = @_;
	my $bg = $node->background_psql('postgres', on_error_stop => 0);
	my $pid = $bg->query_safe('SELECT pg_backend_pid()');
	chomp $pid;
	$bg->query_until(qr/started/, "\\echo started\n$sql;\n");
	return ($bg, $pid);
}

# ---- 1. killed mid-body: headers (and the request id) arrived -------------
my ($bg, $pid) = start_call(
	qq{SELECT fw_chat('[{"role":"user","content":"one [fwsim:trickle=120000]"}]', 'default', '{"max_tokens": 100}')});
ok(wait_until('the sim to answer with headers', sub {
	grep { ($_->{status} // 0) == 200 } @{ sim_log() };
}), 'the simulator sent the headers of request 1');
my ($served1) = grep { ($_->{status} // 0) == 200 } @{ sim_log() };
my $reqid1 = $served1->{request_id};
like($reqid1, qr/^fwsim-[0-9a-f]{16}$/, 'the simulator reports its request id');
# the headers are on the wire at once; leave them time to be read
sleep(2);

# ---- 2. while 1 is in flight, the records behind it are flushed ----------
$node->safe_psql('postgres', q{SELECT fw_complete('quick')});
flush();
is($node->safe_psql('postgres', q{SELECT string_agg(outcome, ',') FROM fw_tier.calls}),
	'ok', 'a call made after the in-flight one is flushed; the in-flight one is not written');

kill 'KILL', $pid;
$bg->{run}->kill_kill;
ok(wait_up(), 'the server is back after the crash-restart');
flush();
is($node->safe_psql('postgres', qq{
SELECT count(*), min(outcome), min(request_id), min(completion_tokens),
       bool_and(prompt_tokens >= $served1->{prompt_tokens}),
       bool_and(cost_usd = (prompt_tokens * 1.0 + completion_tokens * 2.0) / 1000000),
       bool_and(cost_usd > 0), bool_and(http_status IS NULL)
FROM fw_tier.calls WHERE outcome <> 'ok'}),
	"1|unknown|$reqid1|100|t|t|t|t",
	'one unknown row, with its request id, max_tokens and the worst-case cost');

# ---- 3. killed before any header: no request id, max_output_tokens -------
my $before = scalar @{ sim_log() };
($bg, $pid) = start_call(q{SELECT fw_complete('two [fwsim:slow=120000]')});
ok(wait_until('request 2 to reach the simulator',
		sub { $sim->stats->{in_flight} >= 1 }),
	'request 2 is in flight');
kill 'KILL', $pid;
$bg->{run}->kill_kill;
ok(wait_up(), 'the server is back after the second crash-restart');
flush();
is($node->safe_psql('postgres', q{
SELECT count(*), bool_and(request_id IS NULL), min(completion_tokens),
       bool_and(cost_usd = (prompt_tokens * 1.0 + 777 * 2.0) / 1000000)
FROM fw_tier.calls WHERE outcome = 'unknown' AND request_id IS NULL}),
	'1|t|777|t', 'one unknown row without a request id, at fw_tier.max_output_tokens');

# ---- 4. pg_ctl stop -m immediate with an attempt in flight ----------------
($bg, $pid) = start_call(q{SELECT fw_complete('three [fwsim:slow=120000]')});
ok(wait_until('request 3 to reach the simulator',
		sub { $sim->stats->{in_flight} >= 1 }),
	'request 3 is in flight');
$node->stop('immediate');
$bg->{run}->kill_kill;
# another max_connections: the intent file changes size, and is recovered
# at its old one first
$node->append_conf('postgresql.conf', 'max_connections = 37');
$node->start;
flush();
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM fw_tier.calls WHERE outcome = 'unknown'}),
	'3', 'the attempt in flight at an immediate stop is an unknown row too');

# ---- every request the simulator saw is one row, none twice --------------
is($node->safe_psql('postgres', q{
SELECT count(*), count(DISTINCT (call_id, attempt)),
       count(DISTINCT request_id) = count(request_id)
FROM fw_tier.calls}),
	'4|4|t', 'four attempts, four rows, no duplicate');
$node->stop;
done_testing();
