# Nothing waits forever when the call log cannot drain (issue 10, item 4).
#
# Pins: with fw_tier.database missing and an 8 kB ring, calls complete
# (their records go to the spill), log_status says 'no database', fw_flush()
# can be cancelled, the spill survives a restart, and once the database and
# extension exist every row lands, in order, records_pushed = rows; a poison row (a CHECK constraint
# on fw_tier.calls) goes to fw_tier.calls_dead_letter while the others land;
# a lock held on fw_tier.calls shows 'lock timeout', calls do not hang, and
# the rows land once it is released; a cancel during a full-ring wait ends
# the call within a bound and its record still lands; a full spill drops,
# counts and warns; a hot standby calls fw_complete without a hang and
# log_status says 'standby' (issue 11: its log is shipped to the primary).
use strict;
use warnings;
use IPC::Run;
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FwSim;

my $sim = FwSim->start('--time-scale', '0');
my $node = PostgreSQL::Test::Cluster->new('drain');
$node->init(allows_streaming => 1);
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[ $sim->url ]}/inference/v1'
fw_tier.database = 'fwdb'
fw_tier.log_buffer = '8kB'
fw_tier.log_content = on
fw_tier.flush_interval = '100ms'
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.workloads (workload) VALUES ('wd'), ('poison');
});

sub status
{
	my ($cols) = @_;
	return $node->safe_psql('postgres', "SELECT $cols FROM fw_tier.log_status");
}

sub calls
{
	my ($n, $tag, $workload) = @_;
	$workload //= 'wd';
	return $node->psql('postgres',
		"SET statement_timeout = '120s';"
		  . " SELECT count(fw_complete('$tag ' || g, '$workload')) FROM generate_series(1, $n) g");
}

sub flush
{
	return $node->psql('postgres', "SET statement_timeout = '120s'; SELECT fw_flush()");
}

# psql in the background; returns (harness, \$out, \$err)
sub bg_psql
{
	my ($db, $sql) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-h', $node->host, '-p', $node->port,
			'-d', $db, '-c', $sql ],
		'>', \$out, '2>', \$err);
	return ($h, \$out, \$err);
}

sub wait_pid_waiting
{
	my ($like) = @_;
	my $pid;
	for (1 .. 600)
	{
		$pid = $node->safe_psql('postgres',
			"SELECT pid FROM pg_stat_activity WHERE query LIKE '$like' AND wait_event_type = 'Extension' AND pid <> pg_backend_pid()");
		last if $pid ne '';
		usleep(50_000);
	}
	return $pid;
}

# ---- fw_tier.database missing, tiny ring: calls complete, nothing lost -----
ok($node->poll_query_until('postgres',
		"SELECT drain_state = 'no database' FROM fw_tier.log_status"),
	"log_status says 'no database'");
my $n = 200;
my $t0 = time();
my ($ret, $out, $err) = calls($n, 'nodb');
my $elapsed = time() - $t0;
is($ret, 0, "$n calls with the database missing complete") or diag $err;
cmp_ok($elapsed, '<', 60, sprintf('without waiting on the full ring (%.1f s)', $elapsed));
is(status('spill_records > 0, records_dropped, records_spilled + 0 > 0'), 't|0|t',
	'the records beyond the ring went to the spill, none dropped');

# fw_flush() waits for a database that does not exist: cancel ends it
my ($h, $hout, $herr) = bg_psql('postgres', 'SELECT fw_flush()');
my $fpid = wait_pid_waiting('SELECT fw_flush()');
ok($fpid ne '', 'fw_flush() waits');
$t0 = time();
$node->safe_psql('postgres', "SELECT pg_cancel_backend($fpid)");
$h->finish;
my $flush_cancel_ms = (time() - $t0) * 1000;
like($$herr, qr/canceling statement due to user request/, 'a cancel ends it');
cmp_ok($flush_cancel_ms, '<', 5000, sprintf('within 5 s (%.0f ms)', $flush_cancel_ms));

is(status('records_pushed'), $n, "records_pushed = $n");

# the spill survives a restart: found, counted, drained later in order
my $spilled = status('spill_records');
my $log_off = -s $node->logfile;
$node->restart;
is(status('spill_records'), $spilled, "after a restart the spill still holds its $spilled records");
ok($node->wait_for_log(qr/the call-log spill holds $spilled records/, $log_off),
	'and the server log says so');

$node->safe_psql('postgres', 'CREATE DATABASE fwdb');
$node->safe_psql('fwdb', 'CREATE EXTENSION fw_tier');
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns once fwdb has the extension') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*), count(DISTINCT call_id) FROM fw_tier.calls WHERE prompt LIKE 'nodb %'"),
	"$n|$n", "all $n rows land");
is( $node->safe_psql('fwdb',
		"SELECT count(DISTINCT x) > 1, count(*) FILTER (WHERE x < prev) FROM"
		  . " (SELECT x, lag(x) OVER (ORDER BY call_id) AS prev FROM"
		  . "  (SELECT xmin::text::bigint AS x, call_id FROM fw_tier.calls WHERE prompt LIKE 'nodb %') r) s"),
	't|0', 'in the order they were made: each batch (transaction) holds later calls than the one before (ring first, then the spill)');
is(status('records_flushed, spill_records, spill_bytes, drain_state'),
	"$n|0|0|ok", 'records_flushed = rows, the spill is empty, the state ok');
ok(!glob($node->data_dir . '/pg_fw_tier/spill.0*'), 'no spill segment is left');

# ---- a poison row goes to the dead letters, the rest lands -----------------
$node->safe_psql('fwdb',
	q{ALTER TABLE fw_tier.calls ADD CONSTRAINT no_poison CHECK (workload <> 'poison')});
($ret, $out, $err) = $node->psql('postgres',
	"SELECT count(fw_complete('mix ' || g, CASE WHEN g = 6 THEN 'poison' ELSE 'wd' END))"
	  . " FROM generate_series(1, 11) g");
is($ret, 0, 'a statement with one poison call among ten') or diag $err;
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'mix %'"),
	'10', 'the ten good rows land');
is( $node->safe_psql('fwdb',
		"SELECT count(*), min(sqlstate), min(record->>'workload'), min(record->>'prompt'),"
		  . " bool_and(error LIKE '%no_poison%')"
		  . " FROM fw_tier.calls_dead_letter"),
	'1|23514|poison|mix 6|t', 'the poison row is a dead letter, with its error');
is(status('dead_letters, drain_state'), '1|ok', 'counted; the log drains');
# a batch written again (a crash between COMMIT and the tail moving on)
# does not dead-letter an attempt twice
is( $node->safe_psql('fwdb', q{
	INSERT INTO fw_tier.calls_dead_letter (call_id, attempt, record, sqlstate, error,
										   origin_sysid, origin_node)
	SELECT call_id, attempt, record, sqlstate, error, origin_sysid, origin_node
	  FROM fw_tier.calls_dead_letter
	ON CONFLICT (origin_sysid, origin_node, call_id, attempt) DO NOTHING;
	SELECT count(*) FROM fw_tier.calls_dead_letter}),
	'1', 'one dead letter per (origin, call_id, attempt): the insert the flusher runs adds none');
ok($node->wait_for_log(qr/1 of \d+ call-log records were refused by fw_tier.calls/),
	'the flusher warns');

# the dead-letter table refuses too: the dead-letter file
$node->safe_psql('fwdb',
	q{ALTER TABLE fw_tier.calls_dead_letter ADD CONSTRAINT refuse_all CHECK (false) NOT VALID});
($ret, $out, $err) = $node->psql('postgres',
	"SELECT count(fw_complete('mix2 ' || g, CASE WHEN g = 2 THEN 'poison' ELSE 'wd' END))"
	  . " FROM generate_series(1, 3) g");
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'mix2 %'"),
	'2', 'the good rows land');
my $dlf = $node->data_dir . '/pg_fw_tier/dead_letter.jsonl';
my @lines = -e $dlf ? split(/\n/, slurp_file($dlf)) : ();
is(scalar(@lines), 1, 'the poison row is one line of pg_fw_tier/dead_letter.jsonl');
like($lines[0] // '', qr/"sqlstate": "23514".*"dead_letter_table_error": .*refuse_all.*"prompt": "mix2 2"/,
	'with both errors and the record');
is(status('dead_letters'), '2', 'counted');
$node->safe_psql('fwdb', 'ALTER TABLE fw_tier.calls_dead_letter DROP CONSTRAINT refuse_all');

# ---- a lock held on fw_tier.calls: no hang, 'lock timeout', rows land later -
my ($lh, $lout, $lerr) = bg_psql('fwdb',
	'BEGIN; LOCK TABLE fw_tier.calls IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(10); COMMIT;');
ok( $node->poll_query_until('fwdb',
		"SELECT count(*) = 1 FROM pg_locks WHERE relation = 'fw_tier.calls'::regclass AND mode = 'AccessExclusiveLock' AND granted"),
	'a session holds ACCESS EXCLUSIVE on fw_tier.calls');
$t0 = time();
($ret, $out, $err) = calls(40, 'locked');
$elapsed = time() - $t0;
is($ret, 0, '40 calls while the table is locked complete') or diag $err;
cmp_ok($elapsed, '<', 30, sprintf('and do not hang (%.1f s)', $elapsed));
ok($node->poll_query_until('postgres',
		"SELECT drain_state = 'lock timeout' FROM fw_tier.log_status"),
	"log_status says 'lock timeout'");
$lh->finish;
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns once the lock is gone') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'locked %'"),
	'40', 'the 40 rows land after the lock is released');
is(status('drain_state'), 'ok', 'and the state is ok again');

# ---- a lock on fw_tier.escalations stops the window sync, not the log ------
$log_off = -s $node->logfile;
($lh, $lout, $lerr) = bg_psql('fwdb',
	'BEGIN; LOCK TABLE fw_tier.escalations IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60); COMMIT;');
ok( $node->poll_query_until('fwdb',
		"SELECT count(*) = 1 FROM pg_locks WHERE relation = 'fw_tier.escalations'::regclass AND mode = 'AccessExclusiveLock' AND granted"),
	'a session holds ACCESS EXCLUSIVE on fw_tier.escalations');
$node->safe_psql('postgres', "SELECT fw_escalate('wd', '10 minutes')");
($ret, $out, $err) = calls(10, 'escsync');
is($ret, 0, '10 calls with a window to record') or diag $err;
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns while fw_tier.escalations is locked') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'escsync %'"),
	'10', 'the 10 rows land meanwhile');
is($node->safe_psql('fwdb',
		"SELECT count(*) FROM pg_locks WHERE relation = 'fw_tier.escalations'::regclass AND mode = 'AccessExclusiveLock' AND granted"),
	'1', 'the lock was still held');
is(status('drain_state'), 'ok', 'drain_state does not blame fw_tier.calls');
ok($node->wait_for_log(qr/WARNING:  fw_tier flusher: could not record escalation windows in fw_tier.escalations/, $log_off),
	'the sync failure is logged');
$node->safe_psql('fwdb',
	"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'BEGIN; LOCK TABLE fw_tier.escalations%'");
$lh->finish;
ok( $node->poll_query_until('fwdb',
		"SELECT count(*) > 0 FROM fw_tier.escalations WHERE workload = 'wd' AND ended IS NULL"),
	'the window is recorded once the lock is gone');
$node->safe_psql('postgres', "SELECT fw_deescalate('wd')");

# ---- a cancel during a full-ring wait: ends the call, keeps the record ----
$node->safe_psql('postgres', q{ALTER SYSTEM SET fw_tier.flush_interval = '10s'});
$node->reload;
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'"),
	'the flusher has left');
my $launcher = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier launcher'");
my $pushed0 = status('records_pushed');
my $waits0 = status('writer_waits');
kill 'STOP', $launcher;    # nothing drains; the state is still ok
($h, $hout, $herr) = bg_psql('postgres',
	"SELECT count(fw_complete('stalled ' || g, 'wd')) FROM generate_series(1, 100) g");
ok($node->poll_query_until('postgres',
		"SELECT writer_waits > $waits0 FROM fw_tier.log_status"),
	'a call waits for ring space');
my $wpid = wait_pid_waiting('SELECT count(fw_complete(%');
$t0 = time();
$node->safe_psql('postgres', "SELECT pg_cancel_backend($wpid)");
$h->finish;
my $cancel_ms = (time() - $t0) * 1000;
like($$herr, qr/canceling statement due to user request/, 'the cancel ends the call');
cmp_ok($cancel_ms, '<', 5000, sprintf('within 5 s (%.0f ms)', $cancel_ms));
my $made = status('records_pushed') - $pushed0;
cmp_ok($made, '>', 0, "$made records pushed before the cancel");
kill 'CONT', $launcher;
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'stalled %'"),
	$made, 'every record, the cancelled call\'s included, lands');

# statement_timeout ends the same wait
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'"),
	'the flusher has left again');
$pushed0 = status('records_pushed');
kill 'STOP', $launcher;
$t0 = time();
($ret, $out, $err) = $node->psql('postgres',
	"SET statement_timeout = '1s'; SELECT count(fw_complete('timeout ' || g, 'wd')) FROM generate_series(1, 100) g");
my $timeout_s = time() - $t0;
like($err, qr/canceling statement due to statement timeout/, 'statement_timeout ends a full-ring wait');
cmp_ok($timeout_s, '<', 6, sprintf('in time (%.1f s for a 1 s timeout)', $timeout_s));
$made = status('records_pushed') - $pushed0;
kill 'CONT', $launcher;
($ret, $out, $err) = flush();
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'timeout %'"),
	$made, "the $made records, the timed-out call's included, land");

# and pg_terminate_backend: the session ends, its last record is kept
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'"),
	'the flusher has left again');
$pushed0 = status('records_pushed');
$waits0 = status('writer_waits');
kill 'STOP', $launcher;
($h, $hout, $herr) = bg_psql('postgres',
	"SELECT count(fw_complete('terminated ' || g, 'wd')) FROM generate_series(1, 100) g");
ok($node->poll_query_until('postgres',
		"SELECT writer_waits > $waits0 FROM fw_tier.log_status"),
	'a call waits for ring space');
$wpid = wait_pid_waiting('SELECT count(fw_complete(%');
$t0 = time();
$node->safe_psql('postgres', "SELECT pg_terminate_backend($wpid)");
$h->finish;
my $term_ms = (time() - $t0) * 1000;
like($$herr, qr/terminating connection due to administrator command/, 'terminate ends the waiting session');
cmp_ok($term_ms, '<', 5000, sprintf('within 5 s (%.0f ms)', $term_ms));
$made = status('records_pushed') - $pushed0;
kill 'CONT', $launcher;
$node->safe_psql('postgres', q{ALTER SYSTEM RESET fw_tier.flush_interval});
$node->reload;
($ret, $out, $err) = flush();
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'terminated %'"),
	$made, "the $made records, the terminated call's included, land");
is(status('writer_waits > 0, records_dropped'), 't|0', 'the wait is counted, nothing dropped');

# a client found gone during the wait (client_connection_check_interval):
# no interrupt but cancel/terminate is serviced before the record has a
# place, so the session ends only after it is spilled, and it lands
$node->safe_psql('postgres', q{ALTER SYSTEM SET fw_tier.flush_interval = '3s'});
$node->reload;
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'"),
	'the flusher has left again');
my $sent0 = $sim->stats->{total};
$waits0 = status('writer_waits');
kill 'STOP', $launcher;
($h, $hout, $herr) = bg_psql('postgres',
	"SET client_connection_check_interval = '100ms'; SELECT count(fw_complete('gone ' || g, 'wd')) FROM generate_series(1, 100) g");
ok($node->poll_query_until('postgres',
		"SELECT writer_waits > $waits0 FROM fw_tier.log_status"),
	'a call waits for ring space');
$wpid = wait_pid_waiting('%fw_complete(_gone%');
ok($wpid ne '', 'the waiting backend is found');
$h->kill_kill;    # the client goes away mid-wait
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $wpid"),
	'the backend of the vanished client ends');
my $sent = $sim->stats->{total} - $sent0;
kill 'CONT', $launcher;
$node->safe_psql('postgres', q{ALTER SYSTEM RESET fw_tier.flush_interval});
$node->reload;
($ret, $out, $err) = flush();
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'gone %'"),
	$sent, "each of the $sent requests sent lands, the one waiting when the client went included");

# ---- every row refused the same way: the environment, not dead letters ----
ok( $node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'"),
	'no flusher runs');
kill 'STOP', $launcher;
calls(5, 'closed');
$node->safe_psql('fwdb', q{
CREATE FUNCTION public.calls_closed() RETURNS trigger LANGUAGE plpgsql
AS $$BEGIN RAISE EXCEPTION 'calls are closed'; END$$;
CREATE TRIGGER calls_closed BEFORE INSERT ON fw_tier.calls
FOR EACH ROW EXECUTE FUNCTION public.calls_closed();
});
my $dl0 = status('dead_letters');
kill 'CONT', $launcher;
$node->psql('postgres', "SET statement_timeout = '200ms'; SELECT fw_flush()");
ok($node->poll_query_until('postgres',
		"SELECT drain_state = 'insert failing: calls are closed' FROM fw_tier.log_status"),
	"log_status says 'insert failing: calls are closed'");
is(status('dead_letters') - $dl0, 0, 'no row is dead-lettered for it');
$node->safe_psql('fwdb', 'DROP TRIGGER calls_closed ON fw_tier.calls');
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns once the trigger is gone') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'closed %'"),
	'5', 'the 5 kept records land');

# ---- the extension dropped in fwdb: 'no extension', then the rows land ----
$node->safe_psql('fwdb', 'DROP EXTENSION fw_tier CASCADE');
($ret, $out, $err) = calls(30, 'noext');
is($ret, 0, '30 calls with the extension dropped complete') or diag $err;
ok($node->poll_query_until('postgres',
		"SELECT drain_state = 'no extension' FROM fw_tier.log_status"),
	"log_status says 'no extension'");
$node->safe_psql('fwdb', 'CREATE EXTENSION fw_tier');
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns once it is back') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'noext %'"),
	'30', 'the 30 rows land');

# ---- the spill full: dropped, counted, warned -----------------------------
$node->safe_psql('postgres', q{ALTER SYSTEM SET fw_tier.log_spill_limit = '32kB'});
$node->reload;
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS false');
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'fwdb'");
$pushed0 = status('records_pushed');
($ret, $out, $err) = calls(100, 'full');
is($ret, 0, '100 calls with ring and spill full complete') or diag $err;
ok($node->poll_query_until('postgres',
		"SELECT drain_state = 'no connections' FROM fw_tier.log_status"),
	"log_status says 'no connections'");
my $dropped = status('records_dropped');
cmp_ok($dropped, '>', 0, "$dropped records dropped");
my @warned = $err =~ /WARNING:  fw_tier: call-log record dropped: the ring is full and the spill is full/g;
is(scalar(@warned), $dropped, 'a WARNING for each');
cmp_ok(status('spill_bytes'), '<=', 32 * 1024, 'the spill stays within fw_tier.log_spill_limit');
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'full %'"),
	100 - $dropped, 'all but the dropped land');
is(status('records_pushed') - $pushed0, 100 - $dropped, 'dropped records are not counted as pushed');
$node->safe_psql('postgres', q{ALTER SYSTEM RESET fw_tier.log_spill_limit});
$node->reload;

# ---- the spill cannot be created: the WARNING's DETAIL carries the OS error
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS false');
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'fwdb'");
my $fwdir = $node->data_dir . '/pg_fw_tier';
chmod(0500, $fwdir) or die "chmod: $!";
($ret, $out, $err) = calls(40, 'eperm');
chmod(0700, $fwdir) or die "chmod: $!";
is($ret, 0, '40 calls with the spill directory read-only complete') or diag $err;
like($err,
	qr/WARNING:  fw_tier: call-log record dropped: the ring is full and the spill file could not be opened\nDETAIL:  Permission denied; call_id \d+, attempt \d+; counted/,
	'the DETAIL names the OS error and the record');
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns') or diag $err;

# ---- a damaged spill record: skipped, counted, the others land, no crash --
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS false');
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'fwdb'");
($ret, $out, $err) = calls(60, 'spilldmg');
is($ret, 0, '60 calls spill') or diag $err;
my $in_spill = status('spill_records');
$node->stop('fast');
my @segs = glob($node->data_dir . '/pg_fw_tier/spill.0*');
is(scalar(@segs), 1, 'one spill segment');
# walk the frames: {len u32, state u32, ...}; damage the 10th record's prompt_len
open(my $sfh, '+<:raw', $segs[0]) or die;
my $off = 0;
for (1 .. 9)
{
	sysseek($sfh, $off, 0);
	sysread($sfh, my $hdr, 8);
	$off += unpack('V', $hdr);
}
sysseek($sfh, $off + 8, 0);
syswrite($sfh, pack('l<', 100_000_000));
close $sfh;
$log_off = -s $node->logfile;
$node->start;
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'spilldmg %'"),
	59, 'every record but the damaged one lands');
is(status('records_corrupt, spill_records, drain_state'), '1|0|ok',
	'the damage is counted once, the spill is empty again');
ok($node->wait_for_log(qr/WARNING:  fw_tier flusher: damaged record in call-log spill segment/, $log_off),
	'the flusher warns');
unlike(substr(slurp_file($node->logfile), $log_off), qr/terminated by signal/, 'no crash');

# ---- a spill segment larger than a segment: the excess is damage ----------
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS false');
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'fwdb'");
($ret, $out, $err) = calls(20, 'oversize');
is($ret, 0, '20 calls spill') or diag $err;
$node->stop('fast');
@segs = glob($node->data_dir . '/pg_fw_tier/spill.0*');
is(scalar(@segs), 1, 'one spill segment');
truncate($segs[0], 16 * 1024 * 1024 + 65536) or die "truncate: $!";
my $corrupt0;
$log_off = -s $node->logfile;
$node->start;
$corrupt0 = status('records_corrupt');
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'oversize %'"),
	20, 'the 20 records of the oversized segment land');
ok($node->wait_for_log(qr/WARNING:  fw_tier flusher: call-log spill segment \S+ is larger than 16777216 bytes/, $log_off),
	'the flusher warns that the segment is too large');
is(status('records_corrupt - ' . $corrupt0 . ', spill_records, drain_state'), '2|0|ok',
	'the zeros and the excess past 16 MB count once each; the spill is empty');
ok(!glob($node->data_dir . '/pg_fw_tier/spill.0*'), 'the segment is gone');

# ---- a spill segment that cannot be opened: an error, drain_state says so --
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS false');
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'fwdb'");
($ret, $out, $err) = calls(20, 'eacces');
is($ret, 0, '20 calls spill') or diag $err;
@segs = glob($node->data_dir . '/pg_fw_tier/spill.0*');
is(scalar(@segs), 1, 'one spill segment');
my $eacces_spilled = status('spill_records');
cmp_ok($eacces_spilled, '>', 0, "$eacces_spilled of them in the spill");
chmod(0000, $segs[0]) or die "chmod: $!";
$node->safe_psql('postgres', 'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
ok( $node->poll_query_until('postgres',
		"SELECT drain_state LIKE '%could not open file%spill.%' FROM fw_tier.log_status"),
	'drain_state names the segment that cannot be opened');
is(status('spill_records'), $eacces_spilled, 'its records are kept');
chmod(0600, $segs[0]) or die "chmod: $!";
($ret, $out, $err) = flush();
is($ret, 0, 'fw_flush() returns once it can be read') or diag $err;
is( $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'eacces %'"),
	20, 'and the 20 records land');
ok( $node->poll_query_until('postgres', "SELECT drain_state = 'ok' FROM fw_tier.log_status"),
	'the state is ok again');

# ---- a hot standby: calls do not hang, log_status says standby -------------
$node->backup('b1');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($node, 'b1', has_streaming => 1);
$standby->start;
$node->wait_for_catchup($standby);
$t0 = time();
($ret, $out, $err) = $standby->psql('postgres',
	"SET statement_timeout = '60s'; SELECT count(fw_complete('standby ' || g, 'wd')) FROM generate_series(1, 30) g");
$elapsed = time() - $t0;
is($ret, 0, '30 calls on the standby complete (8 kB ring)') or diag $err;
cmp_ok($elapsed, '<', 30, sprintf('without a hang (%.1f s)', $elapsed));
like($standby->safe_psql('postgres', 'SELECT drain_state FROM fw_tier.log_status'),
	qr/^standby/, "log_status says 'standby'");
# issue 11: the standby ships its log to the primary (t/072_standby.pl)
($ret, $out, $err) = $standby->psql('postgres', "SET statement_timeout = '60s'; SELECT fw_flush()");
is($ret, 0, 'fw_flush() on the standby returns once its records are shipped') or diag $err;
my $log = slurp_file($standby->logfile);
unlike($log, qr/fw_tier (flusher|launcher).*exited with exit code/, 'no worker fails in a loop on the standby');
$standby->promote;
($ret, $out, $err) = $standby->psql('postgres', "SET statement_timeout = '120s'; SELECT fw_flush()");
is($ret, 0, 'after promotion fw_flush() returns') or diag $err;
is( $standby->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE 'standby %'"),
	'30', 'and the 30 calls made on the standby are in its fw_tier.calls');
$standby->stop;

diag sprintf('cancel latency: full-ring wait %.0f ms, fw_flush() with the database missing %.0f ms',
	$cancel_ms, $flush_cancel_ms);
$node->stop;
$sim->stop;
done_testing();
