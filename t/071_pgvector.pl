# fw_embed_batch into pgvector: README's example, run as written (issue 12).
#
# Pins: the README block marked "t/071_pgvector.pl runs this block" runs
# unchanged against a cluster with fw_tier and pgvector; the whole table
# (1,000 rows) is embedded by one statement in ceil(1000 / 128) requests
# of 256-dimension vectors; the HNSW index serves the README's query and
# finds the row whose text was asked for first; the row-by-row form gives
# the same vectors with one request per row.  Where pgvector is not
# installed (Debian 12 has no package for PostgreSQL 15; scripts/setup.sh
# builds the vendored tarball when it is there) the test says so and skips.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

plan skip_all => 'FWSIM is not set' unless $ENV{FWSIM} && -x $ENV{FWSIM};

my $sharedir = `pg_config --sharedir`;
chomp $sharedir;
plan skip_all => "pgvector is not installed ($sharedir/extension/vector.control absent)"
  unless -f "$sharedir/extension/vector.control";

# README's block, found by its marker
my $readme = "$FindBin::Bin/../README.md";
open(my $fh, '<', $readme) or die "open $readme: $!";
my $text = do { local $/; <$fh> };
close($fh);
my ($block) = $text =~
  /<!-- readme-test: skip \(needs pgvector: t\/071_pgvector\.pl runs this block\) -->\n```sql\n(.*?)^```$/ms;
ok(defined $block, 'README has the pgvector block');
$block //= '';

my $sim = FwSim->start('--time-scale', '0');
my $node = PostgreSQL::Test::Cluster->new('pgvector');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.flush_interval = '50ms'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION fw_tier');

$sim->reset;
my ($ret, $out, $err) = $node->psql('postgres', $block, on_error_stop => 1);
is($ret, 0, 'README block runs') or diag($err);
my @ids = map { (split /\|/)[0] } grep { /\|/ } split /\n/, $out;
is($ids[0], '42', 'the nearest row is the one whose text was asked for');
is(scalar(@ids), 5, 'five rows');

my $embeds = grep { $_->{model} =~ /embedding/ } @{ $sim->log_requests };
is($embeds, 8 + 1, 'one statement: 1,000 rows in 8 requests, plus the query');
is($node->safe_psql('postgres',
	'SELECT count(emb), min(vector_dims(emb)), max(vector_dims(emb)) FROM docs'),
	'1000|256|256', 'every row has its 256-dimension vector');

# 1,000 rows are cheap to scan: make the planner show the index can serve
# the query (a volatile fw_embed in the ORDER BY itself could not be)
my $q = q{SELECT id FROM docs
 ORDER BY emb <=> (SELECT fw_embed('note 42 about tea', 'default', '{"dimensions": 256}')::vector)
 LIMIT 5};
like($node->safe_psql('postgres', "SET enable_seqscan = off; EXPLAIN (COSTS OFF) $q"),
	qr/Index Scan using docs_emb_idx/, 'the HNSW index serves the query');
like($node->safe_psql('postgres', "SET enable_seqscan = off; SET hnsw.ef_search = 1000; $q"),
	qr/^42\n/, 'through the index, the nearest row is the one asked for');

# the row-by-row form: same vectors, one request per row
$sim->reset;
is($node->safe_psql('postgres', q{
CREATE TABLE before AS SELECT id, emb FROM docs WHERE id <= 20;
UPDATE docs SET emb = fw_embed(body, 'batch', '{"dimensions": 256}')::vector WHERE id <= 20;
SELECT count(*) FROM docs d JOIN before b USING (id) WHERE d.emb = b.emb}),
	'20', 'row by row: the same vectors');
is(scalar(@{ $sim->log_requests }), 20, 'row by row: one request per row');

# the call log says what they were
$node->safe_psql('postgres', 'SELECT fw_flush()');
is($node->safe_psql('postgres',
	q{SELECT kind, count(*) FROM fw_tier.calls GROUP BY kind ORDER BY kind}),
	"embed|30", 'logged as embed calls');

$node->stop;
done_testing();
