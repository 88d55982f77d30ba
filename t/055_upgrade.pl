# Upgrades and dumps (issue 10, item 16).
#
# Pins: CREATE EXTENSION fw_tier VERSION '0.1' then ALTER EXTENSION fw_tier
# UPDATE gives exactly the objects of a fresh CREATE EXTENSION (every
# member with its definition, columns, constraints, indexes, triggers,
# policies, ACLs, config-dump conditions, the shipped rows); pg_dump -Fc /
# pg_restore of a database using fw_tier keeps edited and added workloads,
# prices, the call log and the escalation history, with no error and no
# duplicate, into the same cluster and into another cluster where fw_tier
# is preloaded and its worker is live with records waiting in its ring;
# COPY (a restore) of an edited shipped workload replaces the shipped row,
# INSERT and ON CONFLICT keep their meaning; who may dump the log.
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

sub new_node
{
	my ($name, $database) = @_;
	$database //= 'src';
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.api_key = 'upgrade-key'
fw_tier.database = '$database'
fw_tier.flush_interval = '100ms'
});
	$node->start;
	return $node;
}

my $node = new_node('upgrade');

# ---- (a) 0.1 + ALTER EXTENSION UPDATE = a fresh install -------------------

# Every member of the extension with what defines it, one line each.
my $describe = q{
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'fw_tier'),
m AS (SELECT d.classid, d.objid FROM pg_depend d, ext
	   WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid
		 AND d.deptype = 'e'),
rels AS (SELECT c.* FROM pg_class c JOIN m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid)
SELECT line FROM (
	SELECT 'member ' || pg_describe_object(classid, objid, 0) AS line FROM m
	UNION ALL
	SELECT 'version ' || extversion || ' config ' ||
		   coalesce((SELECT string_agg(c::regclass::text || ' [' || coalesce(cond, '') || ']', ', ' ORDER BY c::regclass::text)
					   FROM unnest(extconfig, extcondition) AS u(c, cond)), '')
	  FROM pg_extension WHERE extname = 'fw_tier'
	UNION ALL
	SELECT 'function ' || p.oid::regprocedure || ' acl=' || coalesce(p.proacl::text, 'default')
		   || E'\n' || pg_get_functiondef(p.oid)
	  FROM pg_proc p JOIN m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
	UNION ALL
	SELECT 'relation ' || c.oid::regclass || ' kind=' || c.relkind::text || ' rls=' || c.relrowsecurity
		   || ' force=' || c.relforcerowsecurity || ' acl=' || coalesce(c.relacl::text, 'default')
		   || ' options=' || coalesce(c.reloptions::text, '')
		   || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '')
	  FROM rels c
	UNION ALL
	SELECT 'view ' || c.oid::regclass || E'\n' || pg_get_viewdef(c.oid) FROM rels c WHERE c.relkind = 'v'
	UNION ALL
	SELECT 'column ' || a.attrelid::regclass || ' ' || a.attnum || ' ' || a.attname || ' '
		   || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
		   || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
		   || ' acl=' || coalesce(a.attacl::text, '')
	  FROM pg_attribute a JOIN rels c ON a.attrelid = c.oid
	  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
	 WHERE a.attnum > 0 AND NOT a.attisdropped
	UNION ALL
	SELECT 'constraint ' || co.conrelid::regclass || ' ' || co.conname || ' ' || pg_get_constraintdef(co.oid)
	  FROM pg_constraint co JOIN rels c ON co.conrelid = c.oid
	UNION ALL
	SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN rels c ON i.indrelid = c.oid
	UNION ALL
	SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
	  FROM pg_trigger t JOIN rels c ON t.tgrelid = c.oid WHERE NOT t.tgisinternal
	UNION ALL
	SELECT 'policy ' || pol.polrelid::regclass || ' ' || pol.polname || ' cmd=' || pol.polcmd::text
		   || ' permissive=' || pol.polpermissive || ' roles=' || pol.polroles::regrole[]::text
		   || ' using=' || coalesce(pg_get_expr(pol.polqual, pol.polrelid), '')
		   || ' check=' || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), '')
	  FROM pg_policy pol JOIN rels c ON pol.polrelid = c.oid
	UNION ALL
	SELECT 'sequence ' || s.seqrelid::regclass || ' ' || s.seqtypid::regtype || ' ' || s.seqstart
		   || ' ' || s.seqincrement || ' ' || s.seqmax || ' ' || s.seqmin || ' ' || s.seqcache || ' ' || s.seqcycle
	  FROM pg_sequence s JOIN rels c ON s.seqrelid = c.oid
	UNION ALL
	SELECT 'schema fw_tier acl=' || coalesce(nspacl::text, '') || ' owner=' || nspowner::regrole
	  FROM pg_namespace WHERE nspname = 'fw_tier'
	UNION ALL
	SELECT 'row fw_tier.workloads ' || w::text FROM fw_tier.workloads w
	UNION ALL
	SELECT 'row fw_tier.prices ' || p::text FROM fw_tier.prices p
) s
ORDER BY line;
};

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION fw_tier');
my $fr = $node->safe_psql('fresh', $describe);
my $default_version = $node->safe_psql('fresh', "SELECT extversion FROM pg_extension WHERE extname = 'fw_tier'");
my @members = ($fr =~ /^member /mg);
cmp_ok(scalar @members, '>=', 30, 'the description lists the members (' . scalar(@members) . ')');
like($fr, qr/^function fw_tier\.purge_calls.*SECURITY DEFINER/ms,
	'the description carries function definitions');

# Every released version, updated, gives the objects of a fresh install.
foreach my $from ('0.1', '0.2', '0.3')
{
	(my $db = "upgraded_$from") =~ s/\./_/g;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION fw_tier VERSION '$from'");
	is($node->safe_psql($db, "SELECT extversion FROM pg_extension WHERE extname = 'fw_tier'"),
		$from, "version $from installs explicitly");
	$node->safe_psql($db, 'ALTER EXTENSION fw_tier UPDATE');
	is($node->safe_psql($db, "SELECT extversion FROM pg_extension WHERE extname = 'fw_tier'"),
		$default_version, "ALTER EXTENSION UPDATE from $from reaches the default version");
	my $up = $node->safe_psql($db, $describe);
	is($up, $fr, "an upgraded $from has the objects of a fresh install, definitions, ACLs and rows included");
	if ($up ne $fr)
	{
		my %f = map { $_ => 1 } split /\n/, $fr;
		my %u = map { $_ => 1 } split /\n/, $up;
		diag("only after the upgrade from $from: $_") for grep { !$f{$_} } split /\n/, $up;
		diag("only in the fresh install: $_") for grep { !$u{$_} } split /\n/, $fr;
	}
}

# pg_dump's view of the two: same schema
my $dump_s = sub {
	my ($db) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'pg_dump', '--schema-only', '--no-owner', '-d', $node->connstr($db) ],
		'>', \$out, '2>', \$err) or die "pg_dump $db: $err";
	$out =~ s/^--.*\n//mg;
	# the random key of \restrict / \unrestrict differs per run
	$out =~ s/^\\(un)?restrict .*\n//mg;
	return $out;
};
is($dump_s->($_), $dump_s->('fresh'), "pg_dump --schema-only of $_ is that of a fresh install") for ('upgraded_0_1', 'upgraded_0_2', 'upgraded_0_3');

# The restore's COPY of an edited shipped workload replaces the shipped
# row; INSERT keeps its meaning.
{
	my ($r, $o, $e) = $node->psql('fresh',
		"\\set VERBOSITY verbose\nINSERT INTO fw_tier.workloads (workload) VALUES ('default')");
	like($e, qr/23505/, 'INSERT of a shipped workload name is still a duplicate key');
	$node->safe_psql('fresh', q{
INSERT INTO fw_tier.workloads (workload, path) VALUES ('batch', 'priority')
	ON CONFLICT (workload) DO UPDATE SET path = EXCLUDED.path});
	is($node->safe_psql('fresh',
			"SELECT path || ' ' || on_overload FROM fw_tier.workloads WHERE workload = 'batch'"),
		'priority retry', 'INSERT ... ON CONFLICT DO UPDATE still updates the shipped row');
	$node->safe_psql('fresh', "COPY fw_tier.workloads (workload, path, on_overload) FROM stdin;\nagent\tpriority\tfail\n\\.\n");
	is($node->safe_psql('fresh',
			"SELECT count(*) || ' ' || string_agg(path || ' ' || on_overload, ',') FROM fw_tier.workloads WHERE workload = 'agent'"),
		'1 priority fail', 'COPY of a shipped workload name replaces the unchanged shipped row');
	my ($r2, $o2, $e2) = $node->psql('fresh',
		"\\set VERBOSITY verbose\nCOPY fw_tier.workloads (workload) FROM stdin;\nbatch\n\\.\n");
	like($e2, qr/23505/, 'COPY of an edited shipped workload is a duplicate key');
}

# ---- (b) pg_dump / pg_restore keeps workloads, prices, the log ------------
my $model = 'accounts/fireworks/models/kimi-k2p6';
$node->safe_psql('postgres', 'CREATE DATABASE src');
$node->safe_psql('src', qq{
CREATE EXTENSION fw_tier;
UPDATE fw_tier.workloads SET path = 'priority', priority_window = '7 minutes' WHERE workload = 'interactive';
INSERT INTO fw_tier.workloads (workload, on_overload, priority_window)
	VALUES ('support_bot', 'priority', '10 minutes');
INSERT INTO fw_tier.prices VALUES
	('$model', 'standard', 0.60, 0.30, 2.50),
	('$model', 'priority', 0.90, 0.45, 3.75);
});
$node->safe_psql('src', q{
SELECT count(fw_complete('dump me ' || g, 'support_bot')) FROM generate_series(1, 4) g;
SELECT count(fw_complete('and me ' || g, 'interactive')) FROM generate_series(1, 2) g;
SELECT fw_escalate('support_bot', '10 minutes');
SET statement_timeout = '120s';
SELECT fw_flush();
});
# the worker mirrors the window into fw_tier.escalations
my $deadline = time + 60;
while (time < $deadline)
{
	last if $node->safe_psql('src', 'SELECT count(*) FROM fw_tier.escalations') eq '1';
	usleep(100_000);
}
is($node->safe_psql('src', 'SELECT count(*) FROM fw_tier.escalations'), '1',
	'the window is recorded');
is($node->safe_psql('src', 'SELECT count(*) FROM fw_tier.calls'), '6', 'six calls logged');

my $content = q{
SELECT 'workloads ' || string_agg(w::text, ' ' ORDER BY workload) FROM fw_tier.workloads w
UNION ALL
SELECT 'prices ' || string_agg(p::text, ' ' ORDER BY model, path) FROM fw_tier.prices p
UNION ALL
SELECT 'calls ' || count(*) || ' ' || md5(string_agg(c::text, E'\n' ORDER BY call_id, attempt)) FROM fw_tier.calls c
 WHERE c.database = 'src'
UNION ALL
SELECT 'escalations ' || string_agg(e::text, ' ' ORDER BY id) FROM fw_tier.escalations e
};
my $before = $node->safe_psql('src', $content);

my $dumpfile = $node->basedir . '/src.dump';
my ($out, $err) = ('', '');
ok( IPC::Run::run([ 'pg_dump', '-Fc', '-f', $dumpfile, '-d', $node->connstr('src') ],
		'>', \$out, '2>', \$err),
	'pg_dump -Fc runs');
is($err, '', 'pg_dump says nothing');

# the log can be left out as for any table
{
	my ($plain, $perr) = ('', '');
	IPC::Run::run([ 'pg_dump', '--exclude-table-data=fw_tier.calls', '-d', $node->connstr('src') ],
		'>', \$plain, '2>', \$perr) or die "pg_dump: $perr";
	ok($plain !~ /^COPY fw_tier\.calls /m && $plain =~ /^COPY fw_tier\.prices /m,
		'pg_dump --exclude-table-data=fw_tier.calls leaves the log out, keeps the prices');
}

# a database owner who is not a superuser may not read the log and the
# escalation history: the README's flags leave them out
$node->safe_psql('postgres', 'CREATE ROLE dbowner LOGIN; ALTER DATABASE src OWNER TO dbowner');
{
	my ($o, $e) = ('', '');
	my $ok = IPC::Run::run([ 'pg_dump', '-U', 'dbowner', '--exclude-table-data=fw_tier.calls',
			'--exclude-table-data=fw_tier.escalations', '--exclude-table-data=fw_tier.escalations_id_seq',
			'--exclude-table-data=fw_tier.calls_dead_letter',
			'--exclude-table-data=fw_tier.calls_dead_letter_id_seq',
			'-d', $node->connstr('src') ],
		'>', \$o, '2>', \$e);
	ok($ok && $e eq '' && $o =~ /^COPY fw_tier\.prices /m && $o =~ /^support_bot\t/m,
		'a non-superuser owner dumps prices and workloads with the log left out');
}
$node->safe_psql('postgres', 'ALTER DATABASE src OWNER TO CURRENT_USER');
$node->safe_psql('postgres', 'CREATE ROLE reader LOGIN BYPASSRLS IN ROLE pg_read_all_data');
{
	my ($o, $e) = ('', '');
	my $ok = IPC::Run::run([ 'pg_dump', '-U', 'reader', '-d', $node->connstr('src') ],
		'>', \$o, '2>', \$e);
	ok($ok && $e eq '' && $o =~ /^COPY fw_tier\.calls /m,
		'pg_read_all_data with BYPASSRLS dumps the log too');
}

sub restore
{
	my ($target, $db, $label) = @_;
	my ($o, $e) = ('', '');
	my $ok = IPC::Run::run(
		[ 'pg_restore', '--exit-on-error', '-d', $target->connstr($db), $dumpfile ],
		'>', \$o, '2>', \$e);
	ok($ok, "$label: pg_restore succeeds");
	is($e, '', "$label: pg_restore reports no error");
	is($target->safe_psql($db, $content), $before,
		"$label: workloads (edited and added), prices, calls and escalations are kept");
	is( $target->safe_psql($db,
			"SELECT count(*) = count(DISTINCT workload) AND count(*) = 6 FROM fw_tier.workloads"),
		't', "$label: the shipped workloads are there once each, with the added one");
	is( $target->safe_psql($db,
			"SELECT path || ' ' || priority_window FROM fw_tier.workloads WHERE workload = 'interactive'"),
		'priority 00:07:00', "$label: the edited shipped workload keeps its edit");
	is( $target->safe_psql($db,
			"SELECT nextval('fw_tier.escalations_id_seq') > max(id) FROM fw_tier.escalations"),
		't', "$label: the escalation id sequence goes on after the restored rows");
}

# into another database of the same cluster
$node->safe_psql('postgres', 'CREATE DATABASE dst');
restore($node, 'dst', 'same cluster');

# into another cluster, into its fw_tier.database, with the worker live
# and records of calls made there before waiting in its ring: the flusher
# writes them as soon as the extension is restored, alongside the restore
my $node2 = new_node('restored');
$node2->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
SELECT count(fw_complete('before the restore ' || g)) FROM generate_series(1, 3) g;
});
$node2->safe_psql('postgres', 'CREATE DATABASE src');
restore($node2, 'src', 'other cluster');
$node2->safe_psql('src', q{
SELECT fw_complete('after the restore', 'support_bot');
SET statement_timeout = '120s';
SELECT fw_flush();
});
is($node2->safe_psql('src', "SELECT count(*) FROM fw_tier.calls WHERE database = 'src'"), '7',
	'the restored log takes new calls');
is($node2->safe_psql('src', "SELECT count(*) FROM fw_tier.calls WHERE database = 'postgres'"), '3',
	'the records that waited in the ring during the restore are written too');
is( $node2->safe_psql('src',
		"SELECT count(*) FROM fw_tier.calls WHERE workload = 'support_bot' AND cost_usd > 0"),
	'5', 'priced with the restored prices');
unlike(slurp_file($node2->logfile), qr/ERROR:/, 'no error in the restored cluster\'s log');

# ---- (c) a new library over the 0.1 SQL: records wait, nothing fails ------
# The server runs the current library while fw_tier.database still has the 0.1
# objects (ALTER EXTENSION UPDATE not yet run): the flusher says once what
# to run, the records wait, and they all land after the update.
my $node3 = new_node('oldsql', 'postgres');
$node3->safe_psql('postgres', q{
CREATE EXTENSION fw_tier VERSION '0.1';
SELECT count(fw_complete('on the old SQL ' || g)) FROM generate_series(1, 5) g;
});
my $waited = 0;
for (1 .. 300)
{
	if (slurp_file($node3->logfile) =~ /is at version 0\.1, the library at 0\.4/)
	{
		$waited = 1;
		last;
	}
	usleep(100_000);
}
ok($waited, 'the flusher says the extension needs ALTER EXTENSION UPDATE');
is($node3->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.calls'), '0',
	'nothing is written into the 0.1 tables');
# fw_flush() keeps asking: the launcher keeps its back-off, no new flusher
# each second (DEBUG1 says when one starts)
$node3->safe_psql('postgres', q{ALTER SYSTEM SET log_min_messages = 'debug1'});
$node3->reload;
my $off3 = -s $node3->logfile;
my ($fret, $fout, $ferr) = $node3->psql('postgres', "SET statement_timeout = '8s'; SELECT fw_flush()");
like($ferr, qr/statement timeout/, 'fw_flush() waits, asking for a flush each second');
$node3->safe_psql('postgres', q{ALTER SYSTEM RESET log_min_messages});
$node3->reload;
my @starts = (substr(slurp_file($node3->logfile), $off3) =~ /fw_tier flusher started in database/g);
cmp_ok(scalar @starts, '<=', 3,
	scalar(@starts) . ' flushers started in 8 s of fw_flush() (the back-off, not one a second)');
# the version mismatch does not stand for "not installed": a DROP says so
$off3 = -s $node3->logfile;
$node3->safe_psql('postgres', 'DROP EXTENSION fw_tier');
my $dropped_warned = 0;
for (1 .. 300)
{
	if (substr(slurp_file($node3->logfile), $off3) =~ /extension "fw_tier" is not installed in database "postgres"/)
	{
		$dropped_warned = 1;
		last;
	}
	usleep(100_000);
}
ok($dropped_warned, 'a DROP EXTENSION after the mismatch gets its own WARNING');
$node3->safe_psql('postgres', q{CREATE EXTENSION fw_tier VERSION '0.1'});
$node3->safe_psql('postgres', q{
ALTER EXTENSION fw_tier UPDATE;
SET statement_timeout = '120s';
SELECT fw_flush();
});
is($node3->safe_psql('postgres', 'SELECT count(*) FROM fw_tier.calls'), '5',
	'after the update every waiting record lands');
is($node3->safe_psql('postgres', 'SELECT drain_state FROM fw_tier.log_status'), 'ok',
	'and the log drains again');
my $log3 = slurp_file($node3->logfile);
my @warned = ($log3 =~ /is at version 0\.1, the library at 0\.4/g);
is(scalar @warned, 1, 'said once');
# (but the fw_flush() above that ran into its statement_timeout on purpose)
is( scalar(grep { /ERROR:|terminated by signal/ && !/canceling statement due to statement timeout/ }
		  split /\n/, $log3),
	0, 'no error in that cluster\'s log');
$node3->stop;

$node2->stop;
$node->stop;
$sim->stop;
done_testing();
