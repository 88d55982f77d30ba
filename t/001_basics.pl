# Basics SQL alone cannot show: not preloaded -> 55000 with a hint;
# pg_cancel_backend stops an in-flight request promptly (57014); the
# backend's memory stays flat across many calls is left to bench/.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

my $sim = FwSim->start('--time-scale', '0');

# --- not preloaded ---------------------------------------------------------
my $plain = PostgreSQL::Test::Cluster->new('plain');
$plain->init;
$plain->start;
$plain->safe_psql('postgres', 'CREATE EXTENSION fw_tier');
my ($ret, $out, $err) = $plain->psql('postgres',
	"SELECT fw_complete('hi')", extra_params => ['-v', 'VERBOSITY=verbose']);
isnt($ret, 0, 'fw_complete fails without preload');
like($err, qr/55000/, 'SQLSTATE 55000 without preload');
like($err, qr/shared_preload_libraries/, 'the hint names shared_preload_libraries');
$plain->stop;

# --- cancel ----------------------------------------------------------------
my $node = PostgreSQL::Test::Cluster->new('main');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION fw_tier');
is($node->safe_psql('postgres', "SELECT fw_complete('ping')"), 'Echo: ping',
	'a call works');

my $bg = $node->background_psql('postgres', on_error_stop => 0);
my $pid = $bg->query_safe('SELECT pg_backend_pid()');
$bg->query_until(qr/started/, q{
\echo started
SELECT fw_complete('[fwsim:hang] wait forever', 'batch');
});
# wait until the request is in flight at the simulator
my $inflight = 0;
for (1 .. 200)
{
	$inflight = $sim->stats->{in_flight};
	last if $inflight >= 1;
	usleep(25_000);
}
is($inflight, 1, 'request is in flight');
my $t0 = time;
$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
my $res = $bg->query('SELECT 1');
my $elapsed = time - $t0;
like($bg->{stderr}, qr/canceling statement due to user request/, 'cancel reports 57014');
# generous margin on a loaded 2-core box: the target (100 ms) is measured by bench/
cmp_ok($elapsed, '<', 5, "cancel returned promptly ($elapsed s)");
$bg->{stderr} = '';
is($bg->query("SELECT fw_complete('after cancel')"), 'Echo: after cancel',
	'the session works after a cancel');
is($bg->{stderr}, '', 'and reports no error');
$bg->quit;

$node->stop;
$sim->stop;
done_testing();
