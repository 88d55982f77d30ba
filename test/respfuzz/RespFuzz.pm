# Response fuzzer for fw_tier: a loopback HTTP server that answers each
# chat request with a body chosen by its prompt, and the generator of
# mutated provider responses.
#
# Prompts the server understands (the last user message's content):
#   fuzz SEED N             case N of seed SEED: a mutated real response
#   raw STATUS HEX [RA]     exactly that status and body (hex-encoded bytes),
#                           optional Retry-After seconds
# Anything else gets a plain fwsim-like 200 answer "Echo: <prompt>".
#
# Cases are deterministic for (SEED, N): the generator seeds its own PRNG
# from them, so a failing case is replayed by its number alone.
package RespFuzz;
use strict;
use warnings;
no warnings 'portable';
use IO::Socket::INET;
use JSON::PP;
use File::Temp qw(tempdir);
use Time::HiRes qw(usleep);

# ---- deterministic PRNG (xorshift64*; Perl's rand differs by build) -----
my $S = 1;

sub seed_case
{
	my ($seed, $n) = @_;
	$S = (($seed * 1000003) ^ ($n * 7919) ^ 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF;
	$S = 1 if $S == 0;
	rnd(2) for 1 .. 4;
}

sub rnd
{
	my ($n) = @_;
	{
		use integer;
		$S ^= ($S << 13);
		$S ^= (($S >> 7) & 0x01FFFFFFFFFFFFFF);
		$S ^= ($S << 17);
	}
	my $v = ($S >> 11) & 0xFFFFFFFF;
	return $v % $n;
}

sub pick { return $_[ rnd(scalar @_) ]; }

# ---- real shapes -----------------------------------------------------------
my @contents = (
	'Echo: hello', "h\x{e9}llo w\x{f6}rld", "\x{65e5}\x{672c}\x{8a9e}\x{306e}\x{30c6}\x{30ad}\x{30b9}\x{30c8}",
	"emoji \x{1F600}", '', 'a' x 5000, "line\nbreak \"quoted\" \\ back\ttab",
	"caf\x{e9} " x 200, 'Echo: ' . join(' ', map { "w$_" } 1 .. 300),
);
my @messages = (
	'Invalid request: unknown field',
	"mod\x{e8}le introuvable: caf\x{e9}",
	('a' x 254) . "\x{e9}" . ('b' x 40),
	('x' x 253) . "\x{20ac}\x{20ac}",
	"\x{65e5}" x 120,
	'Service Overloaded: the serverless fleet is at capacity',
	'rate limit exceeded',
);
my @statuses = (400, 401, 402, 403, 404, 408, 409, 412, 413, 422, 429, 500, 502, 503, 504, 302, 418);
my @raw_numbers = (
	'1e400', '-1e400', '1e-400', '-1', '-0', '0', '2147483647', '2147483648',
	'4294967296', '9223372036854775807', '9223372036854775808',
	'18446744073709551616', '1.5', '1e308', '1e100000', '1e200000', '1e-200000',
	'9' x 1000, '0.0000001', '1E5', '-2147483649', 'NaN', 'Infinity', '01', '1.',
	'-', '1e', '0x10', '+1',
);
my @weird_strings = (
	"\\u0000", "\\ud800", "\\udc00", "\\ud83d\\ude00", "\\u00e9", "\\uFFFF",
	"\\x41", "\\u12", "\\", "\xc3", "\xff\xfe", "\xed\xa0\x80", "\xc0\xaf",
	"\xe2\x82", "\x00", "\x01\x1f", "\x{7f}",
);

sub success_doc
{
	my $p = rnd(100000);
	my $c = rnd(100000);
	return {
		id => 'fwsim-0123456789abcdef', object => 'chat.completion',
		created => 1760000000, model => 'accounts/fireworks/models/kimi-k2p6',
		choices => [ { index => 0, message => { role => 'assistant', content => pick(@contents) },
			finish_reason => 'stop' } ],
		usage => { prompt_tokens => $p, completion_tokens => $c, total_tokens => $p + $c,
			prompt_tokens_details => { cached_tokens => rnd($p + 1) } },
	};
}

sub error_doc
{
	my $t = pick('invalid_request_error', 'not_found', 'rate_limit_exceeded',
		'service_overloaded', 'service_unavailable', 'internal_server_error');
	return { error => { object => 'error', type => $t, code => $t, message => pick(@messages) } };
}

my $json = JSON::PP->new->canonical->utf8;

sub nest
{
	my ($depth, $inner) = @_;
	my $o = pick('[', '{"a":');
	my $c = $o eq '[' ? ']' : '}';
	return ($o x $depth) . $inner . ($c x $depth);
}

# A weird JSON value as raw text.
sub weird_value
{
	my $k = rnd(10);
	return pick(@raw_numbers) if $k <= 2;
	return '"' . pick(@weird_strings) . '"' if $k == 3;
	return pick('null', 'true', 'false', '[]', '{}', '""', '[1,2]', '{"x":1}') if $k <= 5;
	return nest(10000 + rnd(30000), '1') if $k == 6;
	return nest(200 + rnd(100), '"deep"') if $k == 7;
	return '[' . join(',', ('{}') x (20000 + rnd(30000))) . ']' if $k == 8;
	return '"' . ('z' x (1000 + rnd(100000))) . '"';
}

my @paths = (
	[qw(choices)], [qw(choices 0)], [qw(choices 0 message)],
	[qw(choices 0 message content)], [qw(usage)], [qw(usage prompt_tokens)],
	[qw(usage completion_tokens)], [qw(usage prompt_tokens_details)],
	[qw(usage prompt_tokens_details cached_tokens)], [qw(error)], [qw(error message)],
	[qw(model)], [qw(id)],
);

# Put a placeholder at a path (creating it), serialize, substitute the raw
# value: lets any bytes stand where the structure wants a value.
sub set_raw
{
	my ($doc, $path, $raw) = @_;
	my $node = $doc;
	for my $i (0 .. $#$path - 1)
	{
		my $k = $path->[$i];
		my $next = $path->[ $i + 1 ] =~ /^\d+$/ ? [] : {};
		if (ref $node eq 'ARRAY')
		{
			$node->[$k] = $next unless ref $node->[$k] eq ref $next;
			$node = $node->[$k];
		}
		else
		{
			$node->{$k} = $next unless ref($node->{$k} // '') eq ref $next;
			$node = $node->{$k};
		}
	}
	my $last = $path->[-1];
	if (ref $node eq 'ARRAY') { $node->[$last] = '@@RAW@@'; }
	else { $node->{$last} = '@@RAW@@'; }
	my $text = $json->encode($doc);
	$text =~ s/"\@\@RAW\@\@"/$raw/;
	return $text;
}

sub delete_path
{
	my ($doc, $path) = @_;
	my $node = $doc;
	for my $i (0 .. $#$path - 1)
	{
		my $k = $path->[$i];
		$node = ref $node eq 'ARRAY' ? $node->[$k] : $node->{$k};
		return unless ref $node;
	}
	if (ref $node eq 'ARRAY') { splice(@$node, $path->[-1], 1) if @$node; }
	else { delete $node->{ $path->[-1] }; }
}

sub byte_mutate
{
	my ($b) = @_;
	my $k = rnd(6);
	my $len = length($b);
	if ($k == 0 && $len)
	{
		for (1 .. 1 + rnd(8))
		{
			substr($b, rnd($len), 1) =
			  chr(pick(0, 0x80 + rnd(128), 0x22, 0x5c, 0x7b, 0x5b, 0x7d, rnd(256)));
		}
	}
	elsif ($k == 1) { $b = substr($b, 0, rnd($len + 1)); }
	elsif ($k == 2 && $len)
	{
		# inside a string: after some quote
		my @q;
		while ($b =~ /"/g) { push @q, pos($b); last if @q > 200; }
		my $at = @q ? pick(@q) : rnd($len);
		substr($b, $at, 0) = pick(@weird_strings);
	}
	elsif ($k == 3) { $b = pick("\xef\xbb\xbf", "   \n", "garbage", "\x00") . $b; }
	elsif ($k == 4) { $b .= pick(' trailing', '}', ',', "\x00", '{"more":1}'); }
	else
	{
		$b = pick('', ' ', 'null', '[]', '{}', '123', '"str"', 'true',
			'<html><body><h1>502 Bad Gateway</h1></body></html>',
			'{"choices":[{"message":{"content":"ok"}}]}',
			'{"choices":[{"message":{"content":"ok"}}],"choices":[]}',
			'{"choices":[],"choices":[{"message":{"content":"dup"}}]}');
	}
	return $b;
}

# One case: (status, body bytes, retry_after or undef, truncate flag)
sub gen_case
{
	my ($seed, $n) = @_;
	seed_case($seed, $n);
	my $status = rnd(100) < 78 ? 200 : pick(@statuses);
	my $doc = ($status == 200 || rnd(10) == 0) ? success_doc() : error_doc();
	my $body;
	my $k = rnd(10);
	if ($k <= 3) { $body = set_raw($doc, pick(@paths), weird_value()); }
	elsif ($k == 4) { delete_path($doc, pick(@paths)); $body = $json->encode($doc); }
	elsif ($k == 5)
	{
		$body = $json->encode($doc);
		$body = rnd(2) ? nest(10000 + rnd(20000), $body) : $body;
	}
	elsif ($k <= 8) { $body = byte_mutate($json->encode($doc)); }
	else { $body = byte_mutate(set_raw($doc, pick(@paths), weird_value())); }
	$body = byte_mutate($body) if rnd(4) == 0;
	my $ra = $status == 429 ? pick(undef, 0, 1, 600, 86400) : undef;
	my $trunc = rnd(50) == 0;
	return ($status, $body, $ra, $trunc);
}

# ---- the server ------------------------------------------------------------
sub serve_one
{
	my ($c) = @_;
	my $req = '';
	while ($req !~ /\r\n\r\n/)
	{
		my $got = sysread($c, $req, 65536, length $req);
		return unless $got;
	}
	my ($head, $rest) = split(/\r\n\r\n/, $req, 2);
	my ($clen) = $head =~ /^content-length:\s*(\d+)/mi;
	$clen //= 0;
	while (length($rest) < $clen)
	{
		my $got = sysread($c, $rest, 65536, length $rest);
		last unless $got;
	}
	my $prompt = '';
	eval {
		my $r = JSON::PP->new->utf8->decode($rest);
		$prompt = $r->{messages}[-1]{content} // '';
	};
	my ($status, $body, $ra, $trunc) = (200, undef, undef, 0);
	if ($prompt =~ /^fuzz (\d+) (\d+)/)
	{
		($status, $body, $ra, $trunc) = gen_case($1, $2);
	}
	elsif ($prompt =~ /^raw (\d+) ([0-9a-fA-F]*)(?: (\d+))?/)
	{
		($status, $body, $ra) = ($1, pack('H*', $2), $3);
	}
	else
	{
		$body = $json->encode({ choices => [ { index => 0,
			message => { role => 'assistant', content => "Echo: $prompt" } } ] });
	}
	my $h = "HTTP/1.1 $status X\r\nContent-Type: application/json\r\n"
	  . 'Content-Length: ' . (length($body) + ($trunc ? 100 : 0)) . "\r\n"
	  . "x-request-id: fuzz-\xc3\xa9-\x01\r\n"
	  . (defined $ra ? "Retry-After: $ra\r\n" : '')
	  . "Connection: close\r\n\r\n";
	my $out = $h . $body;
	while (length $out)
	{
		my $w = syswrite($c, $out);
		last unless $w;
		substr($out, 0, $w) = '';
	}
}

sub start
{
	my ($class) = @_;
	my $dir = tempdir(CLEANUP => 1);
	my $portfile = "$dir/port";
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0,
			Listen => 128, ReuseAddr => 1, Proto => 'tcp') or die "listen: $!";
		open(my $fh, '>', "$portfile.tmp") or die;
		print $fh $l->sockport, "\n";
		close $fh;
		rename("$portfile.tmp", $portfile);
		$SIG{TERM} = sub { exit 0 };
		my $deadline = time + 3600;		# never outlive a test run
		while (time < $deadline)
		{
			my $c = $l->accept or next;
			binmode $c;
			eval { local $SIG{ALRM} = sub { die "timeout\n" }; alarm 30; serve_one($c); alarm 0; };
			close $c;
		}
		exit 0;
	}
	for (1 .. 400)
	{
		last if -s $portfile;
		usleep(25_000);
	}
	die "respfuzz server did not start" unless -s $portfile;
	open(my $fh, '<', $portfile) or die;
	my $port = <$fh>;
	chomp $port;
	return bless { pid => $pid, port => $port }, $class;
}

sub url { return "http://127.0.0.1:$_[0]->{port}"; }

sub stop
{
	my $self = shift;
	return unless $self->{pid};
	kill 'TERM', $self->{pid};
	waitpid($self->{pid}, 0);
	$self->{pid} = undef;
}

sub DESTROY { $_[0]->stop; }

# SQLSTATEs a failed call may raise (README "Failure classes").
our %CLASS_STATES = map { $_ => 1 }
  qw(53400 53000 08006 22023 28000 42501 42704 54000 08001 22000);

# The SQL driver: one subtransaction per case, the outcome of each.
our $DRIVER_SQL = q{
CREATE OR REPLACE FUNCTION fuzz_run(seed int, n0 int, n1 int)
RETURNS TABLE(case_no int, state text) LANGUAGE plpgsql AS $f$
DECLARE r text;
BEGIN
  FOR k IN n0 .. n1 - 1 LOOP
    case_no := k;
    BEGIN
      IF k % 4 = 3 THEN
        r := fw_chat(jsonb_build_array(jsonb_build_object('role', 'user',
                     'content', format('fuzz %s %s', seed, k))), 'default')::text;
      ELSE
        r := fw_complete(format('fuzz %s %s', seed, k), 'default');
      END IF;
      state := CASE WHEN r IS NULL THEN 'null' ELSE 'ok' END;
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
    END;
    RETURN NEXT;
  END LOOP;
END $f$;
};

# Run cases [0, ncases) of seed against node (database db) in chunks that
# alternate on_error raise / null.  Returns a hash: counts per state,
# bad => [ "case:state", ... ] (errors that must not escape).
sub run_cases
{
	my ($node, $db, $seed, $ncases, $chunk) = @_;
	$chunk //= 500;
	my %count;
	my @bad;
	for (my $n0 = 0, my $i = 0; $n0 < $ncases; $n0 += $chunk, $i++)
	{
		my $n1 = $n0 + $chunk < $ncases ? $n0 + $chunk : $ncases;
		my $mode = $i % 2 ? 'null' : 'raise';
		my $out = $node->safe_psql($db, qq{
SET fw_tier.on_error = '$mode';
SELECT case_no || ':' || state FROM fuzz_run($seed, $n0, $n1);
});
		for my $line (split /\n/, $out)
		{
			my ($c, $st) = split /:/, $line, 2;
			$count{$st}++;
			my $allowed = $st eq 'ok' || $st eq 'null'
			  || ($mode eq 'raise' && $CLASS_STATES{$st});
			push @bad, "$c:$st($mode)" unless $allowed;
		}
	}
	return { count => \%count, bad => \@bad };
}

1;
