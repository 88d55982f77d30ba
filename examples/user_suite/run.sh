#!/usr/bin/env bash
# Run this suite with pg_regress on a throwaway instance with fw_tier
# preloaded.
#   ./run.sh            replay fixtures.tsv: no key, no network (fw_tier.base_url
#                       points at a closed port, so a miss cannot go anywhere)
#   ./run.sh --record   call FW_BASE_URL (default: Fireworks; the server
#                       needs FIREWORKS_API_KEY) and rewrite fixtures.tsv
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
bindir=$(pg_config --bindir)
pg_regress="$(dirname "$(pg_config --pgxs)")/../test/regress/pg_regress"
if [ -n "${SUITE_OUT:-}" ]; then		# keep results/ there, to bless new output
	out=$SUITE_OUT
	mkdir -p "$out"
else
	out=$(mktemp -d)
	trap 'rm -rf "$out"' EXIT
fi

if [ "${1:-}" = "--record" ]; then
	mode=record
	base_url=${FW_BASE_URL:-https://api.fireworks.ai/inference/v1}
	tests="tickets save_fixtures"
	: > fixtures.tsv
else
	mode=replay
	base_url=http://127.0.0.1:9/inference/v1
	tests="load_fixtures tickets"
fi

cat > "$out/fw_tier.conf" <<CONF
shared_preload_libraries = 'fw_tier'
fw_tier.mode = '$mode'
fw_tier.base_url = '$base_url'
fw_tier.database = 'user_suite'
fw_tier.retry_after_cap = '50ms'
fw_tier.backoff_base = '5ms'
fw_tier.backoff_cap = '50ms'
fw_tier.flush_interval = '50ms'
CONF

if ! "$pg_regress" --bindir="$bindir" --temp-instance="$out/instance" \
	--temp-config="$out/fw_tier.conf" --inputdir=. --outputdir="$out" \
	--dbname=user_suite --load-extension=fw_tier $tests; then
	[ -f "$out/regression.diffs" ] && cat "$out/regression.diffs"
	exit 1
fi
