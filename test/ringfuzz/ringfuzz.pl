# The ring fuzzer: SEED and CASES from the environment (test/ringfuzz/run.sh).
# Each case makes calls whose records stay in the ring, stops the server,
# damages the ring file once at random (RingFuzz::fuzz_case), starts it
# again and checks: no crash, no crash-restart, the server answers, and the
# records that were not damaged land (exactly, for single-field damage).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../../t";
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FwSim;
use RingFuzz;

my $seed = $ENV{RINGFUZZ_SEED} // 1;
my $cases = $ENV{RINGFUZZ_CASES} // 20;
my $sim = FwSim->start('--time-scale', '0');
my $ctx = fuzz_setup(
	name => 'ringfuzz',
	url => $sim->url . '/inference/v1',
	ring => $ENV{RINGFUZZ_RING} // '64kB');

srand($seed);
my (%kinds, $landed, $expected_total, $pushed);
my $failed = 0;
for my $case (1 .. $cases)
{
	my $res = fuzz_case($ctx, $case);
	$kinds{ $res->{kind} }++;
	$landed += $res->{landed};
	$pushed += $res->{pushed};
	$expected_total += $res->{expected} if defined $res->{expected};
	ok(!@{ $res->{problems} }, "seed $seed case $case: $res->{kind}")
	  or do { diag join('; ', @{ $res->{problems} }); $failed++ };
}
my $status = $ctx->{node}->safe_psql('postgres',
	'SELECT records_corrupt, records_skipped FROM fw_tier.log_status');
diag sprintf(
	"ringfuzz seed %d: %d cases, %d failed, %d records pushed, %d landed; damage kinds: %s",
	$seed, $cases, $failed, $pushed, $landed,
	join(', ', map { "$_ $kinds{$_}" } sort keys %kinds));
$ctx->{node}->stop;
$sim->stop;
done_testing();
