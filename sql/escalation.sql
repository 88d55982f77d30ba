-- escalation: the per-workload Priority window.  Only 503 Service
-- Overloaded on Standard escalates, and only workloads whose on_overload is
-- 'priority'; the first one is retried at once on Priority, the window is
-- in shared memory (every backend, at once), the worker mirrors it into
-- fw_tier.escalations and closes it when it ends.  429, 503 Unavailable and
-- client errors never escalate, nor do the 'retry' and 'fail' policies, and
-- a Fast request never carries service_tier.  fw_escalate / fw_deescalate
-- are the operator's levers.  No timestamp is printed: booleans and exact
-- intervals only.
INSERT INTO fw_tier.workloads (workload, on_overload, priority_window) VALUES
	('esc_chat', 'priority', '10 minutes'),	-- escalates, its own window
	('esc_other', 'priority', NULL),			-- escalates, fw_tier.priority_window
	('esc_retry', 'retry', NULL),
	('esc_fail', 'fail', NULL),
	('esc_short', 'priority', '1 second');	-- expires during the test
INSERT INTO fw_tier.workloads (workload, path, fast_model, on_overload) VALUES
	('esc_fast', 'fast', 'accounts/fireworks/routers/kimi-k2p6-turbo', 'priority');
SET fw_tier.max_attempts = 3;


-- nothing escalated yet
SELECT workload, path, configured_path, on_overload, escalations
  FROM fw_tier.status WHERE workload LIKE 'esc%' ORDER BY workload;

-- the first 503 Overloaded: retried at once on Priority, and it succeeds
SELECT sim.reset();
SELECT fw_complete('[fwsim:overload] help me', 'esc_chat');
SELECT seq, path, service_tier, status, outcome FROM sim.log ORDER BY seq;
-- the workload is on Priority now, for its own 10-minute window
SELECT workload, path, configured_path, escalations, windows_in_row, alert,
       overloaded_503, standard_attempts, priority_attempts,
       priority_until - window_started AS window_length,
       priority_until > clock_timestamp() AS open
  FROM fw_tier.status WHERE workload = 'esc_chat';
-- the worker mirrors the window: one open row, trigger 'overloaded'
SELECT sim.wait_until($$SELECT count(*) = 1 FROM fw_tier.escalations WHERE workload = 'esc_chat'$$);
SELECT workload, trigger, windows_in_row, ended IS NULL AS open,
       priority_until - started AS window_length
  FROM fw_tier.escalations WHERE workload = 'esc_chat';

-- the next call goes straight to Priority: no Standard attempt first
SELECT sim.reset();
SELECT fw_complete('second question', 'esc_chat');
SELECT seq, path, service_tier, status FROM sim.log ORDER BY seq;
-- and so does a call from another backend: the window is shared
\c -
SET fw_tier.max_attempts = 3;
SELECT sim.reset();
SELECT fw_complete('from another session', 'esc_chat');
SELECT seq, path, service_tier, status FROM sim.log ORDER BY seq;
-- still one window, one escalation
SELECT escalations FROM fw_tier.status WHERE workload = 'esc_chat';

-- overloaded on Priority too: backs off and retries on Priority, never
-- back to Standard; the window stays open, no new escalation is counted
SELECT sim.reset();
SELECT sim.try($$SELECT fw_complete('[fwsim:overload-all] everything is full', 'esc_chat')$$, true);
SELECT seq, path, service_tier, status, outcome FROM sim.log ORDER BY seq;
SELECT path, escalations, priority_overloaded_503,
       priority_until - window_started >= interval '10 minutes' AS still_ten_minutes_or_more
  FROM fw_tier.status WHERE workload = 'esc_chat';

-- 429, 503 Unavailable and client errors on an escalating workload: never
-- escalate, never leave Standard
SELECT sim.reset();
SELECT sim.try($$SELECT fw_complete('[fwsim:ratelimit] slow down', 'esc_other')$$, true) AS rate_limited,
       sim.try($$SELECT fw_complete('[fwsim:unavailable] outage', 'esc_other')$$, true) AS unavailable,
       sim.try($$SELECT fw_complete('[fwsim:status=400] bad', 'esc_other')$$, true) AS bad_request,
       sim.try($$SELECT fw_complete('[fwsim:status=401] who', 'esc_other')$$, true) AS unauthorized,
       sim.try($$SELECT fw_complete('[fwsim:status=500] oops', 'esc_other')$$, true) AS server_error;
SELECT status, outcome, path, count(*) AS attempts, count(service_tier) AS with_service_tier
  FROM sim.log GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT workload, path, escalations, rate_limited_429, unavailable_503, priority_attempts
  FROM fw_tier.status WHERE workload = 'esc_other';

-- 'retry' and 'fail' policies: 503 Overloaded never escalates
SELECT sim.reset();
SELECT sim.try($$SELECT fw_complete('[fwsim:overload] shed', 'esc_retry')$$, true) AS retry_policy;
SELECT sim.try($$SELECT fw_complete('[fwsim:overload] shed', 'esc_fail')$$, true) AS fail_policy;
SELECT count(*) FILTER (WHERE path = 'standard') AS standard_attempts,
       count(*) FILTER (WHERE path <> 'standard') AS other_attempts,
       count(service_tier) AS with_service_tier
  FROM sim.log;
-- a transient overload on 'retry': served on Standard after the backoff
SELECT sim.reset();
SELECT sim.rule('{"fault": "overloaded", "count": 1, "path": "standard"}');
SELECT fw_complete('shed once', 'esc_retry');
SELECT seq, path, service_tier, status FROM sim.log ORDER BY seq;
SELECT workload, path, escalations, overloaded_503, priority_attempts
  FROM fw_tier.status WHERE workload IN ('esc_retry', 'esc_fail') ORDER BY workload;

-- Fast: overloaded everywhere, it retries on Fast, never with service_tier,
-- and does not escalate even with on_overload = 'priority'
SELECT sim.reset();
SELECT sim.try($$SELECT fw_complete('[fwsim:overload-all] quick', 'esc_fast')$$, true);
SELECT fw_complete('quick', 'esc_fast');
SELECT seq, model, path, service_tier, status FROM sim.log ORDER BY seq;
-- a manual window cannot be opened on a Fast workload (Fast never
-- escalates): refused, no escalation counted, its requests stay on Fast
SELECT fw_escalate('esc_fast', '1 minute') > clock_timestamp() AS escalated;
SELECT workload, path, configured_path FROM fw_tier.status WHERE workload = 'esc_fast';
SELECT sim.reset();
SELECT fw_complete('still fast', 'esc_fast');
SELECT seq, model, path, service_tier, status FROM sim.log ORDER BY seq;
SELECT fw_deescalate('esc_fast');

-- fw_escalate: a manual window, the workload's own priority_window by default
-- (no BETWEEN here: it would evaluate fw_escalate twice)
SELECT fw_escalate('esc_other', '5 minutes') - clock_timestamp()
       > interval '4 minutes 50 seconds' AS five_minutes;
SELECT workload, path, escalations, priority_until - window_started AS window_length
  FROM fw_tier.status WHERE workload = 'esc_other';
SELECT sim.wait_until($$SELECT count(*) = 1 FROM fw_tier.escalations WHERE workload = 'esc_other'$$);
SELECT workload, trigger, ended IS NULL AS open, priority_until - started AS window_length
  FROM fw_tier.escalations WHERE workload = 'esc_other';
SELECT sim.reset();
SELECT fw_complete('manual priority', 'esc_other');
SELECT seq, path, service_tier, status FROM sim.log ORDER BY seq;
-- escalating an open window moves its end; no new escalation is counted
SELECT fw_escalate('esc_other', '20 minutes') - clock_timestamp() > interval '19 minutes' AS moved;
SELECT escalations, priority_until - window_started > interval '19 minutes' AS longer
  FROM fw_tier.status WHERE workload = 'esc_other';
-- without a duration: the workload's priority_window, else fw_tier.priority_window
SELECT fw_escalate('esc_retry') - clock_timestamp() > interval '29 minutes' AS default_window;
SELECT fw_escalate('esc_short') - clock_timestamp() <= interval '1 second' AS own_window;
-- invalid input
SELECT sim.try($$SELECT fw_escalate('no_such_workload')$$);
SELECT sim.try($$SELECT fw_deescalate('no_such_workload')$$);
SELECT sim.try($$SELECT fw_escalate(NULL)$$);
SELECT sim.try($$SELECT fw_escalate('esc_other', '-1 minute')$$);
SELECT sim.try($$SELECT fw_escalate('esc_other', '0')$$);

-- fw_deescalate ends the window at once (no jitter): Standard again
SELECT fw_deescalate('esc_other');
SELECT fw_deescalate('esc_retry');
SELECT fw_deescalate('esc_other');	-- nothing open: a no-op
SELECT workload, path, escalations FROM fw_tier.status
 WHERE workload IN ('esc_other', 'esc_retry') ORDER BY workload;
SELECT sim.reset();
SELECT fw_complete('standard again', 'esc_other');
SELECT seq, path, service_tier, status FROM sim.log ORDER BY seq;
-- the worker closes the rows
SELECT sim.wait_until($$SELECT bool_and(ended IS NOT NULL) FROM fw_tier.escalations
                         WHERE workload IN ('esc_other', 'esc_retry')$$);
SELECT workload, trigger, ended <= priority_until AS ended_early
  FROM fw_tier.escalations WHERE workload IN ('esc_other', 'esc_retry') ORDER BY workload;

-- only the operator may escalate: EXECUTE is not granted to PUBLIC
CREATE ROLE fw_esc_app;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO fw_esc_app;
SET ROLE fw_esc_app;
SELECT fw_escalate('esc_chat');
SELECT fw_deescalate('esc_chat');
SELECT count(*) FROM fw_tier.escalations;
-- the status view is public, and shows the window
SELECT workload, path FROM fw_tier.status WHERE workload = 'esc_chat';
RESET ROLE;
REVOKE EXECUTE ON FUNCTION fw_complete(text, text) FROM fw_esc_app;
DROP ROLE fw_esc_app;

-- a window expires on its own: the short one opened above is over after
-- its second (plus a jitter of at most a tenth of it), and the worker
-- closes the row at priority_until
SELECT sim.wait_until($$SELECT path = 'standard' FROM fw_tier.status WHERE workload = 'esc_short'$$);
SELECT pg_sleep(0.2);
SELECT sim.reset();
SELECT fw_complete('after the window', 'esc_short');
SELECT seq, path, service_tier, status FROM sim.log ORDER BY seq;
SELECT sim.wait_until($$SELECT bool_and(ended IS NOT NULL) FROM fw_tier.escalations WHERE workload = 'esc_short'$$);
SELECT trigger, ended = priority_until AS ended_on_time, priority_until - started AS window_length
  FROM fw_tier.escalations WHERE workload = 'esc_short';

-- end: back to Standard, and the history says what happened
SELECT fw_deescalate('esc_chat');
SELECT workload, path FROM fw_tier.status WHERE workload LIKE 'esc%' ORDER BY workload;
SELECT sim.wait_until($$SELECT bool_and(ended IS NOT NULL) FROM fw_tier.escalations$$);
SELECT workload, trigger, count(*) AS windows
  FROM fw_tier.escalations WHERE workload LIKE 'esc%' GROUP BY 1, 2 ORDER BY 1, 2;
-- only Standard escalates: fw_escalate refuses a workload on another path
-- with SQLSTATE 55000
\set VERBOSITY sqlstate
SELECT fw_escalate('fast');
\set VERBOSITY default
SELECT workload, escalations FROM fw_tier.status WHERE workload = 'fast';
RESET fw_tier.max_attempts;
