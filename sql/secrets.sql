-- secrets: the API key is never readable back, not even by a superuser,
-- never in an error, and only superusers may set it or the base URL.
SHOW fw_tier.api_key;
SELECT current_setting('fw_tier.api_key');
SELECT setting FROM pg_settings WHERE name = 'fw_tier.api_key';
-- a wrong key: 401 from the provider, and the key is not in the message
SET fw_tier.api_key = 'sk-wrong-key-do-not-print';
SHOW fw_tier.api_key;
SELECT fw_complete('who am i', 'batch');
RESET fw_tier.api_key;
SELECT fw_complete('right key again', 'batch');

CREATE ROLE fw_secret_user LOGIN;
SET ROLE fw_secret_user;
SHOW fw_tier.api_key;
SELECT current_setting('fw_tier.api_key');
SELECT count(*) FROM pg_settings WHERE name = 'fw_tier.api_key';
SET fw_tier.api_key = 'mine';
SET fw_tier.base_url = 'http://127.0.0.1:9/v1';
SET fw_tier.log_content = on;
RESET ROLE;
DROP ROLE fw_secret_user;
