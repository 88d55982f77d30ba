# Latency model, overlap of slow requests, and per-model congestion shedding.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;
use Time::HiRes qw(time sleep);
use POSIX ();

my ($STD, $FAST) = ($FwSim::STD, $FwSim::FAST);
sub req { my ($s, %b) = @_; $s->chat_request_bytes({ model => $STD, messages => [ { role => 'user', content => 'hi' } ], %b }) }

# --- latency: ttft + words / tps; Fast is twice as fast ---------------------
my $s = FwSim->start('--ttft-ms', '100', '--tps', '20');
my $t0 = time;
is $s->chat('[fwsim:words=9]')->{status}, 200, 'latency request';
my $dt = time - $t0;                          # 100 ms + 10 words / 20 tps = 600 ms
ok $dt >= 0.55 && $dt < 3, "standard latency ~600 ms ($dt)";
$t0 = time;
$s->chat('[fwsim:words=9]', model => $FAST);  # 100 + 10 / 40 = 350 ms
$dt = time - $t0;
ok $dt >= 0.3 && $dt < 0.55, "fast latency ~350 ms ($dt)";
$s->control('config', { time_scale => 0.5 });
$t0 = time;
$s->chat('[fwsim:words=9]');
$dt = time - $t0;
ok $dt >= 0.28 && $dt < 0.55, "time_scale 0.5 halves it ($dt)";

# --- 64 requests of ~100 ms overlap ---------------------------------------------
$s->control('config', { time_scale => 1, ttft_ms => 100, tps => 1000000 });
$t0 = time;
my @r = $s->parallel([ map { req($s) } 1 .. 64 ], 30);
$dt = time - $t0;
is scalar(grep { ($_->{status} // 0) == 200 } @r), 64, '64 concurrent requests all served';
ok $dt < 2.5, "64 x 100 ms overlap ($dt s, not 6.4 s)";
ok $s->stats->{peak_in_flight} >= 32, 'peak_in_flight shows the overlap';
$s->stop;

# --- congestion: capacity 2 -------------------------------------------------------
$s = FwSim->start('--capacity', '2', '--fast-capacity', '1', '--ttft-ms', '1000', '--tps', '1000000');
@r = $s->parallel([ map { req($s) } 1 .. 4 ], 30);
my @st = sort map { $_->{status} // 0 } @r;
is_deeply \@st, [200, 200, 503, 503], '4 concurrent Standard on capacity 2: exactly 2 shed';
for (grep { ($_->{status} // 0) == 503 } @r) {
    is $_->{json}{error}{type}, 'service_overloaded', 'shed with service_overloaded';
    ok $_->{elapsed} < 0.9, 'shed at once, before any latency';
}
my $st = $s->stats;
is $st->{paths}{standard}{overloaded}, 2, 'stats count the shed requests';
is $st->{paths}{standard}{ok}, 2, 'stats count the served requests';

# Standard holds both slots: Priority is still admitted, Standard is shed
my $pid = fork // die;
if (!$pid) {   # child: occupy the two slots for ~1 s
    my @x = $s->parallel([ req($s), req($s) ], 10);
    POSIX::_exit((grep { ($_->{status} // 0) == 200 } @x) == 2 ? 0 : 1);
}
sleep 0.3;
@r = $s->parallel([ req($s, service_tier => 'priority'), req($s, service_tier => 'priority'), req($s) ], 30);
is $r[0]{status}, 200, 'priority admitted while standard is full (1)';
is $r[1]{status}, 200, 'priority admitted while standard is full (2)';
is $r[2]{status}, 503, 'standard shed while the pool is full';
waitpid $pid, 0;
is $? >> 8, 0, 'the standard requests holding the pool were served';

# Priority is shed only when its own in-flight count reaches capacity
@r = $s->parallel([ map { req($s, service_tier => 'priority') } 1 .. 3 ], 30);
is_deeply [ sort map { $_->{status} // 0 } @r ], [200, 200, 503], 'three priority on capacity 2: one shed';

# Fast has its own pool per model id
@r = $s->parallel([ req($s, model => $FAST), req($s, model => $FAST), req($s), req($s) ], 30);
my @fast = sort map { $_->{status} // 0 } @r[0, 1];
my @std  = sort map { $_->{status} // 0 } @r[2, 3];
is_deeply \@fast, [200, 503], 'fast-capacity 1: second Fast shed';
is_deeply \@std, [200, 200], 'Fast traffic does not use the Standard pool';
is $s->stats->{in_flight}, 0, 'nothing left in flight';
is $s->stop, 0, 'clean stop';
done_testing;
