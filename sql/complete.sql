-- complete: fw_complete against the simulator, which answers
-- "Echo: <last user message>" deterministically.
SELECT fw_complete('Hello from PostgreSQL');
SELECT fw_complete('Hello again', 'interactive');
-- NULL prompt: NULL, and no request is sent
SELECT fw_complete(NULL) IS NULL AS null_prompt;
SELECT fw_complete('x', NULL);
-- non-ASCII text survives the round trip
SELECT fw_complete('héllo wörld ☃');
-- inside an ordinary query, one call per row
SELECT i, fw_complete('row ' || i) FROM generate_series(1, 3) i ORDER BY i;
-- unknown workload: 22023, naming it
SELECT fw_complete('hi', 'no_such_workload');
