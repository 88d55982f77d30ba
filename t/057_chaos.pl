# Chaos, short version of bench/chaos/run.sh (issue 18).
#
# Pins: while 3 clients call fw_complete and fw_complete_batch in loops,
# kill -9 of random cluster processes (client backends, launcher,
# flusher, checkpointer ...) and one `pg_ctl stop -m immediate` plus
# restart lose no request the simulator served: each is exactly one row
# of fw_tier.calls (by the request id it issued, and by count for those
# without one), none is written twice, and every client gets answers
# again after the last kill.  Counts only; generous timeouts.
use strict;
use warnings;
use POSIX ();
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

plan skip_all => 'FWSIM is not set' unless $ENV{FWSIM} && -x $ENV{FWSIM};

my $KILLS = 8;
my $CLIENTS = 3;
my $sim = FwSim->start('--time-scale', '0.1');
my $model = 'accounts/fireworks/models/kimi-k2p6';

my $node = PostgreSQL::Test::Cluster->new('chaos');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.flush_interval = '100ms'
fw_tier.request_timeout = '60s'
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', qq{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.prices VALUES ('$model', 'standard', 1.0, 0.5, 2.0);
});
$sim->reset;

my $dir = PostgreSQL::Test::Utils::tempdir();
my $connstr = $node->connstr('postgres');

sub server_up
{
	# psql may exit before it reads its input (the server is still in
	# recovery): IPC::Run then dies on the broken pipe, which is "not up"
	my $rc = eval { ($node->psql('postgres', 'SELECT 1', timeout => 20))[0] };
	return defined $rc && $rc == 0;
}

sub wait_up
{
	my $t0 = time;
	while (time - $t0 < 180)
	{
		return 1 if server_up();
		usleep(100_000);
	}
	return 0;
}

# ---- clients: each success appends a timestamp to its file -----------------
my @kids;
for my $n (1 .. $CLIENTS)
{
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		my $k = 0;
		open(STDERR, '>', '/dev/null');
		$ENV{PGOPTIONS} = '-c statement_timeout=60s';
		my $parent = getppid();
		# the test stops the clients; a test that died cannot, so also stop
		# when its process is gone
		while (!-e "$dir/stop" && getppid() == $parent)
		{
			$k++;
			my $sql =
			    $k % 3 == 0 ? "SELECT length(fw_complete('c$n k$k'))"
			  : $k % 3 == 1
			  ? "SELECT array_length(fw_complete_batch(ARRAY['c$n k$k a', 'c$n k$k b'], 'default'), 1)"
			  : "SELECT length(fw_complete('c$n k$k [fwsim:trickle=300]'))";
			my $rc = system('psql', '-X', '-q', '-A', '-t', '-d', $connstr,
				'-c', $sql, '-o', '/dev/null');
			if ($rc == 0)
			{
				open(my $fh, '>>', "$dir/client.$n") or die;
				printf $fh "%.3f\n", time;
				close($fh);
			}
			else
			{
				usleep(50_000);
			}
		}
		POSIX::_exit(0);	# no END blocks: they would stop the node and the sim
	}
	push @kids, $pid;
}

# ---- the killer ------------------------------------------------------------
my ($kills, $restarts) = (0, 0);
my %what;
my $t0 = time;
my $all_up = 1;
while ($kills < $KILLS && time - $t0 < 240)
{
	usleep(200_000 + int(rand(400_000)));
	my $pm = (split /\n/, slurp_file($node->data_dir . '/postmaster.pid'))[0];
	my @procs = grep { !/logger/ } split /\n/, `ps -o pid=,args= --ppid $pm`;
	next unless @procs;
	my $pick = $procs[ int(rand(@procs)) ];
	my ($pid) = $pick =~ /^\s*(\d+)/;
	next unless kill('KILL', $pid);
	$kills++;
	my $kind = $pick =~ /\[local\]/ ? 'client backend'
	  : $pick =~ /postgres: (fw_tier \w+|[a-z ]+?)\s*$/ ? $1 : 'other';
	$what{$kind}++;
	$all_up &&= wait_up();
}
note("killed: " . join(', ', map { "$_ $what{$_}" } sort keys %what));
# and one immediate stop, with calls in flight
usleep(300_000);
$node->stop('immediate');
$restarts++;
$node->start;
my $last_kill = time;
$all_up &&= wait_up();
ok($all_up, "the server came back after each of $kills kills and $restarts immediate stop");

# ---- after the last kill: answers again, then the count --------------------
sleep(4);
open(my $fh, '>', "$dir/stop") or die;
close($fh);
waitpid($_, 0) for @kids;
my $t1 = time;
sleep(1) while $sim->stats->{in_flight} > 0 && time - $t1 < 120;
$node->safe_psql('postgres', "SET statement_timeout = '120s'; SELECT fw_flush()");

my $answering = 0;
for my $n (1 .. $CLIENTS)
{
	my @ts = -e "$dir/client.$n" ? split(/\n/, slurp_file("$dir/client.$n")) : ();
	$answering++ if @ts && $ts[-1] > $last_kill;
}
is($answering, $CLIENTS, 'every client gets answers again after the last kill');

my $served = $sim->stats->{total};
my @log = @{ $sim->log_requests };
my %ids = map { $_->{request_id} => 1 } grep { $_->{request_id} } @log;
my $without = grep { !$_->{request_id} } @log;
my %rows = map { $_ => 1 } split /\n/,
  $node->safe_psql('postgres', 'SELECT request_id FROM fw_tier.calls WHERE request_id IS NOT NULL');
my ($nrows, $noid, $dup_ids, $unknown) = split /\|/, $node->safe_psql('postgres', q{
SELECT count(*), count(*) FILTER (WHERE request_id IS NULL),
       count(request_id) - count(DISTINCT request_id),
       count(*) FILTER (WHERE outcome = 'unknown')
FROM fw_tier.calls});
my $unmatched = grep { !$rows{$_} } keys %ids;
my $stray = grep { !$ids{$_} } keys %rows;
my $lost = $unmatched + $without - $noid;
$lost = 0 if $lost < 0;
note("served $served, rows $nrows, unknown $unknown, without request id: served $without, rows $noid");

cmp_ok($served, '>', 0, 'the simulator served requests');
is(scalar(@log), $served, "the simulator's log holds every request it served");
is($lost, 0, 'lost = 0: every served request is a row');
is($dup_ids + $stray, 0, 'duplicates = 0: no request id twice, none the simulator never issued');
cmp_ok($nrows, '>=', $served, 'at least one row per served request');

$node->stop;
done_testing();
