# Control API: rules (count, duration, path, model), config, stats, log, reset.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;
use Time::HiRes qw(time sleep);

my $s = FwSim->start('--time-scale', '0', '--api-key', 'sekret');
my ($STD, $FAST) = ($FwSim::STD, $FwSim::FAST);
my %auth = (headers => { Authorization => 'Bearer sekret' });

# count rule, default path any
my $r = $s->control('rules', { fault => 'overloaded', count => 2 });
is $r->{status}, 200, 'rule accepted';
is_deeply $r->{json}, { ok => JSON::PP::true, rule => 0 }, 'rule index 0';
is $s->chat('a', %auth)->{json}{error}{type}, 'service_overloaded', 'rule 1/2: overloaded';
is $s->chat('a', %auth, tier => 'priority')->{json}{error}{type}, 'service_overloaded', 'rule 2/2: overloaded (path any)';
is $s->chat('a', %auth)->{status}, 200, 'rule used up';

# path and model filters, rules in order
is $s->control('rules', { fault => 'unavailable', count => 1, path => 'fast' })->{json}{rule}, 1, 'rule 1';
is $s->control('rules', { fault => 'status', status => 402, count => 1, model => 'accounts/fireworks/models/other' })->{json}{rule}, 2, 'rule 2';
is $s->control('rules', { fault => 'ratelimit', retry_after => 9, count => 1, path => 'priority' })->{json}{rule}, 3, 'rule 3';
is $s->chat('a', %auth)->{status}, 200, 'standard request matches no rule';
$r = $s->chat('a', %auth, model => $FAST);
is $r->{json}{error}{type}, 'service_unavailable', 'fast rule hit';
is $s->chat('a', %auth, model => $FAST)->{status}, 200, 'fast rule used up';
is $s->chat('a', %auth, model => 'accounts/fireworks/models/other')->{status}, 402, 'model rule hit';
$r = $s->chat('a', %auth, tier => 'priority');
is $r->{status}, 429, 'priority rule hit';
is $r->{headers}{'retry-after'}, 9, 'rule retry_after';

# "overload" in a rule means Standard only by default
$s->control('rules', { fault => 'overload', count => 1 });
is $s->chat('a', %auth, tier => 'priority')->{status}, 200, 'overload rule skips priority';
is $s->chat('a', %auth)->{status}, 503, 'overload rule hits standard';

# duration rule: an outage for 1.5 s
$s->control('rules', { fault => 'unavailable', duration_ms => 1500 });
my $t0 = time;
my ($hits, $after) = (0, 0);
for (1 .. 3) { $hits++ if $s->chat('a', %auth)->{status} == 503 }
is $hits, 3, 'duration rule: every request during the window fails (not consumed)';
sleep 1.6 - (time - $t0) if time - $t0 < 1.6;
is $s->chat('a', %auth)->{status}, 200, 'duration rule expired';

# body-shaping rules
$s->control('rules', { fault => 'no-usage', count => 1 });
ok !exists $s->chat('a', %auth)->{json}{usage}, 'no-usage rule';
$s->control('rules', { fault => 'slow', ms => 300, count => 1 });
$t0 = time;
$s->chat('a', %auth);
ok time - $t0 >= 0.28, 'slow rule';

# bad rules
for my $bad ({}, { fault => 'nope' }, { fault => 'status' }, { fault => 'status', status => 99 },
             { fault => 'unavailable', path => 'cheap' }, { fault => 'unavailable', count => 0 },
             { fault => 'unavailable', duration_ms => -5 }) {
    my $r = $s->control('rules', $bad);
    is $r->{status}, 400, 'bad rule rejected: ' . FwSim::JSON()->encode($bad);
    is $r->{json}{error}{type}, 'invalid_request_error', 'bad rule: JSON error';
}
is $s->post('/control/rules', 'not json')->{status}, 400, 'rules: invalid JSON 400';

# config
$r = $s->control('config', { ttft_ms => 5, tps => 1000, capacity => 3 });
is $r->{status}, 200, 'config accepted';
is $r->{json}{config}{capacity}, 3, 'config applied';
is $s->get('/control/config')->{json}{config}{ttft_ms}, 5, 'GET /control/config';
is $s->control('config', { capacity => 0 })->{status}, 400, 'config: capacity 0 rejected';
is $s->control('config', { colour => 1 })->{status}, 400, 'config: unknown key rejected';
is $s->control('config', { time_scale => -1 })->{status}, 400, 'config: negative time_scale rejected';

# stats
$s->control('stats/reset');
my $st = $s->stats;
is $st->{total}, 0, 'stats reset: total 0';
$s->chat('a', %auth);
$s->chat('b c', %auth, tier => 'priority');
$s->chat('[fwsim:overload]', %auth);
$s->chat('[fwsim:unavailable]', %auth, model => $FAST);
$s->chat('[fwsim:ratelimit]', %auth, model => $FAST);
$s->chat('[fwsim:status=400]', %auth);
$s->chat('[fwsim:status=500]', %auth);
$s->chat('x');     # no key: 401
$st = $s->stats;
is $st->{total}, 8, 'stats: total';
is $st->{in_flight}, 0, 'stats: in_flight';
ok $st->{peak_in_flight} >= 1, 'stats: peak';
is_deeply $st->{paths}{standard}, { ok => 1, overloaded => 1, unavailable => 0, rate_limited => 0, client_error => 2, other => 1 }, 'stats: standard';
is_deeply $st->{paths}{priority}, { ok => 1, overloaded => 0, unavailable => 0, rate_limited => 0, client_error => 0, other => 0 }, 'stats: priority';
is_deeply $st->{paths}{fast}, { ok => 0, overloaded => 0, unavailable => 1, rate_limited => 1, client_error => 0, other => 0 }, 'stats: fast';
is_deeply $st->{tokens}, { prompt => 4 + 5, cached => 0, completion => 2 + 3 }, 'stats: tokens of served requests';
$s->get('/control/stats');
is $s->stats->{total}, 8, 'control calls are not counted';

# log
my $log = $s->log(3);
is scalar @$log, 3, 'log limit';
is_deeply [ map { $_->{status} } @$log ], [400, 500, 401], 'log: oldest first, last N';
is $log->[2]{authorized}, JSON::PP::false, 'log: unauthorized flagged';
is $log->[0]{authorized}, JSON::PP::true, 'log: authorized flagged';
is $log->[1]{outcome}, 'other', 'log: outcome';
ok $log->[0]{seq} < $log->[1]{seq}, 'log: seq increases';
my @keys = sort keys %{ $log->[0] };
is_deeply \@keys, [sort qw(seq model path service_tier session_affinity user status outcome prompt_tokens completion_tokens cached_tokens authorized request_id)], 'log entry fields';
is $s->get('/control/log?limit=abc')->{status}, 400, 'log: bad limit';

# background load
$r = $s->control('load', { model => $STD, load => 3, duration_ms => 800 });
is $r->{status}, 200, 'load accepted';
is $s->chat('a', %auth)->{json}{error}{type}, 'service_overloaded', 'load: standard shed (0 + 3 >= 3)';
is $s->chat('a', %auth, tier => 'priority')->{status}, 200, 'load: priority admitted';
is $s->chat('a', %auth, model => 'accounts/fireworks/models/other')->{status}, 200, 'load: other model unaffected';
sleep 0.9;
is $s->chat('a', %auth)->{status}, 200, 'load expired';
is $s->control('load', { model => $STD, load => -1, duration_ms => 10 })->{status}, 400, 'load: bad value';

# reset restores everything
$s->control('rules', { fault => 'unavailable', count => 100 });
$s->control('load', { model => $STD, load => 99, duration_ms => 100000 });
is $s->control('reset')->{status}, 200, 'reset';
is $s->get('/control/config')->{json}{config}{capacity}, 64, 'reset: command-line config back';
is $s->chat('a', %auth)->{status}, 200, 'reset: rules and load gone';
is scalar @{ $s->log }, 1, 'reset: log cleared';
is $s->stats->{total}, 1, 'reset: counters cleared';

is $s->stop, 0, 'clean stop';
done_testing;
