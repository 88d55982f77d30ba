-- cancel: statement_timeout stops an in-flight request with 57014, the
-- backend stays usable and its connection pool works afterwards.
SET statement_timeout = '300ms';
SELECT fw_complete('[fwsim:hang] forever', 'batch');
-- a wait for Retry-After that would outlast the statement is not started:
-- the call fails at once with the provider's error
SET fw_tier.retry_after_cap = '10s';
-- (on a model of its own: a 429 pauses its model for every backend)
SELECT fw_chat('[{"role": "user", "content": "[fwsim:ratelimit=5] wait"}]', 'batch',
               '{"model": "accounts/fireworks/models/paused-model"}');
RESET fw_tier.retry_after_cap;
RESET statement_timeout;
SELECT fw_complete('still alive after cancel', 'batch');
