package FwSim;
# A server that closes a misbehaving client mid-write must make the
# write fail, not kill the test process.
$SIG{PIPE} = 'IGNORE';
# Test helper for fwsim: start/stop a private instance, talk HTTP to it.
# Core Perl only (HTTP::Tiny, JSON::PP, IO::Socket::INET, Time::HiRes).
use strict;
use warnings;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use File::Spec;
use HTTP::Tiny;
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

our $BIN = $ENV{FWSIM_BIN}
  || File::Spec->rel2abs(File::Spec->catfile(dirname(__FILE__), '..', '..', 'fwsim'));
our $JSON = JSON::PP->new->utf8->canonical->allow_nonref;

our $STD  = 'accounts/fireworks/models/kimi-k2p6';
our $FAST = 'accounts/fireworks/routers/kimi-k2p6-turbo';

# start(@extra_args): fwsim on an ephemeral port, quiet, stderr to a file.
sub start {
    my ($class, @args) = @_;
    die "fwsim binary not built: $BIN\n" unless -x $BIN;
    my $dir = tempdir('fwsim-t-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my $pf  = "$dir/port";
    my $pid = fork() // die "fork: $!";
    if (!$pid) {
        open STDOUT, '>', "$dir/stdout" or die;
        open STDERR, '>', "$dir/stderr" or die;
        exec $BIN, '--port', '0', '--port-file', $pf, '--quiet', @args;
        die "exec: $!";
    }
    my $deadline = time + 10;
    sleep 0.02 until -s $pf || time > $deadline || waitpid($pid, WNOHANG) == $pid;
    die "fwsim did not start\n" unless -s $pf;
    open my $fh, '<', $pf or die;
    chomp(my $port = <$fh>);
    my $self = bless {
        pid => $pid, owner => $$, port => $port, dir => $dir,
        http => HTTP::Tiny->new(timeout => 30, keep_alive => 1),
    }, $class;
    return $self;
}

sub port { $_[0]{port} }
sub url  { "http://127.0.0.1:$_[0]{port}$_[1]" }

sub stdout_text { local $/; open my $fh, '<', "$_[0]{dir}/stdout" or return ''; <$fh> }

# stop(): SIGTERM, wait, return the exit status (undef if already gone).
sub stop {
    my ($self) = @_;
    return undef unless $self->{pid};
    kill 'TERM', $self->{pid};
    my $deadline = time + 10;
    my $r;
    while (($r = waitpid($self->{pid}, WNOHANG)) == 0 && time < $deadline) { sleep 0.02 }
    if ($r == 0) { kill 'KILL', $self->{pid}; waitpid($self->{pid}, 0); }
    my $status = $?;
    delete $self->{pid};
    return $r == 0 ? -1 : $status >> 8;
}

# only the process that started fwsim stops it (forked children must not)
sub DESTROY { my $s = shift; local $?; $s->stop if $s->{pid} && $s->{owner} == $$ }

sub _decode {
    my ($res) = @_;
    $res->{json} = eval { $JSON->decode($res->{content}) } if defined $res->{content};
    return $res;
}

# post($path, $body, \%headers): $body is a hashref (encoded) or a string.
sub post {
    my ($self, $path, $body, $headers) = @_;
    my $content = ref $body ? $JSON->encode($body) : $body;
    return _decode($self->{http}->request('POST', $self->url($path), {
        content => $content,
        headers => { 'content-type' => 'application/json', %{ $headers || {} } },
    }));
}

sub get { my ($self, $path) = @_; _decode($self->{http}->request('GET', $self->url($path))) }

# chat($content_or_body, %opts): one user message unless a hashref body is given.
sub chat {
    my ($self, $what, %o) = @_;
    my $body = ref $what ? $what : {
        model => $o{model} // $STD,
        messages => [ { role => 'user', content => $what } ],
        (exists $o{tier} ? (service_tier => $o{tier}) : ()),
        (exists $o{max_tokens} ? (max_tokens => $o{max_tokens}) : ()),
        (exists $o{user} ? (user => $o{user}) : ()),
    };
    return $self->post('/inference/v1/chat/completions', $body, $o{headers});
}

sub control { my ($self, $path, $body) = @_; $self->post("/control/$path", $body // {}) }
sub stats   { $_[0]->get('/control/stats')->{json} }
sub log     { $_[0]->get('/control/log?limit=' . ($_[1] // 100))->{json}{requests} }

sub chat_request_bytes {
    my ($self, $body, %h) = @_;
    my $content = ref $body ? $JSON->encode($body) : $body;
    my $hdr = join '', map { "$_: $h{$_}\r\n" } sort keys %h;
    return "POST /inference/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
      . "Content-Type: application/json\r\nConnection: close\r\n$hdr"
      . "Content-Length: " . length($content) . "\r\n\r\n$content";
}

# parallel(\@raw_requests, $timeout): sends every request on its own
# connection at once, then reads each until EOF.  Returns one hashref per
# request: status, headers (lower-case keys), body, elapsed, eof, error.
sub parallel {
    my ($self, $reqs, $timeout) = @_;
    $timeout //= 30;
    my $t0 = time;
    my (@res, %by_fh);
    my $sel = IO::Select->new;
    for my $i (0 .. $#$reqs) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->{port},
                                      Proto => 'tcp', Timeout => 10);
        $res[$i] = { raw => '', error => $s ? undef : "connect: $!" };
        next unless $s;
        $s->autoflush(1);
        $by_fh{fileno $s} = [$i, $s];
        $sel->add($s);
    }
    for my $e (values %by_fh) {   # send all requests after all connects
        my ($i, $s) = @$e;
        my $ok = print {$s} $reqs->[$i];
        $res[$i]{error} = "send: $!" unless $ok;
    }
    while ($sel->count && time - $t0 < $timeout) {
        for my $s ($sel->can_read(0.5)) {
            my ($i) = @{ $by_fh{fileno $s} };
            my $n = sysread($s, my $buf, 65536);
            if ($n) { $res[$i]{raw} .= $buf; next }
            $res[$i]{error} = "read: $!" unless defined $n;
            $res[$i]{eof} = 1;
            $res[$i]{elapsed} = time - $t0;
            $sel->remove($s);
            close $s;
        }
    }
    for my $s ($sel->handles) { my ($i) = @{ $by_fh{fileno $s} }; $res[$i]{error} //= 'timeout'; close $s }
    parse_response($_) for @res;
    return @res;
}

sub parse_response {
    my ($r) = @_;
    my ($head, $body) = split /\r\n\r\n/, $r->{raw}, 2;
    return $r unless defined $head && $head =~ m{^HTTP/1\.[01] (\d{3})};
    $r->{status} = $1;
    for (split /\r\n/, $head) { $r->{headers}{lc $1} = $2 if /^([^:]+):\s*(.*)$/ }
    $r->{body} = $body // '';
    $r->{json} = eval { $JSON->decode($r->{body}) };
    return $r;
}

sub JSON { $JSON }
sub raw { my ($self, $bytes, $timeout) = @_; ($self->parallel([$bytes], $timeout))[0] }

1;
