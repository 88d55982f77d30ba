# Central analytics over PostgreSQL's own logical replication (issue 11):
# README's "Many servers: one place for spend and 503s", run as written.
#
# Two publishers (app1, app2), each with calls answered and shed with 503
# Overloaded before the subscription (initial copy) and after it
# (streaming), publish fw_tier.calls with README's blocks; a third cluster
# (central) subscribes to both with README's blocks.  Pins: exact row
# counts per origin and in total; central's spend_daily and
# error_rates_hourly equal the sums of the publishers' own (same numbers,
# each publisher's own prices kept in its rows); a publisher's
# purge_calls does not delete centrally (publish = 'insert') and streaming
# goes on after it; central's own calls land in the same table beside the
# replicated ones; a replication role without BYPASSRLS copies nothing
# (the reason README grants it).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

my $fwsim = $ENV{FWSIM} // "$ENV{TESTDIR}/test/fwsim/fwsim";
plan skip_all => "fwsim not built ($fwsim)" unless -x $fwsim;
$ENV{FWSIM} = $fwsim;

# ---- README's blocks ----------------------------------------------------
my $readme = "$FindBin::Bin/../README.md";
open(my $fh, '<', $readme) or die "open $readme: $!";
my @lines = <$fh>;
close($fh);
my (@pub_blocks, @central_blocks);
for (my $i = 0; $i < @lines; $i++)
{
	next unless $lines[$i] =~ /^```sql\s*$/;
	my $marker = '';
	for (my $j = $i - 1; $j >= 0; $j--)
	{
		next if $lines[$j] =~ /^\s*$/;
		$marker = $1 if $lines[$j] =~ /^<!--\s*readme-test:\s*(.*?)\s*-->\s*$/;
		last;
	}
	my $text = '';
	for ($i++; $i < @lines && $lines[$i] !~ /^```\s*$/; $i++) { $text .= $lines[$i]; }
	push @pub_blocks, $text if $marker =~ /t\/074_fleet_logical\.pl runs it on each publisher/;
	push @central_blocks, $text if $marker =~ /t\/074_fleet_logical\.pl runs it on the central server/;
}
is(scalar(@pub_blocks), 1, 'README has the publisher block');
is(scalar(@central_blocks), 2, 'README has the central blocks (setup, queries)');
like($pub_blocks[0], qr/publish = 'insert'/, 'README publishes inserts only');

# ---- the simulator and three clusters ----------------------------------
my $sim = FwSim->start('--time-scale', '0');
my $base = $sim->url . '/inference/v1';
my $model = 'accounts/fireworks/models/kimi-k2p6';

sub fw_conf
{
	my ($db) = @_;
	return qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '$base'
fw_tier.database = '$db'
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '20ms'
fw_tier.retry_after_cap = '20ms'
fw_tier.flush_interval = '100ms'
fw_tier.max_attempts = 4
};
}

my %pub;
for my $name ('app1', 'app2')
{
	my $n = PostgreSQL::Test::Cluster->new($name);
	$n->init(allows_streaming => 'logical');
	$n->append_conf('postgresql.conf', fw_conf($name) . "max_wal_senders = 10\nmax_replication_slots = 10\n");
	$n->start;
	$n->safe_psql('postgres', "CREATE DATABASE $name");
	$pub{$name} = $n;
}
is($pub{app1}->safe_psql('postgres', 'SHOW wal_level'), 'logical', 'publishers run wal_level = logical');

# each publisher prices its calls with its own figures (integers, so that
# every cost is a whole number of millionths: sums compare exactly)
my %prices = (app1 => [1, 0, 2, 3, 0, 6], app2 => [4, 0, 8, 6, 0, 12]);
for my $name ('app1', 'app2')
{
	my @p = @{ $prices{$name} };
	$pub{$name}->safe_psql($name, qq{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.workloads (workload, on_overload) VALUES ('chat', 'priority'), ('other', 'priority');
INSERT INTO fw_tier.prices VALUES ('$model', 'standard', $p[0], $p[1], $p[2]),
	('$model', 'priority', $p[3], $p[4], $p[5]);
});
}

my $central = PostgreSQL::Test::Cluster->new('central');
$central->init;
$central->append_conf('postgresql.conf', fw_conf('central'));
$central->start;
$central->safe_psql('postgres', 'CREATE DATABASE central');

# $plain calls answered, $shed calls shed once (503 Overloaded on
# Standard, then answered on Priority: two rows, one of them 'overloaded');
# the window is closed after each, so every shed call meets Standard.
sub make_calls
{
	my ($name, $tag, $plain, $shed) = @_;
	my $n = $pub{$name};
	$n->safe_psql($name,
		"SELECT fw_complete('$name $tag plain ' || i, CASE WHEN i % 2 = 0 THEN 'chat' ELSE 'other' END)"
		  . " FROM generate_series(1, $plain) i");
	for my $i (1 .. $shed)
	{
		$n->safe_psql($name, "SELECT fw_complete('$name $tag spike $i [fwsim:overload]', 'chat')");
		$n->safe_psql($name, "SELECT fw_deescalate('chat')");
	}
	$n->safe_psql($name, 'SELECT fw_flush()');
}

# poll a query until it returns 't', at most $secs seconds
sub wait_for
{
	my ($node, $db, $sql, $secs, $what) = @_;
	my $deadline = time() + $secs;
	while (time() < $deadline)
	{
		my $r = $node->safe_psql($db, $sql);
		return 1 if $r eq 't';
		usleep(100_000);
	}
	diag("timed out after ${secs}s: $what");
	return 0;
}

# phase 1, before any subscription: the initial copy's rows
make_calls('app1', 'before', 4, 2);
make_calls('app2', 'before', 3, 1);
is($pub{app1}->safe_psql('app1', "SELECT count(*), count(*) FILTER (WHERE outcome = 'overloaded') FROM fw_tier.calls"),
	'8|2', 'app1 logged 4 + 2 x 2 attempts, two of them shed');

# ---- README: publishers, then central ----------------------------------
for my $name ('app1', 'app2')
{
	$pub{$name}->safe_psql($name, $pub_blocks[0]);
}
my $setup = $central_blocks[0];
for my $name ('app1', 'app2')
{
	my $ci = 'host=' . $pub{$name}->host . ' port=' . $pub{$name}->port . " dbname=$name user=fw_fleet";
	$setup =~ s/host=\S+ port=\d+ dbname=$name user=fw_fleet[^']*/$ci/
	  or die "README's central block has no conninfo for $name";
}
$central->safe_psql('central', $setup);

ok( wait_for($central, 'central',
		"SELECT count(*) = 2 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel",
		60, 'initial table sync'),
	'both subscriptions finished their initial copy');

# phase 2, after the subscription: streamed rows
make_calls('app1', 'after', 5, 1);
make_calls('app2', 'after', 2, 3);

my %n;
for my $name ('app1', 'app2')
{
	$n{$name} = $pub{$name}->safe_psql($name, 'SELECT count(*) FROM fw_tier.calls');
}
is($n{app1}, 8 + 5 + 2, 'app1: 15 rows');
is($n{app2}, 5 + 2 + 6, 'app2: 13 rows');
ok( wait_for($central, 'central',
		"SELECT count(*) = $n{app1} + $n{app2} FROM fw_tier.calls", 60, 'streamed rows'),
	'central has every row of both publishers');

# per origin: the publishers' own identities, exact counts
my %sysid;
for my $name ('app1', 'app2')
{
	$sysid{$name} = $pub{$name}->safe_psql($name, 'SELECT system_identifier FROM pg_control_system()');
	my $node = $pub{$name}->safe_psql($name, 'SELECT origin_node FROM fw_tier.local_origin()');
	is($central->safe_psql('central',
			"SELECT origin_node, count(*), count(*) FILTER (WHERE database = '$name')"
			  . " FROM fw_tier.calls WHERE origin_sysid = $sysid{$name} GROUP BY 1"),
		"$node|$n{$name}|$n{$name}", "central: $n{$name} rows of ${name}'s origin (system identifier, node name)");
}
isnt($sysid{app1}, $sysid{app2}, 'the two publishers are two origins');

# ---- the views over the union: the sums of the publishers' own ----------
sub view_rows
{
	my ($node, $db, $sql) = @_;
	my %r;
	for my $line (split /\n/, $node->safe_psql($db, $sql))
	{
		my @f = split /\|/, $line, -1;
		my $key = join('|', splice(@f, 0, 2));
		$r{$key} = \@f;
	}
	return \%r;
}

sub sum_rows
{
	my (@maps) = @_;
	my %s;
	for my $m (@maps)
	{
		for my $k (keys %$m)
		{
			my $v = $m->{$k};
			$s{$k} //= [ (0) x @$v ];
			$s{$k}[$_] += $v->[$_] for 0 .. $#$v;
		}
	}
	return \%s;
}

sub fmt
{
	my ($m) = @_;
	return join("\n", map { "$_ => " . join(',', map { 0 + $_ } @{ $m->{$_} }) } sort keys %$m);
}

my $spend_sql = q{SELECT workload, path || ' ' || model, calls, attempts,
	coalesce(prompt_tokens, 0), coalesce(completion_tokens, 0), cost_usd * 1000000, unpriced_attempts
	FROM fw_tier.spend_daily};
my $errors_sql = q{SELECT hour, path, attempts, overloaded_503, rate_limited_429, unavailable_503
	FROM fw_tier.error_rates_hourly};

my $spend_pubs = sum_rows(map { view_rows($pub{$_}, $_, $spend_sql) } 'app1', 'app2');
my $spend_central = view_rows($central, 'central', $spend_sql);
ok(keys %$spend_pubs >= 3, 'publishers\' spend_daily has rows for both workloads and paths');
is(fmt($spend_central), fmt($spend_pubs),
	'central spend_daily = the sum of both publishers\' spend_daily (calls, attempts, tokens, cost)');
my $cost_central = $central->safe_psql('central', 'SELECT sum(cost_usd) FROM fw_tier.calls');
my $cost_pubs = $pub{app1}->safe_psql('app1', 'SELECT sum(cost_usd) FROM fw_tier.calls')
  + $pub{app2}->safe_psql('app2', 'SELECT sum(cost_usd) FROM fw_tier.calls');
ok($cost_central > 0, "central cost is not zero ($cost_central)");
is($cost_central + 0, $cost_pubs + 0, 'central total cost = the publishers\' (each priced with its own prices)');

my $err_pubs = sum_rows(map { view_rows($pub{$_}, $_, $errors_sql) } 'app1', 'app2');
my $err_central = view_rows($central, 'central', $errors_sql);
is(fmt($err_central), fmt($err_pubs),
	'central error_rates_hourly = the sum of both publishers\' (attempts, 503 Overloaded, 429, 503 Unavailable)');
is($central->safe_psql('central',
		"SELECT database, count(*) FROM fw_tier.calls WHERE outcome = 'overloaded' GROUP BY 1 ORDER BY 1"),
	"app1|3\napp2|4", 'central: 3 + 4 shed attempts, by origin');

# README's query block runs on central as written
$central->safe_psql('central', $central_blocks[1]);

# ---- a publisher's retention stays local (publish = 'insert') -----------
is($pub{app1}->safe_psql('app1', "SELECT fw_tier.purge_calls('0 seconds')"), $n{app1},
	'app1 purges all its rows');
make_calls('app1', 'after purge', 1, 0);
ok( wait_for($central, 'central',
		"SELECT count(*) = $n{app1} + 1 FROM fw_tier.calls WHERE database = 'app1'", 60,
		'row after the purge'),
	'central keeps app1\'s purged rows, and streaming goes on after the purge');
is($pub{app1}->safe_psql('app1', 'SELECT count(*) FROM fw_tier.calls'), '1', 'app1 has only its new row');

# ---- central's own calls, beside the replicated rows --------------------
$central->safe_psql('central', q{
CREATE EXTENSION IF NOT EXISTS fw_tier;
INSERT INTO fw_tier.workloads (workload) VALUES ('central_own');
SELECT fw_complete('central ' || i, 'central_own') FROM generate_series(1, 2) i;
SELECT fw_flush();
});
is($central->safe_psql('central',
		"SELECT count(*) FROM fw_tier.calls WHERE database = 'central' AND workload = 'central_own'"),
	'2', 'central\'s own flusher writes its own calls into the same table');
is($central->safe_psql('central', 'SELECT count(*) FROM fw_tier.calls'),
	$n{app1} + 1 + $n{app2} + 2, 'central total: both publishers\' rows and its own');
is($central->safe_psql('central',
		"SELECT count(*) FROM pg_stat_subscription WHERE subname LIKE 'fw_calls_%' AND pid IS NOT NULL"),
	'2', 'both subscriptions still streaming');

# ---- a call id of another origin is another call ------------------------
# A third server's call may have the same call_id as one of app1's: the key
# and spend_daily tell them apart by origin.
my $q_calls = q{SELECT sum(calls) FROM fw_tier.spend_daily WHERE workload = 'chat'};
my $before = $central->safe_psql('central', $q_calls);
$central->safe_psql('central', q{
INSERT INTO fw_tier.calls (origin_sysid, origin_node, call_id, attempt, started_at, database,
		username, workload, path, model, outcome, cost_usd)
SELECT 42, 'app3', call_id, attempt, started_at, 'app3', username, workload, path, model, outcome, cost_usd
  FROM fw_tier.calls WHERE database = 'app1' AND workload = 'chat' ORDER BY call_id, attempt LIMIT 1;
});
is($central->safe_psql('central', $q_calls), $before + 1,
	'spend_daily counts a call of another origin with an equal call_id as one more call');

# ---- why BYPASSRLS: without it the initial copy is silently empty -------
$pub{app2}->safe_psql('app2', q{
CREATE ROLE fw_norls LOGIN REPLICATION;
GRANT USAGE ON SCHEMA fw_tier TO fw_norls;
GRANT SELECT ON fw_tier.calls TO fw_norls;
});
$central->safe_psql('postgres', 'CREATE DATABASE rlscheck');
my $ci2 = 'host=' . $pub{app2}->host . ' port=' . $pub{app2}->port . ' dbname=app2 user=fw_norls';
$central->safe_psql('rlscheck', qq{
CREATE EXTENSION fw_tier;
CREATE SUBSCRIPTION norls CONNECTION '$ci2' PUBLICATION fw_tier_calls WITH (slot_name = 'norls');
});
ok( wait_for($central, 'rlscheck',
		"SELECT count(*) = 1 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel", 60,
		'rlscheck sync'),
	'a subscription as a role without BYPASSRLS finishes its initial copy');
is($central->safe_psql('rlscheck', 'SELECT count(*) FROM fw_tier.calls'), '0',
	'... having copied none of app2\'s rows (row level security)');
$central->safe_psql('rlscheck', 'DROP SUBSCRIPTION norls');

$central->stop;
$pub{$_}->stop for 'app1', 'app2';
$sim->stop;
done_testing();
