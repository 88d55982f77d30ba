# Replica-local prompt caching, API key auth, body size limit.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;

my $STD = $FwSim::STD;
my $s = FwSim->start('--time-scale', '0', '--api-key', 'k-123', '--max-body', '2000');
my %A = ('Authorization' => 'Bearer k-123');
sub conv { my @m = @_; return +{ model => $STD, messages => [ map { +{ role => $_->[0], content => $_->[1] } } @m ] } }

# --- prompt caching -----------------------------------------------------------
my @turn1 = (['system', 'You are helpful.'], ['user', 'What is two plus two?']);
my @turn2 = (@turn1, ['assistant', 'Four.'], ['user', 'And three plus three?']);
my $r = $s->post('/inference/v1/chat/completions', conv(@turn1), { %A, 'x-session-affinity' => 'chat-1' });
is $r->{json}{usage}{prompt_tokens_details}{cached_tokens}, 0, 'first request of a key: nothing cached';
is $r->{json}{usage}{prompt_tokens}, 3 + 3 + 5 + 3, 'prompt tokens: words + 3 per message';
$r = $s->post('/inference/v1/chat/completions', conv(@turn2), { %A, 'x-session-affinity' => 'chat-1' });
is $r->{json}{usage}{prompt_tokens_details}{cached_tokens}, 8, 'second turn: the shared prefix (8 words) is cached';
is $r->{headers}{'fireworks-cached-prompt-tokens'}, 8, 'cached header';
is $r->{json}{usage}{prompt_tokens}, 8 + 6 + 1 + 3 + 4 + 3, 'prompt tokens of turn 2';
$r = $s->post('/inference/v1/chat/completions', conv(@turn2), { %A, 'x-session-affinity' => 'chat-2' });
is $r->{json}{usage}{prompt_tokens_details}{cached_tokens}, 0, 'another key has its own cache';
$r = $s->post('/inference/v1/chat/completions', conv(@turn2), \%A);
is $r->{json}{usage}{prompt_tokens_details}{cached_tokens}, 0, 'no key: no caching';
$r = $s->post('/inference/v1/chat/completions', conv(@turn2), \%A);
is $r->{json}{usage}{prompt_tokens_details}{cached_tokens}, 0, 'no key: still no caching';
$r = $s->post('/inference/v1/chat/completions', { %{ conv(@turn1) }, user => 'u-7' }, \%A);
$r = $s->post('/inference/v1/chat/completions', { %{ conv(@turn1) }, user => 'u-7' }, \%A);
is $r->{json}{usage}{prompt_tokens_details}{cached_tokens}, 8, 'the user field works as a key';
$r = $s->post('/inference/v1/chat/completions', { %{ conv(['user', 'different words entirely']) }, user => 'u-7' }, \%A);
is $r->{json}{usage}{prompt_tokens_details}{cached_tokens}, 0, 'a different prompt: no common prefix';
my $log = $s->log(1)->[0];
is $log->{user}, 'u-7', 'log: user';
is $log->{session_affinity}, undef, 'log: no affinity';
is $s->stats->{tokens}{cached}, 16, 'stats: cached tokens';

# --- auth ----------------------------------------------------------------------------
for my $case ([undef, 'missing'], ['Bearer wrong', 'wrong key'], ['k-123', 'no Bearer prefix'], ['Bearer k-1234', 'longer key']) {
    my ($h, $name) = @$case;
    $r = $s->post('/inference/v1/chat/completions', conv(['user', 'x']), defined $h ? { Authorization => $h } : {});
    is $r->{status}, 401, "auth $name: 401";
    is $r->{json}{error}{type}, 'authentication_error', "auth $name: type";
}
is $s->log(1)->[0]{authorized}, JSON::PP::false, 'log: unauthorized';
is $s->post('/inference/v1/chat/completions', conv(['user', 'x']), \%A)->{status}, 200, 'right key: 200';
is $s->get('/control/stats')->{status}, 200, 'control needs no key';

# --- body size ---------------------------------------------------------------------
$r = $s->post('/inference/v1/chat/completions', conv(['user', 'y' x 3000]), \%A);
is $r->{status}, 413, 'body over --max-body: 413';
is $r->{json}{error}{type}, 'request_too_large', '413 type';
$r = $s->raw("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-123\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    . join('', map { sprintf("%x\r\n%s\r\n", 500, 'z' x 500) } 1 .. 6) . "0\r\n\r\n");
is $r->{status}, 413, 'chunked body over the limit: 413';
is $s->post('/inference/v1/chat/completions', conv(['user', 'ok']), \%A)->{status}, 200, 'still serving after 413';

is $s->stop, 0, 'clean stop';
done_testing;
