# Congestion schedules (--schedule FILE): the step function, the share of
# Standard shed (seeded: the same run sheds the same requests), Priority never shed, time scaling, clock restart,
# bad files refused with the line number, and the shipped traces' figures.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib";
use FwSim;
use Test::More;
use File::Temp qw(tempdir);
use Time::HiRes qw(time sleep);

my $dir = tempdir(CLEANUP => 1);
sub write_file { my ($name, $text) = @_; open my $fh, '>', "$dir/$name" or die; print $fh $text; close $fh; "$dir/$name" }

# outcome counts of n Standard (or Priority) requests
sub shed_count {
    my ($s, $n, %o) = @_;
    my $shed = 0;
    for (1 .. $n) {
        my $r = $s->chat('hi', %o);
        $shed++ if $r->{status} == 503 && $r->{content} =~ /Overloaded/;
    }
    return $shed;
}

# --- a step function: 25% from 0 s, 100% for one model from 4 s, 0 from 8 s
# (time_scale 1: one trace second lasts 1 s) ---------------------------
my $f = write_file('steps.sched', <<"S");
# comment line
0     *                  0.25   # a quarter of Standard, every model
4     $FwSim::STD        1.0
8     *                  0
10    *                  0
S
my $s = FwSim->start('--schedule', $f, '--time-scale', '1', '--ttft-ms', '0', '--tps', '1000000');
my $sch = $s->get('/control/schedule')->{json};
is $sch->{entries}, 4, 'four entries';
is $sch->{duration_s}, 10, 'duration is the last time';
is $sch->{scale}, 1, 'one trace second = time_scale real seconds';
ok $sch->{trace_time_s} < 1, "clock starts at startup ($sch->{trace_time_s})";
is $sch->{shed_fraction}, 0.25, 'the current fraction';
$s->control('schedule');    # restart: 4 s of 25% ahead
my $t0 = time;
my $n1 = shed_count($s, 60);
ok time - $t0 < 3.8, 'still in the first step' or diag sprintf('60 requests took %.2f s', time - $t0);
ok $n1 >= 3 && $n1 <= 30, "about 25% of 60 Standard requests shed ($n1)";
is shed_count($s, 8, tier => 'priority'), 0, 'Priority is never shed by the schedule';
my $st = $s->stats;
is $st->{paths}{standard}{overloaded}, $n1, 'sheds count as overloaded';
$s->control('schedule');    # the same seed again: the same sheds
is shed_count($s, 60), $n1, 'a restarted clock replays the same sheds';

# restart the clock at time_scale 0.5, wait into the model's 100% step
# (trace 4..8 s = real 2..4 s)
$s->control('config', { time_scale => 0.5 });
$s->control('schedule');
sleep 2.3;
$sch = $s->get('/control/schedule')->{json};
ok $sch->{trace_time_s} >= 4.5 && $sch->{trace_time_s} < 8, "trace time runs at 1/time_scale ($sch->{trace_time_s})";
is shed_count($s, 5), 5, 'the model line sheds every Standard request';
sleep 2.0;    # trace >= 8.5: the all-models 0 line
is shed_count($s, 10), 0, 'a later line ends it';

# /control/reset restarts the clock too (and time_scale back to 1)
$s->control('reset');
ok $s->get('/control/schedule')->{json}{trace_time_s} < 1, 'reset restarts the clock';
is shed_count($s, 60), $n1, 'back at 25%, the same sheds';
$s->stop;
$s = FwSim->start('--schedule', $f, '--time-scale', '1', '--ttft-ms', '0', '--tps', '1000000', '--seed', '7');
my $n7 = shed_count($s, 60);
ok $n7 >= 3 && $n7 <= 30, "--seed 7: about 25% too ($n7)";
$s->stop;

# --- time_scale 0: real time -------------------------------------------------
$s = FwSim->start('--schedule', $f, '--time-scale', '0');
is $s->get('/control/schedule')->{json}{scale}, 1, 'time_scale 0: one trace second is one second';
$s->stop;

# --- no schedule: nothing shed, endpoint answers -------------------------------
$s = FwSim->start('--time-scale', '0');
is $s->get('/control/schedule')->{json}{entries}, 0, 'no schedule: no entries';
is shed_count($s, 5), 0, 'no schedule: nothing shed';
$s->stop;

# --- bad files: exit 2 with file:line ---------------------------------------------
my $bin = $FwSim::BIN;
for my $case (
    [ "0 * 0.5\n1 * 1.5\n",  qr/:2: FRACTION/,  'fraction above 1' ],
    [ "5 * 0\n1 * 0\n",      qr/:2: times must not decrease/, 'decreasing times' ],
    [ "0 *\n",               qr/:1: expected TIME_S MODEL FRACTION/, 'missing column' ],
    [ "x * 0\n",             qr/:1: TIME_S/,    'non-numeric time' ],
    [ "# only a comment\n",  qr/no entries/,    'empty schedule' ],
  )
{
    my ($text, $re, $name) = @$case;
    my $p = write_file('bad.sched', $text);
    my $err = `$bin --port 0 --schedule $p 2>&1 >/dev/null`;
    is $? >> 8, 2, "$name: exit 2";
    like $err, $re, "$name: says where";
}
my $err = `$bin --port 0 --schedule $dir/missing.sched 2>&1 >/dev/null`;
is $? >> 8, 2, 'missing file: exit 2';

# --- the shipped traces: shapes and the day's average ------------------------------
my $traces = "$FindBin::Bin/../../../bench/economics/traces";
sub steps {
    my ($file) = @_;
    open my $fh, '<', $file or die "$file: $!";
    my @e;
    while (<$fh>) { s/#.*//; my @c = split; push @e, [@c] if @c == 3; }
    return @e;
}
sub mean_shed {
    my @e = @_;
    my $sum = 0;
    for my $i (0 .. $#e - 1) { $sum += ($e[$i + 1][0] - $e[$i][0]) * $e[$i][2]; }
    return $sum / $e[-1][0];
}
sub shed_time { my @e = @_; my $t = 0; for my $i (0 .. $#e - 1) { $t += $e[$i + 1][0] - $e[$i][0] if $e[$i][2] > 0 } $t }
SKIP: {
    skip 'bench/economics/traces not found', 8 unless -d $traces;
    my @day = steps("$traces/day.sched");
    is $day[-1][0], 86400, 'day: 24 hours';
    ok abs(mean_shed(@day) - 0.00082) < 1e-7, sprintf('day: Standard shed averages 0.082%% (%.5f%%)', 100 * mean_shed(@day));
    my @burst = steps("$traces/burst.sched");
    is shed_time(@burst), 120, 'burst: one 2-minute burst';
    my @plateau = steps("$traces/plateau.sched");
    is shed_time(@plateau), 2700, 'plateau: 45 minutes';
    my @flap = steps("$traces/flapping.sched");
    is $flap[-1][0], 7200, 'flapping: 2 hours';
    is scalar(grep { $_->[2] > 0 } @flap), 12, 'flapping: 12 bursts (one every 10 minutes)';
    is shed_time(@flap), 720, 'flapping: each 1 minute';
    # every shipped trace loads
    my $ok = 1;
    for my $t (qw(burst plateau flapping day)) {
        my $x = FwSim->start('--schedule', "$traces/$t.sched", '--time-scale', '0');
        $ok &&= $x->get('/control/schedule')->{json}{entries} > 0;
        $x->stop;
    }
    ok $ok, 'fwsim loads every shipped trace';
}

done_testing;
