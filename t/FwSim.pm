# Start and drive the project's Fireworks simulator from TAP tests.
package FwSim;
use strict;
use warnings;
use HTTP::Tiny;
use JSON::PP;
use File::Temp qw(tempdir);
use Time::HiRes qw(usleep);

sub start
{
	my ($class, @args) = @_;
	my $bin = $ENV{FWSIM} or die "FWSIM is not set";
	my $dir = tempdir(CLEANUP => 1);
	my $portfile = "$dir/port";
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDOUT, '>', '/dev/null');
		exec($bin, '--port', '0', '--port-file', $portfile, '--quiet', @args)
		  or die "exec $bin: $!";
	}
	for (1 .. 200)
	{
		last if -s $portfile;
		usleep(25_000);
	}
	die "fwsim did not start" unless -s $portfile;
	open(my $fh, '<', $portfile) or die;
	my $port = <$fh>;
	chomp $port;
	return bless { pid => $pid, port => $port, http => HTTP::Tiny->new(timeout => 30) }, $class;
}

sub url { my $self = shift; return "http://127.0.0.1:$self->{port}"; }

sub get
{
	my ($self, $path) = @_;
	my $r = $self->{http}->get($self->url . $path);
	die "GET $path: $r->{status}" unless $r->{success};
	return decode_json($r->{content});
}

sub post
{
	my ($self, $path, $body) = @_;
	my $r = $self->{http}->post($self->url . $path,
		{ content => encode_json($body // {}), headers => { 'content-type' => 'application/json' } });
	die "POST $path: $r->{status} $r->{content}" unless $r->{success};
	return decode_json($r->{content});
}

sub stats { return $_[0]->get('/control/stats'); }
sub log_requests { return $_[0]->get('/control/log?limit=10000')->{requests}; }
sub reset { $_[0]->post('/control/reset'); }
sub rule { my ($self, %r) = @_; $self->post('/control/rules', \%r); }

sub stop
{
	my $self = shift;
	return unless $self->{pid};
	kill 'TERM', $self->{pid};
	waitpid($self->{pid}, 0);
	$self->{pid} = undef;
}

sub DESTROY { $_[0]->stop; }

1;
