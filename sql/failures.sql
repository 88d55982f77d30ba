-- failures: every failure class, its SQLSTATE, how many attempts it
-- takes, and on_error = 'null'.  Faults come from [fwsim:...] directives in
-- the prompt, so each case is deterministic.  Workload 'batch' retries on
-- overload and never escalates; 'strict' fails at once.
INSERT INTO fw_tier.workloads (workload, on_overload) VALUES ('strict', 'fail');
SET fw_tier.max_attempts = 3;

-- client errors: one attempt, SQLSTATE by status, provider message in DETAIL
SELECT sim.reset();
SELECT fw_complete('[fwsim:status=400] bad request', 'batch');
SELECT fw_complete('[fwsim:status=401] no key', 'batch');
-- the SQLSTATE of each status (README's failure table)
SELECT s AS status,
       sim.try(format($$SELECT fw_complete('[fwsim:status=%s] x', 'batch')$$, s), true) AS sqlstate
  FROM unnest(ARRAY[400, 401, 402, 403, 404, 412, 413, 422, 500, 502, 504]) s ORDER BY s;
-- one attempt each for 4xx, two (one retry) for 5xx
SELECT status, count(*) FROM sim.log GROUP BY status ORDER BY status;

-- 429: retried up to max_attempts, never escalated, then 53400
SELECT sim.reset();
SELECT fw_complete('[fwsim:ratelimit] slow down', 'default');
SELECT count(*) AS attempts, string_agg(DISTINCT path, ',') AS paths FROM sim.log;

-- 503 Unavailable: one short retry, never escalated, then 08006
SELECT sim.reset();
SELECT fw_complete('[fwsim:unavailable] outage', 'default');
SELECT count(*) AS attempts, string_agg(DISTINCT path, ',') AS paths FROM sim.log;
-- a 502 HTML page from a proxy: unavailable too
SELECT fw_complete('[fwsim:html] proxy', 'batch');

-- a transient outage: the retry succeeds
SELECT sim.reset();
SELECT sim.rule('{"fault": "unavailable", "count": 1}');
SELECT fw_complete('second time lucky', 'batch');
SELECT count(*) AS attempts, string_agg(status::text, ',' ORDER BY seq) AS statuses FROM sim.log;

-- 503 Overloaded on a retrying workload: backs off, stays on Standard
SELECT sim.reset();
SELECT fw_complete('[fwsim:overload] shed', 'batch');
SELECT count(*) AS attempts, string_agg(DISTINCT path, ',') AS paths FROM sim.log;
SELECT sim.reset();
SELECT sim.rule('{"fault": "overloaded", "count": 2, "path": "standard"}');
SELECT fw_complete('shed twice then served', 'batch');
SELECT count(*) AS attempts, string_agg(status::text, ',' ORDER BY seq) AS statuses FROM sim.log;
-- on_overload = 'fail': one attempt
SELECT sim.reset();
SELECT fw_complete('[fwsim:overload] shed', 'strict');
SELECT count(*) AS attempts FROM sim.log;

-- 200 that is not a usable completion: bad_response, no retry
SELECT sim.reset();
SELECT fw_complete('[fwsim:malformed] x', 'batch');
SELECT fw_complete('[fwsim:html200] x', 'batch');
SELECT fw_complete('[fwsim:empty-choices] x', 'batch');
SELECT count(*) AS attempts FROM sim.log;
-- missing usage is fine: the answer is still there
SELECT fw_complete('[fwsim:no-usage] still an answer', 'batch');
-- fw_chat only needs choices, not a text content
SELECT fw_chat('[{"role": "user", "content": "[fwsim:empty-choices] x"}]', 'batch');

-- transport failures (libcurl's text varies, so show SQLSTATEs only)
SELECT sim.reset();
SELECT sim.try($$SELECT fw_complete('[fwsim:reset] cut', 'batch')$$, true) AS reset_mid_body,
       sim.try($$SELECT fw_complete('[fwsim:truncated] half', 'batch')$$, true) AS truncated;
-- a transport failure gets one retry, like an outage
SELECT count(*) AS attempts FROM sim.log;
SET fw_tier.request_timeout = '300ms';
SELECT sim.try($$SELECT fw_complete('[fwsim:hang] never', 'batch')$$, true) AS request_timeout;
RESET fw_tier.request_timeout;
SET fw_tier.base_url = 'http://127.0.0.1:1/v1';
SELECT sim.try($$SELECT fw_complete('nobody listens', 'batch')$$, true) AS connection_refused;
RESET fw_tier.base_url;

-- on_error = 'null': the failure becomes NULL, per call or per session
SELECT fw_chat('[{"role": "user", "content": "[fwsim:status=400] x"}]', 'batch',
               '{"on_error": "null"}') IS NULL AS is_null;
SET fw_tier.on_error = 'null';
SELECT fw_complete('[fwsim:status=400] x', 'batch') IS NULL AS is_null;
SELECT fw_complete('fine', 'batch');
-- caller mistakes still raise
SELECT fw_complete('fine', 'no_such_workload');
RESET fw_tier.on_error;

-- max_attempts bounds every retry loop
SET fw_tier.max_attempts = 1;
SELECT sim.reset();
SELECT fw_complete('[fwsim:ratelimit] once', 'batch');
SELECT count(*) AS attempts FROM sim.log;
RESET fw_tier.max_attempts;

-- a batch 503 Overloaded: the DETAIL never repeats the provider's "use
-- service_tier priority", the HINT points at the workload's on_overload
SELECT fw_complete_batch(ARRAY['[fwsim:overload] batch shed'], 'batch');

-- connection refused: the HINT names fw_tier.base_url and its host, never
-- the user:password a URL may carry
SET fw_tier.base_url = 'http://someone:s3cret@127.0.0.1:1/inference/v1';
SET fw_tier.max_attempts = 1;
DO $$
DECLARE
	h text;
	d text;
BEGIN
	PERFORM fw_complete('nobody listens', 'batch');
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS h = PG_EXCEPTION_HINT, d = PG_EXCEPTION_DETAIL;
	RAISE NOTICE '% %, key in the text: %', SQLSTATE, h, d LIKE '%s3cret%' OR h LIKE '%s3cret%';
END
$$;
RESET fw_tier.max_attempts;
RESET fw_tier.base_url;
