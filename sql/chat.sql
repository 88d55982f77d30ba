-- chat: fw_chat returns the provider's whole response; options pass
-- through; fw_tier's own options are checked.
SELECT r->'object' AS object,
       r->'choices'->0->'message'->>'content' AS content,
       r->'choices'->0->>'finish_reason' AS finish_reason,
       r->'usage' AS usage
  FROM fw_chat('[{"role": "system", "content": "be brief"},
                 {"role": "user", "content": "one two three four five"}]') r;
-- max_tokens passes through (the simulator cuts at 3 words)
SELECT r->'choices'->0->'message'->>'content' AS content,
       r->'choices'->0->>'finish_reason' AS finish_reason
  FROM fw_chat('[{"role": "user", "content": "one two three four five"}]',
               'default', '{"max_tokens": 3, "temperature": 0}') r;
-- a model option overrides the workload's
SELECT fw_chat('[{"role": "user", "content": "hi"}]', 'default',
               '{"model": "accounts/fireworks/models/other-model"}')->>'model' AS model;
-- NULL messages: NULL
SELECT fw_chat(NULL) IS NULL AS null_messages;
-- bad input is refused before any request
SELECT fw_chat('{"role": "user"}');
SELECT fw_chat('[]');
SELECT fw_chat('[{"role": "user", "content": "hi"}]', 'default', '[1]');
SELECT fw_chat('[{"role": "user", "content": "hi"}]', 'default', '{"service_tier": "priority"}');
SELECT fw_chat('[{"role": "user", "content": "hi"}]', 'default', '{"stream": true}');
SELECT fw_chat('[{"role": "user", "content": "hi"}]', 'default', '{"path": "turbo"}');
SELECT fw_chat('[{"role": "user", "content": "hi"}]', 'default', '{"on_error": "ignore"}');
