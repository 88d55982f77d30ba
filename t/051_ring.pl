# A damaged call-log ring never takes the server down (issue 10, item 2).
#
# Pins: the issue's repro (one READY record's prompt_len set to 1e8 while
# the server is stopped) no longer crash-loops the postmaster: the record
# is skipped, counted in records_corrupt, reported once, and the others
# land; the flusher checks what it reads from the live mapping too; the
# fuzzer (RingFuzz.pm, test/ringfuzz/run.sh for longer runs) damages the
# file once per case, every kind of damage once and then at random for a
# few fixed seeds: no crash, no crash-restart, the server answers, the
# undamaged records land.
use strict;
use warnings;
use Time::HiRes qw(time);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FwSim;
use RingFuzz;

my $sim = FwSim->start('--time-scale', '0');
# the default ring size, as in the issue: with a small one, what follows
# the mapping may be mapped too and the overrun read would not fault
my $ctx = fuzz_setup(
	name => 'ring',
	url => $sim->url . '/inference/v1',
	ring => '4MB');
my $node = $ctx->{node};

sub status
{
	return $node->safe_psql('postgres',
		"SELECT $_[0] FROM fw_tier.log_status");
}

# ---- the issue's repro: prompt_len = 1e8 on one READY record ------------
$node->safe_psql('postgres',
	"SELECT count(fw_complete('repro ' || g, 'fz')) FROM generate_series(1, 10) g");
$node->stop('fast');
my @ready = ring_ready(ring_read($ctx->{ring}));
is(scalar(@ready), 10, 'the 10 records are in the ring file');
ring_poke($ctx->{ring}, $ready[4]{fileoff} + 8, pack('l<', 100_000_000));
$node->start;
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
$node->safe_psql('postgres', "SET statement_timeout = '60s'; SELECT fw_flush()");
is_deeply([ fuzz_check_server($ctx) ], [], 'no crash, no restart, the server answers');
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'repro %'"),
	'9', 'the 9 undamaged records land');
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt = 'repro 5'"),
	'0', 'the damaged one does not');
is(status('records_corrupt'), '1', 'counted in records_corrupt');
my $log = substr(slurp_file($node->logfile), $ctx->{log_start});
my @said = $log =~ /skipped 1 damaged records in call-log ring file/g;
is(scalar(@said), 1, 'reported once');
like($log, qr/a content length is out of range/, 'saying what was wrong');

# ---- the flusher checks the live mapping too --------------------------------
RingFuzz::close_fwdb($node);
$ctx->{log_start} = -s $node->logfile;
$node->safe_psql('postgres',
	"SELECT count(fw_complete('live ' || g, 'fz')) FROM generate_series(1, 6) g");
@ready = ring_ready(ring_read($ctx->{ring}));
is(scalar(@ready), 6, 'six records wait in the ring of the running server');
# MAP_SHARED: a write to the file is what every process sees
ring_poke($ctx->{ring}, $ready[1]{fileoff} + 12, pack('l<', 100_000_000));
ring_poke($ctx->{ring}, $ready[3]{fileoff} + 400, pack('c', 77));
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
$node->safe_psql('postgres', "SET statement_timeout = '60s'; SELECT fw_flush()");
is_deeply([ fuzz_check_server($ctx) ], [], 'no crash');
is( $node->safe_psql('fwdb',
		"SELECT string_agg(prompt, ',' ORDER BY prompt) FROM fw_tier.calls WHERE prompt LIKE 'live %'"),
	'live 1,live 3,live 5,live 6', 'the four undamaged records land');
is(status('records_corrupt'), '3', 'two more counted');
ok($node->wait_for_log(qr/WARNING:  fw_tier flusher: skipped 2 damaged records/,
		$ctx->{log_start}), 'the flusher warns once for both');

# a live header with head near UINT64_MAX: reset to 0, not to Max(head, tail)
# (which would wrap at the next push and lose every record after it)
RingFuzz::close_fwdb($node);
$ctx->{log_start} = -s $node->logfile;
$node->safe_psql('postgres',
	"SELECT count(fw_complete('wrap ' || g, 'fz')) FROM generate_series(1, 3) g");
ring_poke($ctx->{ring}, 24, pack('Q<', ~7));    # head = 2^64 - 8
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
$node->safe_psql('postgres', "SET statement_timeout = '60s'; SELECT fw_flush()");
ok($node->wait_for_log(qr/WARNING:  fw_tier flusher: .*head and tail/, $ctx->{log_start}),
	'the flusher reports the damaged head');
$node->safe_psql('postgres',
	"SELECT count(fw_complete('afterwrap ' || g, 'fz')) FROM generate_series(1, 5) g");
$node->safe_psql('postgres', "SET statement_timeout = '60s'; SELECT fw_flush()");
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'afterwrap %'"),
	'5', 'the 5 records pushed after the reset land');
my $hdr = ring_read($ctx->{ring});
cmp_ok($hdr->{head}, '<', 1 << 40, 'the ring restarted from 0, far from wrapping');
is_deeply([ fuzz_check_server($ctx) ], [], 'no crash');
$node->stop;

# ---- the fuzzer: every kind of damage once, then a few seeds at random ----
# (a 64 kB ring: the records wrap around, so SKIP padding is damaged too)
$ctx = fuzz_setup(
	name => 'fuzz',
	url => $sim->url . '/inference/v1',
	ring => '64kB');
$node = $ctx->{node};
my $t0 = time();
my ($cases, $landed, $pushed, $corrupt) = (0, 0, 0, 0);
srand(1);
for my $kind (qw(len state prompt_len answer_len path outcome encoding
	workload model error dbname crc payload headtail wholefile region bitflips))
{
	my $res = fuzz_case($ctx, "k$kind", kind => $kind, calls => 6);
	$cases++;
	$landed += $res->{landed};
	$pushed += $res->{pushed};
	$corrupt += $res->{corrupt};
	ok(!@{ $res->{problems} }, "damage $kind: no crash, records accounted for")
	  or diag join('; ', @{ $res->{problems} });
}
for my $seed (2 .. 3)
{
	srand($seed);
	for my $case (1 .. 5)
	{
		my $res = fuzz_case($ctx, "s${seed}c$case", calls => 6);
		$cases++;
		$landed += $res->{landed};
		$pushed += $res->{pushed};
		$corrupt += $res->{corrupt};
		ok(!@{ $res->{problems} }, "seed $seed case $case ($res->{kind})")
		  or diag join('; ', @{ $res->{problems} });
	}
}
cmp_ok($corrupt, '>=', 10, 'damage was found and counted');
diag sprintf('ring fuzz: %d cases in %.0f s, 0 crashes, %d of %d records landed, records_corrupt %s',
	$cases, time() - $t0, $landed, $pushed, $corrupt);

$node->stop;
$sim->stop;
done_testing();
