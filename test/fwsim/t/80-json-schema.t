# response_format json_schema: a deterministic value of the schema, and the
# directives that spoil it (json-invalid, json-violate, json-cut).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;

my $s = FwSim->start('--time-scale', '0');
my $J = FwSim::JSON();

sub ask {
    my ($text, $schema, %o) = @_;
    return $s->chat({
        model => $FwSim::STD,
        messages => [ { role => 'user', content => $text } ],
        (exists $o{max_tokens} ? (max_tokens => $o{max_tokens}) : ()),
        response_format => $o{format}
          // { type => 'json_schema', json_schema => { name => 'answer', schema => $schema } },
    });
}

sub answer_of { my ($r) = @_; $r->{json}{choices}[0]{message}{content} }

my $person = {
    type => 'object',
    required => [ 'name', 'age' ],
    properties => {
        name => { type => 'string' },
        age => { type => 'integer' },
        height => { type => 'number' },
        tags => { type => 'array', items => { type => 'string', enum => [ 'x', 'y' ] } },
        nick => { type => [ 'null', 'string' ] },
        alive => { type => 'boolean' },
        none => { type => 'null' },
        address => { properties => { zip => { type => 'string' } } },
    },
};

# a value of the schema, derived from the prompt only
my $r = ask('tell me about bob', $person);
is $r->{status}, 200, 'json_schema answered';
my $content = answer_of($r);
my $v = eval { $J->decode($content) };
ok $v, 'the answer is JSON' or diag $content;
is_deeply $v, {
    name => 'Echo: tell me about bob', age => 4, height => 4.5, tags => ['x'],
    nick => 'Echo: tell me about bob', alive => JSON::PP::true, none => undef,
    address => { zip => 'Echo: tell me about bob' },
}, 'every property, typed: strings echo, integers count the words, enum takes its first value';
is $r->{json}{choices}[0]{finish_reason}, 'stop', 'finish_reason stop';
my $words = () = $content =~ /\S+/g;
is $r->{json}{usage}{completion_tokens}, $words, 'completion tokens are the words of the JSON';
is answer_of(ask('tell me about bob', $person)), $content, 'deterministic';
isnt answer_of(ask('tell me about ann', $person)), $content, 'and depends on the prompt';

# roots of every type
is answer_of(ask('a b', { type => 'integer' })), '2', 'integer root';
is answer_of(ask('a b', { type => 'array', items => { type => 'number' } })), '[2.5]', 'array of numbers';
is answer_of(ask('a', { type => 'array' })), '[]', 'array without items: empty';
is answer_of(ask('a', { enum => [ { k => [ 1, 'z' ] }, 2 ] })), '{"k":[1,"z"]}', 'enum: its first value, written back';
is answer_of(ask('a', {})), '"Echo: a"', 'no type: a string';
is answer_of(ask('a', { properties => { p => JSON::PP::true } })), '{"p":"Echo: a"}', 'properties imply an object';

# json-violate: the first required property goes missing, or the root type is wrong
$v = $J->decode(answer_of(ask('bob [fwsim:json-violate]', $person)));
ok !exists $v->{name} && exists $v->{age}, 'json-violate: first required property missing';
is answer_of(ask('x [fwsim:json-violate]', { type => 'integer' })), '12345.5', 'json-violate: integer root gets a fraction';
is answer_of(ask('x [fwsim:json-violate]', { type => 'number' })), '"fwsim: not of the schema"', 'number root gets a string';

# json-invalid: prose around the JSON
$content = answer_of(ask('bob [fwsim:json-invalid]', $person));
like $content, qr/^Sure! Here is the JSON you asked for: \{/, 'json-invalid: prose first';
ok !eval { $J->decode($content); 1 }, 'json-invalid: not JSON';

# json-cut and max_tokens: cut, finish_reason length
$r = ask('bob [fwsim:json-cut]', $person);
is $r->{json}{choices}[0]{finish_reason}, 'length', 'json-cut: finish_reason length';
ok !eval { $J->decode(answer_of($r)); 1 }, 'json-cut: the JSON is incomplete';
$r = ask('one two three four five', { type => 'object', properties => { a => {}, b => {} } }, max_tokens => 3);
is $r->{json}{choices}[0]{finish_reason}, 'length', 'max_tokens below the JSON: length';
is $r->{json}{usage}{completion_tokens}, 3, 'max_tokens words kept';
ok !eval { $J->decode(answer_of($r)); 1 }, 'max_tokens cut the JSON';
$r = $s->chat('plain [fwsim:json-cut] text here');
is $r->{json}{choices}[0]{finish_reason}, 'length', 'json-cut on a plain answer too';
is answer_of($r), 'Echo: plai', 'half of its bytes';

# other formats keep the echo; a json_schema request must be well formed
is answer_of(ask('hi', undef, format => { type => 'json_object' })), 'Echo: hi', 'json_object: echo';
for my $bad ({ type => 'json_schema' }, { type => 'json_schema', json_schema => { name => 'a' } },
             { type => 'json_schema', json_schema => { name => 'a', schema => 'x' } },
             { type => 'json_schema', json_schema => { schema => {} } }) {
    $r = ask('hi', undef, format => $bad);
    is $r->{status}, 400, 'malformed json_schema: 400 (' . $J->encode($bad) . ')';
}

# the directives work as control rules too, once each
is $s->control('rules', { fault => 'json-invalid', count => 1 })->{status}, 200, 'json-invalid rule';
like answer_of(ask('r', $person)), qr/^Sure!/, 'rule applies once';
ok eval { $J->decode(answer_of(ask('r', $person))); 1 }, 'then a good answer';

# bounded: a schema whose answer would pass 4 MiB is refused
my $wide = { type => 'object', properties => { map { ("p$_" => { type => 'string' }) } 1 .. 100 } };
my $deep = { type => 'array', items => $wide };
$deep = { type => 'object', properties => { map { ("q$_" => $deep) } 1 .. 100 } };
$r = ask('x' x 1000, $deep);
is $r->{status}, 400, 'a huge answer is refused';
like $r->{json}{error}{message}, qr/4 MiB/, 'and says why';

done_testing;
