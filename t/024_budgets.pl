# Spend limits (issue 13): fw_tier.budgets enforced in shared memory.
#
# Pins: 8 backends x fw_complete_batch at concurrency 32 against one $0.50
# budget spend no more than the limit (README "Spend limits": the bound is
# 0 when usage stays within the reservation), and every refused call sent
# nothing (the simulator's request count); a refusal raises 53400 naming
# the budget, its spend, limit and period end; a restart (even an
# immediate one, with records still in the ring) keeps the period's spend;
# the period arithmetic in UTC and a restore that counts only the current
# period; role and workload scoping; a premium cap keeps an escalating
# workload on Standard with a WARNING and a NOTIFY; a budget on an
# unpriced model refuses, naming the missing price.
use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(time usleep);
use FindBin;
use lib "$FindBin::Bin";
use FwSim;

plan skip_all => 'FWSIM is not set' unless $ENV{FWSIM} && -x $ENV{FWSIM};

my $sim = FwSim->start('--time-scale', '0');
my $model = 'accounts/fireworks/models/kimi-k2p6';

my $node = PostgreSQL::Test::Cluster->new('budgets');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '@{[$sim->url]}/inference/v1'
fw_tier.max_concurrency_cap = 64
fw_tier.flush_interval = '100ms'
fw_tier.backoff_base = '10ms'
fw_tier.backoff_cap = '50ms'
max_connections = 40
});
$node->start;
$node->safe_psql('postgres', qq{
CREATE EXTENSION fw_tier;
CREATE ROLE app LOGIN;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO app;
GRANT EXECUTE ON FUNCTION fw_chat(jsonb, text, jsonb) TO app;
GRANT EXECUTE ON FUNCTION fw_complete_batch(text[], text, jsonb) TO app;
SELECT fw_tier.set_price('$model', 'standard', 10, 5, 40);
SELECT fw_tier.set_price('$model', 'priority', 15, 7.5, 60);
INSERT INTO fw_tier.workloads (workload, on_overload) VALUES
	('capped', 'retry'), ('scoped', 'retry'), ('other', 'retry'), ('alerts', 'retry'),
	('esc', 'priority'), ('esc_free', 'priority');
INSERT INTO fw_tier.workloads (workload, model, on_overload) VALUES
	('unpriced', 'accounts/fireworks/models/no-price-here', 'retry');
});

sub wait_for
{
	my ($what, $cond, $secs) = @_;
	my $deadline = time + ($secs // 60);
	while (time < $deadline)
	{
		return 1 if $cond->();
		usleep(50_000);
	}
	diag("timed out waiting for $what");
	return 0;
}

sub flush { $node->safe_psql('postgres', 'SELECT fw_flush()'); }

# ---- set_price upserts ------------------------------------------------------
$node->safe_psql('postgres', "SELECT fw_tier.set_price('x/y', 'standard', 1, 1, 1); SELECT fw_tier.set_price('x/y', 'standard', 2, 1, 3)");
is($node->safe_psql('postgres', "SELECT input_usd_per_mtok || ' ' || output_usd_per_mtok FROM fw_tier.prices WHERE model = 'x/y'"),
	'2 3', 'fw_tier.set_price inserts, then replaces the row');
$node->safe_psql('postgres', "DELETE FROM fw_tier.prices WHERE model = 'x/y'");
my ($ret, $out, $err) = $node->psql('postgres', "SELECT fw_tier.set_price('x/z', 'standard', 1, 1, 1)",
	extra_params => ['-U', 'app']);
like($err, qr/permission denied for table prices/, 'set_price runs with the caller\'s rights');

# ---- 8 backends x batch at concurrency 32 against one $0.50 budget ---------
# Each answer is 200 words (max_tokens 200): about $0.008 real, $0.0098
# reserved; 320 prompts would cost about $2.6.
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd)
	VALUES ('half_dollar', 'capped', 'day', 0.50);
});
$sim->reset;
my @h;
my @outs = ('') x 8;
my @errs = ('') x 8;
for my $b (0 .. 7)
{
	my $sql = qq{SET fw_tier.max_concurrency = 32;
SELECT count(a) || ' ' || count(*) - count(a)
  FROM unnest(fw_complete_batch(
	(SELECT array_agg('[fwsim:words=199] [fwsim:slow=40] b$b p' || i) FROM generate_series(1, 40) i),
	'capped', '{"on_error": "null", "max_tokens": 200}')) a;};
	push @h, IPC::Run::start(
		[ 'psql', '-X', '-A', '-t', '-q', '-d', $node->connstr('postgres'), '-U', 'app', '-c', $sql ],
		'>', \$outs[$b], '2>', \$errs[$b]);
}
$_->finish for @h;
my ($answered, $nulls) = (0, 0);
for my $b (0 .. 7)
{
	my ($a, $n) = split ' ', ($outs[$b] =~ s/\s+$//r);
	$answered += $a // 0;
	$nulls += $n // 0;
	diag("backend $b: $errs[$b]") if $errs[$b] ne '';
}
is($answered + $nulls, 320, 'every prompt answered or refused (NULL)');
flush();
my $sim_total = $sim->stats->{total};
my $row = $node->safe_psql('postgres', q{
SELECT count(*) FILTER (WHERE outcome = 'ok') || ' ' ||
       count(*) FILTER (WHERE outcome = 'refused') || ' ' ||
       count(*) FILTER (WHERE outcome NOT IN ('ok', 'refused')) || ' ' ||
       count(DISTINCT call_id) || ' ' ||
       sum(cost_usd) || ' ' ||
       coalesce(sum(cost_usd) FILTER (WHERE outcome = 'refused'), 0) || ' ' ||
       bool_and(attempt = 1 AND http_status IS NULL AND prompt_tokens IS NULL)
         FILTER (WHERE outcome = 'refused')
  FROM fw_tier.calls WHERE workload = 'capped'});
my ($ok, $refused, $other, $ncalls, $spent, $refused_cost, $refused_first) = split ' ', $row;
diag("answered $ok, refused $refused, other $other, real spend \$$spent");
is($ok, $answered, 'the answers are the ok rows');
cmp_ok($refused, '>', 100, 'the budget refused most of the prompts');
is($ok + $refused, 320, 'one row per prompt: refused calls were never retried');
is($ncalls, 320, '320 calls logged');
is($sim_total, $ok, 'the simulator saw exactly the answered requests: no refused call sent anything');
cmp_ok($spent, '<=', 0.50, 'real spend (fw_tier.calls) <= limit_usd + 0 (the README bound)');
cmp_ok($spent, '>', 0.30, 'and the budget was actually used (more than 60% of it)');
is($refused_cost + 0, 0, 'refusals cost 0');
is($refused_first, 'true', 'a refusal is the call\'s first and only row, without status or tokens');
my $status = $node->safe_psql('postgres', q{
SELECT spent_usd || ' ' || reserved_usd || ' ' || refusals || ' ' ||
       (period_start = date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') || ' ' ||
       (period_end = period_start + interval '1 day') || ' ' || remaining_usd
  FROM fw_tier.budget_status WHERE budget = 'half_dollar'});
my ($st_spent, $st_reserved, $st_refusals, $st_pstart, $st_pend, $st_remaining) = split ' ', $status;
cmp_ok(abs($st_spent - $spent), '<', 0.000002, 'budget_status.spent_usd is the logged spend');
is($st_reserved + 0, 0, 'nothing stays reserved');
is($st_refusals, $refused, 'budget_status counts the refusals');
is("$st_pstart $st_pend", 'true true', 'a day period: UTC midnight to midnight');

# ---- a refusal raises 53400 naming the budget, spend, limit, period end ---
# The batches left less than their in-flight reservations: lower the limit
# to what is spent plus $0.001, less than one more call's worst case.
$node->safe_psql('postgres', q{
UPDATE fw_tier.budgets SET limit_usd = (SELECT sum(cost_usd) + 0.001 FROM fw_tier.calls WHERE workload = 'capped')
 WHERE budget = 'half_dollar'});
($ret, $out, $err) = $node->psql('postgres',
	q{\set VERBOSITY verbose
SELECT fw_chat('[{"role":"user","content":"[fwsim:words=199] one more"}]', 'capped', '{"max_tokens": 200}')},
	extra_params => ['-U', 'app']);
like($err, qr/ERROR:  53400: fw_tier budget refused the call/, 'refused: SQLSTATE 53400');
like($err, qr/DETAIL:  .*budget "half_dollar" \(day ending \d{4}-\d\d-\d\d 00:00:00\+00\): \$0\.\d{6} spent and \$0\.000000 reserved of its limit \$0\.\d{6}; this attempt may cost up to \$0\.0\d{5}/,
	'DETAIL names the budget, its spend, limit and period end');
is($sim->stats->{total}, $sim_total, 'and nothing was sent');

# with on_error 'raise' a batch stops at the refusal
($ret, $out, $err) = $node->psql('postgres',
	q{SELECT fw_complete_batch(ARRAY['a', 'b', 'c'], 'capped', '{"max_tokens": 200}')},
	extra_params => ['-U', 'app']);
like($err, qr/fw_tier budget refused the call/, 'a batch with on_error raise fails on the refusal');
is($sim->stats->{total}, $sim_total, 'without sending anything');

# ---- restart keeps the period's spend ---------------------------------------
# A few answered calls on a second budget, left in the ring (flush
# interval 10 min), then an immediate stop: the records are in the ring file
# only; the restore counts them once the flusher has written them.
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('ring_kept', 'other', 'hour', 1);
ALTER SYSTEM SET fw_tier.flush_interval = '10min';
SELECT pg_reload_conf();
});
flush();
$node->safe_psql('postgres', q{SELECT fw_complete('[fwsim:words=50] before the restart ' || i, 'other') FROM generate_series(1, 5) i},
	extra_params => ['-U', 'app']);
my $before = $node->safe_psql('postgres', q{SELECT spent_usd FROM fw_tier.budget_status WHERE budget = 'ring_kept'});
cmp_ok($before, '>', 0, "spend before the restart: \$$before");
is($node->safe_psql('postgres', q{SELECT count(*) FROM fw_tier.calls WHERE workload = 'other'}), '0',
	'its rows are still in the ring');
$node->stop('immediate');
$node->append_conf('postgresql.conf', "fw_tier.flush_interval = '100ms'");
$node->start;
$node->safe_psql('postgres', 'ALTER SYSTEM RESET fw_tier.flush_interval; SELECT pg_reload_conf()');
is($node->safe_psql('postgres', q{SELECT spent_usd IS NULL FROM fw_tier.budget_status WHERE budget = 'half_dollar'}),
	't', 'after the restart the state is unknown until the budget is used');
# the first call restores the spend: still refused
($ret, $out, $err) = $node->psql('postgres',
	q{SELECT fw_chat('[{"role":"user","content":"[fwsim:words=199] after"}]', 'capped', '{"max_tokens": 200}')},
	extra_params => ['-U', 'app']);
like($err, qr/fw_tier budget refused the call/, 'after a restart the spent budget still refuses');
my $after = $node->safe_psql('postgres', q{SELECT spent_usd FROM fw_tier.budget_status WHERE budget = 'half_dollar'});
cmp_ok(abs($after - $spent), '<', 0.000002, "restored spend \$$after = logged spend \$$spent");
$node->safe_psql('postgres', q{SELECT fw_complete('after the restart', 'other')}, extra_params => ['-U', 'app']);
flush();
my $logged_other = $node->safe_psql('postgres', q{SELECT sum(cost_usd) FROM fw_tier.calls WHERE workload = 'other'});
my $after_other = $node->safe_psql('postgres', q{SELECT spent_usd FROM fw_tier.budget_status WHERE budget = 'ring_kept'});
cmp_ok($after_other, '>', $before, 'the records that were in the ring are counted after the restart');
cmp_ok(abs($after_other - $logged_other), '<', 0.000002, 'exactly once: restored + new = the log');

# ---- periods: UTC boundaries, and a restore counts the current period only -
is($node->safe_psql('postgres', q{
SET TIME ZONE 'America/New_York';
SELECT string_agg(format('%s %s %s', p, s AT TIME ZONE 'UTC', e AT TIME ZONE 'UTC'), '; ' ORDER BY ord)
  FROM (VALUES (1, 'hour', '2026-12-31 23:59:59.999999+00'::timestamptz),
               (2, 'hour', '2027-01-01 00:00:00+00'),
               (3, 'day', '2026-03-08 06:59:59+00'),
               (4, 'month', '2026-12-31 23:59:59.999999+00'),
               (5, 'month', '2027-01-01 00:00:00+00'),
               (6, 'month', '2028-02-29 12:00:00+00')) v(ord, p, t),
       fw_tier.budget_period(p, t) AS bp(s, e)}),
	'hour 2026-12-31 23:00:00 2027-01-01 00:00:00; hour 2027-01-01 00:00:00 2027-01-01 01:00:00; '
	. 'day 2026-03-08 00:00:00 2026-03-09 00:00:00; month 2026-12-01 00:00:00 2027-01-01 00:00:00; '
	. 'month 2027-01-01 00:00:00 2027-02-01 00:00:00; month 2028-02-01 00:00:00 2028-03-01 00:00:00',
	'periods are UTC hours, days and months, whatever TimeZone says');
# rows just before and at the start of the current hour: only the second counts
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('hourly', 'scoped', 'hour', 100);
INSERT INTO fw_tier.calls (call_id, attempt, started_at, database, username, workload, path, model, outcome, cost_usd)
SELECT 1, 1, s - interval '1 microsecond', 'postgres', 'app', 'scoped', 'standard', 'm', 'ok', 7
  FROM fw_tier.budget_period('hour', now()) AS bp(s, e)
UNION ALL
SELECT 2, 1, s, 'postgres', 'app', 'scoped', 'standard', 'm', 'ok', 3
  FROM fw_tier.budget_period('hour', now()) AS bp(s, e);
});
$node->safe_psql('postgres', q{SELECT fw_complete('count me', 'scoped')});
is($node->safe_psql('postgres', q{SELECT spent_usd > 3 AND spent_usd < 3.01 FROM fw_tier.budget_status WHERE budget = 'hourly'}),
	't', 'the restore counts the rows of the current period only (3, not 7 + 3)');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'hourly'; DELETE FROM fw_tier.calls WHERE call_id IN (1, 2)});

# ---- role and workload scoping ---------------------------------------------
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, role, period, limit_usd) VALUES ('app_scoped', 'scoped', 'app', 'day', 0);
});
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_complete('as app on scoped', 'scoped')}, extra_params => ['-U', 'app']);
like($err, qr/budget "app_scoped"/, 'the role\'s budget on its workload refuses app');
is($node->safe_psql('postgres', q{SELECT fw_complete('as app on other', 'other')}, extra_params => ['-U', 'app']),
	'Echo: as app on other', 'another workload is not in its scope');
is($node->safe_psql('postgres', q{SELECT fw_complete('as superuser on scoped', 'scoped')}),
	'Echo: as superuser on scoped', 'another role is not in its scope');
$node->safe_psql('postgres', q{UPDATE fw_tier.budgets SET role = NULL WHERE budget = 'app_scoped'});
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_complete('as superuser on scoped', 'scoped')});
like($err, qr/budget "app_scoped"/, 'role NULL: every role (the edit applies at once)');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'app_scoped'});

# ---- premium cap: escalation off, WARNING + NOTIFY once --------------------
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd, premium_limit_usd, action)
	VALUES ('no_premium', 'esc', 'day', 10, 0, 'standard_only');
});
my ($lout, $lerr) = ('', '');
my $listener = IPC::Run::start(
	[ 'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres'), '-c',
	  'LISTEN fw_tier_alert', '-c', 'SELECT pg_sleep(4)' ],
	'>', \$lout, '2>', \$lerr);
usleep(500_000);
$sim->reset;
$sim->rule(fault => 'overloaded', count => 2, path => 'standard');
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_complete('shed twice', 'esc')}, extra_params => ['-U', 'app']);
is($out, 'Echo: shed twice', 'the capped workload is answered on Standard after backing off');
like($err, qr/WARNING:  fw_tier budget "no_premium": the premium limit of \$0\.000000 is spent; workload "esc" stays on Standard/,
	'a WARNING says the premium is spent');
my $paths = $sim->stats->{paths};
is("$paths->{standard}{overloaded} $paths->{standard}{ok} $paths->{priority}{ok}", '2 1 0',
	'no Priority request: two 503s, then Standard again');
$sim->rule(fault => 'overloaded', count => 1, path => 'standard');
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_complete('shed again', 'esc')}, extra_params => ['-U', 'app']);
unlike($err, qr/WARNING/, 'the WARNING comes once per period');
$listener->finish;
my @notes = ($lout =~ /Asynchronous notification "fw_tier_alert" with payload "([^\n]*)" received/g);
is(scalar(grep { /"budget": "no_premium", "event": "premium"/ } @notes), 1, 'one NOTIFY fw_tier_alert for the premium');
$sim->reset;
$sim->rule(fault => 'overloaded', count => 1, path => 'standard');
$node->safe_psql('postgres', q{SELECT fw_deescalate('esc'); SELECT fw_complete('free to escalate', 'esc_free')});
is($sim->stats->{paths}{priority}{ok}, 1, 'without a premium cap the same 503 escalates');
flush();
is($node->safe_psql('postgres', q{SELECT count(*) FROM fw_tier.calls WHERE workload = 'esc' AND (escalated OR path <> 'standard')}),
	'0', 'the capped workload\'s attempts are all on Standard');

# ---- alerts at 80% and 100%; action warn refuses nothing -----------------
# each call costs $0.00012 (4 prompt tokens at $10/M, 2 completion at $40/M)
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd, action) VALUES ('alerting', 'alerts', 'month', 0.00028, 'warn');
});
($lout, $lerr) = ('', '');
$listener = IPC::Run::start(
	[ 'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres'), '-c',
	  'LISTEN fw_tier_alert', '-c', 'SELECT pg_sleep(4)' ],
	'>', \$lout, '2>', \$lerr);
usleep(500_000);
my @warned;
for my $i (1 .. 4)
{
	($ret, $out, $err) = $node->psql('postgres', qq{SELECT fw_complete('a$i', 'alerts')});
	push @warned, ($err =~ /WARNING:  fw_tier budget "alerting" is exceeded/ ? 1 : 0);
	is($out, "Echo: a$i", "warn: call $i is answered") if $i == 4;
}
is("@warned", '0 0 1 0', 'action warn: a WARNING when the spend reaches the limit, once');
$listener->finish;
@notes = ($lout =~ /Asynchronous notification "fw_tier_alert" with payload "([^\n]*)" received/g);
is(join(' ', map { /"event": "([^"]+)"/ ? $1 : '?' } grep { /"budget": "alerting"/ } @notes), '80% 100%',
	'NOTIFY fw_tier_alert at 80% (second call) and at 100% (third), once each');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'alerting'});

# ---- settle: an error answer releases, an unknown outcome keeps the worst case
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd, action) VALUES ('settle', 'other', 'day', 100, 'warn');
});
my $spent0 = $node->safe_psql('postgres', q{SELECT fw_complete('first use restores', 'other'); SELECT spent_usd FROM fw_tier.budget_status WHERE budget = 'settle'});
$spent0 = (split /\n/, $spent0)[-1];
$node->psql('postgres', q{SELECT fw_complete('[fwsim:status=400] rejected', 'other')});
is($node->safe_psql('postgres', q{SELECT spent_usd || ' ' || reserved_usd FROM fw_tier.budget_status WHERE budget = 'settle'}),
	"$spent0 0.000000", 'a 400 answer releases its reservation');
$node->psql('postgres', q{SET fw_tier.request_timeout = '300ms'; SELECT fw_chat('[{"role":"user","content":"[fwsim:hang] lost"}]', 'other', '{"max_tokens": 100}')});
my $held = $node->safe_psql('postgres', q{SELECT spent_usd - } . $spent0 . q{ FROM fw_tier.budget_status WHERE budget = 'settle'});
# worst case: >= 64 prompt tokens at $10/M plus 100 output tokens at $40/M
cmp_ok($held, '>=', 0.00464, "a timeout after sending is settled at its reservation (\$$held)");
# without max_tokens a budgeted call is sent with fw_tier.max_output_tokens
is($node->safe_psql('postgres', q{SET fw_tier.max_output_tokens = 4; SELECT fw_complete('[fwsim:words=50] long', 'other')}),
	'Echo: w1 w2 w3', 'a budgeted call without max_tokens is cut at fw_tier.max_output_tokens');
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_chat('[{"role":"user","content":"x"}]', 'other', '{"max_completion_tokens": 10}')});
like($err, qr/"max_completion_tokens" is not accepted when a fw_tier budget applies/, 'max_completion_tokens cannot slip past the reservation');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'settle'});

# ---- a budget on an unpriced model refuses, naming the price ---------------
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('on_unpriced', 'unpriced', 'month', 100);
});
my $before_unpriced = $sim->stats->{total};
($ret, $out, $err) = $node->psql('postgres', q{\set VERBOSITY verbose
SELECT fw_complete('which price?', 'unpriced')}, extra_params => ['-U', 'app']);
like($err, qr/53400.*\n.*no price for model "accounts\/fireworks\/models\/no-price-here" on path standard in fw_tier\.prices/,
	'a budgeted call on an unpriced model is refused, naming the missing price');
like($err, qr/HINT:  .*fw_tier\.set_price/, 'the HINT names fw_tier.set_price');
is($sim->stats->{total}, $before_unpriced, 'nothing sent');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'on_unpriced'});
is($node->safe_psql('postgres', q{SELECT fw_complete('no budget, no refusal', 'unpriced')}),
	'Echo: no budget, no refusal', 'without a budget the unpriced model is called (cost NULL in the log)');

# ---- a budget of another database: restored from its own rows -----------
# fw_tier.calls (in fw_tier.database) holds every database's calls; the
# restore counts the rows of the budget's database only.
$node->safe_psql('postgres', 'CREATE DATABASE shop');
$node->safe_psql('shop', qq{
CREATE EXTENSION fw_tier;
SELECT fw_tier.set_price('$model', 'standard', 10, 5, 40);
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('shop_day', 'default', 'day', 1);
});
$node->safe_psql('postgres', q{SELECT fw_complete('postgres side ' || i) FROM generate_series(1, 3) i});
$node->safe_psql('shop', q{SELECT fw_complete('shop side ' || i) FROM generate_series(1, 2) i});
flush();
my $shop_logged = $node->safe_psql('postgres', q{SELECT sum(cost_usd) FROM fw_tier.calls WHERE database = 'shop'});
$node->restart;
$node->safe_psql('shop', q{SELECT fw_complete('shop after the restart')});
flush();
my $shop_now = $node->safe_psql('postgres', q{SELECT sum(cost_usd) FROM fw_tier.calls WHERE database = 'shop'});
my $shop_status = $node->safe_psql('shop', q{SELECT spent_usd FROM fw_tier.budget_status WHERE budget = 'shop_day'});
cmp_ok($shop_now, '>', $shop_logged, 'the call after the restart is logged');
cmp_ok(abs($shop_status - $shop_now), '<', 0.000002,
	"database shop's budget is restored from shop's rows only (\$$shop_status; postgres' calls to 'default' are not counted)");

# ---- review fixes (review1.md) ------------------------------------------
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.workloads (workload, on_overload) VALUES
	('locked', 'retry'), ('rec', 'retry'), ('huge', 'retry'), ('strn', 'retry'), ('oversized', 'retry');
INSERT INTO fw_tier.workloads (workload, model, on_overload) VALUES
	('nanpriced', 'accounts/fireworks/models/nan-price', 'retry');
});

# 1: a read of the budgets that fails (lock_timeout behind a lock on
# fw_tier.prices) leaves the cache invalid: the next call reads again and
# is refused, instead of running with no budget for the session.
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('locked_zero', 'locked', 'day', 0);
});
my $locker = $node->background_psql('postgres', on_error_stop => 0);
$locker->query_safe('BEGIN; LOCK TABLE fw_tier.prices IN ACCESS EXCLUSIVE MODE');
my $bsess = $node->background_psql('postgres', on_error_stop => 0);
$bsess->query_safe("SET lock_timeout = '200ms'");
my $lt_out = $bsess->query(q{SELECT fw_complete('while locked', 'locked')});
my $lt_err = $bsess->{stderr};
like($lt_err, qr/lock timeout/, 'the budget read behind a lock times out');
$locker->query_safe('COMMIT');
my $sent_before_lock = $sim->stats->{total};
$lt_out = $bsess->query(q{SELECT fw_complete('after the lock', 'locked')});
$lt_err = $bsess->{stderr};
like($lt_err, qr/fw_tier budget refused the call/, 'the same session reads the budgets again and refuses');
unlike($lt_out // '', qr/Echo/, 'no answer without the budget');
is($sim->stats->{total}, $sent_before_lock, 'nothing sent after the failed read');
$bsess->quit;
$locker->quit;
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'locked_zero'});

# 3: record mode under a budget: the fixture is keyed by the caller's
# options (not the injected max_tokens cap), so replay finds it.
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('rec_budget', 'rec', 'day', 10);
});
$node->safe_psql('postgres', q{SET fw_tier.mode = 'record'; SELECT fw_complete('recorded under a budget', 'rec')});
is($node->safe_psql('postgres', q{SELECT count(*) FROM fw_tier.fixtures
  WHERE fingerprint = fw_fingerprint('[{"role": "user", "content": "recorded under a budget"}]', 'rec')}),
	'1', 'the fixture recorded under a budget has the key fw_fingerprint computes');
($ret, $out, $err) = $node->psql('postgres', q{SET fw_tier.mode = 'replay'; SELECT fw_complete('recorded under a budget', 'rec')});
is($out, 'Echo: recorded under a budget', 'and replay finds it');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'rec_budget'});

# 4: the reservation counts the bytes sent: UTF-8 of a LATIN1 database.
# 10000 x 'é' are ~10 kB of jsonb but 20 kB on the wire: at $1 per million
# prompt tokens the worst case is above $0.02, over a $0.015 limit.
$node->safe_psql('postgres', q{CREATE DATABASE lat1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0});
$node->safe_psql('lat1', qq{
CREATE EXTENSION fw_tier;
SELECT fw_tier.set_price('$model', 'standard', 1, 1, 0);
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('latin1', 'default', 'day', 0.015);
});
my $sent_before_lat = $sim->stats->{total};
($ret, $out, $err) = $node->psql('lat1', q{SELECT length(fw_chat(jsonb_build_array(jsonb_build_object('role', 'user', 'content', repeat(chr(233), 10000))), 'default', '{"max_tokens": 1}')::text)});
like($err, qr/fw_tier budget refused the call/, 'LATIN1: the prompt is reserved at its UTF-8 size and refused');
is($sim->stats->{total}, $sent_before_lat, 'LATIN1: nothing sent');

# 8: one attempt too large for what is left is refused without a "100%"
# alert: the budget is not used up.
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('not_full', 'oversized', 'day', 0.5);
});
($lout, $lerr) = ('', '');
$listener = IPC::Run::start(
	[ 'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres'), '-c',
	  'LISTEN fw_tier_alert', '-c', 'SELECT pg_sleep(3)' ],
	'>', \$lout, '2>', \$lerr);
usleep(500_000);
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_chat('[{"role":"user","content":"x"}]', 'oversized', '{"max_tokens": 1000000}')});
like($err, qr/fw_tier budget refused the call/, 'an attempt of up to $40 is refused by a $0.50 budget');
usleep(500_000);
flush();
$listener->finish;
@notes = ($lout =~ /Asynchronous notification "fw_tier_alert" with payload "([^\n]*)" received/g);
is(scalar(grep { /"budget": "not_full"/ } @notes), 0, 'and no "100%" alert: nothing is spent');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'not_full'});

# 9: a warn budget adds worst cases without limit: three timeouts of
# $4e9 each saturate instead of overflowing.
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd, action) VALUES ('huge_warn', 'huge', 'day', 1, 'warn');
});
$node->psql('postgres', q{SET fw_tier.request_timeout = '300ms';
SELECT fw_chat('[{"role":"user","content":"[fwsim:hang] h1"}]', 'huge', '{"max_tokens": 1000000000, "n": 1000000}');
SELECT fw_chat('[{"role":"user","content":"[fwsim:hang] h2"}]', 'huge', '{"max_tokens": 1000000000, "n": 1000000}');
SELECT fw_chat('[{"role":"user","content":"[fwsim:hang] h3"}]', 'huge', '{"max_tokens": 1000000000, "n": 1000000}');}, on_error_stop => 0);
is($node->safe_psql('postgres', q{SELECT spent_usd >= 9e9 AND reserved_usd = 0 FROM fw_tier.budget_status WHERE budget = 'huge_warn'}),
	't', 'three $4e9 worst cases settled: spent saturates (no int8 overflow), nothing stays reserved');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'huge_warn'});

# 10: under a budget n and max_tokens must be JSON numbers
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('strn_budget', 'strn', 'day', 10);
});
my $sent_before_strn = $sim->stats->{total};
($ret, $out, $err) = $node->psql('postgres', q{\set VERBOSITY verbose
SELECT fw_chat('[{"role":"user","content":"x"}]', 'strn', '{"n": "8"}')});
like($err, qr/22023: option "n" must be a JSON number when a fw_tier budget applies/, '"n": "8" is refused under a budget');
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_chat('[{"role":"user","content":"x"}]', 'strn', '{"max_tokens": "100"}')});
like($err, qr/option "max_tokens" must be a JSON number/, 'so is "max_tokens": "100"');
is($sim->stats->{total}, $sent_before_strn, 'nothing sent');
$node->safe_psql('postgres', q{DELETE FROM fw_tier.budgets WHERE budget = 'strn_budget'});

# 12: NaN and unbounded limits and prices are refused by the tables; a
# NaN price left from before (no CHECK then) is no price.
($ret, $out, $err) = $node->psql('postgres', q{INSERT INTO fw_tier.budgets (budget, period, limit_usd) VALUES ('nan', 'day', 'NaN')});
like($err, qr/violates check constraint/, 'limit_usd NaN is refused');
($ret, $out, $err) = $node->psql('postgres', q{INSERT INTO fw_tier.budgets (budget, period, limit_usd, premium_limit_usd) VALUES ('nanp', 'day', 1, 'NaN')});
like($err, qr/violates check constraint/, 'premium_limit_usd NaN is refused');
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_tier.set_price('m/nan', 'standard', 'NaN', 1, 1)});
like($err, qr/violates check constraint "prices_finite"/, 'a NaN price is refused');
$node->safe_psql('postgres', q{
ALTER TABLE fw_tier.prices DROP CONSTRAINT prices_finite;
INSERT INTO fw_tier.prices VALUES ('accounts/fireworks/models/nan-price', 'standard', 'NaN', 1, 1);
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('nan_priced', 'nanpriced', 'day', 10);
});
($ret, $out, $err) = $node->psql('postgres', q{SELECT fw_complete('nan price', 'nanpriced')});
like($err, qr/no price for model "accounts\/fireworks\/models\/nan-price"/, 'a NaN price row from before the CHECK is no price');
$node->safe_psql('postgres', q{
DELETE FROM fw_tier.budgets WHERE budget = 'nan_priced';
DELETE FROM fw_tier.prices WHERE model = 'accounts/fireworks/models/nan-price';
ALTER TABLE fw_tier.prices ADD CONSTRAINT prices_finite CHECK (
	input_usd_per_mtok < 1000000000 AND cached_input_usd_per_mtok < 1000000000
	AND output_usd_per_mtok < 1000000000) NOT VALID;
});

# 13: the SQL functions pin search_path and live in schema fw_tier
is($node->safe_psql('postgres', q{SELECT string_agg(p.proname || ' ' || n.nspname || ' ' || array_to_string(p.proconfig, ','), '; ' ORDER BY p.proname)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname IN ('budget_period', 'budget_state', 'fw_tier_budget_state')}),
	'budget_period fw_tier search_path=pg_catalog, pg_temp; budget_state fw_tier search_path=pg_catalog, pg_temp',
	'budget_period and budget_state: schema fw_tier, search_path pinned');

# embeddings under a budget (issue 12 meets 13): the worst case is the
# input alone (nothing is generated, no max_tokens sent); the call is
# answered and its spend settles from usage
$node->safe_psql('postgres', q{
INSERT INTO fw_tier.workloads (workload) VALUES ('embed_budget');
SELECT fw_tier.set_price('accounts/fireworks/models/qwen3-embedding-8b', 'standard', 1, 1, 0);
INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('embeds', 'embed_budget', 'day', 1);
});
is($node->safe_psql('postgres', q{SELECT array_length(fw_embed('hello budget', 'embed_budget'), 1) > 0}),
	't', 'fw_embed is answered under a budget');
is($node->safe_psql('postgres', q{SELECT count(embedding) || '/' || count(*) FROM fw_embed_batch(ARRAY['a b', NULL, 'c'], 'embed_budget')}),
	'2/3', 'fw_embed_batch is answered under a budget, NULL in gives NULL out');
is($node->safe_psql('postgres', q{SELECT spent_usd > 0 AND reserved_usd = 0 FROM fw_tier.budget_status WHERE budget = 'embeds'}),
	't', 'the embeddings\' spend is settled, nothing left reserved');

$node->stop;
done_testing();
