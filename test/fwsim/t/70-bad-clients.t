# Misbehaving clients and many connections must not hurt the server.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);

my $STD = $FwSim::STD;
my $s = FwSim->start('--ttft-ms', '300', '--tps', '1000000', '--capacity', '5000');
sub conn { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $s->port, Proto => 'tcp', Timeout => 5) }

# garbage bytes
# (libmicrohttpd may just wait for more bytes here; the connection then idles
# until the client leaves or the 300 s connection timeout)
my $r = $s->raw("\x00\xff\x13garbage\r\n\r\n", 1);
ok !defined $r->{status} || $r->{status} == 400, "garbage: no answer or 400";
ok(($r->{status} // 0) != 200, "garbage: never a 200");
$r = $s->raw("GET / HTTP/9.9\r\n\r\n", 5);
ok $r->{eof}, 'bad HTTP version: handled';
$r = $s->raw("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nConnection: close\r\n\r\n{}", 5);
ok $r->{eof}, 'bad Content-Length: handled';

# random binary junk (fixed seed, so a failure reproduces) and a header bomb
srand(42);
$r = $s->raw(join('', map { chr int rand 256 } 1 .. 65536), 1);
ok(($r->{status} // 0) != 200, 'random bytes: never a 200');
$r = $s->raw("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " . ('h' x 200000) . "\r\nConnection: close\r\n\r\n", 5);
ok $r->{eof}, 'header bomb: connection closed';
ok !defined $r->{status} || $r->{status} >= 400, 'header bomb: refused (' . ($r->{status} // 'no status') . ')';

# half-sent requests, then close
for my $cut (10, 60) {
    my $full = $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'half' } ] });
    my $c = conn();
    print {$c} substr($full, 0, length($full) - $cut);
    sleep 0.05;
    close $c;
}
# a client that vanishes during the simulated latency
{
    my $c = conn();
    print {$c} $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'gone' } ] });
    sleep 0.05;
    close $c;
}
sleep 0.6;
is $s->stats->{in_flight}, 0, 'abandoned requests released';
is $s->chat('still there?')->{status}, 200, 'server answers after bad clients';

# 1,000 concurrent connections, each with a ~300 ms request
my $N = 1000;
my $t0 = time;
my @res = $s->parallel([ map { $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => "n$_" } ] }) } 1 .. $N ], 60);
my $dt = time - $t0;
my $ok = grep { ($_->{status} // 0) == 200 } @res;
is $ok, $N, "1,000 concurrent connections all answered 200 ($dt s)";
ok $dt < 30, 'and they overlapped';
my @errs = grep { $_->{error} } @res;
is scalar(@errs), 0, 'no connect/read errors' or diag explain [ map { $_->{error} } @errs[0 .. 4] ];
ok $s->stats->{peak_in_flight} >= 100, 'peak_in_flight shows real concurrency: ' . $s->stats->{peak_in_flight};

# idle open connections do not block others
my @idle = map { conn() } 1 .. 50;
is scalar(grep { defined } @idle), 50, '50 idle connections open';
is $s->chat('after the crowd')->{status}, 200, 'server answers with idle connections open';
close $_ for grep { defined } @idle;

# pipelined keep-alive requests on one connection
my $one = $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'p' } ] });
(my $ka = $one) =~ s/Connection: close\r\n//;
$r = $s->raw($ka . $one, 10);
my @status = $r->{raw} =~ m{HTTP/1\.1 (\d{3}) }g;
is_deeply \@status, [200, 200], 'two pipelined requests on one connection';

is $s->stop, 0, 'clean stop after the crowd';
done_testing;
