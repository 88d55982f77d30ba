# Read replicas (issue 11): the row's origin, and a standby's call log.
#
# Pins: the flusher's rows carry this server's origin (system identifier
# and node name, = fw_tier.local_origin()); the generated node id is kept
# across a restart; a standby made by pg_basebackup is told from its
# primary (same system identifier, its own node name and a new node id) and
# removes the ring, intents and spill it copied instead of logging the
# primary's records again; N calls on the standby give N rows on the
# primary with the standby's origin (fw_flush() there waits for them to be
# replayed back); with the primary stopped the standby's calls answer
# without blocking, log_status says why the records wait, a call and
# fw_flush() are cancelled at once; the primary started again: still one
# row per attempt; fw_tier.ingest_calls is granted to nobody and refuses
# garbage, a bad node name and the primary's own identity; a batch the
# primary committed whose answer the shipper never got is sent again and
# written once; the shipper killed mid-stream (the standby's crash-restart)
# writes nothing twice; a budget's spend is restored on the standby;
# fw_chat, fw_complete_batch and replay work there; record mode refuses.
# Review fixes: the node name is the generated id, not cluster_name; a
# renamed host keeps its id and its log; the primary refuses a second node
# id under a known origin name; libpq's text (a password in a URI) stays
# out of log_status; with replay paused longer than the old 30 s bound the
# acknowledged batch is not sent again and the tail moves once replay
# resumes; a reload changing primary_conninfo reconnects the shipper, whose
# application_name wins over primary_conninfo's; a forged batch with an
# HTTP status or a count out of range is refused, cached > prompt tokens
# capped.
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
fw_tier.api_key = 'standby-key'
fw_tier.database = 'fwdb'
fw_tier.flush_interval = '100ms'
});
$primary->start;
$primary->safe_psql('postgres', 'CREATE DATABASE fwdb');
$primary->safe_psql('fwdb', 'CREATE EXTENSION fw_tier');

sub node_id
{
	my ($node) = @_;
	my $f = slurp_file($node->data_dir . '/pg_fw_tier/node');
	return $f =~ /^node_id=(\S+)$/m ? $1 : '';
}

# ---- origin of the primary's own rows ------------------------------------
my $sysid = $primary->safe_psql('fwdb',
	'SELECT system_identifier FROM pg_control_system()');
# the node name is the generated id, not cluster_name (the test harness
# starts each node with --cluster-name; packagers give every server one)
is($primary->safe_psql('fwdb', 'SELECT origin_sysid, origin_node FROM fw_tier.local_origin()'),
	"$sysid|" . node_id($primary), 'local_origin: the system identifier and the node id, not cluster_name');
$primary->safe_psql('fwdb', q{SELECT count(fw_complete('p ' || g)) FROM generate_series(1, 5) g});
$primary->safe_psql('fwdb', 'SELECT fw_flush()');
is( $primary->safe_psql('fwdb', q{
	SELECT count(*), count(*) FILTER (WHERE (origin_sysid, origin_node) = (SELECT * FROM fw_tier.local_origin()))
	  FROM fw_tier.calls}),
	'5|5', 'the flusher fills origin_sysid and origin_node');
my $id = node_id($primary);
like($id, qr/^node-[0-9a-f]{12}$/, 'a node id is generated in pg_fw_tier/node');
$primary->restart;
is(node_id($primary), $id, 'the node id is kept across a restart');

# another host name (a container, DHCP): the same server, id and log kept
$primary->stop;
{
	my $nf = $primary->data_dir . '/pg_fw_tier/node';
	my $text = slurp_file($nf);
	$text =~ s/^host=.*$/host=renamed-host/m;
	open(my $fh, '>', $nf) or die "$nf: $!";
	print $fh $text;
	close($fh);
}
$primary->start;
is(node_id($primary), $id, 'a renamed host keeps its node id');
ok($primary->log_contains(qr/its host name changed since the node file was written; node id "\Q$id\E" and the call log are kept/),
	'and says so in the log');
ok(!$primary->log_contains(qr/is a copy of another server's/), 'a renamed host is not taken for a copy');
unlike(slurp_file($primary->data_dir . '/pg_fw_tier/node'), qr/^host=renamed-host$/m,
	'the node file is rewritten with the new host name');

# ---- a standby from pg_basebackup: a copy --------------------------------
# records in the primary's ring at backup time: the flusher cannot take
# the table's lock
my $bg = $primary->background_psql('fwdb');
$bg->query_safe('BEGIN; LOCK TABLE fw_tier.calls IN ACCESS EXCLUSIVE MODE');
$primary->safe_psql('fwdb', q{SELECT count(fw_complete('ring ' || g)) FROM generate_series(1, 7) g});
$primary->backup('bk');
$bg->query_safe('COMMIT');
$bg->quit;
$primary->safe_psql('fwdb', 'SELECT fw_flush()');
is($primary->safe_psql('fwdb', 'SELECT count(*) FROM fw_tier.calls'), '12',
	'the primary logs its 7 ring records itself');

my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->append_conf('postgresql.conf', 'restart_after_crash = on');
$standby->start;
$primary->wait_for_catchup($standby);
ok($standby->log_contains(qr/this data directory is a copy of another server's/),
	'the standby finds its pg_fw_tier/ is a copy');
isnt(node_id($standby), $id, 'the standby gets a node id of its own');
my $sbnode = node_id($standby);
is($standby->safe_psql('fwdb', 'SELECT origin_sysid, origin_node FROM fw_tier.local_origin()'),
	"$sysid|$sbnode", 'same system identifier, its own node name (its id)');
is($standby->safe_psql('fwdb', 'SELECT records_pushed, bytes_used FROM fw_tier.log_status'),
	'0|0', 'the copied ring is not the standby\'s: removed, not logged again');

# ---- one node id per origin name on the primary ---------------------------
# another server shipped under this name first: refused (42710), records kept
$primary->safe_psql('fwdb', qq{
INSERT INTO fw_tier.origin_nodes (origin_sysid, origin_node, node_id) VALUES ($sysid, '$sbnode', 'node-000000000000')});
$primary->wait_for_catchup($standby);
$standby->safe_psql('fwdb', q{SELECT fw_complete('clash 1'), fw_complete('clash 2')});
ok( $primary->poll_query_until('fwdb', q{SELECT true}, 't')
	  && $standby->poll_query_until('fwdb', q{SELECT drain_state LIKE 'standby: %refused%' FROM fw_tier.log_status}),
	'a second node id under a known origin name: the primary refuses the batch');
ok($primary->log_contains(qr/the origin "\Q$sbnode\E" belongs to another server/),
	'the primary says the origin belongs to another server');
is($primary->safe_psql('fwdb', qq{SELECT count(*) FROM fw_tier.calls WHERE origin_node = '$sbnode'}), '0',
	'nothing written under the other server\'s name');
$primary->safe_psql('fwdb', qq{DELETE FROM fw_tier.origin_nodes WHERE origin_node = '$sbnode'});
$standby->safe_psql('fwdb', q{SET statement_timeout = '60s'; SELECT fw_flush()});
is($primary->safe_psql('fwdb', qq{SELECT count(*), count(DISTINCT call_id) FROM fw_tier.calls WHERE origin_node = '$sbnode'}),
	'2|2', 'the row removed: shipped, once each');
is($primary->safe_psql('fwdb', qq{SELECT node_id FROM fw_tier.origin_nodes WHERE origin_sysid = $sysid}),
	$sbnode, 'the primary remembers the standby\'s node id under its name');


my ($t0, $elapsed, $ret, $out, $err);

# ---- N calls on the standby: N rows on the primary, with its origin -----
sub standby_rows
{
	my ($where) = @_;
	return $primary->safe_psql('fwdb', qq{
	SELECT count(*), count(DISTINCT (call_id, attempt)),
		   count(*) FILTER (WHERE origin_sysid = $sysid AND origin_node = '$sbnode')
	  FROM fw_tier.calls WHERE $where});
}
$primary->safe_psql('fwdb', q{ALTER SYSTEM SET fw_tier.log_content = on});
$primary->reload;
$standby->safe_psql('postgres', q{ALTER SYSTEM SET fw_tier.log_content = on});
$standby->reload;
my $n = 40;
$standby->safe_psql('fwdb', qq{SELECT count(fw_complete('s ' || g)) FROM generate_series(1, $n) g});
$standby->safe_psql('fwdb', q{SET statement_timeout = '60s'; SELECT fw_flush()});
is(standby_rows(q{prompt LIKE 's %'}), "$n|$n|$n", "$n calls on the standby: $n rows on the primary, with the standby's origin");
is($standby->safe_psql('fwdb', qq{SELECT count(*) FROM fw_tier.calls WHERE origin_node = '$sbnode' AND prompt LIKE 's %'}),
	$n, 'fw_flush() on the standby returns once the rows are replayed there too');
is($standby->safe_psql('fwdb', 'SELECT drain_state, bytes_used, records_pushed = records_flushed FROM fw_tier.log_status'),
	'standby|0|t', "log_status: 'standby', the ring empty, every record shipped");
ok($primary->safe_psql('fwdb', q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fw_tier shipper'}) >= 1,
	'the shipper is connected to the primary');

# ---- a budget on the standby: its spend is restored there ----------------
$primary->safe_psql('fwdb', q{
SELECT fw_tier.set_price('accounts/fireworks/models/kimi-k2p6', 'standard', 1, 0.5, 2);
INSERT INTO fw_tier.workloads (workload) VALUES ('sbw');
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('sb', 'sbw', 'day', 100)});
$primary->wait_for_catchup($standby);
$t0 = time();
is($standby->safe_psql('fwdb', q{SET statement_timeout = '60s'; SELECT fw_complete('budget call', 'sbw')}),
	'Echo: budget call', 'a call under a budget on the standby is answered');
$elapsed = time() - $t0;
cmp_ok($elapsed, '<', 20, sprintf('its spend restored on the standby, not refused after a wait (%.1f s)', $elapsed));

# ---- the primary down: calls answer, records wait, cancel works ----------
$primary->stop;
$t0 = time();
($ret, $out, $err) = $standby->psql('fwdb',
	"SET statement_timeout = '60s'; SELECT count(fw_complete('down ' || g)) FROM generate_series(1, 30) g");
$elapsed = time() - $t0;
is($ret, 0, '30 calls on the standby with the primary down') or diag $err;
cmp_ok($elapsed, '<', 20, sprintf('without blocking on the log (%.1f s)', $elapsed));
ok( $standby->poll_query_until('fwdb',
		q{SELECT drain_state LIKE 'standby: %' AND bytes_used + spill_bytes > 0 FROM fw_tier.log_status}),
	'log_status says why the records wait, and that they do');
diag $standby->safe_psql('fwdb', 'SELECT drain_state FROM fw_tier.log_status');

$sim->rule(fault => 'slow', ms => 20000, count => 1);
$t0 = time();
($ret, $out, $err) = $standby->psql('fwdb',
	"SET statement_timeout = '500ms'; SELECT fw_complete('cancelled call')");
$elapsed = time() - $t0;
like($err, qr/canceling statement due to statement timeout/, 'a standby call is cancelled while the primary is down');
cmp_ok($elapsed, '<', 10, sprintf('at once (%.1f s)', $elapsed));
$t0 = time();
($ret, $out, $err) = $standby->psql('fwdb', "SET statement_timeout = '500ms'; SELECT fw_flush()");
$elapsed = time() - $t0;
like($err, qr/canceling statement due to statement timeout/, 'fw_flush() waits for the primary, and is cancelled');
cmp_ok($elapsed, '<', 10, sprintf('at once (%.1f s)', $elapsed));
$sim->reset;

# ---- the primary back: still exactly once ---------------------------------
$primary->start;
($ret, $out, $err) = $standby->psql('fwdb', "SET statement_timeout = '90s'; SELECT fw_flush()");
is($ret, 0, 'fw_flush() on the standby returns once the primary is back') or diag $err;
is(standby_rows(q{prompt LIKE 'down %' OR prompt = 'cancelled call'}), '31|31|31', 'the 30 calls and the cancelled one: one row each, no duplicate');
is( $primary->safe_psql('fwdb', qq{
	SELECT count(*), count(DISTINCT (origin_sysid, origin_node, call_id, attempt))
	  FROM fw_tier.calls WHERE origin_node = '$sbnode'}),
	($n + 34) . '|' . ($n + 34), "still $n + 34 rows of the standby (the budget call and the 2 clash calls too), none twice");

# ---- committed, but the answer lost: sent again, written once -------------
# The shipper logs in as a role granted EXECUTE on fw_tier.ingest_calls;
# pg_current_wal_insert_lsn() is taken from PUBLIC, so each batch commits
# on the primary and the shipper never learns where: it keeps the records
# and sends them again, and again, until the LSN can be read.
# ---- libpq's error text stays out of log_status ---------------------------
# a typo in a URI: libpq's message quotes it, password included
$standby->append_conf('postgresql.conf',
	"fw_tier.log_conninfo = 'postgresql://fw:s3cr3tpw%zz\@127.0.0.1:" . $primary->port . "/fwdb'");
$standby->reload;
$standby->safe_psql('fwdb', q{SELECT fw_complete('bad conninfo')});
ok( $standby->poll_query_until('fwdb',
		q{SELECT drain_state = 'standby: fw_tier.log_conninfo is not valid' FROM fw_tier.log_status}),
	'a conninfo libpq cannot parse: drain_state says so in a fixed phrase');
is($standby->safe_psql('fwdb', q{SELECT count(*) FROM fw_tier.log_status WHERE drain_state LIKE '%s3cr3t%'}), '0',
	'the password in the conninfo is not in fw_tier.log_status');
ok($standby->log_contains(qr/fw_tier.log_conninfo is not valid\n.*DETAIL:  invalid percent-encoded token/),
	"libpq's message goes to the server log");

$primary->safe_psql('fwdb', q{
CREATE ROLE shipper LOGIN;
GRANT EXECUTE ON FUNCTION fw_tier.ingest_calls(bigint, text, bytea) TO shipper});
$primary->wait_for_catchup($standby);
$standby->append_conf('postgresql.conf',
	"fw_tier.log_conninfo = 'host=" . $primary->host . ' port=' . $primary->port
	  . " dbname=fwdb user=shipper'");
$standby->reload;
# once the shipper has taken the new setting, it ships as that role
my $as_shipper = 0;
for my $try (1 .. 20)
{
	$standby->safe_psql('fwdb', qq{SELECT fw_complete('as shipper $try'); SET statement_timeout = '60s'; SELECT fw_flush()});
	$as_shipper = $primary->safe_psql('fwdb',
		q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fw_tier shipper' AND usename = 'shipper'});
	last if $as_shipper;
	usleep(200_000);
}
is($as_shipper, 1, 'the shipper logs in as fw_tier.log_conninfo says, a role granted EXECUTE');
$primary->safe_psql('fwdb', 'REVOKE EXECUTE ON FUNCTION pg_catalog.pg_current_wal_insert_lsn() FROM PUBLIC');
$standby->safe_psql('fwdb', q{SELECT count(fw_complete('noack ' || g)) FROM generate_series(1, 20) g});
ok( $primary->poll_query_until('fwdb', q{SELECT count(*) = 20 FROM fw_tier.calls WHERE prompt LIKE 'noack %'}),
	'the batch is committed on the primary by the granted role');
ok( $standby->poll_query_until('fwdb',
		q{SELECT drain_state = 'standby: the primary did not say its WAL position (SQLSTATE 42501)' FROM fw_tier.log_status}, 't'),
	'the shipper cannot read the commit position: log_status says so');
sleep(2);	# a few resends (back-off 0.1 s, 0.2 s, ...)
is($standby->safe_psql('fwdb', q{SELECT bytes_used > 0 FROM fw_tier.log_status}), 't',
	'the records stay in the standby\'s ring meanwhile');
$primary->safe_psql('fwdb', 'GRANT EXECUTE ON FUNCTION pg_catalog.pg_current_wal_insert_lsn() TO PUBLIC');
($ret, $out, $err) = $standby->psql('fwdb', "SET statement_timeout = '60s'; SELECT fw_flush()");
is($ret, 0, 'then shipped') or diag $err;
is(standby_rows(q{prompt LIKE 'noack %'}), '20|20|20', 'sent several times, each row written once');
is($standby->safe_psql('fwdb', 'SELECT drain_state, bytes_used FROM fw_tier.log_status'), 'standby|0',
	'the ring is empty, the state ok again');

# ---- the shipper killed mid-stream: the standby's crash-restart ----------
# records pushed while the shipper ships; kill -9 it (the standby's
# postmaster restarts every process, the ring file survives): shipped
# again, once each
my $bgk = $standby->background_psql('fwdb', on_error_stop => 0);
$bgk->query_until(qr/started/, q{
\echo started
SELECT count(fw_complete('kill [fwsim:slow=5] ' || g)) FROM generate_series(1, 200) g;
});
ok( $primary->poll_query_until('fwdb', q{SELECT count(*) >= 10 FROM fw_tier.calls WHERE prompt LIKE 'kill %'}),
	'the standby ships while the client calls');
my $spid = $standby->safe_psql('fwdb', q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier shipper'});
ok($spid && kill('KILL', $spid), 'the shipper is killed mid-stream');
$bgk->quit;
ok( $standby->poll_query_until('fwdb', q{SELECT true}, 't'), 'the standby is back after its crash-restart');
# what the client got before its backend died with the others
($ret, $out, $err) = $standby->psql('fwdb', "SET statement_timeout = '60s'; SELECT fw_flush()");
is($ret, 0, 'the rest is shipped after the restart') or diag $err;
is( $primary->safe_psql('fwdb', q{
	SELECT count(*) >= 10, count(*) = count(DISTINCT prompt) FROM fw_tier.calls WHERE prompt LIKE 'kill %'}),
	't|t', 'each call answered before the kill has its row, once (a record sent before the kill is not written again)');
is( $primary->safe_psql('fwdb', qq{
	SELECT count(*) = count(DISTINCT (origin_sysid, origin_node, call_id, attempt)),
		   count(*) FILTER (WHERE outcome = 'unknown') <= 1
	  FROM fw_tier.calls WHERE origin_node = '$sbnode'}),
	't|t', "every row of the standby once; the attempt in flight at the kill logged as 'unknown'");

# ---- replay paused on the standby: the batch waits, it is not sent again ---
# (the wait used to end after 30 s, and the batch went again with a newer
# commit position, out of reach while replay stays behind)
$standby->safe_psql('postgres', 'SELECT pg_wal_replay_pause()');
$standby->safe_psql('fwdb', q{SELECT count(fw_complete('paused ' || g)) FROM generate_series(1, 10) g});
ok( $primary->poll_query_until('fwdb', q{SELECT count(*) >= 1 FROM fw_tier.calls WHERE prompt LIKE 'paused %'}),
	'a batch is shipped while replay is paused on the standby');
my $logpos = -s $primary->logfile;
sleep(36);
$t0 = time();
is($standby->safe_psql('fwdb', q{SELECT count(fw_complete('paused more ' || g)) FROM generate_series(1, 5) g}), '5',
	'calls go on on the standby meanwhile');
cmp_ok(time() - $t0, '<', 20, 'without waiting for the log');
my $resent = () = substr(slurp_file($primary->logfile), $logpos) =~ /SELECT fw_tier\.ingest_calls/g;
is($resent, 0, 'nothing is sent again in 36 s of paused replay (the old bound was 30 s)');
is($standby->safe_psql('fwdb', 'SELECT drain_state, bytes_used > 0 FROM fw_tier.log_status'),
	"standby: waiting for this standby to replay the primary's commit|t",
	'log_status says the shipper waits for replay, the records kept');
$standby->safe_psql('postgres', 'SELECT pg_wal_replay_resume()');
($ret, $out, $err) = $standby->psql('fwdb', "SET statement_timeout = '60s'; SELECT fw_flush()");
is($ret, 0, 'replay resumed: the rest is shipped') or diag $err;
is(standby_rows(q{prompt LIKE 'paused %'}), '15|15|15', 'every call of the pause has its row, once');
is($standby->safe_psql('fwdb', 'SELECT drain_state, bytes_used FROM fw_tier.log_status'), 'standby|0',
	'the tail moved: the ring is empty');

# ---- primary_conninfo changed by a reload: the shipper connects again -----
# (fw_tier.log_conninfo empty).  A client calls without a pause, so the
# shipper never idles out: only the reload can make it reconnect.  The
# walreceiver's application_name in primary_conninfo is not the shipper's.
$primary->safe_psql('fwdb', 'ALTER ROLE shipper REPLICATION');
$standby->append_conf('postgresql.conf', "fw_tier.log_conninfo = ''");
$standby->reload;
my $bgc = $standby->background_psql('fwdb', on_error_stop => 0);
$bgc->query_until(qr/started/, q{
\echo started
SELECT count(fw_complete('conn [fwsim:slow=10] ' || g)) FROM generate_series(1, 1500) g;
\echo finished
});
ok( $primary->poll_query_until('fwdb', q{
	SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'fw_tier shipper' AND usename <> 'shipper'}),
	'fw_tier.log_conninfo empty: the shipper connects by primary_conninfo');
my $pci = $standby->safe_psql('postgres', 'SHOW primary_conninfo');
$standby->append_conf('postgresql.conf', "primary_conninfo = '$pci user=shipper application_name=walrcv_custom'");
$standby->reload;
my $reconnected = 0;
for my $try (1 .. 80)
{
	$reconnected = $primary->safe_psql('fwdb', q{
		SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fw_tier shipper' AND usename = 'shipper'});
	last if $reconnected;
	usleep(100_000);
}
is($reconnected, 1, 'a reload changing primary_conninfo: the shipper connects again, by the new one, while it ships');
ok( $primary->poll_query_until('postgres', q{
	SELECT count(*) = 1 FROM pg_stat_replication WHERE application_name = 'walrcv_custom'}),
	'the walreceiver takes application_name from primary_conninfo');
my $conn_done = $bgc->query_until(qr/finished/, '');
like($conn_done, qr/^1500$/m, 'the client\'s calls are answered');
$bgc->quit;
($ret, $out, $err) = $standby->psql('fwdb', "SET statement_timeout = '60s'; SELECT fw_flush()");
is($ret, 0, 'then everything is shipped') or diag $err;
is(standby_rows(q{prompt LIKE 'conn %'}), '1500|1500|1500', 'each call once across the reconnect');
# the harness finds the walreceiver by its application_name: as it was
$standby->append_conf('postgresql.conf', "primary_conninfo = '$pci'");
$standby->reload;
$primary->wait_for_catchup($standby);

# ---- the ingest function: privileges and checks ---------------------------
$primary->safe_psql('fwdb', 'CREATE ROLE other LOGIN');
($ret, $out, $err) = $primary->psql('fwdb',
	"SET ROLE other; SELECT fw_tier.ingest_calls(1, 'x', '\\x00')");
like($err, qr/permission denied for function ingest_calls/, 'EXECUTE is granted to nobody by default');
($ret, $out, $err) = $primary->psql('fwdb',
	"SET ROLE shipper; SELECT fw_tier.ingest_calls(1, 'x', '\\x00010203')");
like($err, qr/ERROR:  fw_tier.ingest_calls: the batch is not valid/, 'a grantee may call it; garbage is refused');
($ret, $out, $err) = $primary->psql('fwdb',
	"\\set VERBOSITY verbose\nSELECT fw_tier.ingest_calls(1, 'x', pg_catalog.decode(repeat('00', 80), 'hex'))");
like($err, qr/22P03.*magic number/s, 'a batch without the magic number: 22P03, said why');
($ret, $out, $err) = $primary->psql('fwdb',
	"SELECT fw_tier.ingest_calls(o.origin_sysid, o.origin_node, '\\x00') FROM fw_tier.local_origin() o");
like($err, qr/is this server's own identity/, "the primary's own origin is refused");
# a batch the shipper sent (the primary logs its parameters), its first
# record changed and its checksum made right again: the range checks
sub crc32c
{
	my ($data) = @_;
	my $crc = 0xFFFFFFFF;
	for my $b (unpack('C*', $data))
	{
		$crc ^= $b;
		$crc = ($crc & 1) ? (($crc >> 1) ^ 0x82F63B78) : ($crc >> 1) for 1 .. 8;
	}
	return $crc ^ 0xFFFFFFFF;
}
my @sent = slurp_file($primary->logfile) =~ /\$3 = '\\x([0-9a-f]+)'/g;
ok(@sent > 0, 'a shipped batch is in the primary\'s log');
sub forged
{
	my (%set) = @_;
	my $b = pack('H*', $sent[-1]);
	my $r = 16 + 64;	# the header, then the first record
	my %off = (http_status => 404, prompt_tokens => 408, cached_prompt_tokens => 412);
	substr($b, $r + $off{$_}, 4) = pack('l<', $set{$_}) for keys %set;
	my ($len, undef, $plen, $alen) = unpack('V V l< l<', substr($b, $r, 16));
	my $payload = 728 + ($plen > 0 ? $plen : 0) + ($alen > 0 ? $alen : 0);
	my $crc = crc32c(substr($b, $r, 4) . substr($b, $r + 8, 12) . substr($b, $r + 24, $payload));
	substr($b, $r + 20, 4) = pack('V', $crc);
	return unpack('H*', $b);
}
($ret, $out, $err) = $primary->psql('fwdb',
	"SELECT fw_tier.ingest_calls($sysid, 'forged', '\\x" . forged() . "')");
is($ret, 0, 'the batch sent again under another name, its checksum recomputed: accepted') or diag $err;
($ret, $out, $err) = $primary->psql('fwdb',
	"SELECT fw_tier.ingest_calls($sysid, 'forged', '\\x" . forged(http_status => 5000) . "')");
like($err, qr/Record 1: its HTTP status is out of range/, 'an HTTP status out of range is refused');
($ret, $out, $err) = $primary->psql('fwdb',
	"SELECT fw_tier.ingest_calls($sysid, 'forged', '\\x" . forged(prompt_tokens => -7) . "')");
like($err, qr/Record 1: a count is out of range/, 'a negative token count is refused');
$primary->safe_psql('fwdb', q{DELETE FROM fw_tier.calls WHERE origin_node = 'forged'});
$primary->safe_psql('fwdb',
	"SELECT fw_tier.ingest_calls($sysid, 'forged', '\\x" . forged(prompt_tokens => 9999, cached_prompt_tokens => 50000) . "')");
is($primary->safe_psql('fwdb', q{
	SELECT count(*), min(cached_prompt_tokens) FROM fw_tier.calls WHERE origin_node = 'forged' AND prompt_tokens = 9999}),
	'1|9999', 'more cached than prompt tokens: capped, no negative cost');
$primary->safe_psql('fwdb', q{DELETE FROM fw_tier.calls WHERE origin_node = 'forged'});
($ret, $out, $err) = $primary->psql('fwdb',
	"SELECT fw_tier.ingest_calls(1, E'a\\nb', '\\x00')");
like($err, qr/not printable ASCII/, 'a node name with a newline is refused');

# ---- fw_chat, fw_complete_batch and replay on the standby ------------------
is( $standby->safe_psql('fwdb',
		q{SELECT fw_chat('[{"role": "user", "content": "chat on the standby"}]')->'choices'->0->'message'->>'content'}),
	'Echo: chat on the standby', 'fw_chat on the standby');
is($standby->safe_psql('fwdb', q{SELECT array_to_string(fw_complete_batch(ARRAY['b1', 'b2', 'b3']), ',')}),
	'Echo: b1,Echo: b2,Echo: b3', 'fw_complete_batch on the standby');
$primary->safe_psql('fwdb', q{SET fw_tier.mode = 'record'; SELECT fw_complete('recorded on the primary')});
$primary->wait_for_catchup($standby);
$sim->rule(fault => 'unavailable', count => 100);
is( $standby->safe_psql('fwdb',
		q{SET fw_tier.mode = 'replay'; SELECT fw_complete('recorded on the primary')}),
	'Echo: recorded on the primary', 'replay on the standby answers from a fixture recorded on the primary');
$sim->reset;

# ---- record mode refuses on a standby --------------------------------------
($ret, $out, $err) = $standby->psql('fwdb',
	"\\set VERBOSITY verbose\nSET fw_tier.mode = 'record'; SELECT fw_complete('rec')");
like($err, qr/25006.*cannot record fixtures on a standby/s, "record mode on a standby: 25006, before anything is sent");

$standby->stop;
$primary->stop;
done_testing();
