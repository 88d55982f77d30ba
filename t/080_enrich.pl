# Continuous enrichment (issue 14): fw_enrich_create and its workers.
#
# Pins: create refuses bad templates (22023), unknown columns (42703),
# tables without a primary key (55000) and roles without the rights
# (42501); 10,000 rows by COPY all get the simulator's answer for their
# own prompt, one paid request each; an UPDATE of an unreferenced column
# sends nothing, of the referenced one re-enriches only those rows; a row
# updated while its request is in flight ends with the answer for its
# latest value; pause holds the queue, resume drains it; a failing row
# goes to fw_tier.enrich_dead_letters after max_attempts and
# fw_enrich_retry brings it back; answers saved while the rows were locked
# survive a worker SIGKILL and are written without paying again; a
# SIGKILL, a cancel and a server restart mid-run lose nothing; the worker
# shows in pg_stat_activity; fw_enrich_drop removes the triggers and the
# queue, and later inserts send nothing.
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

my $node = PostgreSQL::Test::Cluster->new('enrich');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.flush_interval = '50ms'
fw_tier.max_concurrency = 32
max_worker_processes = 16
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
CREATE ROLE app LOGIN;
CREATE ROLE other LOGIN;
CREATE SCHEMA appdata AUTHORIZATION app;
GRANT USAGE ON SCHEMA appdata TO other;
GRANT EXECUTE ON FUNCTION fw_enrich_create(text, regclass, name, text, text, jsonb) TO app, other;
GRANT EXECUTE ON FUNCTION fw_enrich_drop(text), fw_enrich_pause(text),
	fw_enrich_resume(text), fw_enrich_retry(text) TO app, other;
SET ROLE app;
CREATE TABLE appdata.docs (id int PRIMARY KEY, body text, note text, summary text);
CREATE TABLE appdata.nokey (id int, body text, summary text);
GRANT SELECT ON appdata.docs TO other;
});

sub paid
{
	my $s = $sim->stats;
	my $n = 0;
	$n += $s->{paths}{$_}{ok} for keys %{ $s->{paths} };
	return $n;
}

# wait (bounded) until the condition query returns 't'
sub wait_for
{
	my ($sql, $what, $secs) = @_;
	$secs //= 90;
	my $deadline = time + $secs;
	while (time < $deadline)
	{
		# a crash restart may be under way: an error is "not yet"
		my ($rc, $out) = $node->psql('postgres', $sql);
		return 1 if $rc == 0 && $out eq 't';
		usleep(100_000);
	}
	diag("timed out waiting for $what: "
		  . $node->safe_psql('postgres', 'SELECT * FROM fw_tier.enrich_status'));
	return 0;
}

sub drained
{
	my ($what, $name) = @_;
	$name //= 'sum';
	return wait_for("SELECT queued = 0 AND in_flight = 0 FROM fw_tier.enrich_status WHERE name = '$name'",
		$what);
}

sub wrong
{
	return $node->safe_psql('postgres',
		q{SELECT count(*) FROM appdata.docs WHERE summary IS DISTINCT FROM 'Echo: Summarise: ' || body});
}

# --- create: the checks -------------------------------------------------
my @bad = (
	[ q|'x', 'appdata.docs', 'summary', 'Summarise {body'|, '22023', 'an unclosed brace' ],
	[ q|'x', 'appdata.docs', 'summary', 'Summarise } {body}'|, '22023', 'a lone closing brace' ],
	[ q{'x', 'appdata.docs', 'summary', 'Summarise: {bodyy}'}, '42703', 'an unknown column' ],
	[ q{'x', 'appdata.docs', 'summary', 'Summarise: {summary}'}, '22023', 'the target in the prompt' ],
	[ q{'x', 'appdata.nokey', 'summary', 'Summarise: {body}'}, '55000', 'a table without a primary key' ],
	[ q{'x', 'appdata.docs', 'summary', 'Summarise: {body}', 'nosuch'}, '22023', 'an unknown workload' ],
);
for my $b (@bad)
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSET ROLE app; SELECT fw_enrich_create($b->[0]);");
	like($err, qr/ERROR:  $b->[1]/, "create refuses $b->[2] ($b->[1])");
}
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSET ROLE other; SELECT fw_enrich_create('x', 'appdata.docs', 'summary', 'S: {body}');");
	like($err, qr/ERROR:  42501/, 'a role with SELECT but no UPDATE on the target may not create one');
}
{
	$node->safe_psql('postgres', 'CREATE ROLE nogrant LOGIN; GRANT USAGE ON SCHEMA appdata TO nogrant');
	my ($rc, $out, $err) = $node->psql('postgres',
		"SET ROLE nogrant; SELECT fw_enrich_create('x', 'appdata.docs', 'summary', 'S: {body}');");
	like($err, qr/HINT:  A superuser or the extension's owner can run GRANT EXECUTE ON FUNCTION fw_enrich_create\(text, regclass, name, text, text, jsonb\) TO nogrant/,
		'without EXECUTE: 42501 with the GRANT to run as its hint');
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.enrichments'), 0, 'nothing was registered');

# --- 10,000 rows by COPY ------------------------------------------------
$node->safe_psql('postgres', q{SET ROLE app;
SELECT fw_enrich_create('sum', 'appdata.docs', 'summary', 'Summarise: {body}', 'batch',
						'{"max_attempts": 2}')});
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_trigger WHERE tgrelid = 'appdata.docs'::regclass AND NOT tgisinternal}),
	2, 'two triggers on the table');

my $p0 = paid();
my $copy = "COPY appdata.docs (id, body) FROM STDIN;\n"
  . join('', map { "$_\tdocument {number} $_ {{x}}\n" } 1 .. 10000) . "\\.\n";
$node->safe_psql('postgres', "SET ROLE app;\n$copy");
ok(drained('the COPY'), '10,000 rows enriched');
is(wrong(), 0, 'every row has the answer for its own prompt (braces in values stay as they are)');
is(paid() - $p0, 10000, 'one paid request per row');
is( $node->safe_psql('postgres',
		q{SELECT done FROM fw_tier.enrich_status WHERE name = 'sum'}),
	10000, 'enrich_status counts them done');

# --- updates --------------------------------------------------------------
$p0 = paid();
$node->safe_psql('postgres', q{UPDATE appdata.docs SET note = 'n' WHERE id <= 100});
sleep 2;
is(paid() - $p0, 0, 'an UPDATE of a column the prompt does not name sends nothing');
$node->safe_psql('postgres',
	q{UPDATE appdata.docs SET body = 'changed ' || id WHERE id BETWEEN 101 AND 150});
ok(drained('the update'), 'updated rows drained');
is(wrong(), 0, 'the changed rows have their new answers');
is(paid() - $p0, 50, 'only the 50 changed rows were sent');

# --- a row updated while its request is in flight ------------------------
$node->safe_psql('postgres',
	q{UPDATE appdata.docs SET body = '[fwsim:slow=1500] first' WHERE id = 1});
ok( wait_for(
		q{SELECT count(*) = 1 FROM fw_tier.enrich_queue WHERE state = 'in_flight'},
		'the slow request in flight', 30),
	'the slow request is in flight');
$node->safe_psql('postgres', q{UPDATE appdata.docs SET body = 'second' WHERE id = 1});
ok(drained('the in-flight update'), 'drained');
is( $node->safe_psql('postgres', 'SELECT summary FROM appdata.docs WHERE id = 1'),
	'Echo: Summarise: second', 'the row ends with the answer for its latest value');

# --- pause / resume ------------------------------------------------------
$node->safe_psql('postgres', q{SET ROLE app; SELECT fw_enrich_pause('sum')});
$p0 = paid();
$node->safe_psql('postgres',
	q{UPDATE appdata.docs SET body = 'paused ' || id WHERE id BETWEEN 201 AND 210});
sleep 2;
is(paid() - $p0, 0, 'paused: nothing sent');
is( $node->safe_psql('postgres',
		q{SELECT queued || ' ' || paused FROM fw_tier.enrich_status WHERE name = 'sum'}),
	'10 true', 'paused: 10 queued');
$node->safe_psql('postgres', q{SET ROLE app; SELECT fw_enrich_resume('sum')});
ok(drained('resume'), 'resumed');
is(wrong(), 0, 'the rows updated while paused are enriched');
is(paid() - $p0, 10, 'ten requests');

# --- dead letters and retry ---------------------------------------------
$sim->rule(fault => 'status', status => 400, count => 2);
$node->safe_psql('postgres', q{INSERT INTO appdata.docs (id, body) VALUES (20001, 'doomed')});
ok( wait_for(q{SELECT failed = 1 FROM fw_tier.enrich_status WHERE name = 'sum'}, 'the dead letter', 30),
	'after max_attempts (2) the row is a dead letter')
  or diag($node->safe_psql('postgres', q{SELECT * FROM fw_tier.enrich_queue; SELECT fw_flush(); SELECT call_id, attempt, outcome, http_status, error FROM fw_tier.calls ORDER BY started_at DESC LIMIT 5}));
like( $node->safe_psql('postgres',
		q{SET ROLE app; SELECT pk::text || ' ' || attempts || ' ' || last_error FROM fw_tier.enrich_dead_letters}),
	qr/^\{"id": 20001\} 2 client_error/, 'the dead letter names the row, its attempts and last error');
is( $node->safe_psql('postgres', q{SET ROLE other; SELECT count(*) FROM fw_tier.enrich_dead_letters}),
	0, 'another role does not see them');
is($node->safe_psql('postgres', q{SET ROLE app; SELECT fw_enrich_retry('sum')}), 1, 'retry puts it back');
ok(drained('retry'), 'retried');
is(wrong(), 0, 'the retried row is enriched');

# --- answers saved while the rows are locked survive a SIGKILL ----------
my $locker = $node->background_psql('postgres');
$p0 = paid();
$node->safe_psql('postgres',
	q{INSERT INTO appdata.docs (id, body) SELECT g, 'locked ' || g FROM generate_series(30001, 30300) g});
$locker->query_safe(q{BEGIN; SELECT id FROM appdata.docs WHERE id > 30000 FOR UPDATE});
ok( wait_for(q{SELECT count(*) FILTER (WHERE summary IS NULL) =
			(SELECT count(*) FROM fw_tier.enrich_queue WHERE answer IS NOT NULL AND state = 'queued')
		FROM appdata.docs WHERE id > 30000}, 'the saved answers', 60),
	'every answer not written back (rows locked) is saved in its queue item');
my $saved = $node->safe_psql('postgres', q{SELECT count(*) FROM fw_tier.enrich_queue WHERE answer IS NOT NULL});
cmp_ok($saved, '>', 0, "answers saved: $saved");
my $wpid = $node->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier enrich'});
like($wpid, qr/^\d+$/, 'one enrich worker in pg_stat_activity');
like( $node->safe_psql('postgres', "SELECT application_name FROM pg_stat_activity WHERE pid = $wpid"),
	qr/^fw_tier enrich postgres$/, 'application_name names the database');
kill 'KILL', $wpid;
eval { $locker->quit; };
usleep(200_000) while kill 0, $wpid;
$node->poll_query_until('postgres', 'SELECT true') or die;
ok(drained('after the SIGKILL'), 'drained after the crash restart');
is(wrong(), 0, 'every locked row enriched');
is(paid() - $p0, 300, 'the saved answers were written without paying again');

# --- SIGKILL, cancel and restart mid-run: nothing lost --------------------
$sim->post('/control/config', { time_scale => 0.2 });
for my $how ('kill', 'cancel', 'terminate', 'restart')
{
	my $base = { kill => 40000, cancel => 50000, terminate => 55000, restart => 60000 }->{$how};
	$p0 = paid();
	$node->safe_psql('postgres',
		"INSERT INTO appdata.docs (id, body) SELECT g, '$how ' || g FROM generate_series($base + 1, $base + 600) g");
	ok( wait_for(
			"SELECT count(summary) >= 64 FROM appdata.docs WHERE id > $base", "some answers ($how)", 60),
		"$how: the run is under way");
	my $pid = $node->safe_psql('postgres',
		q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier enrich'});
	if ($how eq 'kill') { kill 'KILL', $pid; usleep(200_000) while kill 0, $pid; }
	elsif ($how eq 'cancel') { $node->safe_psql('postgres', "SELECT pg_cancel_backend($pid)"); }
	elsif ($how eq 'terminate')
	{
		my $t0 = time;
		$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
		usleep(50_000) while kill(0, $pid) && time - $t0 < 30;
		cmp_ok(time - $t0, '<', 5, 'terminate: the worker exits promptly');
		# nobody starts another until a commit queues: resume does
		$node->safe_psql('postgres', q{SET ROLE app; SELECT fw_enrich_resume('sum')});
	}
	else { $node->restart; }
	$node->poll_query_until('postgres', 'SELECT true') or die;
	ok(drained("after $how"), "$how: drained");
	is(wrong(), 0, "$how: every row has the answer for its own prompt");
	my $extra = paid() - $p0 - 600;
	cmp_ok($extra, '>=', 0, "$how: every row was paid for");
	cmp_ok($extra, '<=', 32, "$how: at most the requests in flight at the $how paid again ($extra)");
	if ($how eq 'cancel')
	{
		is( $node->safe_psql('postgres',
				q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier enrich'}),
			$pid, 'cancel: the same worker went on');
	}
}
$sim->post('/control/config', { time_scale => 0 });

# --- kinds: json (with a schema) and embed ---------------------------------
my $schema = '{"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}';
$node->safe_psql('postgres', qq{SET ROLE app;
CREATE TABLE appdata.items (id bigint PRIMARY KEY, title text, meta jsonb, emb real[], n bigint);
SELECT fw_enrich_create('meta', 'appdata.items', 'meta', 'Classify: {title}', 'batch',
						'{"kind": "json", "schema": $schema}');
SELECT fw_enrich_create('emb', 'appdata.items', 'emb', '{title}', 'batch',
						'{"kind": "embed", "dimensions": 8}');
INSERT INTO appdata.items (id, title) SELECT g, 'item ' || g FROM generate_series(1, 20) g;});
ok(drained('json', 'meta') && drained('embed', 'emb'), 'json and embed enrichments drained');
is( $node->safe_psql('postgres', qq{SELECT count(*) FROM appdata.items
		WHERE meta = fw_complete_json('Classify: ' || title, '$schema', 'batch')}),
	20, 'kind json: each row holds fw_complete_json\'s answer for its prompt');
is( $node->safe_psql('postgres', q{SELECT count(*) FROM appdata.items
		WHERE emb = fw_embed(title, 'batch', '{"dimensions": 8}') AND array_length(emb, 1) = 8}),
	20, 'kind embed: each row holds fw_embed\'s vector');
{
	my ($rc, $out, $err) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSET ROLE app; SELECT fw_enrich_create('x', 'appdata.items', 'n', '{title}', 'batch', '{\"kind\": \"embed\"}');");
	like($err, qr/ERROR:  42804/, 'embed into a bigint column is refused (42804)');
}
$node->safe_psql('postgres', q{SET ROLE app; SELECT fw_enrich_drop('meta'); SELECT fw_enrich_drop('emb')});

# --- the worker writes as the creator: privileges and row level security -
$node->safe_psql('postgres', q{SET ROLE app;
CREATE TABLE appdata.shared (id int PRIMARY KEY, body text, summary text);
GRANT SELECT (id, body), UPDATE (summary) ON appdata.shared TO other;
ALTER TABLE appdata.shared ENABLE ROW LEVEL SECURITY;
CREATE POLICY see_low ON appdata.shared FOR SELECT TO other USING (id <= 5);
CREATE POLICY upd_low ON appdata.shared FOR UPDATE TO other USING (id <= 5);});
$node->safe_psql('postgres', q{SET ROLE other;
SELECT fw_enrich_create('shared', 'appdata.shared', 'summary', 'Shared: {body}')});
$p0 = paid();
$node->safe_psql('postgres', q{SET ROLE app;
INSERT INTO appdata.shared SELECT g, 'row ' || g FROM generate_series(1, 10) g});
ok(drained('row level security', 'shared'), 'drained');
is( $node->safe_psql('postgres',
		q{SELECT string_agg(id || ':' || coalesce(summary, '-'), ' ' ORDER BY id) FROM appdata.shared}),
	'1:Echo: Shared: row 1 2:Echo: Shared: row 2 3:Echo: Shared: row 3 4:Echo: Shared: row 4 5:Echo: Shared: row 5 6:- 7:- 8:- 9:- 10:-',
	'only the rows its creator may see and update are enriched');
is(paid() - $p0, 5, 'and only those were sent');
{
	my ($rc, $out, $err) = $node->psql('postgres', q{SET ROLE other; SELECT fw_enrich_drop('sum')});
	like($err, qr/must be the owner of enrichment "sum" or of its table/, 'another role may not drop an enrichment');
}
$node->safe_psql('postgres', q{SET ROLE other; SELECT fw_enrich_drop('shared')});

# --- two workers; the registry in pg_dump ----------------------------------
$node->append_conf('postgresql.conf', 'fw_tier.enrich_workers = 2');
$node->reload;
$node->safe_psql('postgres', q{SET ROLE app;
CREATE TABLE appdata.many (id int PRIMARY KEY, body text, summary text);
SELECT fw_enrich_create('many', 'appdata.many', 'summary', 'M: {body}', 'batch', '{"chunk": 50}');});
$sim->post('/control/config', { time_scale => 0.2 });
$p0 = paid();
$node->safe_psql('postgres', q{INSERT INTO appdata.many SELECT g, 'm' || g FROM generate_series(1, 1000) g});
ok( wait_for(q{SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'fw_tier enrich'},
		'a second worker', 30),
	'with fw_tier.enrich_workers = 2 a full chunk starts a second worker');
ok(drained('two workers', 'many'), 'two workers drained the queue');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM appdata.many WHERE summary IS DISTINCT FROM 'Echo: M: ' || body}),
	0, 'two workers: every row has its own answer');
is(paid() - $p0, 1000, 'two workers: one paid request per row (SKIP LOCKED: no item twice)');
$sim->post('/control/config', { time_scale => 0 });
like($node->safe_psql('postgres', q{SELECT 1}), qr/1/, 'alive');
{
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'pg_dump', '-d', $node->connstr('postgres') ], '>', \$out, '2>', \$err);
	like($out, qr/^COPY fw_tier\.enrichments /m, 'pg_dump keeps the registry (pg_extension_config_dump)');
	like($out, qr/^\d+\tmany\tappdata\.many\tsummary\tM: \{body\}\t.*\tapp\tf\t/m,
		'its row names the table and the owner role by name');
	like($out, qr/CREATE TRIGGER fw_enrich_\d+_insert AFTER INSERT ON appdata\.many/,
		'and the triggers, with the table');
}
# restored into another database: the registry and the triggers work there
{
	my $dump = $node->basedir . '/enrich.dump';
	$node->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('postgres') ], 'pg_dump -Fc');
	$node->safe_psql('postgres', 'CREATE DATABASE restored');
	$node->command_ok([ 'pg_restore', '-d', $node->connstr('restored'), $dump ], 'pg_restore');
	$node->safe_psql('restored', q{INSERT INTO appdata.many VALUES (5001, 'restored row')});
	my $ok = 0;
	for (1 .. 300)
	{
		$ok = 1, last if $node->safe_psql('restored',
			'SELECT summary FROM appdata.many WHERE id = 5001') eq 'Echo: M: restored row';
		usleep(100_000);
	}
	ok($ok, 'after pg_restore an insert is enriched by a worker of the restored database');
	# the restored database's worker is idle there: it leaves for the DROP
	is( $node->safe_psql('postgres',
			q{SELECT count(*) FROM pg_stat_activity WHERE datname = 'restored' AND backend_type = 'fw_tier enrich'}),
		1, 'a worker is connected to the restored database');
	$node->safe_psql('postgres', 'DROP DATABASE restored');
	pass('DROP DATABASE is not blocked by its enrich worker');
}
$node->safe_psql('postgres', q{SET ROLE app; SELECT fw_enrich_drop('many')});

# --- a table owner's code never runs as a superuser --------------------
# The reviewer's attacks: a cast to json of an enum and a domain's CHECK,
# both calling ALTER ROLE mallory SUPERUSER (caught: harmless when not
# privileged).  Key of such a type: refused; extra column of such a type:
# the triggers and the worker never convert it.
$node->safe_psql('postgres', q{
CREATE ROLE mallory LOGIN;
CREATE SCHEMA mal AUTHORIZATION mallory;
GRANT EXECUTE ON FUNCTION fw_enrich_create(text, regclass, name, text, text, jsonb),
	fw_enrich_drop(text), fw_enrich_pause(text), fw_enrich_resume(text) TO mallory;
SET ROLE mallory;
CREATE TYPE mal.e AS ENUM ('a', 'b');
CREATE FUNCTION mal.evil(mal.e) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
	BEGIN ALTER ROLE mallory SUPERUSER; EXCEPTION WHEN others THEN NULL; END;
	RETURN '"x"';
END $$;
CREATE CAST (mal.e AS json) WITH FUNCTION mal.evil(mal.e);
CREATE FUNCTION mal.evil2(int) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
	BEGIN ALTER ROLE mallory SUPERUSER; EXCEPTION WHEN others THEN NULL; END;
	RETURN true;
END $$;
CREATE DOMAIN mal.d AS int CHECK (mal.evil2(VALUE));
CREATE TABLE mal.k (k mal.e PRIMARY KEY, body text, summary text);
INSERT INTO mal.k VALUES ('a', 'key row', NULL);
CREATE TABLE mal.x (id int PRIMARY KEY, body text, mood mal.e, summary text);
INSERT INTO mal.x VALUES (1, 'first', 'a', NULL);
CREATE TABLE mal.dm (id int PRIMARY KEY, body text, dd mal.d, summary text);
});
my ($rc, $out, $err) = $node->psql('postgres',
	q{SET ROLE mallory; SELECT fw_enrich_create('malk', 'mal.k', 'summary', 'K: {body}')});
like($err, qr/built-in scalar type/, 'a key of a user type (enum with a cast to json) is refused');
is($node->safe_psql('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}),
	'f', 'and creating it did not run the cast as a superuser');
$node->safe_psql('postgres', 'ALTER ROLE mallory NOSUPERUSER');
$node->safe_psql('postgres', q{SET ROLE mallory;
	SELECT fw_enrich_create('malx', 'mal.x', 'summary', 'X: {body}');
	SELECT fw_enrich_create('maldm', 'mal.dm', 'summary', 'D: {body}')});
ok(wait_for(q{SELECT summary = 'Echo: X: first' FROM mal.x WHERE id = 1}, 'malx backfill', 60),
	'an enrichment of a table with an enum column works');
$node->safe_psql('postgres', q{SET ROLE mallory; UPDATE mal.x SET body = 'second' WHERE id = 1});
ok(wait_for(q{SELECT summary = 'Echo: X: second' FROM mal.x WHERE id = 1}, 'malx update', 60),
	'its UPDATE trigger re-enqueued the row');
is($node->safe_psql('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}),
	'f', 'the UPDATE trigger did not convert the enum column as a superuser');
$node->safe_psql('postgres', 'ALTER ROLE mallory NOSUPERUSER');
$node->safe_psql('postgres', q{SET ROLE mallory; INSERT INTO mal.dm (id, body) VALUES (1, 'dom'), (2, 'dom2')});
ok(wait_for(q{SELECT count(*) = 2 FROM mal.dm WHERE summary LIKE 'Echo: D: dom%'}, 'maldm', 60),
	'an enrichment of a table with a domain column works');
is($node->safe_psql('postgres', q{SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'}),
	'f', 'the worker did not run the domain\'s CHECK as a superuser');
$node->safe_psql('postgres', 'ALTER ROLE mallory NOSUPERUSER');

# --- a writer holding a queue row does not stall the worker ---------------
# Its trigger's ON CONFLICT locks the in-flight item's queue row; the
# write-back skips it (no wait under held cancel), other rows go on, and
# the row is answered for its new value once the writer commits.
$node->safe_psql('postgres', q{UPDATE mal.x SET body = '[fwsim:slow=2000] slow' WHERE id = 1});
ok( wait_for(q{SELECT count(*) = 1 FROM fw_tier.enrich_queue q JOIN fw_tier.enrichments e ON e.id = q.enrichment
			 WHERE e.name = 'malx' AND q.state = 'in_flight'}, 'the slow malx request', 30),
	'the slow request is in flight');
my $holder = $node->background_psql('postgres');
$holder->query_safe(q{BEGIN; UPDATE mal.x SET body = 'held' WHERE id = 1});
sleep 3;	# the slow answer arrives while the writer holds the queue row
my $lockwaits = 0;
for (1 .. 5)
{
	$lockwaits += $node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fw_tier enrich' AND wait_event_type = 'Lock'});
	usleep(400_000);
}
is($lockwaits, 0, 'no worker waits for the lock of the writer holding the queue row');
$node->safe_psql('postgres', q{INSERT INTO mal.x (id, body) VALUES (2, 'free')});
ok(wait_for(q{SELECT summary = 'Echo: X: free' FROM mal.x WHERE id = 2}, 'row 2 while row 1 is held', 30),
	'the worker goes on while a writer holds a queue row');
$holder->query_safe('COMMIT');
$holder->quit;
ok(wait_for(q{SELECT summary = 'Echo: X: held' FROM mal.x WHERE id = 1}, 'the held row', 60),
	'the held row is answered for its committed value');

# --- managing an enrichment does not block its table's writers -----------
my $pauser = $node->background_psql('postgres');
$pauser->query_safe(q{SET ROLE mallory; BEGIN; SELECT fw_enrich_pause('malx')});
($rc, $out, $err) = $node->psql('postgres',
	q{SET statement_timeout = '5s'; INSERT INTO mal.x (id, body) VALUES (3, 'while paused')});
is($rc, 0, 'an INSERT goes through while a pause of its enrichment is uncommitted')
  or diag($err);
$pauser->query_safe('COMMIT');
$pauser->query_safe(q{BEGIN; SELECT fw_enrich_resume('malx')});
($rc, $out, $err) = $node->psql('postgres',
	q{SET statement_timeout = '5s'; INSERT INTO mal.x (id, body) VALUES (4, 'while resumed')});
is($rc, 0, 'and while a resume is') or diag($err);
$pauser->query_safe('COMMIT');
$pauser->quit;
ok(wait_for(q{SELECT count(*) = 2 FROM mal.x WHERE id IN (3, 4) AND summary LIKE 'Echo: X: while %'}, 'rows 3, 4', 60),
	'both are enriched after the resume');

# --- a temporary table is refused -----------------------------------------
($rc, $out, $err) = $node->psql('postgres', q{SET ROLE mallory;
	CREATE TEMP TABLE tmpdocs (id int PRIMARY KEY, body text, summary text);
	SELECT fw_enrich_create('maltmp', 'tmpdocs', 'summary', 'T: {body}')});
like($err, qr/is a temporary table/, 'a temporary table cannot be an enrichment source');


# --- a poisoned enrichment neither loops nor hides -------------------------
($rc, $out, $err) = $node->psql('postgres',
	q{SET ROLE mallory; SELECT fw_enrich_create('malbad', 'mal.x', 'summary', 'X: {body}', 'batch', '{"chunk": "many"}')});
like($err, qr/options.chunk must be an integer/, 'a bad options.chunk is refused at create');
$node->safe_psql('postgres', q{SET ROLE mallory;
	CREATE TABLE mal.p (id int PRIMARY KEY, body text, summary text);
	SELECT fw_enrich_create('malp', 'mal.p', 'summary', 'P: {body}', 'batch', '{"max_attempts": 2}');
	REVOKE SELECT ON mal.p FROM mallory;
	INSERT INTO mal.p (id, body) VALUES (1, 'unreadable')});
ok( wait_for(q{SELECT failed = 1 FROM fw_tier.enrich_status WHERE name = 'malp'}, 'the unreadable row', 30),
	'an enrichment whose rows its creator cannot read charges attempts and ends as a dead letter');
like( $node->safe_psql('postgres', q{SET ROLE mallory; SELECT last_error FROM fw_tier.enrich_dead_letters WHERE name = 'malp'}),
	qr/^claim: permission denied/, 'the dead letter says why');
$node->safe_psql('postgres', q{SET ROLE mallory; SELECT fw_enrich_drop('malp')});


# --- a referencing row's FOR KEY SHARE does not hold the write-back up -----
$node->safe_psql('postgres', q{SET ROLE mallory;
	CREATE TABLE mal.child (id int PRIMARY KEY, xid int REFERENCES mal.x (id))});
my $fk = $node->background_psql('postgres');
$fk->query_safe(q{BEGIN; INSERT INTO mal.child VALUES (1, 2)});	# KEY SHARE of x row 2
$node->safe_psql('postgres', q{UPDATE mal.x SET body = 'referenced' WHERE id = 2});
ok(wait_for(q{SELECT summary = 'Echo: X: referenced' FROM mal.x WHERE id = 2}, 'the referenced row', 30),
	'a row another transaction references (FOR KEY SHARE) is written back meanwhile');
$fk->query_safe('COMMIT');
$fk->quit;

# --- renaming a column the enrichment names never fails the writers -------
$node->safe_psql('postgres', q{SET ROLE mallory;
	CREATE TABLE mal.r (id int PRIMARY KEY, body text, summary text);
	INSERT INTO mal.r VALUES (0, 'before', 'done');
	SELECT fw_enrich_create('malr', 'mal.r', 'summary', 'R: {body}');
	ALTER TABLE mal.r RENAME COLUMN id TO rid});
($rc, $out, $err) = $node->psql('postgres', q{SET ROLE mallory; INSERT INTO mal.r (rid, body) VALUES (1, 'a')});
is($rc, 0, 'an INSERT after the key column was renamed succeeds');
like($err, qr/names a column that no longer exists/, 'with a WARNING');
($rc, $out, $err) = $node->psql('postgres', q{SET ROLE mallory; UPDATE mal.r SET body = 'b' WHERE rid = 0});
is($rc, 0, 'so does an UPDATE of a watched column') or diag($err);
$node->safe_psql('postgres', q{SET ROLE mallory; ALTER TABLE mal.r RENAME COLUMN rid TO id; ALTER TABLE mal.r RENAME COLUMN summary TO s2});
($rc, $out, $err) = $node->psql('postgres', q{SET ROLE mallory; INSERT INTO mal.r (id, body) VALUES (2, 'c')});
is($rc, 0, 'and an INSERT after the target column was renamed');
$node->safe_psql('postgres', q{SET ROLE mallory; SELECT fw_enrich_drop('malr')});

$node->safe_psql('postgres', q{SET ROLE mallory; SELECT fw_enrich_drop('malx'); SELECT fw_enrich_drop('maldm')});

# --- drop -----------------------------------------------------------------
$node->safe_psql('postgres', q{SET ROLE app; SELECT fw_enrich_drop('sum')});
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_trigger WHERE tgrelid = 'appdata.docs'::regclass AND NOT tgisinternal}),
	0, 'drop removes the triggers');
is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.enrich_queue'), 0, 'and the queue');
$p0 = paid();
$node->safe_psql('postgres', q{INSERT INTO appdata.docs (id, body) VALUES (99999, 'after drop')});
sleep 2;
is(paid() - $p0, 0, 'an insert after the drop sends nothing');
is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.enrichments'), 0, 'the registry is empty');

$node->stop;
done_testing();
