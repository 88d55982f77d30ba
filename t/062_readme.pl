# README.md cannot drift from the software: every ```sql block of README.md
# runs, in the order it appears, against a throwaway cluster with fw_tier
# preloaded and the simulator (test/fwsim) as the API, and a block that
# errors unexpectedly fails the test.
#
# Conventions (also in README's "Testing" section).  An HTML comment on the
# line right before a fence says how to run the block:
#   <!-- readme-test: role=app -->             run as role app
#   <!-- readme-test: role=app expect=42501 --> the block must fail, and its
#                                              first error has SQLSTATE 42501
#   <!-- readme-test: db=shop -->              run in database shop
#   <!-- readme-test: skip (why) -->           not run (say why)
#   <!-- readme-test: conf -->                 a postgresql.conf fragment (a
#                                              plain ``` block): its lines are
#                                              appended to the cluster's
#                                              postgresql.conf before it starts,
#                                              127.0.0.1:8080 replaced by the
#                                              simulator's address
# role= and db= combine.  An unmarked ```sql block runs as the bootstrap
# superuser in README's database (fw_tier.database, postgres).  ```sh blocks
# and unmarked plain blocks are never run.  Each block goes to
# psql -X -v ON_ERROR_STOP=1 with \set VERBOSITY verbose, so an error
# prints its SQLSTATE; psql runs in a temporary directory (for \copy).
#
# The simulator is started the way README's "Try it locally" says, with
# --api-key sim-key, so a block only passes if the key setup it documents
# works.  The test only adds settings that make retries quick
# (backoff_base, retry_after_cap, flush_interval).
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use File::Temp qw(tempdir);
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

my $readme = "$FindBin::Bin/../README.md";
open(my $fh, '<', $readme) or die "open $readme: $!";
my @lines = <$fh>;
close($fh);

# Split README into blocks: lang, text, marker, line number.
my @blocks;
for (my $i = 0; $i < @lines; $i++)
{
	next unless $lines[$i] =~ /^```(\S*)\s*$/;
	my ($lang, $start) = ($1, $i + 1);
	my $marker = '';
	for (my $j = $i - 1; $j >= 0; $j--)
	{
		next if $lines[$j] =~ /^\s*$/;
		$marker = $1 if $lines[$j] =~ /^<!--\s*readme-test:\s*(.*?)\s*-->\s*$/;
		last;
	}
	my $text = '';
	for ($i++; $i < @lines && $lines[$i] !~ /^```\s*$/; $i++)
	{
		$text .= $lines[$i];
	}
	die "README.md:$start: unclosed fence" if $i >= @lines;
	push @blocks, { lang => $lang, text => $text, marker => $marker, line => $start };
}

my @conf = grep { $_->{marker} eq 'conf' } @blocks;
my @sql = grep { $_->{lang} eq 'sql' } @blocks;
ok(@conf >= 1, 'README has a postgresql.conf fragment marked conf');
ok(@sql >= 10, 'README has SQL blocks (' . scalar(@sql) . ')');

my $sim = FwSim->start('--time-scale', '0', '--api-key', 'sim-key');
my $simaddr = $sim->url =~ s{^http://}{}r;

my $node = PostgreSQL::Test::Cluster->new('readme');
$node->init;
my $confadd = '';
for my $b (@conf)
{
	(my $t = $b->{text}) =~ s/127\.0\.0\.1:8080/$simaddr/g;
	$confadd .= "# README.md:$b->{line}\n$t";
}
like($confadd, qr/shared_preload_libraries\s*=\s*'fw_tier'/, 'README conf preloads fw_tier');
like($confadd, qr{fw_tier\.base_url\s*=\s*'http://\Q$simaddr\E/inference/v1'},
	'README conf points base_url at the simulator, /inference/v1 included');
$node->append_conf('postgresql.conf', $confadd . q{
# quick retries for the test
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '20ms'
fw_tier.retry_after_cap = '20ms'
fw_tier.flush_interval = '50ms'
});
$node->start;

my $work = tempdir(CLEANUP => 1);
chmod 0755, $work;
chdir $work or die "chdir $work: $!";

my (@skipped, $ran);
for my $b (@sql)
{
	my $m = $b->{marker};
	my $where = "README.md:$b->{line}";
	if ($m =~ /^skip\b\s*(.*)$/)
	{
		push @skipped, "$where $1";
		note("skipped $where: $1");
		next;
	}
	my %opt;
	for my $kv (split /\s+/, $m)
	{
		my ($k, $v) = split /=/, $kv, 2;
		die "$where: bad readme-test marker '$m'"
		  unless defined $v && $k =~ /^(role|db|expect)$/;
		$opt{$k} = $v;
	}
	my $db = $opt{db} // 'postgres';
	my @user = $opt{role} ? ('-U', $opt{role}) : ();
	my ($ret, $out, $err) = $node->psql($db, "\\set VERBOSITY verbose\n" . $b->{text},
		on_error_stop => 1, extra_params => \@user);
	my ($state) = $err =~ /ERROR:\s+([0-9A-Z]{5}):/;
	my $as = ($opt{role} // 'superuser') . " in $db";
	$ran++;
	if (defined $opt{expect})
	{
		ok($ret != 0 && defined $state && $state eq $opt{expect},
			"$where ($as) fails with $opt{expect}")
		  or diag("exit $ret, SQLSTATE " . ($state // 'none') . "\n$err");
	}
	else
	{
		ok($ret == 0 && !defined $state, "$where ($as) runs")
		  or diag("exit $ret\n$err\n--- block ---\n$b->{text}");
	}
}
note('skipped blocks: ' . scalar(@skipped));
note("  $_") for @skipped;

# The blocks talked to the simulator, with the key README gives.
ok($sim->stats->{total} > 0, 'README examples reached the simulator');
is($node->safe_psql('postgres',
		"SELECT fw_flush(); SELECT count(*) FROM fw_tier.calls WHERE http_status = 401"),
	"\n0", 'no call was refused for its key');

chdir '/';
$node->stop;
$sim->stop;
done_testing();
