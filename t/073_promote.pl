# Promotion of a shipping standby (issue 11).
#
# Pins: a client calls on the standby while it ships its log and while it
# is promoted (pg_promote mid-stream): afterwards the new primary's
# fw_tier.calls has exactly one row per call made there (count = distinct =
# calls), shipped before the promotion or flushed locally after it; an
# escalation window opened on the standby (by a shed request, in its own
# shared memory, nothing written there during recovery) is in the new
# primary's fw_tier.escalations after the promotion; no fw_tier worker
# fails in a loop; a budget's spend restored on the new primary counts the
# old primary's calls of the period (its lineage: one system identifier).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

plan skip_all => 'FWSIM is not set' unless $ENV{FWSIM} && -x $ENV{FWSIM};

my $sim = FwSim->start('--time-scale', '0');

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.api_key = 'promote-key'
fw_tier.database = 'fwdb'
fw_tier.flush_interval = '50ms'
fw_tier.log_content = on
});
$primary->start;
$primary->safe_psql('postgres', 'CREATE DATABASE fwdb');
$primary->safe_psql('fwdb', 'CREATE EXTENSION fw_tier');
# spend under a budget on the old primary, before the failover
$primary->safe_psql('fwdb', q{
SELECT fw_tier.set_price('accounts/fireworks/models/kimi-k2p6', 'standard', 1, 0.5, 2);
INSERT INTO fw_tier.workloads (workload) VALUES ('fbw');
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('fb', 'fbw', 'day', 100)});
$primary->safe_psql('fwdb', q{SELECT count(fw_complete('old primary spend ' || g, 'fbw')) FROM generate_series(1, 4) g});
$primary->safe_psql('fwdb', 'SELECT fw_flush()');
$primary->backup('bk');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

# ---- a window opened on the standby ----------------------------------------
$sim->rule(fault => 'overload', path => 'standard', count => 1);
is($standby->safe_psql('fwdb', q{SELECT fw_complete('shed on the standby', 'default')}),
	'Echo: shed on the standby', 'a shed call on the standby is answered on Priority');
is($standby->safe_psql('fwdb', q{SELECT path, escalations FROM fw_tier.status WHERE workload = 'default'}),
	'priority|1', "the standby's own shared memory holds the window");
is($standby->safe_psql('fwdb', q{SELECT count(*) FROM fw_tier.escalations}),
	'0', 'nothing is written to fw_tier.escalations during recovery');

# ---- calls on the standby across pg_promote ---------------------------------
# 400 calls of 10 ms each: about 4 s, the promotion in the middle
my $n = 400;
my $bg = $standby->background_psql('fwdb', on_error_stop => 0);
$bg->query_until(qr/started/, qq{
\\echo started
SELECT count(fw_complete('m [fwsim:slow=10] ' || g)) FROM generate_series(1, $n) g;
\\echo finished
});
# some are shipped before the promotion
ok( $primary->poll_query_until('fwdb',
		q{SELECT count(*) >= 20 FROM fw_tier.calls WHERE prompt LIKE 'm %'}),
	'the standby ships while the client calls');
my $shipped_before = $primary->safe_psql('fwdb', q{SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'm %'});
diag "$shipped_before rows shipped before the promotion";
$standby->safe_psql('postgres', 'SELECT pg_promote()');
ok($standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()'), 'promoted');
my $answered = $bg->query_until(qr/finished/, '');
like($answered, qr/^$n$/m, "the client's $n calls all answered across the promotion");
$bg->quit;

my ($ret, $out, $err) = $standby->psql('fwdb', "SET statement_timeout = '90s'; SELECT fw_flush()");
is($ret, 0, 'fw_flush() on the new primary returns') or diag $err;
is( $standby->safe_psql('fwdb', q{
	SELECT count(*), count(DISTINCT (origin_sysid, origin_node, call_id, attempt)),
		   count(DISTINCT prompt),
		   count(*) FILTER (WHERE origin_node = (SELECT origin_node FROM fw_tier.local_origin()))
	  FROM fw_tier.calls WHERE prompt LIKE 'm %'}),
	"$n|$n|$n|$n", "count = distinct = calls made ($shipped_before shipped before the promotion)");
is($standby->safe_psql('fwdb', 'SELECT drain_state, bytes_used, spill_records FROM fw_tier.log_status'),
	'ok|0|0', 'the new primary drains locally: nothing left');

# ---- the budget after the failover: the old primary's spend is counted ------
# the restore counts every origin of the system identifier (the lineage)
$standby->safe_psql('fwdb', q{SET statement_timeout = '60s'; SELECT fw_complete('after failover', 'fbw')});
$standby->safe_psql('fwdb', q{SET statement_timeout = '60s'; SELECT fw_flush()});
my ($spent, $all, $own) = split /\|/, $standby->safe_psql('fwdb', q{
	SELECT (SELECT spent_usd FROM fw_tier.budget_status WHERE budget = 'fb'),
		   (SELECT sum(cost_usd) FROM fw_tier.calls WHERE workload = 'fbw'),
		   (SELECT sum(cost_usd) FROM fw_tier.calls WHERE workload = 'fbw'
			   AND origin_node = (SELECT origin_node FROM fw_tier.local_origin()))});
cmp_ok($own, '>', 0, 'the new primary has its own spend under the budget');
cmp_ok(abs($spent - $all), '<', 0.000002,
	"the new primary's budget counts the old primary's spend of the period ($spent = $all)");
cmp_ok($spent, '>', $own + 0.000001, 'more than its own calls');

# ---- the standby's window, mirrored after the promotion ----------------------
ok( $standby->poll_query_until('fwdb',
		q{SELECT count(*) = 1 FROM fw_tier.escalations WHERE workload = 'default' AND database = 'fwdb'}),
	"the window opened on the standby is in the new primary's fw_tier.escalations");

my $log = slurp_file($standby->logfile);
unlike($log, qr/fw_tier (flusher|launcher|shipper).*exited with exit code/,
	'no fw_tier worker failed');

$standby->stop;
$primary->stop;
done_testing();
