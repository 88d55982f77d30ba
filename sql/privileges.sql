-- privileges: calls cost money, so EXECUTE is granted on purpose; the call
-- log is not readable by PUBLIC.
CREATE ROLE fw_app LOGIN;
SET ROLE fw_app;
SELECT fw_complete('not yet allowed');
SELECT count(*) FROM fw_tier.calls;
SELECT count(*) > 0 AS sees_workloads FROM fw_tier.workloads;
UPDATE fw_tier.workloads SET path = 'priority';
RESET ROLE;
GRANT EXECUTE ON FUNCTION fw_complete(text, text) TO fw_app;
SET ROLE fw_app;
SELECT fw_complete('now allowed');
SELECT fw_chat('[{"role": "user", "content": "still not"}]');
RESET ROLE;
REVOKE EXECUTE ON FUNCTION fw_complete(text, text) FROM fw_app;
DROP ROLE fw_app;

-- without EXECUTE, PostgreSQL's 42501 carries a HINT naming the GRANT
CREATE ROLE fw_norights;
SET ROLE fw_norights;
SELECT fw_complete_batch(ARRAY['x']);
SELECT fw_escalate('batch');
CALL fw_enrich('pg_class', 'oid', 'relname', 'relname');
-- other functions' errors are left as they are
SELECT pg_catalog.pg_read_file('x');
RESET ROLE;
DROP ROLE fw_norights;
