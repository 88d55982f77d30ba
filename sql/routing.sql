-- routing: which model and service_tier each workload sends, read back
-- from the simulator's request log.  Priority and Fast never stack.
SELECT sim.reset();
SELECT fw_complete('standard call', 'batch');
SELECT fw_complete('fast call', 'fast');
SELECT fw_chat('[{"role": "user", "content": "forced priority"}]', 'default', '{"path": "priority"}')
       ->'choices'->0->'message'->>'content';
SELECT fw_chat('[{"role": "user", "content": "forced fast"}]', 'fast', '{"path": "fast"}')
       ->'choices'->0->'message'->>'content';
-- a Standard workload forced onto Fast needs a fast_model
SELECT fw_chat('[{"role": "user", "content": "no fast model"}]', 'batch', '{"path": "fast"}');
-- options.fast_model supplies it per call (1 to 159 bytes)
SELECT fw_chat('[{"role": "user", "content": "own fast model"}]', 'batch',
               '{"path": "fast", "fast_model": "accounts/fireworks/routers/glm-5p1-fast"}')
       ->'choices'->0->'message'->>'content';
SELECT fw_chat('[{"role": "user", "content": "bad fast model"}]', 'batch',
               jsonb_build_object('path', 'fast', 'fast_model', repeat('x', 160)));
SELECT fw_chat('[{"role": "user", "content": "empty fast model"}]', 'batch',
               '{"path": "fast", "fast_model": ""}');
SELECT model, path, service_tier FROM sim.log ORDER BY seq;

-- edits to fw_tier.workloads apply at once, no reconnect
SELECT sim.reset();
UPDATE fw_tier.workloads SET path = 'priority' WHERE workload = 'agent';
SELECT fw_complete('now on priority', 'agent');
UPDATE fw_tier.workloads SET model = 'accounts/fireworks/models/agent-model', path = 'standard'
 WHERE workload = 'agent';
SELECT fw_complete('own model', 'agent');
UPDATE fw_tier.workloads SET model = NULL WHERE workload = 'agent';
SET fw_tier.default_model = 'accounts/fireworks/models/session-default';
SELECT fw_complete('session default', 'agent');
RESET fw_tier.default_model;
SELECT model, path, service_tier FROM sim.log ORDER BY seq;
