# State that belongs to someone (issue 10, items 6, 10, 12 and the record
# part of 7):
#  - escalation state is per database: fw_escalate in one database leaves
#    another on Standard; the worker records and restores the windows of
#    every database; names that are not workloads never take a slot; with
#    fw_tier.max_workloads = 4, slots are reused (and a backend's cached
#    slot of a reused slot is detected);
#  - per-role API keys live in files of fw_tier.api_key_dir: each role's
#    calls carry its own key, and an ordinary role cannot read another's
#    key through pg_db_role_setting, pg_settings, pg_file_settings,
#    pg_stat_activity (mid-call), the call log, fixtures, error messages or
#    the server log; ALTER ROLE / ALTER DATABASE / a function's SET clause
#    refuse fw_tier.api_key, and a value stored before is ignored;
#  - fixtures: a fixture write that fails is a WARNING, the answer is
#    returned, the paid attempt is logged, and the session is not poisoned;
#    the documented grant on fw_tier.fixtures_import is enough to import.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);
use File::Temp qw(tempdir);
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

# ---------------------------------------------------------------------
# Part 1: escalation state per database, slots (fw_tier.max_workloads = 4)
# ---------------------------------------------------------------------
my $sim = FwSim->start('--time-scale', '0');
my $node = PostgreSQL::Test::Cluster->new('state');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.max_workloads = 4
fw_tier.flush_interval = '50ms'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION fw_tier; CREATE DATABASE db2');
$node->safe_psql('db2', 'CREATE EXTENSION fw_tier');

sub path_of
{
	my ($db, $wl) = @_;
	return $node->safe_psql($db,
		"SELECT path FROM fw_tier.status WHERE workload = '$wl'");
}

sub wait_for
{
	my ($db, $sql, $what) = @_;
	for (1 .. 400)
	{
		return 1 if $node->safe_psql($db, $sql) eq 't';
		usleep(25_000);
	}
	fail("timed out waiting for $what");
	return 0;
}

$node->safe_psql('postgres', "SELECT fw_escalate('default', '10 minutes')");
is(path_of('postgres', 'default'), 'priority', 'postgres: default escalated');
is(path_of('db2', 'default'), 'standard',
	'db2: its own default stays on standard');
$sim->reset;
is($node->safe_psql('db2', "SELECT fw_complete('from db2')"), 'Echo: from db2',
	'db2: a call works');
is($sim->log_requests->[-1]{path}, 'standard', 'db2: the call went to standard');
$node->safe_psql('postgres', "SELECT fw_complete('from postgres')");
is($sim->log_requests->[-1]{path}, 'priority',
	'postgres: the call went to priority');

# the worker records each database's window, both open at once
$node->safe_psql('db2', "SELECT fw_escalate('default', '10 minutes')");
wait_for('postgres',
	"SELECT count(*) = 2 FROM fw_tier.escalations WHERE ended IS NULL",
	'two open windows');
is($node->safe_psql('postgres',
		"SELECT string_agg(database || ':' || workload, ',' ORDER BY database)"
		  . " FROM fw_tier.escalations WHERE ended IS NULL"),
	'db2:default,postgres:default', 'one open row per database');

# a restart restores the windows of every database
$node->restart;
wait_for('db2', "SELECT path = 'priority' FROM fw_tier.status WHERE workload = 'default'",
	'db2 window restored');
is(path_of('postgres', 'default'), 'priority', 'restart: postgres window restored');
is(path_of('db2', 'default'), 'priority', 'restart: db2 window restored');
$node->safe_psql('db2', "SELECT fw_deescalate('default')");
is(path_of('db2', 'default'), 'standard', 'db2 de-escalated');
is(path_of('postgres', 'default'), 'priority', 'postgres still on priority');
$node->safe_psql('postgres', "SELECT fw_deescalate('default')");
wait_for('postgres',
	"SELECT count(*) = 0 FROM fw_tier.escalations WHERE ended IS NULL",
	'windows closed in fw_tier.escalations');

# names that are not workloads never take a slot
is($node->safe_psql('postgres', q{
DO $$
DECLARE n int := 0;
BEGIN
	FOR i IN 1 .. 100 LOOP
		BEGIN PERFORM fw_complete('x', 'nope_' || i);
		EXCEPTION WHEN invalid_parameter_value THEN n := n + 1; END;
		BEGIN PERFORM fw_escalate('nope_' || i);
		EXCEPTION WHEN invalid_parameter_value THEN n := n + 1; END;
		BEGIN PERFORM fw_deescalate('nope_' || i);
		EXCEPTION WHEN invalid_parameter_value THEN n := n + 1; END;
	END LOOP;
	RAISE NOTICE 'refused %', n;
END $$;
SELECT count(*) FROM fw_tier_workload_state() WHERE workload LIKE 'nope%';
SELECT fw_complete('still works', 'interactive');
}), "0\nEcho: still works",
	'300 calls on unknown names: 22023 each, no slot taken, a real workload works');

# slots are reused: 8 workloads created, used and dropped through 4 slots
sub use_workloads
{
	my @names = @_;
	my $sql = '';
	foreach my $w (@names)
	{
		$sql .= "INSERT INTO fw_tier.workloads (workload) VALUES ('$w');\n"
		  . "SELECT fw_complete('hi $w', '$w');\n";
	}
	return $node->psql('postgres', $sql, on_error_stop => 0);
}
sleep 3;    # every slot idle (reuse takes 2 s)
my ($ret, $out, $err) = use_workloads(qw(r1 r2 r3 r4));
is($out, "Echo: hi r1\nEcho: hi r2\nEcho: hi r3\nEcho: hi r4",
	'4 new workloads take the 4 slots');
is($err, '', 'no error');
$node->safe_psql('postgres',
	"DELETE FROM fw_tier.workloads WHERE workload IN ('r1', 'r2', 'r3', 'r4')");
sleep 3;
my $t0 = time;
($ret, $out, $err) = use_workloads(qw(r5 r6 r7 r8 r9));
my $elapsed = time - $t0;
like($out, qr/^Echo: hi r5\nEcho: hi r6\nEcho: hi r7\nEcho: hi r8/,
	'4 more reuse the idle slots of dropped workloads');
SKIP:
{
	skip "box too slow for the idle window ($elapsed s)", 1 if $elapsed > 1.5;
	like($err, qr/ERROR:  too many fw_tier workloads/,
		'a 5th workload while all 4 slots were just used: a clear error');
}
is($node->safe_psql('postgres',
		"SELECT string_agg(workload || '=' || attempts, ',' ORDER BY workload)"
		  . " FROM fw_tier.status WHERE workload IN ('r5', 'r6', 'r7', 'r8')"),
	'r5=1,r6=1,r7=1,r8=1', 'a reused slot starts with fresh counters');

# a backend's cached slot that was given to another workload is detected
$node->safe_psql('postgres',
	"DELETE FROM fw_tier.workloads WHERE workload LIKE 'r_'; "
	  . "INSERT INTO fw_tier.workloads (workload) VALUES ('keep')");
sleep 3;
my $bg = $node->background_psql('postgres', on_error_stop => 0);
is($bg->query_safe("SELECT fw_complete('k1', 'keep')"), 'Echo: k1', 'keep: first call');
sleep 3;
($ret, $out, $err) = use_workloads(qw(s1 s2 s3 s4));
is($out, "Echo: hi s1\nEcho: hi s2\nEcho: hi s3\nEcho: hi s4",
	'4 workloads take every slot, keep\'s too');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier_workload_state() WHERE workload = 'keep'"),
	'0', 'keep has no slot now');
sleep 3;
is($bg->query_safe("SELECT fw_complete('k2', 'keep')"), 'Echo: k2',
	'keep: the backend with the stale slot calls again');
is($node->safe_psql('postgres',
		"SELECT attempts FROM fw_tier.status WHERE workload = 'keep'"),
	'1', 'keep counted once, in a slot of its own');
is($node->safe_psql('postgres',
		"SELECT max(attempts) FROM fw_tier.status WHERE workload LIKE 's_'"),
	'1', 'no other workload got keep\'s attempt');

# a slot reused while a call of its workload is in flight: the answer's
# attempt is never counted in the new owner's slot
$node->safe_psql('postgres', "INSERT INTO fw_tier.workloads (workload) VALUES ('slowpoke')");
sleep 3;
$bg->query_until(qr/started/, q{
\echo started
SELECT fw_complete('[fwsim:slow=6000] slow', 'slowpoke');
});
my $inflight = 0;
for (1 .. 200)
{
	$inflight = $sim->stats->{in_flight};
	last if $inflight >= 1;
	usleep(25_000);
}
is($inflight, 1, 'slowpoke\'s call is in flight');
usleep(2_500_000);    # its slot idle for 2 s: reusable
$t0 = time;
($ret, $out, $err) = use_workloads(qw(t1 t2 t3 t4));
$elapsed = time - $t0;
is($out, "Echo: hi t1\nEcho: hi t2\nEcho: hi t3\nEcho: hi t4",
	'4 workloads take every slot, slowpoke\'s too');
like($bg->query('SELECT 1'), qr/^Echo: slow\n1$/, 'slowpoke\'s call ends well');
# the stale slot is resolved again by name: the attempt lands in a slot of
# slowpoke's own (taking the idlest t's) or nowhere, never in a t's
is($node->safe_psql('postgres',
		"SELECT max(attempts) FILTER (WHERE workload LIKE 't_'),"
		  . " max(attempts) FILTER (WHERE workload = 'slowpoke') <= 1"
		  . " FROM fw_tier.status"),
	'1|t', "its attempt went to none of the others (t's took $elapsed s)");
$bg->quit;
$node->stop;
$sim->stop;

# ---------------------------------------------------------------------
# Part 2: per-role API keys
# ---------------------------------------------------------------------
my $KA = 'sk-alice-7f3a9c21e0';    # the simulator's key
my $KB = 'sk-bob-51e2d0aa93';
my $DECOY = 'sk-decoy-0b9e44cc1f';
my @secrets = ($KA, $KB, $DECOY);

sub no_secret
{
	my ($text, $what) = @_;
	my @found = grep { index($text // '', $_) >= 0 } @secrets;
	is("@found", '', "$what: no key in it");
}

my $keydir = tempdir(CLEANUP => 1);
sub write_key
{
	my ($role, $key) = @_;
	my $tmp = "$keydir/.tmp-$role";
	open(my $fh, '>', $tmp) or die;
	print $fh "$key\n";
	close $fh;
	chmod 0600, $tmp;
	rename($tmp, "$keydir/$role") or die;    # a new file, as an editor would
}

$sim = FwSim->start('--time-scale', '0', '--api-key', $KA);
$node = PostgreSQL::Test::Cluster->new('keys');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.api_key_dir = '$keydir'
fw_tier.flush_interval = '50ms'
fw_tier.max_attempts = 1
# PostgreSQL's defaults (the test framework logs every statement)
log_statement = none
log_min_error_statement = error
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE carol LOGIN;
CREATE ROLE eve LOGIN;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO alice, bob, carol;
GRANT SELECT ON fw_tier.calls TO alice, bob, carol, eve;
GRANT INSERT, UPDATE ON fw_tier.fixtures TO alice, bob;
});
write_key('alice', $KA);
write_key('bob', $KB);

sub as_role
{
	my ($role, $sql) = @_;
	my ($r, $o, $e) = $node->psql('postgres', $sql, on_error_stop => 0,
		extra_params => [ '-U', $role ]);
	return ($o, $e);
}

my ($o, $e) = as_role('alice', "SELECT fw_complete('hello from alice')");
is($o, 'Echo: hello from alice', 'alice: her key is accepted');
($o, $e) = as_role('bob', "\\set VERBOSITY verbose\nSELECT fw_complete('hello from bob')");
like($e, qr/ERROR:  28000: fireworks rejected the request \(HTTP 401\)/,
	'bob: his own key is sent, and refused');
no_secret($e, 'the 401 error');
($o, $e) = as_role('carol', "SELECT fw_complete('hello from carol')");
like($e, qr/HTTP 401/, 'carol: no key file, no server-wide key: 401');

# swap the files: each role's calls carry its own (re-read) key
write_key('alice', $KB);
write_key('bob', $KA);
($o, $e) = as_role('alice', "SELECT fw_complete('alice again')");
like($e, qr/HTTP 401/, 'alice with bob\'s old key: 401');
($o, $e) = as_role('bob', "SELECT fw_complete('bob again')");
is($o, 'Echo: bob again', 'bob with the good key: 200');
write_key('alice', $KA);
write_key('bob', $KB);

# a key file others could read is refused
chmod 0644, "$keydir/alice";
($o, $e) = as_role('alice', "SELECT fw_complete('loose file')");
like($e, qr/fw_tier key file ".*alice" has group or world access/,
	'a key file with group/world access is refused');
no_secret($e, 'the permission error');
chmod 0600, "$keydir/alice";

# a symbolic link in the key directory is refused, even to a good key file
symlink("$keydir/alice", "$keydir/carol") or die "symlink: $!";
($o, $e) = as_role('carol', "SELECT fw_complete('through a link')");
like($e, qr/fw_tier key file ".*carol" is a symbolic link/,
	'a symlinked key file is refused');
unlike($o // '', qr/Echo/, 'and no call is made with the linked key');
no_secret($e, 'the symlink error');
unlink("$keydir/carol");

# the shared 429 pause is the account's: bob's key bills another account,
# so alice's Retry-After does not hold his calls (the pause is capped at 6 s
# for alice's sessions, so that the rest of this test is not held)
$node->safe_psql('postgres', q{
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO eve;
ALTER ROLE alice SET fw_tier.shared_pause_cap = '6s';
});
write_key('eve', $KA);
my $t429 = time;
($o, $e) = as_role('alice', "SET fw_tier.on_error = 'null'; SELECT fw_complete('[fwsim:ratelimit=600] alice is limited') IS NULL");
is($o, 't', 'alice: a 429 with Retry-After 600');
($o, $e) = as_role('bob', "SET statement_timeout = '2s'; SELECT fw_complete('bob is not paused')");
like($e, qr/HTTP 401/, 'bob (another key): his call goes out at once, no pause') or diag($e);
($o, $e) = as_role('eve', "SET statement_timeout = '1s'; SELECT fw_complete('eve shares alice''s key')");
like($e, qr/canceling statement due to statement timeout/,
	'eve (alice\'s key, same account): paused by alice\'s 429');
$node->safe_psql('postgres', q{
REVOKE EXECUTE ON FUNCTION fw_complete(text, text) FROM eve;
ALTER ROLE alice RESET fw_tier.shared_pause_cap;
});
my $left = 6.5 - (time - $t429);
usleep(int($left * 1e6)) if $left > 0;		# the pause is over
unlink("$keydir/eve");

# the settings every role can read refuse the key
foreach my $stmt (
	"ALTER ROLE bob SET fw_tier.api_key = '$DECOY'",
	"ALTER ROLE bob IN DATABASE postgres SET fw_tier.api_key = '$DECOY'",
	"ALTER DATABASE postgres SET fw_tier.api_key = '$DECOY'",
	"ALTER ROLE ALL SET fw_tier.api_key = '$DECOY'",
	"CREATE FUNCTION keyed() RETURNS int LANGUAGE sql SET fw_tier.api_key = '$DECOY' AS 'SELECT 1'")
{
	my ($r, $so, $se) = $node->psql('postgres', "\\set VERBOSITY verbose\n$stmt",
		on_error_stop => 0);
	like($se, qr/ERROR:  42501: fw_tier.api_key cannot be stored with ALTER ROLE/,
		"refused: " . ($stmt =~ s/'[^']*'$|SET .*//r));
	no_secret($se, 'the refusal');
}
is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_db_role_setting WHERE setconfig::text LIKE '%api_key%'"),
	'0', 'nothing stored in pg_db_role_setting');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_proc WHERE proname = 'keyed'"),
	'0', 'no function created');

# a value stored before 0.2 (written here behind the catalog's back) is
# ignored at session start with a WARNING that does not quote it
$node->safe_psql('postgres', qq{
SET allow_system_table_mods = on;
INSERT INTO pg_db_role_setting VALUES (0, 'carol'::regrole, ARRAY['fw_tier.api_key=$KA']);
});
($o, $e) = as_role('carol', "SELECT fw_complete('carol with a role setting')");
like($e, qr/WARNING:  fw_tier.api_key set with ALTER ROLE or ALTER DATABASE is ignored/,
	'a stored role setting: WARNING at session start');
like($e, qr/HTTP 401/, 'and the stored key is not used');
no_secret($e, 'the WARNING');
# installing (or updating to) 0.2 names each stored key, never its value
$node->safe_psql('postgres', 'CREATE DATABASE keycheck');
$node->safe_psql('keycheck', qq{
CREATE FUNCTION keyed_before() RETURNS int LANGUAGE sql AS 'SELECT 1';
SET allow_system_table_mods = on;
UPDATE pg_proc SET proconfig = ARRAY['fw_tier.api_key=$KB'] WHERE proname = 'keyed_before';
});
{
	my ($r, $so, $se) = $node->psql('keycheck', 'CREATE EXTENSION fw_tier', on_error_stop => 0);
	is($r, 0, 'CREATE EXTENSION with stored keys still works');
	like($se, qr/WARNING:  fw_tier.api_key is stored for role carol in database \(every database\)/,
		'the update warns about the role setting');
	like($se, qr/ALTER ROLE carol RESET fw_tier.api_key/, 'and says how to reset it');
	like($se, qr/WARNING:  fw_tier.api_key is stored in the settings of function keyed_before\(\)/,
		'and about the function setting');
	no_secret($se, 'the update WARNINGs');
}
$node->safe_psql('postgres', 'DROP DATABASE keycheck');
$node->safe_psql('postgres', 'ALTER ROLE carol RESET fw_tier.api_key');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_db_role_setting'), '0',
	'ALTER ROLE ... RESET removes it');

# record fixtures of a 200 (alice) and a 401 (bob)
as_role('alice', "SET fw_tier.mode = 'record'; SELECT fw_complete('alice records')");
as_role('bob', "SET fw_tier.mode = 'record'; SELECT fw_complete('bob records')");

# what eve can read, while alice is in the middle of a call
my $abg = $node->background_psql('postgres', on_error_stop => 0,
	extra_params => [ '-U', 'alice' ]);
$abg->query_until(qr/started/, q{
\echo started
SELECT fw_complete('[fwsim:slow=3000] alice takes her time');
});
$inflight = 0;
for (1 .. 200)
{
	$inflight = $sim->stats->{in_flight};
	last if $inflight >= 1;
	usleep(25_000);
}
is($inflight, 1, 'alice\'s call is in flight');
($o, $e) = as_role('eve', q{
SELECT string_agg(concat_ws(' ', usename, query, state, wait_event, application_name), ' | ')
  FROM pg_stat_activity;
SELECT string_agg(concat_ws('=', name, setting, reset_val, boot_val), ' ') FROM pg_settings;
SELECT coalesce(string_agg(setconfig::text, ' '), '') FROM pg_db_role_setting;
SELECT count(*) FROM fw_tier.calls;
SELECT string_agg(f::text, ' ') FROM fw_tier.fixtures f;
SELECT string_agg(x::text, ' ') FROM fw_tier.fixtures_export x;
SELECT * FROM pg_file_settings;
});
no_secret($o . $e, 'pg_stat_activity, pg_settings, pg_db_role_setting, calls, fixtures as eve');
like($e, qr/permission denied for (view|function) pg_(file_settings|show_all_file_settings)/,
	'pg_file_settings: not readable by eve');
like($o, qr/\n0\n/, 'eve sees no call log rows of others');
like($o, qr/alice records/, 'eve does read the fixtures');
my $super_view = $node->safe_psql('postgres', q{
SELECT string_agg(concat_ws(' ', usename, query), ' | ') FROM pg_stat_activity;
SELECT string_agg(concat_ws('=', name, setting), ' ') FROM pg_settings;
SELECT string_agg(concat_ws('=', name, setting), ' ') FROM pg_file_settings;
});
like($super_view, qr/alice takes her time/, 'the superuser sees alice\'s query');
no_secret($super_view, 'pg_stat_activity, pg_settings, pg_file_settings as superuser');
like($abg->query('SELECT 1'), qr/^Echo: alice takes her time\n1$/,
	'alice\'s call ended with her answer');
$abg->quit;

$node->safe_psql('postgres', 'SELECT fw_flush()');
my $rows = $node->safe_psql('postgres', q{
SELECT string_agg(c::text, E'\n') FROM fw_tier.calls c;
SELECT string_agg(f::text, E'\n') FROM fw_tier.fixtures f;
});
like($rows, qr/alice.*200.*\n.*bob.*401/s, 'the call log has 200s and 401s');
no_secret($rows, 'every call log and fixture row');

# ---------------------------------------------------------------------
# Part 3: fixtures
# ---------------------------------------------------------------------
$node->safe_psql('postgres', q{
CREATE ROLE imp LOGIN; CREATE ROLE rec LOGIN; CREATE ROLE ci LOGIN;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO rec, ci;
GRANT INSERT ON fw_tier.fixtures_import TO imp;          -- README, literally
GRANT INSERT, UPDATE ON fw_tier.fixtures TO ci;           -- README, literally
SELECT fw_fixture('imported prompt', 'default', 200, 'imported answer');
});
write_key($_, $KA) foreach qw(rec ci);
my $tsv = "$keydir/fixtures.tsv";
$node->safe_psql('postgres',
	"\\copy (SELECT * FROM fw_tier.fixtures_export) TO '$tsv'");
$node->safe_psql('postgres', 'TRUNCATE fw_tier.fixtures');
($o, $e) = as_role('imp', "\\copy fw_tier.fixtures_import FROM '$tsv'");
is($e, '', 'import with the documented grant only');
($o, $e) = as_role('imp', "\\copy fw_tier.fixtures_import FROM '$tsv'");
is($e, '', 'and again (an upsert)');
is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.fixtures'), '3',
	'the fixtures are back');

# a role that may not write fixtures records: WARNING, answer, logged, and
# the session goes on (record, replay, export)
($o, $e) = as_role('rec', q{
SET fw_tier.mode = 'record';
SELECT fw_complete('rec one');
SELECT fw_complete('rec two');
SET fw_tier.mode = 'replay';
SELECT fw_complete('imported prompt');
SELECT count(*) FROM fw_tier.fixtures_export;
});
is($o, "Echo: rec one\nEcho: rec two\nimported answer\n3",
	'no write grant: the answers, a replay and the export all work');
my @warnings = ($e =~ /WARNING:  could not record fw_tier fixture/g);
is(scalar(@warnings), 2, 'one WARNING per fixture not written');
like($e, qr/permission denied for table fixtures/, 'saying why');
unlike($e, qr/ERROR/, 'and no error');
$node->safe_psql('postgres', 'SELECT fw_flush()');
is($node->safe_psql('postgres',
		"SELECT string_agg(outcome, ',') FROM fw_tier.calls WHERE username = 'rec'"),
	'ok,ok,ok', 'every paid attempt (and the replay) is in the call log');

# a constraint failure on one fixture: that one is skipped, the rest is
# recorded
$node->safe_psql('postgres',
	"ALTER TABLE fw_tier.fixtures ADD CONSTRAINT fx_no_poison CHECK (response NOT LIKE '%poison%')");
($o, $e) = as_role('ci', q{
SET fw_tier.mode = 'record';
SELECT fw_complete('poison pill');
SELECT fw_complete('clean pill');
SELECT count(*) FROM fw_tier.fixtures_export;
});
is($o, "Echo: poison pill\nEcho: clean pill\n4",
	'a fixture failing a constraint: the answer, the next record, the export');
like($e, qr/WARNING:  could not record fw_tier fixture.*\n.*violates check constraint "fx_no_poison"/,
	'a WARNING names the constraint');
is($node->safe_psql('postgres',
		"SELECT string_agg(request->'messages'->0->>'content', ',' ORDER BY 1)"
		  . " FROM fw_tier.fixtures WHERE request::text LIKE '%pill%'"),
	'clean pill', 'only the clean fixture is stored');
$node->safe_psql('postgres', 'SELECT fw_flush()');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.calls WHERE username = 'ci'"),
	'2', 'both paid attempts are logged');

$node->stop;
no_secret(slurp_file($node->logfile), 'the server log');
$sim->stop;
done_testing();
