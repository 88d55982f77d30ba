# Account rate limits: 429 + Retry-After, limit headers, shared Std/Prio budget.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;
use Time::HiRes qw(time sleep);

my ($STD, $FAST) = ($FwSim::STD, $FwSim::FAST);
# time-scale 0.04: the 60 s window lasts 2.4 s; latency 8 ms
my $s = FwSim->start('--time-scale', '0.04', '--prompt-tpm', '30', '--ttft-ms', '200');

# each "a b" request: 2 words + 3 = 5 prompt tokens; budget 30 = 6 requests
my $r = $s->chat('a b');
is $r->{status}, 200, 'first request served';
is $r->{headers}{'x-ratelimit-limit-tokens-prompt'}, 1, 'per-second prompt limit (30/60 -> at least 1)';
ok !exists $r->{headers}{'x-ratelimit-limit-tokens-generated'}, 'no header for an unlimited dimension';
my $ok = 1;
$ok++ while $ok < 20 && $s->chat('a b', ($ok % 2 ? (tier => 'priority') : ()))->{status} == 200;
is $ok, 6, 'Standard and Priority share one budget: 6 requests of 5 tokens fit 30';
$r = $s->chat('a b');
is $r->{status}, 429, 'over budget: 429';
is $r->{json}{error}{type}, 'rate_limit_exceeded', '429 type';
like $r->{json}{error}{message}, qr/rate limit/, '429 message mentions rate limit';
like $r->{headers}{'retry-after'}, qr/^[1-9]\d*$/, 'Retry-After is a positive integer';
ok $r->{headers}{'retry-after'} <= 3, 'Retry-After within the (scaled) window';
is $s->chat('a b', model => $FAST)->{status}, 200, 'Fast id has its own budget';
is $s->chat('a b', model => 'accounts/fireworks/models/other')->{status}, 200, 'other model has its own budget';
is $s->stats->{paths}{standard}{rate_limited}, 2, 'stats: rate_limited (the probe and the check)';
is $s->log(1)->[0]{outcome}, 'ok', 'log keeps going';

sleep 2.6;
is $s->chat('a b')->{status}, 200, 'next window: served again';

# generated tokens: counted when requests finish
$s->control('reset');
$s->control('config', { prompt_tpm => 0, generated_tpm => 120 });
$r = $s->chat('[fwsim:words=99]');            # 100 completion tokens
is $r->{status}, 200, 'generated: first request';
is $r->{headers}{'x-ratelimit-limit-tokens-generated'}, 2, 'generated per-second limit 120/60';
is $s->chat('[fwsim:words=29]')->{status}, 200, 'generated: 100 < 120, still admitted';
$r = $s->chat('x');
is $r->{status}, 429, 'generated: budget spent -> 429';
ok $r->{headers}{'retry-after'} >= 1, 'generated: Retry-After';

# uncached prompt tokens: prompt caching stretches the budget
$s->control('reset');
$s->control('config', { prompt_tpm => 0, uncached_prompt_tpm => 40 });
my $long = join ' ', map { "word$_" } 1 .. 27;   # 27 + 3 = 30 tokens
$r = $s->chat($long, headers => { 'x-session-affinity' => 'sess' });
is $r->{status}, 200, 'uncached: first 30 tokens';
is $r->{headers}{'x-ratelimit-limit-tokens-cache-adjusted-prompt'}, 1, 'cache-adjusted limit header';
$r = $s->chat($long, headers => { 'x-session-affinity' => 'sess' });
is $r->{status}, 200, 'uncached: same prompt again is mostly cached';
is $r->{headers}{'fireworks-cached-prompt-tokens'}, 27, 'uncached: 27 cached';
is $s->chat($long, headers => { 'x-session-affinity' => 'other' })->{status}, 429, 'uncached: a cold key blows the budget';

is $s->stop, 0, 'clean stop';
done_testing;
