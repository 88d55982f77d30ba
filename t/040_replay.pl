# Record / replay across processes, what SQL alone cannot show: record
# against the simulator, STOP it, replay the same statements and get the
# same output and the same call log; a miss fails with 42704, the
# fingerprint and the prompt, and sends nothing (the simulator's port is
# closed, and a second simulator's counters do not move); export, import,
# export is byte for byte the same file; and the example user suite in
# examples/user_suite passes with pg_regress in replay mode.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Compare;
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

# run-tap.sh sets PG_REGRESS; set it when run alone with prove
$ENV{PG_REGRESS} //= (`pg_config --pgxs` =~ s{/pgxs/src/makefiles/pgxs.mk\s*$}{/pgxs/src/test/regress/pg_regress}r);

my $sim = FwSim->start('--time-scale', '0');
my $node = PostgreSQL::Test::Cluster->new('replay');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '20ms'
fw_tier.retry_after_cap = '20ms'
fw_tier.flush_interval = '50ms'
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.workloads (workload, on_overload) VALUES ('tap_rr', 'priority');
});

# One script, run once recording and once replaying.  Failures are caught
# so the script runs to the end; each line of output is compared.
my $script = q{
SELECT fw_complete('tap one', 'tap_rr');
SELECT fw_chat('[{"role": "user", "content": "tap chat"}]', 'tap_rr', '{"temperature": 0.5}')->'choices'->0->'message'->>'content';
SELECT fw_complete('[fwsim:overload] tap shed', 'tap_rr');
SELECT path FROM fw_tier.status WHERE workload = 'tap_rr';
SELECT fw_deescalate('tap_rr');
SELECT array_to_string(fw_complete_batch(ARRAY['tap b1', 'tap b2', 'tap b3'], 'tap_rr'), '|');
DO $$ BEGIN PERFORM fw_complete('[fwsim:ratelimit] tap limited', 'tap_rr');
   EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'caught %', SQLSTATE; END $$;
DO $$ BEGIN PERFORM fw_complete('[fwsim:status=400] tap bad', 'tap_rr');
   EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'caught %', SQLSTATE; END $$;
SELECT fw_complete('[fwsim:unavailable] tap down', 'tap_rr');
};
my $calls = q{
SELECT fw_flush();
SELECT string_agg(concat_ws(' ', attempt, path, http_status, outcome, escalated), E'\n'
                  ORDER BY call_id, attempt)
  FROM fw_tier.calls WHERE workload = 'tap_rr' AND call_id > %d;
};

sub run_script
{
	my ($mode) = @_;
	my $last = $node->safe_psql('postgres',
		'SELECT coalesce(max(call_id), 0) FROM fw_tier.calls');
	my ($ret, $out, $err) = $node->psql('postgres',
		"SET fw_tier.mode = '$mode';\n$script", on_error_stop => 0);
	my $log = $node->safe_psql('postgres', sprintf($calls, $last));
	$err =~ s/^psql:<stdin>:\d+: //mg;
	return ($out, $err, $log);
}

my ($rec_out, $rec_err, $rec_log) = run_script('record');
my $sent = $sim->stats->{total};
like($rec_out, qr/Echo: tap one/, 'record: the simulator answered');
like($rec_err, qr/caught 53400.*caught 22023.*ERROR:  fireworks is unavailable/s,
	'record: failures raised as live');
like($rec_log, qr/^1 standard 503 overloaded f\n2 priority 200 ok t$/m,
	'record: the overload escalated');
is($sent, 1 + 1 + 2 + 3 + 3 + 1 + 2, 'record: every attempt reached the simulator');
is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.fixtures'),
	1 + 1 + 2 + 3 + 3 + 1 + 2, 'record: one fixture per answer (2xx once, failures per attempt)');

$sim->stop;
my ($rep_out, $rep_err, $rep_log) = run_script('replay');
is($rep_out, $rec_out, 'replay with the simulator stopped: the same results');
is($rep_err, $rec_err, 'replay: the same errors and notices');
is($rep_log, $rec_log, 'replay: the same attempts in the call log');

# a miss: 42704, fingerprint, excerpt; the simulator's port is closed
my ($ret, $out, $err) = $node->psql('postgres', q{
SET fw_tier.mode = 'replay';
\set VERBOSITY verbose
SELECT fw_complete('tap never recorded', 'tap_rr');
});
my $fp = $node->safe_psql('postgres',
	q{SELECT fw_fingerprint('[{"role": "user", "content": "tap never recorded"}]', 'tap_rr')});
like($err, qr/ERROR:  42704: no fw_tier fixture for request $fp/, 'miss: 42704 with the fingerprint');
like($err, qr/prompt "tap never recorded"/, 'miss: the prompt excerpt');

# ... and sends nothing to a simulator that is listening
my $sim2 = FwSim->start('--time-scale', '0');
($ret, $out, $err) = $node->psql('postgres', qq{
SET fw_tier.mode = 'replay';
SELECT fw_complete('tap never recorded either', 'tap_rr');
});
like($err, qr/no fw_tier fixture/, 'miss with a live simulator');
# the server's base_url is the stopped simulator: point it at the live one
$node->append_conf('postgresql.conf', "fw_tier.base_url = '@{[$sim2->url]}/inference/v1'");
$node->reload;
($ret, $out, $err) = $node->psql('postgres', qq{
SET fw_tier.mode = 'replay';
SELECT fw_complete('tap never recorded either', 'tap_rr');
SELECT fw_complete('tap one', 'tap_rr');
}, on_error_stop => 0);
like($err, qr/no fw_tier fixture/, 'miss with base_url at a live simulator');
like($out, qr/Echo: tap one/, 'a hit still answers') or diag($err);
is($sim2->stats->{total}, 0, 'replay sent nothing');
is($node->safe_psql('postgres', q{SELECT fw_complete('tap live', 'tap_rr')}),
	'Echo: tap live', 'live mode reaches it (the check above can fail)');

# Replays are no production event: a replayed 503 escalates the replaying
# session only, writes no fw_tier.escalations row, costs 0 (a price row
# exists) and is marked replayed; a live call next to it is not.
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.prices
SELECT DISTINCT model, path, 1, 1, 1 FROM fw_tier.calls WHERE workload = 'tap_rr'
ON CONFLICT DO NOTHING;
});
my $esc_before = $node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.escalations');
my $last = $node->safe_psql('postgres', 'SELECT coalesce(max(call_id), 0) FROM fw_tier.calls');
my $sent2 = $sim2->stats->{total};
my $bg = $node->background_psql('postgres');
$bg->query_safe("SET fw_tier.mode = 'replay'");
is($bg->query_safe(q{SELECT fw_complete('[fwsim:overload] tap shed', 'tap_rr')}),
	'Echo: tap shed', 'replayed 503: the session retried on Priority');
is($bg->query_safe(q{SELECT fw_complete('tap one', 'tap_rr')}), 'Echo: tap one',
	'the next replayed call answers');
is($bg->query_safe(q{SELECT path FROM fw_tier.status WHERE workload = 'tap_rr'}),
	'priority', 'the replaying session sees its own window in fw_tier.status');
# another session, live: the shared window is not open
is($node->safe_psql('postgres', q{SELECT path FROM fw_tier.status WHERE workload = 'tap_rr'}),
	'standard', 'another session: fw_tier.status says standard');
is($node->safe_psql('postgres', q{SELECT fw_complete('tap live two', 'tap_rr')}),
	'Echo: tap live two', 'another session calls live');
is($sim2->stats->{total}, $sent2 + 1, 'the live call reached the simulator, the replays did not');
$node->safe_psql('postgres', 'SELECT fw_flush()');
is($node->safe_psql('postgres', q{SELECT count(*) FROM fw_tier.escalations}),
	$esc_before, 'no fw_tier.escalations row for the replayed 503');
is($node->safe_psql('postgres', qq{
SELECT string_agg(concat_ws(' ', attempt, path, outcome, escalated, replayed,
                            cost_usd = 0), E'\n' ORDER BY call_id, attempt)
  FROM fw_tier.calls WHERE workload = 'tap_rr' AND call_id > $last}),
	"1 standard overloaded f t t\n2 priority ok t t t\n1 priority ok t t t\n1 standard ok f f f",
	'replayed rows: replayed, cost 0, the next one on Priority; the live one: standard, priced');
$bg->query_safe(q{SELECT fw_deescalate('tap_rr')});
is($bg->query_safe(q{SELECT path FROM fw_tier.status WHERE workload = 'tap_rr'}),
	'standard', 'fw_deescalate ends the session window too');
$bg->quit;
$sim2->stop;

# export, truncate, import, export: the same bytes
my $dir = PostgreSQL::Test::Utils::tempdir;
$node->safe_psql('postgres',
	"\\copy (SELECT * FROM fw_tier.fixtures_export) TO '$dir/a.tsv'");
$node->safe_psql('postgres',
	"TRUNCATE fw_tier.fixtures;\n\\copy fw_tier.fixtures_import FROM '$dir/a.tsv'");
$node->safe_psql('postgres',
	"\\copy (SELECT * FROM fw_tier.fixtures_export) TO '$dir/b.tsv'");
ok(-s "$dir/a.tsv", 'the export is not empty');
is(compare("$dir/a.tsv", "$dir/b.tsv"), 0, 'export, import, export: byte for byte');
# importing twice upserts
$node->safe_psql('postgres', "\\copy fw_tier.fixtures_import FROM '$dir/a.tsv'");
$node->safe_psql('postgres',
	"\\copy (SELECT * FROM fw_tier.fixtures_export) TO '$dir/c.tsv'");
is(compare("$dir/a.tsv", "$dir/c.tsv"), 0, 'a second import changes nothing');

$node->stop;

# the example user suite: pg_regress, temp instance, replay, no simulator
my $ex = "$dir/user_suite";
system('cp', '-a', "$ENV{TESTDIR}/examples/user_suite", $ex) == 0 or die "cp: $?";
my ($stdout, $stderr);
my $ok = IPC::Run::run([ 'bash', "$ex/run.sh" ], '>', \$stdout, '2>', \$stderr);
ok($ok, 'examples/user_suite passes in replay mode') or diag("$stdout\n$stderr");
like($stdout, qr/All 2 tests passed/, 'both of its tests ran');

done_testing();
