#!/usr/bin/env bash
# pg_regress suite against the simulator, on a temporary instance with
# fw_tier preloaded (pg_cron style: --temp-config + --temp-instance).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$(pg_config --bindir):$PATH"
. test/start-fwsim.sh --time-scale 0 --api-key regress-key

cat > test/regress.conf <<CONF
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '$FWSIM_URL/inference/v1'
fw_tier.api_key = 'regress-key'
fw_tier.database = 'contrib_regression'
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '50ms'
fw_tier.retry_after_cap = '20ms'
fw_tier.flush_interval = '50ms'
CONF

if ! make -s installcheck; then
	[ -f regression.diffs ] && head -c 20000 regression.diffs
	exit 1
fi
