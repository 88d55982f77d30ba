# fw_enrich as a new user runs it (issue 17).
#
# Pins: with the extension in schema fw and a search_path that neither
# names fw nor is safe (a planted fw_complete_batch), CALL fw.fw_enrich
# answers through the extension's own functions; inside a transaction
# block it is refused (25001, clear message) before any request, and an
# atomic CALL from a function is refused before any request too; under
# on_error 'raise' a failing row's chunk keeps its other answers and the
# error comes after the COMMIT; fw_tier.progress seen from another session
# during a 300-row run in chunks of 100 shows job_total 300 and the chunk
# (total 100) separately, job_done growing across chunks.
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
});
$node->start;
$node->safe_psql('postgres', q{
CREATE SCHEMA fw;
CREATE EXTENSION fw_tier SCHEMA fw;
CREATE ROLE app LOGIN;
GRANT USAGE ON SCHEMA fw TO app;
GRANT EXECUTE ON PROCEDURE fw.fw_enrich(regclass, name, name, name, text, integer, jsonb) TO app;
GRANT EXECUTE ON FUNCTION fw.fw_complete_batch(text[], text, jsonb) TO app;
CREATE SCHEMA appdata AUTHORIZATION app;
-- a role's planted lookalikes, first on the caller's search_path
CREATE SCHEMA evil;
GRANT USAGE ON SCHEMA evil TO PUBLIC;
CREATE FUNCTION evil.fw_complete_batch(prompts text[], workload text, options jsonb)
RETURNS text[] LANGUAGE sql AS $$ SELECT array_agg('EVIL' || p) FROM unnest(prompts) p $$;
CREATE FUNCTION evil.cardinality(text[]) RETURNS integer LANGUAGE sql AS $$ SELECT 1 $$;
});

my $hostile = 'SET search_path = evil, appdata, public;';

sub requests { return scalar @{ $sim->log_requests }; }

# --- schema independence ----------------------------------------------------
$node->safe_psql('postgres', q{
CREATE TABLE appdata.docs (id int PRIMARY KEY, body text, summary text);
INSERT INTO appdata.docs SELECT i, 'doc ' || i, NULL FROM generate_series(1, 7) i;
ALTER TABLE appdata.docs OWNER TO app;
});
$sim->reset;
my ($rc, $out, $err) = $node->psql('postgres', qq{
SET ROLE app; $hostile
CALL fw.fw_enrich('appdata.docs', 'id', 'body', 'summary', 'batch', 3);
});
is($rc, 0, 'CALL fw.fw_enrich works with the extension in schema fw and a hostile search_path')
  or diag($err);
is( $node->safe_psql('postgres',
		"SELECT count(*) FILTER (WHERE summary = 'Echo: ' || body) FROM appdata.docs"),
	7, 'every row answered by the extension\'s own fw_complete_batch');
is(requests(), 7, 'one request a row');
like($err, qr/chunk 3: 7 of 7 rows answered so far/, 'three chunks, counted with pg_catalog.cardinality');

# --- outside a transaction block only -------------------------------------
$node->safe_psql('postgres', 'UPDATE appdata.docs SET summary = NULL');
$sim->reset;
($rc, $out, $err) = $node->psql('postgres', qq{
SET ROLE app; $hostile
BEGIN;
CALL fw.fw_enrich('appdata.docs', 'id', 'body', 'summary', 'batch', 3);
});
isnt($rc, 0, 'fw_enrich inside BEGIN fails');
like($err, qr/ERROR:  fw_enrich cannot run inside a transaction block/, 'with a clear message');
like($err, qr/HINT:  CALL it on its own, outside BEGIN/, 'and a HINT');
unlike($err, qr/invalid transaction termination/, 'not PostgreSQL\'s message halfway');
is(requests(), 0, 'no request was sent');

($rc, $out, $err) = $node->psql('postgres', qq{
\\set VERBOSITY verbose
SET ROLE app; $hostile
CALL fw.fw_enrich('appdata.docs', 'id', 'body', 'summary', 'batch', 3) \\; SELECT 1;
});
like($err, qr/25001: fw_enrich cannot run inside a transaction block/,
	'a multi-statement query string (implicit block) is refused too, SQLSTATE 25001');
is(requests(), 0, 'no request was sent');

$node->safe_psql('postgres', q{
CREATE FUNCTION appdata.enrich_from_function() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	CALL fw.fw_enrich('appdata.docs', 'id', 'body', 'summary', 'batch', 3);
END $$;
ALTER FUNCTION appdata.enrich_from_function() OWNER TO app;
});
($rc, $out, $err) = $node->psql('postgres', qq{
SET ROLE app; $hostile
SELECT appdata.enrich_from_function();
});
isnt($rc, 0, 'an atomic CALL (from a function) fails');
is(requests(), 0, 'before any request');
is($node->safe_psql('postgres', 'SELECT count(summary) FROM appdata.docs'), 0, 'nothing written');

# --- on_error 'raise' keeps the chunk's paid answers ------------------------
$node->safe_psql('postgres',
	"UPDATE appdata.docs SET body = '[fwsim:status=400] doc 5' WHERE id = 5");
$sim->reset;
($rc, $out, $err) = $node->psql('postgres', qq{
SET ROLE app; $hostile
CALL fw.fw_enrich('appdata.docs', 'id', 'body', 'summary', 'batch', 3, '{"on_error": "raise"}');
});
isnt($rc, 0, 'a failing row under on_error raise raises');
like($err, qr/ERROR:  fw_enrich: 1 of 3 rows of chunk 2 failed/, 'naming how many rows of which chunk');
like($err, qr/first failed row is id = 5/, 'and the first failed row');
is($node->safe_psql('postgres', 'SELECT string_agg(id::text, \',\' ORDER BY id) FROM appdata.docs WHERE summary IS NOT NULL'),
	'1,2,3,4,6', 'chunk 2\'s other answers (4, 6) are kept, chunk 3 never ran');
is(requests(), 6, 'chunk 2 ran to its end (6 requests), nothing after');
$node->safe_psql('postgres', 'SELECT fw.fw_flush()');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.calls WHERE http_status = 400 AND username = 'app'"),
	1, 'the failed attempt is in fw_tier.calls');

# --- progress: the job and the chunk ----------------------------------------
$node->safe_psql('postgres', q{
CREATE TABLE appdata.big (id int PRIMARY KEY, body text, summary text);
INSERT INTO appdata.big SELECT i, '[fwsim:slow=100] big ' || i, NULL FROM generate_series(1, 300) i;
-- already answered and NULL-prompt rows are not the job's
INSERT INTO appdata.big VALUES (301, 'done', 'x'), (302, NULL, NULL);
ALTER TABLE appdata.big OWNER TO app;
});
$sim->reset;
my $bg = $node->background_psql('postgres', on_error_stop => 0);
my $pid = $bg->query_safe('SELECT pg_backend_pid()');
$bg->query_safe("SET ROLE app; $hostile SET fw_tier.max_concurrency = 10");
my $t0 = time;
$bg->query_until(qr/started/, q{
\echo started
CALL fw.fw_enrich('appdata.big', 'id', 'body', 'summary', 'batch', 100);
\echo finished
});
ok( $node->poll_query_until('postgres',
		"SELECT job_total = 300 AND total = 100 AND job_done >= 100 AND job_done < 300 "
		  . "AND job_done - done IN (100, 200) FROM fw_tier.progress WHERE pid = $pid"),
	'during a later chunk: job_total 300, the chunk\'s total 100, job_done = earlier chunks + done');
my $mid = $node->safe_psql('postgres',
	"SELECT format('%s/%s chunk, %s/%s job', done, total, job_done, job_total) FROM fw_tier.progress WHERE pid = $pid");
note("progress seen mid-run: $mid");
$bg->query_until(qr/finished/, '');
my $elapsed = time - $t0;
note(sprintf('300 rows, chunks of 100, 10 in flight, 100 ms each: %.1f s', $elapsed));
is( $node->safe_psql('postgres',
		"SELECT format('%s/%s %s/%s', done, total, job_done, job_total) FROM fw_tier.progress WHERE pid = $pid"),
	'100/100 300/300', 'at the end: the last chunk 100/100, the job 300/300');
is($node->safe_psql('postgres', 'SELECT count(summary) FROM appdata.big'), 301, 'all 300 answered');
$bg->quit;

# a plain statement has no job figures
is( $node->safe_psql('postgres', q{
SELECT cardinality(fw.fw_complete_batch(ARRAY['plain'])) \\gset
SELECT total::text || ' ' || coalesce(job_total::text, 'none') FROM fw_tier.progress WHERE pid = pg_backend_pid();
}),
	'1 none', 'a plain batch: total 1, no job');

done_testing();
