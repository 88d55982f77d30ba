# Command line: bad options exit 2 with one clear line; start-up contract.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;
use IPC::Open3;
use Symbol qw(gensym);

sub run_fwsim {
    my @args = @_;
    my $err = gensym;
    my $pid = open3(my $in, my $out, $err, $FwSim::BIN, @args);
    close $in;
    local $/;
    my $o = <$out> // '';
    my $e = <$err> // '';
    waitpid $pid, 0;
    return ($? >> 8, $o, $e);
}

my @bad = (
    [ ['--port'],                           qr/^fwsim: --port: missing value$/ ],
    [ [],                                   qr/^fwsim: --port is required/ ],
    [ ['--port', 'abc'],                    qr/^fwsim: --port: expected a non-negative integer, got "abc"$/ ],
    [ ['--port', '70000'],                  qr/^fwsim: --port: expected an integer between 0 and 65535, got "70000"$/ ],
    [ ['--port', '-1'],                     qr/^fwsim: --port: expected a non-negative integer, got "-1"$/ ],
    [ ['--port', '0', '--tps', 'abc'],      qr/^fwsim: --tps: expected a positive integer, got "abc"$/ ],
    [ ['--port', '0', '--tps', '0'],        qr/^fwsim: --tps: expected an integer between 1 and/ ],
    [ ['--port', '0', '--tps'],             qr/^fwsim: --tps: missing value$/ ],
    [ ['--port', '0', '--capacity', '-3'],  qr/^fwsim: --capacity: expected a positive integer, got "-3"$/ ],
    [ ['--port', '0', '--fast-capacity', 'x'], qr/^fwsim: --fast-capacity: expected a positive integer/ ],
    [ ['--port', '0', '--ttft-ms', '1.5'],  qr/^fwsim: --ttft-ms: expected a non-negative integer, got "1.5"$/ ],
    [ ['--port', '0', '--time-scale', 'fast'], qr/^fwsim: --time-scale: expected a non-negative number, got "fast"$/ ],
    [ ['--port', '0', '--time-scale', '-1'], qr/^fwsim: --time-scale: expected a number between 0 and 1000, got "-1"$/ ],
    [ ['--port', '0', '--prompt-tpm', ''],  qr/^fwsim: --prompt-tpm: expected a non-negative integer, got ""$/ ],
    [ ['--port', '0', '--uncached-prompt-tpm', '1e3'], qr/^fwsim: --uncached-prompt-tpm: expected a non-negative integer/ ],
    [ ['--port', '0', '--generated-tpm', '-5'], qr/^fwsim: --generated-tpm: expected a non-negative integer/ ],
    [ ['--port', '0', '--max-body', '0'],   qr/^fwsim: --max-body: expected an integer between 1 and/ ],
    [ ['--port', '0', '--host', '0.0.0.0'], qr/^fwsim: --host: only loopback addresses are allowed, got "0.0.0.0"$/ ],
    [ ['--port', '0', '--host', '192.168.1.1'], qr/^fwsim: --host: only loopback/ ],
    [ ['--port', '0', '--host', 'example.com'], qr/^fwsim: --host: expected a loopback IP address/ ],
    [ ['--port', '0', '--api-key', ''],     qr/^fwsim: --api-key: expected a non-empty key$/ ],
    [ ['--port', '0', '--bogus'],           qr/^fwsim: unknown option "--bogus"/ ],
    [ ['--port', '0', 'stray'],             qr/^fwsim: unexpected argument "stray"/ ],
    [ ['--port=abc'],                       qr/^fwsim: --port: expected a non-negative integer, got "abc"$/ ],
);
for my $case (@bad) {
    my ($args, $re) = @$case;
    my ($rc, $out, $err) = run_fwsim(@$args);
    my $name = "fwsim @$args";
    is $rc, 2, "$name exits 2";
    my @lines = split /\n/, $err;
    is scalar(@lines), 1, "$name prints one line";
    like $lines[0] // '', $re, "$name message";
    is $out, '', "$name prints nothing on stdout";
}

my ($rc, $out, $err) = run_fwsim('--help');
is $rc, 0, '--help exits 0';
like $out, qr/^usage: fwsim --port N/, '--help prints usage';
like $out, qr/--fast-capacity/, 'usage lists the options';

# start-up line, port file, clean stop on SIGTERM
my $s = FwSim->start;
ok $s->port > 0, 'ephemeral port written to the port file';
like $s->stdout_text, qr/^fwsim listening on 127\.0\.0\.1:(\d+)\n\z/, 'exactly one start-up line';
my ($p) = $s->stdout_text =~ /:(\d+)$/m;
is $p, $s->port, 'start-up line and port file agree';
is $s->get('/control/health')->{status}, 200, 'answers';
is $s->stop, 0, 'SIGTERM: exit 0';

# SIGINT too, and --key=value syntax
$s = FwSim->start('--tps=100', '--host', 'localhost');
is $s->get('/control/config')->{json}{config}{tps}, 100, '--opt=value form accepted';
kill 'INT', $s->{pid};
waitpid $s->{pid}, 0;
is $? >> 8, 0, 'SIGINT: exit 0';
delete $s->{pid};

done_testing;
