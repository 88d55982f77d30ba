# The call log never loses a row.
#
# Pins: a SIGKILLed worker comes back after the crash-restart with the
# escalation state intact, and the N records that were still in the ring
# become exactly N rows; ROLLBACK, an error in a DO block and a
# statement_timeout cancel still log the attempt; a tiny ring (8 kB) with 8
# concurrent writers and a stalled worker makes writers wait (counted) and
# loses nothing.
use strict;
use warnings;
use File::Temp qw(tempdir);
use IPC::Run;
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $fwsim = $ENV{FWSIM} // "$ENV{TESTDIR}/test/fwsim/fwsim";
plan skip_all => "fwsim not built ($fwsim)" unless -x $fwsim;

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

sub new_node
{
	my ($name, $extra) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = 'http://127.0.0.1:$port/inference/v1'
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '20ms'
fw_tier.flush_interval = '100ms'
restart_after_crash = on
$extra
});
	$node->start;
	$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.workloads (workload) VALUES ('wkill'), ('wtx');
});
	return $node;
}

sub worker_pid
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		'SELECT worker_pid FROM fw_tier.log_status');
}

my $node = new_node('calllog', '');

# ---- worker SIGKILL: ring and escalation state survive ------------------
$node->safe_psql('postgres', q{SELECT fw_escalate('wkill', '10 minutes')});
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM fw_tier.escalations WHERE workload = 'wkill' AND ended IS NULL"),
	'window recorded before the kill');

# keep the records in the ring: the worker flushes only every 10 minutes now
$node->safe_psql('postgres', q{ALTER SYSTEM SET fw_tier.flush_interval = '10min'});
$node->reload;
usleep(300_000);
my $n = 60;
$node->safe_psql('postgres',
	"SELECT count(fw_complete('kill test ' || g, 'wkill')) FROM generate_series(1, $n) g");
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.calls WHERE workload = 'wkill'"),
	'0', 'records are still in the ring');
ok($node->safe_psql('postgres', 'SELECT bytes_used > 0 FROM fw_tier.log_status') eq 't',
	'ring not empty');

my $old_pid = worker_pid($node);
ok($old_pid =~ /^\d+$/, "worker running ($old_pid)");
kill 'KILL', $old_pid;
# the postmaster restarts everything; wait for a new worker
ok( $node->poll_query_until('postgres',
		"SELECT worker_pid IS NOT NULL AND worker_pid <> $old_pid FROM fw_tier.log_status"),
	'worker came back');
is( $node->safe_psql('postgres',
		"SELECT path FROM fw_tier.status WHERE workload = 'wkill'"),
	'priority', 'escalation state intact after the crash-restart');
$node->safe_psql('postgres', 'SET statement_timeout = \'60s\'; SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT count(*), count(DISTINCT call_id), bool_and(path = 'priority')"
		  . " FROM fw_tier.calls WHERE workload = 'wkill'"),
	"$n|$n|t", "exactly $n rows after the kill");
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.escalations WHERE workload = 'wkill'"),
	'1', 'one row for the window');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET fw_tier.flush_interval});
$node->reload;

# ---- rows survive ROLLBACK, errors and cancels ---------------------------
$node->safe_psql('postgres', q{
BEGIN;
SELECT fw_complete('rolled back', 'wtx');
ROLLBACK;
});
my ($ret, $out, $err) = $node->psql('postgres', q{
DO $$BEGIN PERFORM fw_complete('then failed', 'wtx'); RAISE EXCEPTION 'boom'; END$$;
});
like($err, qr/boom/, 'DO block failed');
($ret, $out, $err) = $node->psql('postgres', q{
SET statement_timeout = '300ms';
SELECT fw_complete('too slow [fwsim:slow=20000]', 'wtx');
});
like($err, qr/statement timeout/, 'call cancelled by statement_timeout');
$node->safe_psql('postgres', 'SELECT fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT count(DISTINCT call_id), count(*) FILTER (WHERE outcome = 'ok'),"
		  . " count(*) FILTER (WHERE outcome = 'cancelled')"
		  . " FROM fw_tier.calls WHERE workload = 'wtx'"),
	'3|2|1', 'rollback, DO-block error and cancel all logged');

$node->stop;

# ---- a tiny ring, eight writers, a stalled worker ------------------------
my $tiny = new_node('tinyring', qq{
fw_tier.log_buffer = '8kB'
fw_tier.log_content = on
});
is($tiny->safe_psql('postgres', 'SELECT ring_size FROM fw_tier.log_status'),
	'8192', 'ring is 8 kB');

my $wpid = worker_pid($tiny);
kill 'STOP', $wpid;
my $clients = 8;
my $per_client = 40;
my $script = "$simdir/push.sql";
open(my $fh, '>', $script) or die;
print $fh "SELECT fw_complete(repeat('tiny ring ', 40) || :client_id, 'wtx');\n";
close $fh;
my ($pb_out, $pb_err) = ('', '');
my $pgbench = IPC::Run::start(
	[
		'pgbench', '--no-vacuum', "--client=$clients", "--jobs=$clients",
		"--transactions=$per_client", '-f', $script,
		'-h', $tiny->host, '-p', $tiny->port, 'postgres'
	],
	'>', \$pb_out, '2>', \$pb_err);
# writers fill the ring and wait for space
ok( $tiny->poll_query_until('postgres',
		"SELECT writer_waits >= 1 FROM fw_tier.log_status"),
	'writers wait while the ring is full');
kill 'CONT', $wpid;
$pgbench->finish;
is($pgbench->result(0), 0, 'pgbench finished') or diag $pb_err;
$tiny->safe_psql('postgres', 'SELECT fw_flush()');
my $total = $clients * $per_client;
is( $tiny->safe_psql('postgres',
		"SELECT count(*), count(DISTINCT call_id), count(prompt)"
		  . " FROM fw_tier.calls WHERE workload = 'wtx'"),
	"$total|$total|$total", "all $total records written, none lost");
is( $tiny->safe_psql('postgres',
		"SELECT records_pushed = records_flushed, bytes_used, writer_waits > 0"
		  . " FROM fw_tier.log_status"),
	"t|0|t", 'counters agree, ring empty, waits counted');

# ---- a role name in another encoding: the name columns are cleaned too ----
# (a LATIN1 database writes the role name as its byte 0xE9; in fw_tier.calls
# that byte is not text of this database: it becomes '?', as in text columns)
$tiny->safe_psql('postgres',
	"CREATE DATABASE lat1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
$tiny->safe_psql('lat1', "SET client_encoding = 'UTF8'; CREATE EXTENSION fw_tier; CREATE ROLE \"r\x{c3}\x{a9}\" SUPERUSER");
$tiny->safe_psql('lat1', "SET client_encoding = 'UTF8'; SET ROLE \"r\x{c3}\x{a9}\"; SELECT fw_complete('latin1 role')");
$tiny->safe_psql('postgres', "SET statement_timeout = '60s'; SELECT fw_flush()");
is( $tiny->safe_psql('postgres',
		"SELECT username::text, database::text FROM fw_tier.calls WHERE prompt = 'latin1 role'"),
	'r?|lat1', 'the LATIN1 role name lands with its non-ASCII byte as ?');
$tiny->stop;

done_testing();
