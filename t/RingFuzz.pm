# RingFuzz: read and damage fw_tier's call-log ring file, and a fuzz driver
# that damages it at random while the server is stopped.
#
# The layout is calllog.c's (FwRingFile, FwRingRec): a 4096-byte header
# page {magic u32, version u32, size u64, rec_size u32, unused u32, head
# u64, tail u64}, then `size` bytes of records {len u32, state u32,
# prompt_len i32, answer_len i32, encoding i32, crc u32, FwCallRecord (728
# bytes), prompt, answer}, 8-byte aligned.  ring_read dies when rec_size is
# not the one known here, so a layout change cannot go unnoticed.
#
# Used by t/051_ring.pl (fixed seeds) and test/ringfuzz/run.sh SEED CASES.
package RingFuzz;

use strict;
use warnings;
use Exporter 'import';
use Test::More;
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

our @EXPORT = qw(ring_read ring_ready ring_poke fuzz_setup fuzz_case
  fuzz_check_server);

use constant {
	HDRSZ => 4096,
	REC_SIZE => 752,
	READY => 0x52454459,
	RESERVED => 0x52455356,
	SKIP => 0x534b4950,
};

# field => [offset in the record, pack format, size]
our %F = (
	len => [ 0, 'V', 4 ],
	state => [ 4, 'V', 4 ],
	prompt_len => [ 8, 'l<', 4 ],
	answer_len => [ 12, 'l<', 4 ],
	encoding => [ 16, 'l<', 4 ],
	crc => [ 20, 'V', 4 ],
	attempt => [ 32, 'l<', 4 ],
	started_at => [ 40, 'q<', 8 ],
	dbname => [ 48, 'a64', 64 ],
	username => [ 112, 'a64', 64 ],
	workload => [ 176, 'a64', 64 ],
	model => [ 240, 'a160', 160 ],
	path => [ 400, 'c', 1 ],
	outcome => [ 401, 'c', 1 ],
	priority_sent => [ 402, 'C', 1 ],
	request_id => [ 428, 'a64', 64 ],
	error => [ 492, 'a256', 256 ],
);

sub ring_read
{
	my ($file) = @_;
	open(my $fh, '<:raw', $file) or die "open $file: $!";
	local $/;
	my $buf = <$fh>;
	close $fh;
	my ($magic, $version, $size, $rec_size, undef, $head, $tail) =
	  unpack('V V Q< V V Q< Q<', $buf);
	die "ring record layout changed (rec_size $rec_size), update RingFuzz.pm"
	  if $magic == 0x46575247 && $rec_size != REC_SIZE;
	return {
		buf => $buf,
		magic => $magic,
		version => $version,
		size => $size,
		head => $head,
		tail => $tail,
		file_size => length($buf),
	};
}

# READY records of [tail, head), walked as the server does: each
# {pos, fileoff, len, prompt_len, answer_len}.
sub ring_ready
{
	my ($r) = @_;
	my @out;
	my $pos = $r->{tail};
	my $size = $r->{size};
	return () if !$size || $r->{head} < $pos || $r->{head} - $pos > $size;
	while ($pos < $r->{head})
	{
		my $off = $pos % $size;
		my $fo = HDRSZ + $off;
		my ($len, $state) = unpack('V V', substr($r->{buf}, $fo, 8));
		last if $len < 8 || $len % 8 || $off + $len > $size;
		if ($state == READY)
		{
			my ($pl, $al) = unpack('l< l<', substr($r->{buf}, $fo + 8, 8));
			push @out,
			  {
				pos => $pos,
				fileoff => $fo,
				len => $len,
				prompt_len => $pl,
				answer_len => $al
			  };
		}
		$pos += $len;
	}
	return @out;
}

sub ring_poke
{
	my ($file, $off, $bytes) = @_;
	open(my $fh, '+<:raw', $file) or die "open $file: $!";
	sysseek($fh, $off, 0) or die "seek: $!";
	syswrite($fh, $bytes) == length($bytes) or die "write: $!";
	close $fh;
}

sub set_field
{
	my ($file, $rec, $field, $value) = @_;
	my ($o, $fmt) = @{ $F{$field} };
	ring_poke($file, $rec->{fileoff} + $o, pack($fmt, $value));
}

# A node whose call log goes to database fwdb, which refuses connections
# while records are made, so they stay in the ring across the stop.
sub fuzz_setup
{
	my (%o) = @_;
	my $node = PostgreSQL::Test::Cluster->new($o{name} // 'ringfuzz');
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '$o{url}'
fw_tier.database = 'fwdb'
fw_tier.log_buffer = '$o{ring}'
fw_tier.log_content = on
fw_tier.flush_interval = '100ms'
restart_after_crash = on
});
	$node->start;
	$node->safe_psql('postgres', 'CREATE DATABASE fwdb');
	$node->safe_psql('fwdb', 'CREATE EXTENSION fw_tier');
	$node->safe_psql('postgres', q{
CREATE EXTENSION fw_tier;
INSERT INTO fw_tier.workloads (workload) VALUES ('fz');
});
	close_fwdb($node);
	return {
		node => $node,
		ring => $node->data_dir . '/pg_fw_tier/calllog.ring',
		log_start => 0,
	};
}

sub close_fwdb
{
	my ($node) = @_;
	$node->safe_psql('postgres',
		'ALTER DATABASE fwdb ALLOW_CONNECTIONS false');
	$node->safe_psql('postgres',
		"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'fwdb'"
	);
	$node->poll_query_until('postgres',
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = 'fwdb'")
	  or die 'a session stays in fwdb';
}

# No crash, no crash-restart, server answering; returns a list of problems.
sub fuzz_check_server
{
	my ($ctx) = @_;
	my $node = $ctx->{node};
	my @bad;
	my $log = substr(slurp_file($node->logfile), $ctx->{log_start});
	push @bad, 'a process was terminated by a signal'
	  if $log =~ /terminated by signal/;
	push @bad, 'the server restarted after a crash'
	  if $log =~ /all server processes terminated; reinitializing/;
	push @bad, 'a PANIC' if $log =~ /PANIC/;
	my ($ret, $out) = $node->psql('postgres', 'SELECT 1');
	push @bad, 'the server does not answer' unless $ret == 0 && $out eq '1';
	return @bad;
}

# One case: K calls, stop, one random damage, start, drain.  Returns a
# hash: kind, pushed, expected (exact count of rows that must land, or
# undef when the damage leaves it open), landed, problems.
sub fuzz_case
{
	my ($ctx, $case, %o) = @_;
	my $node = $ctx->{node};
	my $k = $o{calls} // 8;
	my $tag = "fz$case";

	$node->safe_psql('postgres',
		"SELECT count(fw_complete('$tag ' || g || ' ' || repeat('x', (g * 37) % 300), 'fz'))"
		  . " FROM generate_series(1, $k) g");
	$node->stop('fast');

	my $r = ring_read($ctx->{ring});
	my @ready = ring_ready($r);
	my $kind = $o{kind};
	my @kinds = qw(len state prompt_len answer_len path outcome encoding
	  workload model error dbname crc payload headtail wholefile region
	  bitflips);
	$kind //= $kinds[ int(rand(@kinds)) ];
	my $expected = scalar(@ready) - 1;
	my $file = $ctx->{ring};
	my $victim = @ready ? $ready[ int(rand(@ready)) ] : undef;
	$kind = 'wholefile' if !$victim && $kind !~ /wholefile|region|bitflips|headtail/;

	my $huge = int(rand(2)) ? 100_000_000 : 2**31 - 1;
	if ($kind eq 'len')
	{
		my @v = (0, 1, 8, $victim->{len} + 8, $victim->{len} - 8, $huge,
			int(rand(2**32)));
		set_field($file, $victim, 'len', $v[ int(rand(@v)) ]);
	}
	elsif ($kind eq 'state')
	{
		my @v = (0, int(rand(2**32)), RESERVED, SKIP);
		my $s = $v[ int(rand(@v)) ];
		set_field($file, $victim, 'state', $s);
	}
	elsif ($kind eq 'prompt_len' || $kind eq 'answer_len')
	{
		my @v = ($huge, -2, -(2**31), $victim->{$kind} + 1, 8193);
		set_field($file, $victim, $kind, $v[ int(rand(@v)) ]);
	}
	elsif ($kind eq 'path' || $kind eq 'outcome')
	{
		my @v = (-1, 3, 9, 77, 127, -128);
		set_field($file, $victim, $kind, $v[ int(rand(@v)) ]);
	}
	elsif ($kind eq 'encoding')
	{
		set_field($file, $victim, 'encoding', (-5, 99, 2**30)[ int(rand(3)) ]);
	}
	elsif ($kind =~ /^(workload|model|error|dbname)$/)
	{
		# no terminator anywhere in the fixed-size string
		my $n = $F{$kind}[2];
		ring_poke($file, $victim->{fileoff} + $F{$kind}[0], 'A' x $n);
	}
	elsif ($kind eq 'crc')
	{
		set_field($file, $victim, 'crc', int(rand(2**32)));
	}
	elsif ($kind eq 'payload')
	{
		# a byte of the prompt or the call record changes: only the CRC sees it
		my $covered = REC_SIZE + ($victim->{prompt_len} > 0 ? $victim->{prompt_len} : 0)
		  + ($victim->{answer_len} > 0 ? $victim->{answer_len} : 0);
		my $o = 24 + int(rand($covered - 24));
		my $b = ord(substr($r->{buf}, $victim->{fileoff} + $o, 1));
		ring_poke($file, $victim->{fileoff} + $o, chr($b ^ (1 + int(rand(255)))));
	}
	elsif ($kind eq 'headtail')
	{
		my @v = (
			[ $r->{tail}, $r->{head} + 8 * (1 + int(rand(1000))) ],
			[ $r->{head} + 8, $r->{tail} ],
			[ $r->{tail} + 3, $r->{head} ],
			[ int(rand(2**32)) * 8, int(rand(2**32)) * 8 ],
			[ $r->{tail}, $r->{tail} + $r->{size} * 2 ],
		);
		my $p = $v[ int(rand(@v)) ];
		ring_poke($file, 24, pack('Q< Q<', @$p));
		$expected = undef;
	}
	elsif ($kind eq 'wholefile')
	{
		my $bytes = join('', map { chr(int(rand(256))) } 1 .. $r->{file_size});
		# sometimes keep a plausible header, so the records get read
		substr($bytes, 0, 48) = substr($r->{buf}, 0, 48) if int(rand(2));
		ring_poke($file, 0, $bytes);
		$expected = undef;
	}
	elsif ($kind eq 'region')
	{
		# random bytes over a stretch of records
		my $from = HDRSZ + int(rand($r->{size}));
		my $n = 1 + int(rand(4096));
		$n = $r->{file_size} - $from if $from + $n > $r->{file_size};
		ring_poke($file, $from, join('', map { chr(int(rand(256))) } 1 .. $n));
		$expected = undef;
	}
	elsif ($kind eq 'bitflips')
	{
		for (1 .. 1 + int(rand(20)))
		{
			my $o = HDRSZ + int(rand($r->{size}));
			my $b = ord(substr($r->{buf}, $o, 1));
			ring_poke($file, $o, chr($b ^ (1 << int(rand(8)))));
		}
		$expected = undef;
	}
	else { die "unknown damage $kind" }

	$node->start;
	# an undamaged state field set to SKIP is a silent skip, RESERVED a
	# "writer died" skip: the record goes either way
	$node->safe_psql('postgres',
		'ALTER DATABASE fwdb ALLOW_CONNECTIONS true');
	my ($ret, $out, $err) = $node->psql('postgres',
		"SET statement_timeout = '60s'; SELECT fw_flush()");
	my @problems = fuzz_check_server($ctx);
	push @problems, "fw_flush failed: $err" if $ret != 0;
	my $landed = $node->safe_psql('fwdb',
		"SELECT count(*) FROM fw_tier.calls WHERE prompt LIKE '$tag %'");
	push @problems, "$landed rows landed, expected $expected"
	  if defined $expected && $landed != $expected;
	push @problems, "$landed rows landed, more than the $k pushed"
	  if $landed > $k;
	my $corrupt = $node->safe_psql('postgres',
		'SELECT records_corrupt FROM fw_tier.log_status');
	close_fwdb($node);
	$ctx->{log_start} = -s $node->logfile;
	return {
		kind => $kind,
		pushed => $k,
		ready => scalar(@ready),
		expected => $expected,
		landed => $landed,
		corrupt => $corrupt,
		problems => \@problems
	};
}

1;
