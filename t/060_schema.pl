# Schema independence: the extension installed in schema fw, every
# documented entry point called schema-qualified under a hostile
# search_path (schema evil, first and only, holding decoys with the
# entry points' names that raise) works, and the decoys never run.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

my $sim = FwSim->start('--time-scale', '0');
my $node = PostgreSQL::Test::Cluster->new('schema');
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
CREATE SCHEMA evil;
CREATE TABLE public.docs (id integer PRIMARY KEY, body text, answer text);
INSERT INTO public.docs SELECT i, 'doc ' || i FROM generate_series(1, 3) i;
});
# decoys: an unqualified internal call would resolve to these and raise
for my $decoy (
	'fw_complete(text, text)', 'fw_chat(jsonb, text, jsonb)',
	'fw_complete_batch(text[], text, jsonb)', 'fw_fixture_chat(jsonb, text, integer, text, text, jsonb, integer, integer)',
	'fw_fixture_flush()', 'fw_fingerprint(jsonb, text, jsonb)')
{
	my ($name) = $decoy =~ /^(\w+)/;
	my $args = $decoy =~ s/^\w+\(//r =~ s/\)$//r;
	my $i = 0;
	my $sig = join(', ', map { 'a' . $i++ . " $_" } grep { length } split /,\s*/, $args);
	$node->safe_psql('postgres', qq{
CREATE FUNCTION evil.$name($sig) RETURNS text LANGUAGE plpgsql AS
\$\$ BEGIN RAISE EXCEPTION 'decoy evil.$name ran'; END \$\$;});
}

sub q_hostile
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres',
		"SET search_path = evil;\n$sql", on_error_stop => 1);
	return ($ret, $out, $err);
}

sub ok_hostile
{
	my ($sql, $want, $name) = @_;
	my ($ret, $out, $err) = q_hostile($sql);
	is($ret, 0, "$name: runs") or diag($err);
	unlike($err, qr/decoy|ERROR/, "$name: no error, no decoy") if $err;
	like($out, $want, "$name: result") if defined $want;
}

ok_hostile(q{SELECT fw.fw_complete('hello', 'default')}, qr/^Echo: hello$/, 'fw.fw_complete');
ok_hostile(q{SELECT fw.fw_chat('[{"role": "user", "content": "chat"}]', 'default')->'choices'->0->'message'->>'content'},
	qr/^Echo: chat$/, 'fw.fw_chat');
ok_hostile(q{SELECT array_to_string(fw.fw_complete_batch(ARRAY['b1', 'b2'], 'batch'), '|')},
	qr/^Echo: b1\|Echo: b2$/, 'fw.fw_complete_batch');
ok_hostile(q{SELECT fw.fw_escalate('default', '1 minute') > now()}, qr/^t$/, 'fw.fw_escalate');
ok_hostile(q{SELECT path FROM fw_tier.status WHERE workload = 'default'}, qr/^priority$/,
	'fw_tier.status');
ok_hostile(q{SELECT fw.fw_deescalate('default')}, undef, 'fw.fw_deescalate');
ok_hostile(q{SELECT length(fw.fw_fingerprint('[{"role": "user", "content": "x"}]', 'default'))},
	qr/^\d+$/, 'fw.fw_fingerprint');
ok_hostile(q{SELECT fw.fw_fixture('fixed', 'default', 200, 'from a fixture') IS NOT NULL},
	qr/^t$/, 'fw.fw_fixture');
ok_hostile(q{SELECT fw.fw_fixture_chat('[{"role": "user", "content": "fixed chat"}]', 'default', 200, 'chat fixture') IS NOT NULL},
	qr/^t$/, 'fw.fw_fixture_chat');
ok_hostile(q{SET fw_tier.mode = 'replay'; SELECT fw.fw_complete('fixed', 'default')},
	qr/^from a fixture$/, 'replay through fw.fw_complete');
ok_hostile(q{SELECT count(*) > 0 FROM fw_tier.fixtures_export}, qr/^t$/, 'fw_tier.fixtures_export');
ok_hostile(q{SELECT fw.fw_flush(); SELECT count(*) > 0 FROM fw_tier.calls}, qr/t$/,
	'fw.fw_flush and fw_tier.calls');
ok_hostile(q{SELECT count(*) >= 0 FROM fw_tier.spend_daily}, qr/^t$/, 'fw_tier.spend_daily');
ok_hostile(q{SELECT count(*) >= 0 FROM fw_tier.unpriced_models}, qr/^t$/, 'fw_tier.unpriced_models');
{
	my ($ret, $out, $err) = q_hostile(
		q{CALL fw.fw_enrich('public.docs', 'id', 'body', 'answer', 'batch', 2)});
	is($ret, 0, 'CALL fw.fw_enrich under a hostile search_path') or diag($err);
	is($node->safe_psql('postgres', 'SELECT string_agg(answer, \'|\' ORDER BY id) FROM public.docs'),
		'Echo: doc 1|Echo: doc 2|Echo: doc 3', 'fw.fw_enrich answered every row');
}

# the decoys are live: an unqualified call under this search_path hits one
{
	my ($ret, $out, $err) = q_hostile(q{SELECT fw_complete_batch(ARRAY['x'], 'batch', '{}')});
	like($err, qr/decoy evil\.fw_complete_batch ran/, 'an unqualified call would run the decoy');
}

$node->stop;
done_testing();
