# The engine on a production cluster (issue 10, items 3, 5, 7, 8, 9, 13).
#
# Pins: an in-flight call survives interrupts that are not a stop
# (pg_log_backend_memory_contexts, a ProcSignal barrier from DROP DATABASE,
# client_connection_check_interval, parallel workers exiting under a
# Gather) while pg_cancel_backend, statement_timeout and
# pg_terminate_backend still stop it; one role's backoff settings cannot
# lengthen the shared 429 pause another role waits (fw_tier.shared_pause_cap);
# responses that used to raise inside classification (a UTF-8 answer in a
# LATIN1 database, prompt_tokens beyond int4, deep nesting) become a class
# and a log row, and a response fuzzer finds no escaping error, no crash
# and one log row per case; control characters in session_affinity, the
# key or base_url are refused with 22023 before anything is sent (the key
# is not printed); a forced path is sent and logged as forced during a
# Priority window; error text is cut on a character boundary, so a LATIN1
# client gets the real SQLSTATE.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use FindBin;
use lib "$FindBin::Bin";
use lib "$FindBin::Bin/../test/respfuzz";
use FwSim;
use RespFuzz;

plan skip_all => 'FWSIM is not set' unless $ENV{FWSIM} && -x $ENV{FWSIM};

my $sim = FwSim->start('--time-scale', '0');
my $fz = RespFuzz->start;

my $node = PostgreSQL::Test::Cluster->new('engine');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.flush_interval = '50ms'
fw_tier.shared_pause_cap = '2s'
max_worker_processes = 16
max_parallel_workers = 8
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
CREATE ROLE ra LOGIN;
CREATE ROLE rb LOGIN;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO ra, rb;
});

sub wait_for
{
	my ($what, $cond, $secs) = @_;
	my $deadline = time + ($secs // 30);
	while (time < $deadline)
	{
		return 1 if $cond->();
		usleep(20_000);
	}
	diag("timed out waiting for $what");
	return 0;
}

# ENGINE_SECTIONS=pause,fuzz runs only those sections (test/respfuzz/run.sh
# runs the fuzzer alone); default: all of them.
my %only = map { $_ => 1 } split /,/, ($ENV{ENGINE_SECTIONS} // '');
sub section { return !%only || $only{ $_[0] }; }

sub calls_count
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.calls');
}

# psql's stderr with SQLSTATEs (VERBOSITY verbose) and the elapsed time
sub run_sql
{
	my ($db, $sql, %opt) = @_;
	my $t0 = time;
	my ($ret, $out, $err) = $node->psql($db, $sql,
		extra_params => [ '-v', 'VERBOSITY=verbose', @{ $opt{params} // [] } ],
		$opt{connstr} ? (connstr => $opt{connstr}) : ());
	return ($ret, $out, $err, time - $t0);
}

# ===== item 3: only a real cancel stops a paid request ======================
if (section('interrupts'))
{
my $bg = $node->background_psql('postgres', on_error_stop => 0);
my $pid = $bg->query_safe('SELECT pg_backend_pid()');

sub wait_in_flight
{
	return wait_for('a request in flight', sub { $sim->stats->{in_flight} >= 1 }, 20);
}

# Start a slow call in $bg, do $interfere from another session while it is
# in flight, and check the call still answers.
sub survives
{
	my ($name, $interfere, $setup) = @_;
	$sim->reset;
	$bg->{stderr} = '';
	$bg->query_safe($setup) if $setup;
	$bg->query_until(qr/started/, qq{
\\echo started
SELECT fw_complete('[fwsim:slow=1500] $name');
});
	ok(wait_in_flight(), "$name: the call is in flight");
	$interfere->();
	my $out = $bg->query("SELECT 'end'");
	like($out, qr/Echo: $name/, "$name: the call returned its answer");
	unlike($bg->{stderr}, qr/ERROR/, "$name: no error") or diag($bg->{stderr});
}

survives('memctx', sub {
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	usleep(100_000);
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
});

# DROP DATABASE emits a ProcSignal barrier and waits until every backend
# absorbed it: it returns only if the in-flight backend services it.
$node->safe_psql('postgres', 'CREATE DATABASE scratch');
survives('barrier', sub { $node->safe_psql('postgres', 'DROP DATABASE scratch'); });

survives('conncheck', sub { usleep(300_000) },
	"SET client_connection_check_interval = '10ms'");
$bg->query('RESET client_connection_check_interval');

# A batch with 8 requests in flight survives the same interrupts.
{
	$sim->reset;
	$bg->{stderr} = '';
	$bg->query_until(qr/started/, q{
\echo started
SELECT array_to_string(fw_complete_batch(array_agg('[fwsim:slow=1500] b' || i ORDER BY i), 'batch'), ',')
  FROM generate_series(1, 8) i;
});
	ok(wait_for('8 in flight', sub { $sim->stats->{in_flight} >= 8 }, 20), 'batch: 8 requests in flight');
	$node->safe_psql('postgres', "SELECT pg_log_backend_memory_contexts($pid)");
	$node->safe_psql('postgres', 'CREATE DATABASE scratch2');
	$node->safe_psql('postgres', 'DROP DATABASE scratch2');
	my $out = $bg->query("SELECT 'end'");
	like($out, qr/^Echo: b1,Echo: b2,.*,Echo: b8$/m, 'batch: every answer returned');
	unlike($bg->{stderr}, qr/ERROR/, 'batch: no error') or diag($bg->{stderr});
	is($sim->stats->{total}, 8, 'batch: each request sent once');
}

# ... and when that check finds the client gone, the session ends (FATAL)
# and the attempt in flight is still logged.
{
	my $dead = $node->background_psql('postgres', on_error_stop => 0);
	my $dpid = $dead->query_safe('SELECT pg_backend_pid()');
	$dead->query_safe("SET client_connection_check_interval = '10ms'");
	$sim->reset;
	my $n0 = $node->safe_psql('postgres',
		q{SELECT count(*) FROM fw_tier.calls WHERE error = 'interrupted by an error in the statement'});
	$dead->query_until(qr/started/, q{
\echo started
SELECT fw_complete('[fwsim:slow=5000] dead client');
});
	ok(wait_in_flight(), 'dead client: the call is in flight');
	$dead->{run}->kill_kill;
	ok(wait_for('the backend to exit', sub {
		$node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE pid = $dpid") == 0 }, 10),
		'dead client: the backend ends');
	ok(wait_for('the interrupted attempt logged', sub {
		$node->safe_psql('postgres',
			q{SELECT count(*) FROM fw_tier.calls WHERE error = 'interrupted by an error in the statement'}) == $n0 + 1 }),
		'dead client: the attempt in flight is logged');
}

# Parallel query: fw_complete is PARALLEL RESTRICTED, so it runs in the
# leader above a Gather while the workers finish their scan and exit.
$node->safe_psql('postgres', q{
CREATE TABLE big AS SELECT g AS id FROM generate_series(1, 200000) g;
ANALYZE big;
});
my $par_settings = q{
SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0; SET max_parallel_workers_per_gather = 2;
};
# no ORDER BY: a Sort would wait for the workers before the first call
my $par_sql = q{SELECT fw_complete('[fwsim:slow=700] par' || id) FROM big WHERE id % 50000 = 1};
like($node->safe_psql('postgres', "$par_settings EXPLAIN (COSTS OFF) $par_sql"),
	qr/Gather/, 'the plan has a Gather');
{
	$sim->reset;
	my ($ret, $out, $err) = $node->psql('postgres', "$par_settings $par_sql",
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	is($ret, 0, 'parallel query: no error') or diag($err);
	is(join(',', sort split /\n/, $out), 'Echo: par1,Echo: par100001,Echo: par150001,Echo: par50001',
		'parallel query: every answer returned while workers exited');
	is($sim->stats->{total}, 4, 'parallel query: each request sent once');
}

# The stops still stop.
sub stop_latency
{
	my ($name, $stop) = @_;
	$sim->reset;
	$bg->{stderr} = '';
	$bg->query_until(qr/started/, q{
\echo started
SELECT fw_complete('[fwsim:hang] wait');
});
	ok(wait_in_flight(), "$name: the call is in flight");
	my $t0 = time;
	$stop->();
	my $out = $bg->query('SELECT 1');
	my $lat = time - $t0;
	like($bg->{stderr}, qr/canceling statement/, "$name: the call is stopped (57014)");
	cmp_ok($lat, '<', 2, sprintf('%s stops within 2 s (%.0f ms)', $name, $lat * 1000));
	diag(sprintf('%s latency: %.1f ms', $name, $lat * 1000));
	ok(wait_for("$name: the simulator saw the client go",
		sub { $sim->stats->{in_flight} == 0 }, 10), "$name: the transfer is released");
}

stop_latency('pg_cancel_backend', sub { $node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)") });

{
	$sim->reset;
	my ($ret, $out, $err, $el) = run_sql('postgres',
		q{SET statement_timeout = '500ms'; SELECT fw_complete('[fwsim:hang] st')});
	like($err, qr/57014/, 'statement_timeout stops the call (57014)');
	cmp_ok($el, '<', 2.5, sprintf('statement_timeout 500ms: returned after %.0f ms', $el * 1000));
	diag(sprintf('statement_timeout latency beyond 500 ms (incl. psql start): %.1f ms', ($el - 0.5) * 1000));
}

{
	$sim->reset;
	my $ncancel = $node->safe_psql('postgres', q{SELECT count(*) FROM fw_tier.calls WHERE outcome = 'cancelled'
	  AND error = 'canceled by the statement'});
	my $t0 = time;
	$bg->query_until(qr/started/, q{
\echo started
SELECT fw_complete('[fwsim:hang] term');
});
	ok(wait_in_flight(), 'terminate: the call is in flight');
	$t0 = time;
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
	ok(wait_for('the backend to exit', sub {
		$node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE pid = $pid") == 0 }, 10),
		'pg_terminate_backend ends the backend');
	my $lat = time - $t0;
	cmp_ok($lat, '<', 2, sprintf('terminate within 2 s (%.0f ms)', $lat * 1000));
	diag(sprintf('pg_terminate_backend latency (incl. polling): %.1f ms', $lat * 1000));
	ok(wait_for('the cancelled attempt logged', sub {
		$node->safe_psql('postgres', q{SELECT count(*) FROM fw_tier.calls WHERE outcome = 'cancelled'
		  AND error = 'canceled by the statement'}) == $ncancel + 1 }), 'the terminated attempt is logged as cancelled');
	eval { $bg->quit };
}
}

# ===== item 5: one role's settings cannot slow another's calls =============

for my $case (!section('pause') ? () :
	(['[fwsim:ratelimit=600] a', 'Retry-After 600 s'], ['[fwsim:status=429] a', 'no Retry-After']))
{
	my ($prompt, $what) = @$case;
	$sim->reset;
	my $a = $node->safe_psql('postgres', qq{
SET fw_tier.backoff_base = '10min'; SET fw_tier.backoff_cap = '1h';
SET fw_tier.retry_after_cap = '1h'; SET fw_tier.max_attempts = 1;
SET fw_tier.on_error = 'null';
SELECT fw_complete('$prompt') IS NULL;
}, connstr => $node->connstr('postgres') . ' user=ra');
	is($a, 't', "429 ($what): role A's call fails at once with max_attempts = 1");
	my ($ret, $out, $err, $el) = run_sql('postgres',
		q{SET statement_timeout = '20s'; SELECT fw_complete('b')},
		connstr => $node->connstr('postgres') . ' user=rb');
	is($out, 'Echo: b', "429 ($what): role B's call answers") or diag($err);
	cmp_ok($el, '<', 5, sprintf("429 ($what): B is not held by A's settings (%.0f ms, cap 2 s)", $el * 1000));
	cmp_ok($el, '>=', 0.5, "429 ($what): the shared pause itself still applies")
	  if $what =~ /600/;
}

# ===== item 8: no header injection ==========================================

for my $aff (!section('headers') ? () :
	("x\r\nAuthorization: Bearer evil", "x\nx-injected: 1", "tab\there"))
{
	$sim->reset;
	(my $sqlaff = $aff) =~ s/\r/\\r/g;
	$sqlaff =~ s/\n/\\n/g;
	$sqlaff =~ s/\t/\\t/g;
	my ($ret, $out, $err) = run_sql('postgres',
		qq{SELECT fw_chat('[{"role":"user","content":"inj"}]', 'default',
		   jsonb_build_object('session_affinity', E'$sqlaff'))});
	like($err, qr/22023/, "session_affinity with control characters: 22023 ($sqlaff)");
	is($sim->stats->{total}, 0, "nothing was sent ($sqlaff)");
}
if (section('headers'))
{
	$sim->reset;
	my $out = $node->safe_psql('postgres',
		q{SELECT fw_chat('[{"role":"user","content":"aff"}]', 'default',
		  '{"session_affinity": "good-1"}')->'choices'->0->'message'->>'content'});
	is($out, 'Echo: aff', 'a clean session_affinity is sent');
	is($sim->log_requests->[-1]{session_affinity}, 'good-1', 'and arrives as the header');
}
if (section('headers'))
{
	my $keyfile = $node->basedir . '/key.txt';
	open(my $fh, '>', $keyfile) or die;
	print $fh "sk-SECRET42\rX-Evil: 1\n";
	close $fh;
	$sim->reset;
	my ($ret, $out, $err) = run_sql('postgres',
		qq{SET fw_tier.api_key_file = '$keyfile'; SELECT fw_complete('k')});
	like($err, qr/22023/, 'a key with CR from api_key_file: 22023');
	unlike($err, qr/SECRET42/, 'and the message does not print the key');
	is($sim->stats->{total}, 0, 'nothing was sent with the bad key');
	($ret, $out, $err) = run_sql('postgres',
		q{SET fw_tier.api_key = E'sk-SECRET43\nX-Evil: 1'; SELECT fw_complete('k')});
	like($err, qr/22023/, 'a key with LF from fw_tier.api_key: 22023');
	unlike($err, qr/SECRET43/, 'and the message does not print it');
	($ret, $out, $err) = run_sql('postgres',
		qq{SET fw_tier.base_url = E'@{[$sim->url]}/inference/v1\\r\\nX: 1'; SELECT fw_complete('k')});
	like($err, qr/22023/, 'a base_url with CR/LF: 22023');
	is($sim->stats->{total}, 0, 'nothing was sent');
}

# ===== item 9: a forced path is sent and logged as forced ===================
if (section('forced'))
{
	$node->safe_psql('postgres', q{SELECT fw_escalate('default', '10 min')});
	$sim->reset;
	my $c0 = calls_count();
	my $out = $node->safe_psql('postgres',
		q{SELECT fw_chat('[{"role":"user","content":"forced"}]', 'default', '{"path":"standard"}')
		  ->'choices'->0->'message'->>'content'});
	is($out, 'Echo: forced', 'forced standard call answers during a window');
	my $log = $sim->log_requests;
	is($log->[-1]{path}, 'standard', 'the simulator served it on Standard');
	ok(!defined $log->[-1]{service_tier}, 'no service_tier was sent');
	$out = $node->safe_psql('postgres', q{SELECT fw_complete('unforced')});
	is($sim->log_requests->[-1]{service_tier}, 'priority', 'without the option the call goes Priority');
	ok(wait_for('two log rows', sub { calls_count() >= $c0 + 2 }), 'both calls logged');
	is($node->safe_psql('postgres', qq{SELECT string_agg(path || '/' || escalated || '/' || coalesce(service_tier, '-'), ' ' ORDER BY started_at)
	   FROM (SELECT * FROM fw_tier.calls ORDER BY started_at DESC LIMIT 2) s}),
		'standard/false/- priority/true/priority', 'the log says standard, not escalated; then priority, escalated');
	$node->safe_psql('postgres', q{SELECT fw_deescalate('default')});
}

# ===== item 13: error text cut on a character boundary ======================
$node->safe_psql('postgres', "ALTER SYSTEM SET fw_tier.base_url = '@{[$fz->url]}/inference/v1'");
$node->reload;
wait_for('the new base_url', sub {
	$node->safe_psql('postgres', 'SHOW fw_tier.base_url') eq $fz->url . '/inference/v1' });

sub raw_prompt
{
	my ($status, $body, $ra) = @_;
	return "raw $status " . unpack('H*', $body) . (defined $ra ? " $ra" : '');
}
if (section('cut'))
{
	# 254 ASCII bytes then "é": the 255-byte limit falls inside the character
	my $msg = ('a' x 254) . "\xc3\xa9" . ('b' x 20);
	my $p = raw_prompt(400, qq({"error":{"message":"$msg"}}));
	my $c0 = calls_count();
	my ($ret, $out, $err) = run_sql('postgres',
		qq{SET client_encoding = 'LATIN1'; SELECT fw_complete('$p')});
	like($err, qr/22023/, 'a LATIN1 client gets the real SQLSTATE (22023)');
	unlike($err, qr/invalid byte sequence|22021/, 'not an encoding error');
	like($err, qr/a{254}\n|a{254}$/m, 'the DETAIL ends before the cut character');
	ok(wait_for('the log row', sub { calls_count() >= $c0 + 1 }), 'the attempt is logged');
	is($node->safe_psql('postgres',
		q{SELECT octet_length(error) FROM fw_tier.calls ORDER BY started_at DESC LIMIT 1}),
		254, 'the logged error is cut before the character too');
}

# ===== item 7: classification never raises, always logs =====================
if (section('classify'))
{
	$node->safe_psql('postgres', q{
CREATE DATABASE lat1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
});
	$node->safe_psql('lat1', 'CREATE EXTENSION fw_tier');
	my $c0 = calls_count();
	my $jp = qq({"choices":[{"message":{"role":"assistant","content":"\xe6\x97\xa5\xe6\x9c\xac"}}]});
	my ($ret, $out, $err) = run_sql('lat1',
		"SET fw_tier.on_error = 'null'; SELECT fw_complete('" . raw_prompt(200, $jp) . "') IS NULL");
	is($out, 't', 'LATIN1 database, answer not in LATIN1: NULL with on_error=null') or diag($err);
	($ret, $out, $err) = run_sql('lat1', "SELECT fw_complete('" . raw_prompt(200, $jp) . "')");
	like($err, qr/22000/, 'and bad_response (22000) with on_error=raise');
	like($err, qr/database encoding|LATIN1|no equivalent/i, 'DETAIL says why');
	my $ok = qq({"choices":[{"message":{"content":"caf\xc3\xa9"}}]});
	($ret, $out, $err) = run_sql('lat1', "SELECT fw_complete('" . raw_prompt(200, $ok) . "') = 'caf' || chr(233)");
	is($out, 't', 'an answer LATIN1 can hold still works there');

	my $big = qq({"choices":[{"message":{"content":"big"}}],"usage":{"prompt_tokens":3000000000,"completion_tokens":-1}});
	($ret, $out, $err) = run_sql('postgres', "SELECT fw_complete('" . raw_prompt(200, $big) . "')");
	is($out, 'big', 'prompt_tokens beyond int4: the answer is returned') or diag($err);

	my $deep = '{"choices":[{"message":{"content":"x"}}],"x":' . ('[' x 100000) . (']' x 100000) . '}';
	($ret, $out, $err) = run_sql('postgres',
		"SET fw_tier.on_error = 'null'; SELECT fw_complete('" . raw_prompt(200, $deep) . "') IS NULL");
	is($out, 't', 'a body nested 100,000 deep: NULL with on_error=null') or diag($err);
	($ret, $out, $err) = run_sql('postgres', "SELECT fw_complete('" . raw_prompt(200, $deep) . "')");
	like($err, qr/22000/, 'and 22000 with on_error=raise');

	ok(wait_for('six log rows', sub { calls_count() >= $c0 + 6 }), 'every attempt is logged');
	is($node->safe_psql('postgres', qq{SELECT string_agg(outcome || '/' || coalesce(prompt_tokens::text, '-'), ' ' ORDER BY started_at)
	   FROM (SELECT * FROM fw_tier.calls ORDER BY started_at DESC LIMIT 6) s}),
		'bad_response/- bad_response/- ok/- ok/- bad_response/- bad_response/-',
		'classes in the log: bad_response, ok (tokens unknown), bad_response');

	# an answer claiming more cached than prompt tokens is logged capped,
	# so its cost is never negative
	my $cached = qq({"choices":[{"message":{"content":"cached"}}],"usage":{"prompt_tokens":10,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":50}}});
	my $cc0 = calls_count();
	($ret, $out, $err) = run_sql('postgres', "SELECT fw_complete('" . raw_prompt(200, $cached) . "')");
	is($out, 'cached', 'cached tokens above prompt tokens: the answer is returned') or diag($err);
	ok(wait_for('its log row', sub { calls_count() >= $cc0 + 1 }), 'and logged');
	is($node->safe_psql('postgres', q{SELECT prompt_tokens || '/' || cached_prompt_tokens
	   FROM fw_tier.calls ORDER BY started_at DESC LIMIT 1}), '10/10',
		'cached tokens are capped at the prompt tokens in the log');

	# a number beyond numeric's range in the answer: the answer is still
	# returned (it was paid for), the count logged as unknown
	my $huge = qq({"choices":[{"message":{"content":"huge"}}],"usage":{"prompt_tokens":1e200000,"completion_tokens":1},"x":-1e200000});
	$cc0 = calls_count();
	($ret, $out, $err) = run_sql('postgres', "SELECT fw_complete('" . raw_prompt(200, $huge) . "')");
	is($out, 'huge', 'a token count of 1e200000: the answer is returned') or diag($err);
	ok(wait_for('its log row', sub { calls_count() >= $cc0 + 1 }), 'and logged');
	is($node->safe_psql('postgres', q{SELECT outcome || '/' || coalesce(prompt_tokens::text, '-')
	   FROM fw_tier.calls ORDER BY started_at DESC LIMIT 1}), 'ok/-',
		'the count is logged as unknown');
}

# ===== record mode: a body that is not valid text is no fixture ============
if (section('classify'))
{
	my $c0 = calls_count();
	my $f0 = $node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.fixtures');
	my $bad = qq({"error":{"message":"bad \xff\xfe bytes"}});
	my ($ret, $out, $err) = run_sql('postgres',
		"SET fw_tier.mode = 'record'; SET fw_tier.on_error = 'null'; SELECT fw_complete('"
		  . raw_prompt(400, $bad) . "') IS NULL");
	is($out, 't', 'record mode, a non-UTF-8 body: the call itself goes on') or diag($err);
	like($err, qr/WARNING:  .*could not record fw_tier fixture.*\n.*DETAIL:  The response body is not valid UTF8 text/,
		'record mode, a non-UTF-8 body: WARNING, not recorded');
	is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.fixtures'), $f0,
		'no invalid text stored in fw_tier.fixtures');
	ok(wait_for('its log row', sub { calls_count() >= $c0 + 1 }), 'and the attempt is logged');
}

# ===== a cleanup that cannot log normally still releases every handle ======
# The session's role was dropped (its calls still run: EXECUTE is granted
# to PUBLIC for this); a cancel's log row cannot name it
# (GetUserNameFromId): it is logged under the role's oid, and the cancel is
# reported as such.  Before, the cleanup raised "invalid role OID" before
# it released the handles.
if (section('interrupts'))
{
	$node->safe_psql('postgres', "ALTER SYSTEM SET fw_tier.base_url = '@{[$sim->url]}/inference/v1'; SELECT pg_reload_conf()");
	wait_for('the sim base_url', sub {
		$node->safe_psql('postgres', 'SHOW fw_tier.base_url') eq $sim->url . '/inference/v1' });
	$node->safe_psql('postgres', 'CREATE ROLE gone LOGIN; GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO PUBLIC');
	my $oid = $node->safe_psql('postgres', "SELECT 'gone'::regrole::oid");
	$sim->reset;
	my $bg = $node->background_psql('postgres', on_error_stop => 0,
		extra_params => [ '-U', 'gone' ]);
	my $pid = $bg->query_safe('SELECT pg_backend_pid()');
	$node->safe_psql('postgres', 'DROP ROLE gone');
	$bg->{stderr} = '';
	$bg->query_until(qr/started/, "\\echo started\nSELECT fw_complete('[fwsim:slow=5000] doomed');\n");
	ok(wait_for('a request in flight', sub { $sim->stats->{in_flight} >= 1 }, 20),
		'the dropped role\'s call is in flight');
	$node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)");
	like($bg->query('SELECT 1'), qr/1/, 'the session goes on after the cancel');
	like($bg->{stderr}, qr/canceling statement due to user request/, 'the cancel is reported as such');
	unlike($bg->{stderr}, qr/invalid role|cache lookup/, 'not as a failed role lookup');
	ok(wait_for('the cancelled attempt logged', sub {
		$node->safe_psql('postgres', qq{SELECT count(*) FROM fw_tier.calls
		  WHERE username = '$oid' AND outcome = 'cancelled'}) == 1 }),
		'the cancelled attempt is logged under the dropped role\'s oid');
	is($node->safe_psql('postgres', q{SELECT fw_complete('another session')}),
		'Echo: another session', 'the server is up and calls work');
	$node->safe_psql('postgres', 'REVOKE EXECUTE ON FUNCTION fw_complete(text, text) FROM PUBLIC');
	eval { $bg->quit };
	$node->safe_psql('postgres', "ALTER SYSTEM SET fw_tier.base_url = '@{[$fz->url]}/inference/v1'; SELECT pg_reload_conf()");
	wait_for('the fuzz base_url', sub {
		$node->safe_psql('postgres', 'SHOW fw_tier.base_url') eq $fz->url . '/inference/v1' });
}

# The fuzzer: FUZZ_SEED / FUZZ_CASES override (test/respfuzz/run.sh).
if (section('fuzz'))
{
	my $seed = $ENV{FUZZ_SEED} // 1;
	my $ncases = $ENV{FUZZ_CASES} // 2000;
	$node->safe_psql('postgres', $RespFuzz::DRIVER_SQL);
	$node->safe_psql('postgres', q{
ALTER SYSTEM SET fw_tier.shared_pause_cap = 0;
ALTER SYSTEM SET fw_tier.max_attempts = 1;
ALTER SYSTEM SET fw_tier.request_timeout = '20s';
SELECT pg_reload_conf();
});
	my $c0 = calls_count();
	my $t0 = time;
	my $res = RespFuzz::run_cases($node, 'postgres', $seed, $ncases);
	my $el = time - $t0;
	is(scalar @{ $res->{bad} }, 0, "fuzz seed $seed, $ncases cases: no error escapes but the class SQLSTATEs")
	  or diag(join(' ', @{ $res->{bad} }[0 .. ($#{ $res->{bad} } < 30 ? $#{ $res->{bad} } : 30)]));
	diag(sprintf('fuzz: %d cases in %.1f s; outcomes: %s', $ncases, $el,
		join(' ', map { "$_=$res->{count}{$_}" } sort keys %{ $res->{count} })));
	ok(wait_for('every fuzz log row', sub { calls_count() >= $c0 + $ncases }, 60),
		'the log received the fuzz rows');
	is(calls_count() - $c0, $ncases, 'exactly one log row per case');
	# the server sends "x-request-id: fuzz-\xc3\xa9-\x01": foreign bytes
	# reach the log as printable ASCII only
	is($node->safe_psql('postgres', q{SELECT count(*) FILTER (WHERE request_id ~ '[^ -~]')
	   || '/' || (count(*) FILTER (WHERE request_id = 'fuzz-??-?') > 0) FROM fw_tier.calls}),
		'0/true', 'request ids in the log are printable ASCII');

	# a quarter as many in a LATIN1 database (UTF-8 the database cannot hold)
	$node->safe_psql('postgres', q{
CREATE DATABASE fuzzlat1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0});
	$node->safe_psql('fuzzlat1', 'CREATE EXTENSION fw_tier');
	$node->safe_psql('fuzzlat1', $RespFuzz::DRIVER_SQL);
	my $nlat = int($ncases / 4);
	$c0 = calls_count();
	$res = RespFuzz::run_cases($node, 'fuzzlat1', $seed + 1, $nlat, int(($nlat + 1) / 2) || 1);
	is(scalar @{ $res->{bad} }, 0, "fuzz seed @{[$seed + 1]}, $nlat cases in a LATIN1 database: no error escapes")
	  or diag(join(' ', @{ $res->{bad} }[0 .. ($#{ $res->{bad} } < 30 ? $#{ $res->{bad} } : 30)]));
	diag(sprintf('fuzz LATIN1: %d cases; outcomes: %s', $nlat,
		join(' ', map { "$_=$res->{count}{$_}" } sort keys %{ $res->{count} })));
	ok(wait_for('every LATIN1 fuzz log row', sub { calls_count() >= $c0 + $nlat }, 60),
		'the log received the LATIN1 fuzz rows');
	is(calls_count() - $c0, $nlat, 'exactly one log row per LATIN1 case');
	is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server is up');
	my $log = slurp_file($node->logfile);
	unlike($log, qr/terminated by signal|server process .* was terminated/, 'no backend crashed');
}

$node->stop;
$sim->stop;
$fz->stop;
done_testing();
