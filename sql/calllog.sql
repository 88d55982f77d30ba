-- calllog: every HTTP attempt becomes exactly one row of fw_tier.calls,
-- written by the background worker, so rows survive the caller's ROLLBACK
-- and errors.  Pins the columns (attempt numbers, path, service_tier,
-- status, outcome, tokens from usage or the fireworks-* headers, error text
-- without the key), cost_usd priced at log time from fw_tier.prices,
-- fw_tier.log_content, row-level security, the analytics views and
-- fw_tier.purge_calls.  No timestamp is printed.
INSERT INTO fw_tier.workloads (workload, on_overload) VALUES
	('log_a', 'priority'),
	('log_b', 'retry');
SET fw_tier.max_attempts = 3;


-- start from an empty log (earlier files' rows are flushed, then dropped)
SELECT fw_flush();
TRUNCATE fw_tier.calls;
SELECT worker_pid IS NOT NULL AS worker_running, bytes_used FROM fw_tier.log_status;

-- prices in USD per million tokens; Priority is 1.5x Standard
INSERT INTO fw_tier.prices VALUES
	('accounts/fireworks/models/kimi-k2p6', 'standard', 1.00, 0.50, 4.00),
	('accounts/fireworks/models/kimi-k2p6', 'priority', 1.50, 0.75, 6.00);

SELECT sim.reset();
-- 1: a plain call
SELECT fw_complete('hello log', 'log_a');
-- 2: a call in a transaction that rolls back: its row stays
BEGIN;
SELECT fw_complete('rolled back', 'log_a');
ROLLBACK;
-- 3: a call in a DO block that raises afterwards
DO $$
BEGIN
  PERFORM fw_complete('in a failing block', 'log_a');
  RAISE EXCEPTION 'the block fails after the call';
END $$;
-- 4: shed on Standard, escalated, served on Priority: two attempts
SELECT fw_complete('[fwsim:overload] shed then served', 'log_a');
SELECT fw_deescalate('log_a');
-- 5: 429 three times (log_b never escalates)
SELECT sim.try($$SELECT fw_complete('[fwsim:ratelimit] too fast', 'log_b')$$, true);
-- 6: a client error, one attempt
SELECT sim.try($$SELECT fw_complete('[fwsim:status=400] bad', 'log_b')$$, true);
-- 7: no usage object: tokens from the fireworks-* headers
SELECT fw_complete('[fwsim:no-usage] headers only', 'log_b');
-- 8: a model without a price row
SELECT fw_chat('[{"role": "user", "content": "unpriced model"}]', 'log_b',
               '{"model": "accounts/fireworks/models/unpriced"}') IS NOT NULL AS answered;
-- 9: a NULL prompt makes no request and no row
SELECT fw_complete(NULL, 'log_b');

SELECT fw_flush();
-- one row per attempt the simulator saw
SELECT (SELECT count(*) FROM sim.log) AS requests_seen,
       (SELECT count(*) FROM fw_tier.calls) AS rows_logged,
       (SELECT count(DISTINCT call_id) FROM fw_tier.calls) AS calls_logged;
SELECT records_pushed = records_flushed AS all_flushed, bytes_used, records_skipped
  FROM fw_tier.log_status;

-- the columns, in the order the calls were made
SELECT dense_rank() OVER (ORDER BY call_id) AS call, attempt, workload, path,
       model, service_tier, escalated, http_status, outcome,
       prompt_tokens, cached_prompt_tokens, completion_tokens,
       cost_usd, error
  FROM fw_tier.calls ORDER BY call_id, attempt;
-- who, where, how long, which request
SELECT count(*) FILTER (WHERE database = current_database()) AS in_this_db,
       count(*) FILTER (WHERE username = current_user) AS by_me,
       count(*) FILTER (WHERE latency_ms >= 0 AND ttfb_ms >= 0) AS timed,
       count(*) FILTER (WHERE request_id IS NOT NULL) AS with_request_id,
       count(*) FILTER (WHERE started_at <= now()) AS started_before_now
  FROM fw_tier.calls;
-- cost_usd is what the token columns say at the price of the row's path
SELECT count(*) AS priced_ok_rows,
       bool_and(c.cost_usd = ((c.prompt_tokens - c.cached_prompt_tokens) * p.input_usd_per_mtok
                              + c.cached_prompt_tokens * p.cached_input_usd_per_mtok
                              + coalesce(c.completion_tokens, 0) * p.output_usd_per_mtok) / 1000000) AS matches
  FROM fw_tier.calls c JOIN fw_tier.prices p ON p.model = c.model AND p.path = c.path
 WHERE c.outcome = 'ok';
-- the key never reaches the log
SELECT count(*) AS rows_with_key FROM fw_tier.calls
 WHERE error LIKE '%regress-key%' OR request_id LIKE '%regress-key%';

-- prices apply at log time: a new price changes new rows only
SELECT cost_usd AS old_cost FROM fw_tier.calls
 WHERE workload = 'log_a' AND attempt = 1 AND outcome = 'ok'
 ORDER BY call_id LIMIT 1;
UPDATE fw_tier.prices SET input_usd_per_mtok = 10, output_usd_per_mtok = 40
 WHERE path = 'standard';
SELECT fw_complete('hello log', 'log_a');
SELECT fw_flush();
SELECT cost_usd FROM fw_tier.calls
 WHERE workload = 'log_a' AND prompt_tokens = 5 AND outcome = 'ok' AND path = 'standard'
 ORDER BY call_id;
-- back to the first price (the views below price Standard at today's rate)
UPDATE fw_tier.prices SET input_usd_per_mtok = 1, output_usd_per_mtok = 4
 WHERE path = 'standard';

-- fw_tier.log_content: off by default, on stores prompt and answer
SHOW fw_tier.log_content;
SELECT count(*) FILTER (WHERE prompt IS NOT NULL OR answer IS NOT NULL) AS rows_with_content
  FROM fw_tier.calls;
SET fw_tier.log_content = on;
SELECT fw_complete('remember this', 'log_b');
SELECT fw_chat('[{"role": "user", "content": "and this"}]', 'log_b') IS NOT NULL AS answered;
SELECT sim.try($$SELECT fw_complete('[fwsim:status=400] failed one', 'log_b')$$, true);
RESET fw_tier.log_content;
SELECT fw_complete('not this', 'log_b');
SELECT fw_flush();
SELECT outcome, prompt, answer FROM fw_tier.calls
 WHERE prompt IS NOT NULL OR answer IS NOT NULL ORDER BY call_id;
SELECT prompt IS NULL AND answer IS NULL AS not_stored FROM fw_tier.calls
 WHERE call_id = (SELECT max(call_id) FROM fw_tier.calls);
-- only a superuser may turn it on
CREATE ROLE fw_log_reader;
SET ROLE fw_log_reader;
SET fw_tier.log_content = on;
RESET ROLE;

-- row-level security: SELECT on the table shows one's own rows only
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO fw_log_reader;
SET ROLE fw_log_reader;
SELECT count(*) FROM fw_tier.calls;		-- no privilege yet
SELECT fw_complete('my own call', 'log_b');
SELECT fw_flush();
RESET ROLE;
GRANT SELECT ON fw_tier.calls TO fw_log_reader;
SET ROLE fw_log_reader;
SELECT username, count(*) FROM fw_tier.calls GROUP BY 1 ORDER BY 1;
-- the analytics views run with the caller's rights: own rows too
SELECT workload, path, calls, attempts FROM fw_tier.spend_daily;
RESET ROLE;
-- a member of pg_read_all_stats sees every row
GRANT pg_read_all_stats TO fw_log_reader;
SET ROLE fw_log_reader;
SELECT count(*) = (SELECT count(*) FROM fw_tier.calls) AS sees_all,
       count(DISTINCT username) AS users
  FROM fw_tier.calls;
-- the table is read-only for it
DELETE FROM fw_tier.calls;
RESET ROLE;
-- a role renamed since its last call: the next row has its new name
ALTER ROLE fw_log_reader RENAME TO fw_log_renamed;
SET ROLE fw_log_renamed;
SELECT fw_complete('after a rename', 'log_b') IS NOT NULL AS answered;
RESET ROLE;
SELECT fw_flush();
SELECT username FROM fw_tier.calls
 WHERE call_id = (SELECT max(call_id) FROM fw_tier.calls);
ALTER ROLE fw_log_renamed RENAME TO fw_log_reader;
REVOKE pg_read_all_stats FROM fw_log_reader;
REVOKE SELECT ON fw_tier.calls FROM fw_log_reader;
REVOKE EXECUTE ON FUNCTION fw_complete(text, text) FROM fw_log_reader;

-- the analytics views (summed over days / hours: the run may cross one)
SELECT workload, path, model, sum(calls) AS calls, sum(attempts) AS attempts,
       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       sum(cost_usd) AS cost_usd, sum(unpriced_attempts) AS unpriced_attempts
  FROM fw_tier.spend_daily GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT path, sum(attempts) AS attempts, sum(overloaded_503) AS overloaded_503,
       sum(rate_limited_429) AS rate_limited_429, sum(unavailable_503) AS unavailable_503
  FROM fw_tier.error_rates_hourly GROUP BY 1 ORDER BY 1;
SELECT workload, escalated, sum(attempts) AS attempts,
       sum(priority_cost_usd) AS priority_cost_usd,
       sum(standard_cost_usd) AS standard_cost_usd, sum(premium_usd) AS premium_usd
  FROM fw_tier.priority_premium GROUP BY 1, 2 ORDER BY 1, 2;
SELECT sim.wait_until($$SELECT count(*) = 1 FROM fw_tier.escalations
                         WHERE workload = 'log_a' AND ended IS NOT NULL$$);
SELECT workload, trigger, attempts, priority_attempts, overloaded_503,
       cost_usd, premium_usd
  FROM fw_tier.escalation_timeline WHERE workload = 'log_a';

-- retention: purge_calls deletes rows older than the interval, in batches
UPDATE fw_tier.calls SET started_at = started_at - interval '40 days'
 WHERE workload = 'log_b';
SELECT count(*) AS old_rows FROM fw_tier.calls WHERE started_at < now() - interval '30 days';
SELECT fw_tier.purge_calls('30 days', 2) AS purged;
SELECT count(*) FILTER (WHERE workload = 'log_b') AS log_b_left,
       count(*) FILTER (WHERE workload = 'log_a') AS log_a_left
  FROM fw_tier.calls;
SELECT fw_tier.purge_calls('30 days') AS purged_again;
SELECT sim.try($$SELECT fw_tier.purge_calls('30 days', 0)$$);
SELECT sim.try($$SELECT fw_tier.purge_calls(NULL)$$);
-- not for PUBLIC
SET ROLE fw_log_reader;
SELECT fw_tier.purge_calls('30 days');
RESET ROLE;

-- costs: full precision in fw_tier.calls, 6 decimals in the views; one
-- unpriced attempt makes its group's cost unknown (NULL), priced_cost_usd
-- sums the attempts that have a price
SELECT sum(cost_usd) AS table_cost_usd FROM fw_tier.calls
 WHERE workload = 'log_a' AND path = 'priority';
UPDATE fw_tier.calls SET cost_usd = NULL
 WHERE (call_id, attempt) = (SELECT call_id, attempt FROM fw_tier.calls
                              WHERE workload = 'log_a' AND path = 'standard'
                              ORDER BY call_id, attempt LIMIT 1);
SELECT workload, path, sum(attempts) AS attempts,
       bool_or(cost_usd IS NULL) AS cost_unknown, sum(cost_usd) AS cost_usd,
       sum(priced_cost_usd) AS priced_cost_usd, sum(unpriced_attempts) AS unpriced_attempts
  FROM fw_tier.spend_daily WHERE workload = 'log_a' GROUP BY 1, 2 ORDER BY 1, 2;

-- fw_tier.unpriced_models names the (model, path) pairs with unpriced
-- attempts: the one made unpriced above (its price row exists: those
-- attempts stay unpriced), and a model never priced (the INSERT to run)
INSERT INTO fw_tier.workloads (workload, model, on_overload) VALUES
	('log_unpriced', 'accounts/fireworks/models/never-priced', 'retry');
SELECT fw_complete('no price for me', 'log_unpriced');
SELECT fw_flush();
SELECT model, path, unpriced_attempts, priced_now, hint
  FROM fw_tier.unpriced_models ORDER BY model, path;
DELETE FROM fw_tier.workloads WHERE workload = 'log_unpriced';

-- a price row that can never match warns (and is kept: pg_restore must
-- not fail): Fast calls are priced under the Fast model id
INSERT INTO fw_tier.prices VALUES
	('accounts/fireworks/models/kimi-k2p6', 'fast', 2.00, 1.00, 8.00);
INSERT INTO fw_tier.prices VALUES
	('accounts/fireworks/models/no-such-base', 'fast', 2.00, 1.00, 8.00);
INSERT INTO fw_tier.prices VALUES
	('accounts/fireworks/routers/kimi-k2p6-turbo', 'standard', 2.00, 1.00, 8.00);
-- these match: no warning
INSERT INTO fw_tier.prices VALUES
	('accounts/fireworks/routers/kimi-k2p6-turbo', 'fast', 2.00, 1.00, 8.00),
	('accounts/fireworks/routers/glm-5p1-fast', 'fast', 2.00, 1.00, 8.00);
-- an UPDATE is checked too
UPDATE fw_tier.prices SET model = 'accounts/fireworks/models/other-base'
 WHERE model = 'accounts/fireworks/models/no-such-base';
SELECT model, path FROM fw_tier.prices ORDER BY 1, 2;

-- clean up
DROP ROLE fw_log_reader;
DELETE FROM fw_tier.prices;
DELETE FROM fw_tier.workloads WHERE workload IN ('log_a', 'log_b');
RESET fw_tier.max_attempts;
