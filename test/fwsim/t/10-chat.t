# Chat completions: body, headers, determinism, max_tokens, paths, validation.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;

my $s = FwSim->start('--time-scale', '0');
my ($STD, $FAST) = ($FwSim::STD, $FwSim::FAST);

# --- success: body and headers -------------------------------------------
my $body = {
    model => $STD,
    messages => [
        { role => 'system', content => 'You are terse.' },
        { role => 'user', content => "  Hello,\n\t big   world  [fwsim:slow=1] again " },
    ],
    temperature => 0.2, response_format => { type => 'text' }, extra_field => [1, 2],
};
my $r = $s->post('/inference/v1/chat/completions', $body);
is $r->{status}, 200, 'standard request: 200';
like $r->{headers}{'content-type'}, qr{^application/json}, 'JSON content type';
my $j = $r->{json};
ok $j, 'body is JSON';
like $j->{id}, qr/^fwsim-[0-9a-f]{16}$/, 'id format';
is $j->{object}, 'chat.completion', 'object';
like $j->{created}, qr/^\d+$/, 'created is unix seconds';
ok abs($j->{created} - time) < 120, 'created is now';
is $j->{model}, $STD, 'model echoed as sent';
is scalar @{ $j->{choices} }, 1, 'one choice';
is $j->{choices}[0]{index}, 0, 'choice index';
is $j->{choices}[0]{message}{role}, 'assistant', 'role';
is $j->{choices}[0]{message}{content}, 'Echo: Hello, big world again', 'content: echo, directive removed, whitespace collapsed';
is $j->{choices}[0]{finish_reason}, 'stop', 'finish_reason stop';
# prompt: "You are terse." 3 words + 3; user text 5 words (the directive counts) + 3
is_deeply $j->{usage}, { prompt_tokens => 14, completion_tokens => 5, total_tokens => 19,
                         prompt_tokens_details => { cached_tokens => 0 } }, 'usage';
is $r->{headers}{'fireworks-prompt-tokens'}, 14, 'fireworks-prompt-tokens header';
is $r->{headers}{'fireworks-cached-prompt-tokens'}, 0, 'fireworks-cached-prompt-tokens header';
is $r->{headers}{'x-request-id'}, $j->{id}, 'x-request-id matches id';
ok !exists $r->{headers}{'x-ratelimit-limit-tokens-prompt'}, 'no rate-limit headers without limits';

# --- determinism, unique ids --------------------------------------------
my $r2 = $s->post('/inference/v1/chat/completions', $body);
is $r2->{json}{choices}[0]{message}{content}, $j->{choices}[0]{message}{content}, 'same request, same text';
is_deeply $r2->{json}{usage}, $j->{usage}, 'same request, same usage';
isnt $r2->{json}{id}, $j->{id}, 'ids are unique per request';

# --- max_tokens -----------------------------------------------------------
$r = $s->chat('one two three four five', max_tokens => 3);
is $r->{json}{choices}[0]{message}{content}, 'Echo: one two', 'max_tokens keeps the first N words';
is $r->{json}{choices}[0]{finish_reason}, 'length', 'finish_reason length';
is $r->{json}{usage}{completion_tokens}, 3, 'completion_tokens = max_tokens';
$r = $s->chat('one two', max_tokens => 3);
is $r->{json}{choices}[0]{finish_reason}, 'stop', 'max_tokens equal to the word count: stop';
$r = $s->chat('x [fwsim:words=10]', max_tokens => 4);
is $r->{json}{choices}[0]{message}{content}, 'Echo: w1 w2 w3', 'words=N capped by max_tokens';
is $r->{json}{choices}[0]{finish_reason}, 'length', 'words=N cut: length';
$r = $s->chat('[fwsim:words=5]');
is $r->{json}{choices}[0]{message}{content}, 'Echo: w1 w2 w3 w4 w5', 'words=N';
is $r->{json}{usage}{completion_tokens}, 6, 'words=N: N+1 tokens';

# --- content forms and JSON decoding ---------------------------------------
$r = $s->post('/v1/chat/completions', '{"model":"' . $STD . '","messages":[{"role":"user","content":'
    . '[{"type":"text","text":"caf\u00e9"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"\ud83d\ude00 \"q\" \\\\ a\/b"}]}]}');
is $r->{status}, 200, '/v1 alias and content parts';
is $r->{json}{choices}[0]{message}{content}, "Echo: caf\x{e9} \x{1f600} \"q\" \\ a/b", 'escapes, \u and surrogate pairs round-trip';
$r = $s->post('/v1/chat/completions', { model => $STD, messages => [
    { role => 'user', content => 'first question' }, { role => 'assistant', content => undef },
    { role => 'user', content => "tab\there \x01 ctl" } ] });
is $r->{json}{choices}[0]{message}{content}, "Echo: tab here \x01 ctl", 'last user message wins; control chars escaped';
like $r->{content}, qr/\\u0001/, 'control character escaped as \u0001';

# --- the three paths --------------------------------------------------------
for my $case ([undef, 'standard'], ['default', 'standard'], ['auto', 'standard'], ['priority', 'priority']) {
    my ($tier, $path) = @$case;
    $r = $s->chat('hi', defined $tier ? (tier => $tier) : ());
    is $r->{status}, 200, 'tier ' . ($tier // 'none') . ': 200';
}
$r = $s->chat('hi', model => $FAST);
is $r->{status}, 200, 'fast model: 200';
is $r->{json}{model}, $FAST, 'fast model echoed';
my $log = $s->log(6);
is_deeply [ map { $_->{path} } @$log[-5..-1] ], [qw(standard standard standard priority fast)], 'paths recorded in the log';
is_deeply [ map { $_->{service_tier} } @$log[-5..-1] ], [undef, 'default', 'auto', 'priority', undef], 'service_tier as sent';

# --- validation ---------------------------------------------------------------
my @bad = (
    [ { model => $FAST, service_tier => 'priority', messages => [ { role => 'user', content => 'x' } ] }, 400, qr/cannot be combined/, 'priority on a Fast model' ],
    [ { model => $STD, service_tier => 'flex', messages => [ { role => 'user', content => 'x' } ] }, 400, qr/service_tier/, 'unknown service_tier' ],
    [ { model => $STD, service_tier => 7, messages => [ { role => 'user', content => 'x' } ] }, 400, qr/service_tier/, 'non-string service_tier' ],
    [ { model => 'gpt-4o', messages => [ { role => 'user', content => 'x' } ] }, 404, qr/not found/i, 'model outside accounts/fireworks' ],
    [ { model => 'accounts/fireworks/models/', messages => [ { role => 'user', content => 'x' } ] }, 404, qr/not found/i, 'empty model name' ],
    [ { messages => [ { role => 'user', content => 'x' } ] }, 400, qr/model/, 'missing model' ],
    [ { model => $STD }, 400, qr/messages/, 'missing messages' ],
    [ { model => $STD, messages => [] }, 400, qr/messages/, 'empty messages' ],
    [ { model => $STD, messages => [ { content => 'x' } ] }, 400, qr/role/, 'message without role' ],
    [ { model => $STD, messages => [ { role => 'user', content => 5 } ] }, 400, qr/content/, 'numeric content' ],
    [ { model => $STD, messages => [ { role => 'user', content => 'x' } ], stream => JSON::PP::true }, 400, qr/streaming not supported by fwsim/, 'stream true' ],
    [ { model => $STD, messages => [ { role => 'user', content => 'x' } ], max_tokens => 0 }, 400, qr/max_tokens/, 'max_tokens 0' ],
    [ { model => $STD, messages => [ { role => 'user', content => 'x' } ], max_tokens => 2.5 }, 400, qr/max_tokens/, 'fractional max_tokens' ],
    [ { model => $STD, messages => [ { role => 'user', content => 'x' } ], temperature => 'hot' }, 400, qr/temperature/, 'bad temperature' ],
    [ { model => $STD, messages => [ { role => 'user', content => 'x [fwsim:nosuch]' } ] }, 400, qr/unknown fwsim directive/, 'unknown directive' ],
    [ { model => $STD, messages => [ { role => 'user', content => 'x [fwsim:status=abc]' } ] }, 400, qr/status/, 'bad directive argument' ],
    [ '{"model":', 400, qr/invalid JSON/, 'truncated JSON' ],
    [ '{"model":"a",}', 400, qr/invalid JSON/, 'trailing comma' ],
    [ '{"model":"\x"}', 400, qr/invalid JSON/, 'bad escape' ],
    [ '{"a":01}', 400, qr/invalid JSON/, 'leading zero' ],
    [ '[1,2]', 400, qr/object/, 'array body' ],
    [ '{} x', 400, qr/invalid JSON/, 'trailing garbage' ],
    [ ('[' x 100) . (']' x 100), 400, qr/invalid JSON body: nesting too deep/, 'deep nesting rejected' ],
    [ '', 400, qr/invalid JSON/, 'empty body' ],
);
for my $case (@bad) {
    my ($b, $status, $re, $name) = @$case;
    $r = $s->post('/inference/v1/chat/completions', $b);
    is $r->{status}, $status, "$name: $status";
    like $r->{json}{error}{message} // '', $re, "$name: message";
    my $type = $status == 404 ? 'not_found' : 'invalid_request_error';
    is $r->{json}{error}{type}, $type, "$name: type";
    is $r->{json}{error}{code}, $type, "$name: code";
    is $r->{json}{error}{object}, 'error', "$name: object";
}

# --- routing -----------------------------------------------------------------
$r = $s->post('/inference/v1/completions', {});
is $r->{status}, 404, 'unknown path: 404';
is $r->{json}{error}{type}, 'not_found', 'unknown path: JSON error';
$r = $s->get('/inference/v1/chat/completions');
is $r->{status}, 405, 'GET on chat: 405';
is $r->{headers}{allow}, 'POST', 'Allow header';
$r = $s->post('/control/stats', {});
is $r->{status}, 405, 'POST on /control/stats: 405';

is $s->stop, 0, 'clean stop';
done_testing;
