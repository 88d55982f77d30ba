# Read replicas (issue 11): the row's origin, and a standby's call log.
#
# Pins: the flusher's rows carry this server's origin (system identifier
# and node name, = fw_tier.local_origin()); the generated node id is kept
# across a restart; a standby made by pg_basebackup is told from its
# primary (same system identifier, its own node name and a new node id) and
# removes the ring, intents and spill it copied instead of logging the
# primary's records again.
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
is($primary->safe_psql('fwdb', 'SELECT origin_sysid, origin_node FROM fw_tier.local_origin()'),
	"$sysid|primary", 'local_origin: the system identifier and cluster_name');
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
$standby->start;
$primary->wait_for_catchup($standby);
ok($standby->log_contains(qr/this data directory is a copy of another server's/),
	'the standby finds its pg_fw_tier/ is a copy');
isnt(node_id($standby), $id, 'the standby gets a node id of its own');
is($standby->safe_psql('fwdb', 'SELECT origin_sysid, origin_node FROM fw_tier.local_origin()'),
	"$sysid|standby", 'same system identifier, its own node name');
is($standby->safe_psql('fwdb', 'SELECT records_pushed, bytes_used FROM fw_tier.log_status'),
	'0|0', 'the copied ring is not the standby\'s: removed, not logged again');

$standby->stop;
$primary->stop;
done_testing();
