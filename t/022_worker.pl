# The background workers and fw_tier.database.
#
# Pins: a missing fw_tier.database is reported once, not in a FATAL restart
# loop; once the database and the extension exist the call log is written
# there, calls made in other databases included (database column right);
# DROP DATABASE of fw_tier.database succeeds while a flusher is connected
# with records in the ring, which then wait and land in the re-created
# database, none lost; the launcher holds no database; the flusher drains
# the ring at shutdown.
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

my $node = PostgreSQL::Test::Cluster->new('worker');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.database = 'fwdb'
fw_tier.flush_interval = '100ms'
});
# count only this run's lines: the log file outlives a previous run
my $log_start = -s $node->logfile // 0;
$node->start;

sub count_log
{
	my ($re) = @_;
	my @lines = grep { /$re/ } split /\n/,
	  substr(slurp_file($node->logfile), $log_start);
	return scalar @lines;
}

sub calls
{
	my ($db, $n, $tag) = @_;
	$node->safe_psql($db,
		"SELECT count(fw_complete('$tag ' || g)) FROM generate_series(1, $n) g");
}

sub flush
{
	my ($db) = @_;
	$node->safe_psql($db, "SET statement_timeout = '120s'; SELECT fw_flush()");
}

my $missing = qr/fw_tier launcher: database "fwdb" does not exist/;

# ---- fw_tier.database missing: said once, no restart loop ----------------
$node->safe_psql('postgres', 'CREATE EXTENSION fw_tier');
ok($node->wait_for_log($missing, $log_start),
	'the launcher says the database is missing');
calls('postgres', 3, 'before fwdb');
sleep(4);
is(count_log($missing), 1, 'said once, not in a loop');
is(count_log(qr/FATAL/), 0, 'no FATAL in the server log');
is(count_log(qr/"fw_tier [a-z]+" .* exited with exit code/), 0,
	'no fw_tier worker exited with an error');
is(count_log(qr/HINT:  Create database "fwdb" and run CREATE EXTENSION fw_tier/), 1,
	'the message says what to do');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fw_tier launcher' AND datname IS NULL"),
	'1', 'the launcher is connected to no database');
is($node->safe_psql('postgres',
		'SELECT bytes_used > 0, worker_pid IS NOT NULL FROM fw_tier.log_status'),
	't|t', 'records wait in the ring');

# ---- create it: the call log goes there, from every database --------------
$node->safe_psql('postgres', 'CREATE DATABASE fwdb');
$node->safe_psql('fwdb', 'CREATE EXTENSION fw_tier');
flush('postgres');
is( $node->safe_psql('fwdb',
		"SELECT count(*), count(DISTINCT call_id), bool_and(database = 'postgres')"
		  . " FROM fw_tier.calls"),
	'3|3|t', 'calls made in postgres before fwdb existed are in fwdb');
calls('fwdb', 2, 'in fwdb');
flush('fwdb');
is( $node->safe_psql('fwdb',
		"SELECT database, count(*) FROM fw_tier.calls GROUP BY 1 ORDER BY 1"),
	"fwdb|2\npostgres|3", 'the database column names the calling database');
is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.calls'),
	'0', 'nothing is written to the calling database');

# ---- DROP DATABASE while a flusher is connected with work -----------------
$node->safe_psql('postgres', q{ALTER SYSTEM SET fw_tier.flush_interval = '10min'});
$node->reload;
usleep(500_000);
calls('postgres', 4, 'before drop');
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity"
		  . " WHERE backend_type = 'fw_tier flusher' AND datname = 'fwdb'"),
	'a flusher is connected to fwdb');
is($node->safe_psql('fwdb', 'SELECT count(*) FROM fw_tier.calls'),
	'5', 'the new records are still in the ring');
my $t0 = time();
my ($ret, $out, $err) = $node->psql('postgres', 'DROP DATABASE fwdb');
my $elapsed = time() - $t0;
is($ret, 0, 'DROP DATABASE fwdb succeeds') or diag $err;
cmp_ok($elapsed, '<', 30, "and does not hang ($elapsed s)");
ok($node->wait_for_log(qr/fw_tier flusher: leaving database "fwdb"/, $log_start),
	'the flusher left for the drop');
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'"),
	'no flusher while fwdb is gone');

# ---- re-create it: logging resumes, nothing lost ---------------------------
$node->safe_psql('postgres', 'CREATE DATABASE fwdb');
$node->safe_psql('fwdb', 'CREATE EXTENSION fw_tier');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET fw_tier.flush_interval});
$node->reload;
calls('postgres', 2, 'after drop');
flush('postgres');
is( $node->safe_psql('fwdb',
		"SELECT count(*), count(DISTINCT call_id), bool_and(database = 'postgres')"
		  . " FROM fw_tier.calls"),
	'6|6|t', 'the 4 records from before the drop and 2 new ones are in the new fwdb');
is(count_log(qr/FATAL/), 0, 'still no FATAL in the server log');
is(count_log(qr/"fw_tier [a-z]+" .* exited with exit code/), 0,
	'still no fw_tier worker exited with an error');

# ---- the flusher drains the ring at shutdown -------------------------------
$node->safe_psql('postgres', q{ALTER SYSTEM SET fw_tier.flush_interval = '10min'});
$node->reload;
usleep(500_000);
calls('postgres', 5, 'at shutdown');
is($node->safe_psql('fwdb', 'SELECT count(*) FROM fw_tier.calls'),
	'6', 'records still in the ring before the stop');
$node->stop('fast');
$node->start;
is($node->safe_psql('fwdb', 'SELECT count(*) FROM fw_tier.calls'),
	'11', 'the final drain wrote them before the stop');
is(count_log(qr/remain in the ring file/), 0, 'nothing was left in the ring');

$node->stop;
$sim->stop;
done_testing();
