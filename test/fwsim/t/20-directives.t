# Every [fwsim:...] directive, on the paths where it matters.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;
use Time::HiRes qw(time);

my $s = FwSim->start('--time-scale', '0');
my ($STD, $FAST) = ($FwSim::STD, $FwSim::FAST);
my $OVERLOAD_MSG = 'Service Overloaded: the serverless fleet is at capacity; retry with backoff or use service_tier priority';

sub err_ok {
    my ($r, $status, $type, $name) = @_;
    is $r->{status}, $status, "$name: status $status";
    is $r->{json}{error}{type}, $type, "$name: type $type";
    is $r->{json}{error}{code}, $type, "$name: code $type";
}

# overload: Standard only
my $r = $s->chat('hi [fwsim:overload]');
err_ok $r, 503, 'service_overloaded', 'overload on standard';
is $r->{json}{error}{message}, $OVERLOAD_MSG, 'overload message';
is $s->chat('hi [fwsim:overload]', tier => 'priority')->{status}, 200, 'overload: priority served';
is $s->chat('hi [fwsim:overload]', model => $FAST)->{status}, 200, 'overload: fast served';
$r = $s->chat('hi [fwsim:overload]', tier => 'priority');
is $r->{json}{choices}[0]{message}{content}, 'Echo: hi', 'directive stripped from the answer';

# overload-all: every path
for my $o ([], [tier => 'priority'], [model => $FAST]) {
    err_ok $s->chat('[fwsim:overload-all] hi', @$o), 503, 'service_overloaded', "overload-all (@$o)";
}

# unavailable: a 503 that must not look like overload
$r = $s->chat('[fwsim:unavailable]', tier => 'priority');
err_ok $r, 503, 'service_unavailable', 'unavailable';
is $r->{json}{error}{message}, 'Service Unavailable', 'unavailable message';
unlike $r->{content}, qr/overload/i, 'unavailable body never says overload';

# status=NNN
my %types = (400 => 'invalid_request_error', 401 => 'authentication_error', 402 => 'payment_required',
             403 => 'permission_denied', 404 => 'not_found', 412 => 'precondition_failed',
             413 => 'request_too_large', 422 => 'unprocessable_entity', 500 => 'internal_server_error',
             502 => 'bad_gateway', 503 => 'service_unavailable', 504 => 'gateway_timeout');
for my $st (sort keys %types) {
    $r = $s->chat("x [fwsim:status=$st]");
    err_ok $r, $st, $types{$st}, "status=$st";
    ok length($r->{json}{error}{message}), "status=$st has a message";
}
unlike $s->chat('[fwsim:status=503]')->{content}, qr/overload/i, 'status=503 is not overload';

# ratelimit
$r = $s->chat('[fwsim:ratelimit]');
err_ok $r, 429, 'rate_limit_exceeded', 'ratelimit';
is $r->{headers}{'retry-after'}, 1, 'ratelimit: Retry-After 1 by default';
like $r->{json}{error}{message}, qr/rate limit/, 'ratelimit message';
$r = $s->chat('[fwsim:ratelimit=17]');
is $r->{headers}{'retry-after'}, 17, 'ratelimit=17: Retry-After 17';

# slow (not scaled by time-scale 0)
my $t0 = time;
$r = $s->chat('[fwsim:slow=400] x');
my $dt = time - $t0;
is $r->{status}, 200, 'slow: 200';
ok $dt >= 0.38, "slow=400 took at least 400 ms ($dt)";
ok $dt < 5, 'slow=400 not absurdly slow';

# html / html200
$r = $s->chat('[fwsim:html]');
is $r->{status}, 502, 'html: 502';
like $r->{headers}{'content-type'}, qr{^text/html}, 'html: text/html';
is $r->{content}, '<html><body><h1>502 Bad Gateway</h1></body></html>', 'html: proxy page';
$r = $s->chat('[fwsim:html200]');
is $r->{status}, 200, 'html200: 200';
like $r->{headers}{'content-type'}, qr{^text/html}, 'html200: text/html';
like $r->{content}, qr/^<html>/, 'html200: HTML body';
ok !$r->{json}, 'html200: not JSON';

# malformed
$r = $s->chat('[fwsim:malformed]');
is $r->{status}, 200, 'malformed: 200';
like $r->{headers}{'content-type'}, qr{^application/json}, 'malformed: claims JSON';
ok !defined $r->{json}, 'malformed: body is not valid JSON';

# empty-choices, no-usage
$r = $s->chat('[fwsim:empty-choices] q');
is $r->{status}, 200, 'empty-choices: 200';
is_deeply $r->{json}{choices}, [], 'empty-choices: []';
ok $r->{json}{usage}, 'empty-choices: usage still present';
$r = $s->chat('[fwsim:no-usage] q w');
is $r->{status}, 200, 'no-usage: 200';
ok !exists $r->{json}{usage}, 'no-usage: no usage object';
is $r->{json}{choices}[0]{message}{content}, 'Echo: q w', 'no-usage: content intact';
is $r->{headers}{'fireworks-prompt-tokens'}, 6, 'no-usage: token header still sent';

# huge
$r = $s->chat('[fwsim:huge=5000000]');
is $r->{status}, 200, 'huge: 200';
is length($r->{json}{choices}[0]{message}{content} // ''), 5000000, 'huge: content is 5,000,000 bytes';
ok $r->{json}{usage}{completion_tokens} > 100000, 'huge: completion tokens counted';

# trickle: a valid body, delivered slowly
my $req = $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'slowly [fwsim:trickle]' } ] });
$r = $s->raw($req, 20);
is $r->{status}, 200, 'trickle: 200';
is $r->{json}{choices}[0]{message}{content}, 'Echo: slowly', 'trickle: complete valid body';
is length($r->{body}), $r->{headers}{'content-length'}, 'trickle: whole Content-Length delivered';
ok $r->{elapsed} >= 0.5, "trickle: took ~1 s ($r->{elapsed})";

# trickle=MS: the body takes about MS ms; the log names the request id sent
$req = $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'slower [fwsim:trickle=2500]' } ] });
$r = $s->raw($req, 20);
is $r->{status}, 200, 'trickle=MS: 200';
is $r->{json}{choices}[0]{message}{content}, 'Echo: slower', 'trickle=MS: complete valid body';
ok $r->{elapsed} >= 2.0, "trickle=2500: took ~2.5 s ($r->{elapsed})";
is $s->log(1)->[0]{request_id}, $r->{headers}{'x-request-id'},
	'log: request_id is the x-request-id sent';

# truncated: Content-Length of the whole body, half sent, then closed
$req = $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'cut [fwsim:truncated]' } ] });
$r = $s->raw($req, 10);
is $r->{status}, 200, 'truncated: 200';
ok $r->{eof}, 'truncated: connection closed';
ok $r->{headers}{'content-length'} > 0, 'truncated: has Content-Length';
is length($r->{body}), int($r->{headers}{'content-length'} / 2), 'truncated: exactly half the body';
ok !defined $r->{json}, 'truncated: body does not parse';

# reset: chunked body started, then the connection is reset
$req = $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'boom [fwsim:reset]' } ] });
$r = $s->raw($req, 10);
is $r->{status}, 200, 'reset: 200 status line';
ok $r->{eof}, 'reset: connection gone';
like $r->{headers}{'transfer-encoding'} // '', qr/chunked/, 'reset: chunked body';
unlike $r->{body}, qr/\r\n0\r\n\r\n\z/, 'reset: no final chunk';

# several directives at once: first error wins, slow still applies
$t0 = time;
$r = $s->chat('[fwsim:slow=200][fwsim:unavailable][fwsim:overload]');
is $r->{status}, 503, 'combined: 503';
is $r->{json}{error}{type}, 'service_unavailable', 'combined: first error directive wins';
ok time - $t0 >= 0.18, 'combined: slow applied to the error too';

# hang: no answer; thread released when the client goes away
$req = $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => '[fwsim:hang]' } ] });
$t0 = time;
$r = $s->raw($req, 1.5);
is $r->{error}, 'timeout', 'hang: no answer within 1.5 s';
ok !defined $r->{status}, 'hang: not even a status line';
select undef, undef, undef, 0.6;   # the server notices the hang-up within 200 ms
is $s->stats->{in_flight}, 0, 'hang: request released after the client left';
is $s->log(1)->[0]{status}, 499, 'hang: logged as 499 (client went away)';

# directives only count in the LAST user message
$r = $s->post('/inference/v1/chat/completions', { model => $STD, messages => [
    { role => 'user', content => '[fwsim:overload]' }, { role => 'assistant', content => 'ok' },
    { role => 'user', content => 'fine' } ] });
is $r->{status}, 200, 'directive in an earlier message is ignored';

is $s->stop, 0, 'clean stop';
done_testing;
