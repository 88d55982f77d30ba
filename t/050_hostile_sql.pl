# Hostile SQL: an ordinary role tries to run its code as the superuser,
# through the workers and through the extension's SQL objects; the
# retention function for its grantees; the launcher after a termination;
# escalation durations that overflow; the flusher's statistics.
#
# Pins (issue 10, items 1, 11, 14, 15):
# - operators a role defines in public (int4 * numeric, numeric / int4) or
#   in a schema named after the bootstrap superuser ("$user"), or that the
#   owner of fw_tier.database puts first with ALTER DATABASE SET
#   search_path, are never used by the flusher: the role stays ordinary,
#   cost_usd is right;
# - fw_enrich run by a superuser never calls a role's public.cardinality;
# - operators planted in public before CREATE EXTENSION are not bound by
#   the extension's views and CHECK constraints;
# - fw_tier.purge_calls deletes every old row for a grantee; others 42501;
# - the launcher is back after pg_terminate_backend; a shutdown still stops
#   it with exit code 0 after the final drain;
# - fw_escalate refuses zero, negative, too long and overflowing durations;
# - pg_stat_user_tables.n_tup_ins of fw_tier.calls grows while the flusher
#   runs, not only when it exits.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use IPC::Run;
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

plan skip_all => 'FWSIM is not set' unless $ENV{FWSIM} && -x $ENV{FWSIM};

my $sim = FwSim->start('--time-scale', '0');

my $node = PostgreSQL::Test::Cluster->new('hostile');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.api_key = 'hostile-key'
fw_tier.database = 'postgres'
fw_tier.flush_interval = '100ms'
});
my $log_start = -s $node->logfile // 0;
$node->start;

my $model = 'accounts/fireworks/models/kimi-k2p6';
my $su = $node->safe_psql('postgres', 'SELECT current_user');

$node->safe_psql('postgres', qq{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.prices VALUES ('$model', 'standard', 1.0, 0.5, 2.0);
});

sub log_since
{
	my ($start) = @_;
	return substr(slurp_file($node->logfile), $start);
}

sub is_super
{
	my ($role) = @_;
	return $node->safe_psql('postgres',
		"SET search_path = pg_catalog; SELECT rolsuper FROM pg_roles WHERE rolname = '$role'");
}

# A new flusher prepares its INSERT again: wait until none runs, so the
# next one plans after the hostile objects exist.
sub wait_no_flusher
{
	my $deadline = time + 60;
	while (time < $deadline)
	{
		return 1
		  if $node->safe_psql('postgres',
			"SET search_path = pg_catalog; SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'")
		  eq '0';
		usleep(100_000);
	}
	return 0;
}

sub flush
{
	$node->safe_psql('postgres', "SET search_path = pg_catalog; SET statement_timeout = '120s'; SELECT public.fw_flush()");
}

# The SQL of a function that makes $role superuser when it runs as one.
sub escalate_body
{
	my ($role) = @_;
	return qq{BEGIN
		IF pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'on' THEN
			EXECUTE 'ALTER ROLE $role SUPERUSER';
		END IF;
		RETURN 777777;
	END};
}

# cost_usd as priced by the prices row above, computed with numeric
# operands only (exact matches in pg_catalog)
my $cost_ok = q{cost_usd OPERATOR(pg_catalog.=)
	((((prompt_tokens - coalesce(cached_prompt_tokens, 0))::numeric OPERATOR(pg_catalog.*) 1.0)
	 OPERATOR(pg_catalog.+) (coalesce(cached_prompt_tokens, 0)::numeric OPERATOR(pg_catalog.*) 0.5)
	 OPERATOR(pg_catalog.+) (coalesce(completion_tokens, 0)::numeric OPERATOR(pg_catalog.*) 2.0))
	OPERATOR(pg_catalog./) 1000000.0)};

# ---- item 1: operators in public ------------------------------------------
$node->safe_psql('postgres', qq{
CREATE ROLE evil LOGIN;
GRANT CREATE ON SCHEMA public TO evil;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO evil;
SET ROLE evil;
CREATE FUNCTION public.evil_mul(int4, numeric) RETURNS numeric
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil')]}\$\$;
CREATE FUNCTION public.evil_div(numeric, int4) RETURNS numeric
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil')]}\$\$;
CREATE OPERATOR public.* (leftarg = int4, rightarg = numeric, function = public.evil_mul);
CREATE OPERATOR public./ (leftarg = numeric, rightarg = int4, function = public.evil_div);
});
ok(wait_no_flusher(), 'no flusher runs before the hostile call');
$node->safe_psql('postgres', "SET ROLE evil; SELECT fw_complete('hostile public')");
flush();
is(is_super('evil'), 'f', 'a role\'s public operators do not run as the flusher\'s superuser');
is( $node->safe_psql('postgres', qq{
	SELECT count(*), bool_and(cost_usd IS NOT NULL AND cost_usd > 0 AND $cost_ok)
	  FROM fw_tier.calls WHERE username = 'evil'}),
	'1|t', 'the hostile call is logged with the right cost');

# ---- item 1: a schema named after the bootstrap superuser ("$user") -------
$node->safe_psql('postgres', qq{
CREATE ROLE evil2 LOGIN;
CREATE SCHEMA "$su" AUTHORIZATION evil2;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO evil2;
SET ROLE evil2;
CREATE FUNCTION "$su".evil_mul(int4, numeric) RETURNS numeric
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil2')]}\$\$;
CREATE FUNCTION "$su".evil_div(numeric, int4) RETURNS numeric
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil2')]}\$\$;
CREATE OPERATOR "$su".* (leftarg = int4, rightarg = numeric, function = "$su".evil_mul);
CREATE OPERATOR "$su"./ (leftarg = numeric, rightarg = int4, function = "$su".evil_div);
GRANT USAGE ON SCHEMA "$su" TO PUBLIC;
});
ok(wait_no_flusher(), 'no flusher runs before the second hostile call');
$node->safe_psql('postgres', "SET ROLE evil2; SELECT fw_complete('hostile user schema')");
flush();
is(is_super('evil2'), 'f', 'operators in the "$user" schema of the superuser do not run in the flusher');
is( $node->safe_psql('postgres', qq{
	SELECT count(*), bool_and(cost_usd IS NOT NULL AND $cost_ok)
	  FROM fw_tier.calls WHERE username = 'evil2'}),
	'1|t', 'that call is logged with the right cost too');
unlike(log_since($log_start), qr/ERROR:/, 'no error in the server log so far');

# ---- item 1: the database owner sets the database's search_path ----------
# An owner of fw_tier.database need not be a superuser; ALTER DATABASE SET
# reaches every new session of the database, the flusher's included (and
# this test's: its own queries pin search_path until the RESET).
$node->safe_psql('postgres', qq{
CREATE ROLE evil5 LOGIN;
ALTER DATABASE postgres OWNER TO evil5;
CREATE SCHEMA evil5 AUTHORIZATION evil5;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO evil5;
SET ROLE evil5;
CREATE FUNCTION evil5.evil_eq(text, text) RETURNS boolean
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil5') =~ s/RETURN 777777/RETURN \$1 OPERATOR(pg_catalog.=) \$2/r]}\$\$;
CREATE OPERATOR evil5.= (leftarg = text, rightarg = text, function = evil5.evil_eq);
GRANT USAGE ON SCHEMA evil5 TO PUBLIC;
ALTER DATABASE postgres SET search_path = evil5, pg_catalog;
});
ok(wait_no_flusher(), 'no flusher runs before the call under the owner\'s search_path');
$node->safe_psql('postgres', "SET ROLE evil5; SELECT public.fw_complete('hostile database setting')");
flush();
is(is_super('evil5'), 'f', 'ALTER DATABASE SET search_path does not reach the flusher');
$node->safe_psql('postgres', q{
ALTER DATABASE postgres RESET search_path;
ALTER DATABASE postgres OWNER TO CURRENT_USER;
});
is($node->safe_psql('postgres', "SELECT count(*) FROM fw_tier.calls WHERE username = 'evil5'"),
	'1', 'that call is logged');

# ---- item 1: fw_enrich run by a superuser ---------------------------------
$node->safe_psql('postgres', qq{
CREATE ROLE evil3 LOGIN;
GRANT CREATE ON SCHEMA public TO evil3;
SET ROLE evil3;
CREATE FUNCTION public.cardinality(text[]) RETURNS int
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil3') =~ s/777777/0/r]}\$\$;
RESET ROLE;
CREATE TABLE docs (id int PRIMARY KEY, body text, summary text);
INSERT INTO docs SELECT g, 'doc ' || g, NULL FROM generate_series(1, 5) g;
});
$node->safe_psql('postgres', "CALL fw_enrich('docs', 'id', 'body', 'summary', 'batch', 2)");
is(is_super('evil3'), 'f', 'fw_enrich by a superuser does not call a role\'s public.cardinality');
is($node->safe_psql('postgres', 'SELECT count(summary) FROM docs'), '5',
	'fw_enrich still answers every row');

# ---- item 1: operators planted before CREATE EXTENSION --------------------
$node->safe_psql('postgres', qq{
CREATE ROLE evil4 LOGIN;
CREATE DATABASE late;
});
$node->safe_psql('late', qq{
GRANT CREATE ON SCHEMA public TO evil4;
SET ROLE evil4;
CREATE FUNCTION public.evil_mul(int4, numeric) RETURNS numeric
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil4')]}\$\$;
CREATE FUNCTION public.evil_div(numeric, int4) RETURNS numeric
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil4')]}\$\$;
CREATE FUNCTION public.evil_div8(numeric, int8) RETURNS numeric
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil4')]}\$\$;
CREATE FUNCTION public.evil_ge(numeric, int4) RETURNS boolean
	LANGUAGE plpgsql AS \$\$@{[escalate_body('evil4') =~ s/RETURN 777777/RETURN true/r]}\$\$;
CREATE OPERATOR public.* (leftarg = int4, rightarg = numeric, function = public.evil_mul);
CREATE OPERATOR public./ (leftarg = numeric, rightarg = int4, function = public.evil_div);
CREATE OPERATOR public./ (leftarg = numeric, rightarg = int8, function = public.evil_div8);
CREATE OPERATOR public.>= (leftarg = numeric, rightarg = int4, function = public.evil_ge);
RESET ROLE;
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.prices VALUES ('$model', 'standard', 1.0, 0.5, 2.0);
INSERT INTO fw_tier.calls (call_id, attempt, started_at, database, username, workload,
	path, model, outcome, prompt_tokens, completion_tokens, cost_usd)
VALUES (1, 1, now(), 'late', 'x', 'default', 'priority', '$model', 'ok', 10, 20, 1),
	   (2, 1, now(), 'late', 'x', 'default', 'standard', '$model', 'overloaded', NULL, NULL, 0);
INSERT INTO fw_tier.escalations (database, workload, started, priority_until, trigger, windows_in_row)
VALUES ('late', 'default', now() - interval '1 minute', now() + interval '1 minute', 'manual', 1);
});
my $views = $node->safe_psql('late', q{
SELECT (SELECT count(*) FROM fw_tier.priority_premium) || ','
	|| (SELECT count(*) FROM fw_tier.error_rates_hourly) || ','
	|| (SELECT count(*) FROM fw_tier.escalation_timeline) || ','
	|| (SELECT count(*) FROM fw_tier.spend_daily)});
is($views, '1,2,1,2', 'the analytics views answer');
is($node->safe_psql('late', "SELECT rolsuper FROM pg_roles WHERE rolname = 'evil4'"), 'f',
	'operators planted before CREATE EXTENSION are not bound by its views and checks');
is( $node->safe_psql('late', q{
	SELECT count(*) FROM pg_depend d
	  JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND d.refobjid = o.oid
	 WHERE o.oprnamespace <> 'pg_catalog'::regnamespace}),
	'0', 'no object depends on an operator outside pg_catalog');
is( $node->safe_psql('late', q{
	SELECT count(*) FROM pg_depend d
	  JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
	 WHERE d.classid IN ('pg_rewrite'::regclass, 'pg_constraint'::regclass,
						 'pg_attrdef'::regclass, 'pg_policy'::regclass)
	   AND p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
	   AND NOT EXISTS (SELECT FROM pg_depend e
					    WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid
						  AND e.refclassid = 'pg_extension'::regclass AND e.deptype = 'e')}),
	'0', 'no object depends on a function that is neither pg_catalog\'s nor the extension\'s');

# ---- item 14: purge_calls for its grantees --------------------------------
$node->safe_psql('postgres', qq{
CREATE ROLE janitor LOGIN;
CREATE ROLE outsider LOGIN;
GRANT EXECUTE ON FUNCTION fw_tier.purge_calls(interval, integer) TO janitor;
INSERT INTO fw_tier.calls (call_id, attempt, started_at, database, username, workload,
	path, model, outcome)
SELECT g, 1, now() - interval '100 days', 'postgres', 'someone_else', 'default',
	   'standard', '$model', 'ok'
  FROM generate_series(1, 5) g;
});
my $before = $node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.calls');
my ($pret, $pout, $perr) = $node->psql('postgres',
	"SET ROLE janitor; SELECT fw_tier.purge_calls('90 days', 2)");
is("$pout$perr", '5', 'a grantee purges every old row, whoever made the call');
is($node->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.calls'), $before - 5,
	'recent rows stay');
my ($ret, $out, $err) = $node->psql('postgres',
	"\\set VERBOSITY verbose\nSET ROLE outsider; SELECT fw_tier.purge_calls('90 days')");
like($err, qr/42501: permission denied for function purge_calls/,
	'a role without the grant gets 42501');

# ---- item 15: fw_escalate durations ---------------------------------------
sub escalate_error
{
	my ($sql) = @_;
	my ($r, $o, $e) = $node->psql('postgres', "\\set VERBOSITY verbose\n$sql");
	return $e =~ /ERROR:  ([0-9A-Z]{5}): ([^\n]*)/ ? "$1 $2" : "no error";
}
is(escalate_error("SELECT fw_escalate('default', '0')"),
	'22023 escalation duration must be positive', 'zero duration: 22023');
is(escalate_error("SELECT fw_escalate('default', '-5 minutes')"),
	'22023 escalation duration must be positive', 'negative duration: 22023');
is(escalate_error("SELECT fw_escalate('default', '1 month -31 days')"),
	'22023 escalation duration must be positive', 'negative in total: 22023');
is(escalate_error("SELECT fw_escalate('default', '400 days')"),
	'22008 escalation duration is out of range', 'longer than a year: 22008');
is(escalate_error("SELECT fw_escalate('default', '178000000 years')"),
	'22008 escalation duration is out of range', 'months overflowing microseconds: 22008');
is(escalate_error("SELECT fw_escalate('default', '2147483647 days')"),
	'22008 escalation duration is out of range', 'days overflowing microseconds: 22008');
is(escalate_error("SELECT fw_escalate('default', '2147483647 days 2562047788 hours')"),
	'22008 escalation duration is out of range', 'days plus time overflowing: 22008');
$node->safe_psql('postgres',
	"UPDATE fw_tier.workloads SET priority_window = '100000 years' WHERE workload = 'agent'");
is(escalate_error("SELECT fw_escalate('agent')"),
	"22008 the workload's priority_window is out of range",
	'a huge priority_window of the workload: 22008');
is( $node->safe_psql('postgres', q{
	SELECT fw_escalate('agent', '5 minutes') - now() BETWEEN interval '4 minutes' AND interval '6 minutes'}),
	't', 'an explicit duration does not depend on the workload\'s window');
$node->safe_psql('postgres', "SELECT fw_deescalate('agent')");
$node->safe_psql('postgres',
	"UPDATE fw_tier.workloads SET priority_window = NULL WHERE workload = 'agent'");
is( $node->safe_psql('postgres', q{
	SELECT fw_escalate('default', '10 minutes') - now() BETWEEN interval '9 minutes' AND interval '11 minutes'}),
	't', 'a sane duration still works');
$node->safe_psql('postgres', "SELECT fw_deescalate('default')");
is( $node->safe_psql('postgres', q{
	SELECT fw_escalate('default', '365 days') - now() > interval '364 days'}),
	't', 'up to a year is accepted');
$node->safe_psql('postgres', "SELECT fw_deescalate('default')");

# ---- item 11: the flusher reports its inserts as it goes ------------------
{
	my $load_sql = q{
DO $$
DECLARE t timestamptz := clock_timestamp();
BEGIN
	WHILE clock_timestamp() < t + interval '12 s' LOOP
		PERFORM fw_complete('stat');
		PERFORM pg_sleep(0.02);
	END LOOP;
END $$;};
	my ($lout, $lerr) = ('', '');
	my $load = IPC::Run::start(
		[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
		  '-c', $load_sql ],
		'>', \$lout, '2>', \$lerr);
	my $stat_sql = q{SELECT pg_stat_clear_snapshot();
		SELECT coalesce((SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier flusher'), 0)
			|| ' ' || n_tup_ins
		  FROM pg_stat_user_tables WHERE relid = 'fw_tier.calls'::regclass};
	my ($pid0, $base);
	my $seen = 0;
	my $t0 = time;
	while (time < $t0 + 10)
	{
		my ($pid, $n) = split / /, (split /\n/, $node->safe_psql('postgres', $stat_sql))[-1];
		if ($pid == 0) { usleep(100_000); next; }
		if (!defined $pid0 || $pid != $pid0)
		{
			# a new flusher (or the first): count from here
			($pid0, $base) = ($pid, $n);
		}
		elsif ($n > $base)
		{
			$seen = 1;
			last;
		}
		usleep(200_000);
	}
	usleep(500_000);
	my $still = $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE pid = " . ($pid0 // 0));
	ok($seen && $still eq '1',
		'n_tup_ins of fw_tier.calls grows while the same flusher keeps running');
	diag(sprintf('stats seen after %.1f s', time - $t0));
	$load->finish;
	is($lerr, '', 'the load ran without error');
}

# ---- item 15: the launcher comes back after pg_terminate_backend -----------
my $launcher = sub {
	$node->safe_psql('postgres',
		"SELECT coalesce((SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier launcher'), 0)");
};
my $old = $launcher->();
ok($old > 0, 'the launcher runs');
my $term_start = -s $node->logfile;
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old)");
my $new = 0;
my $t1 = time;
while (time < $t1 + 60)
{
	$new = $launcher->();
	last if $new > 0 && $new != $old;
	usleep(200_000);
}
ok($new > 0 && $new != $old, 'a new launcher runs after pg_terminate_backend');
diag(sprintf('launcher back after %.1f s', time - $t1));
like(log_since($term_start), qr/fw_tier launcher terminated; it restarts in 5 s/,
	'the launcher says it restarts');
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.workloads (workload) VALUES ('after_restart'), ('at_shutdown');
SELECT fw_complete('after restart', 'after_restart');
});
flush();
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.calls WHERE workload = 'after_restart' AND outcome = 'ok'"),
	'1', 'the new launcher has the log written');

# a shutdown still stops the launcher cleanly, after the final drain
$node->safe_psql('postgres', q{
ALTER SYSTEM SET fw_tier.flush_interval = '10min';
SELECT pg_reload_conf();
});
sleep(1);
$node->safe_psql('postgres',
	"SELECT count(fw_complete('at shutdown ' || g, 'at_shutdown')) FROM generate_series(1, 3) g");
my $stop_start = -s $node->logfile;
$node->stop('fast');
my $stop_log = log_since($stop_start);
unlike($stop_log, qr/"fw_tier [a-z]+" \(PID \d+\) exited with exit code/,
	'at shutdown no fw_tier worker exits with an error');
unlike($stop_log, qr/remain in the ring file/, 'the final drain wrote everything');
like($stop_log, qr/database system is shut down/, 'the server shut down');
$node->start;
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM fw_tier.calls WHERE workload = 'at_shutdown' AND outcome = 'ok'"),
	'3', 'the calls made just before the shutdown are in the log');

$node->stop;
$sim->stop;
done_testing();
