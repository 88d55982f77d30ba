#!/usr/bin/env bash
# Run this suite with pg_regress on a throwaway instance with fw_tier
# preloaded.
#   ./run.sh            replay fixtures.tsv: no key, no network (fw_tier.base_url
#                       points at a closed port, so a miss cannot go anywhere)
#   ./run.sh --record   call FW_BASE_URL (default: Fireworks itself, which
#                       needs FIREWORKS_API_KEY in this script's environment:
#                       the temporary server inherits it) and rewrite
#                       fixtures.tsv, only once the recording succeeded
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
	if [ "$base_url" = https://api.fireworks.ai/inference/v1 ] && [ -z "${FIREWORKS_API_KEY:-}" ]; then
		echo "run.sh --record: set FIREWORKS_API_KEY, or FW_BASE_URL for the simulator" >&2
		exit 2
	fi
	# Record in a scratch copy: save_fixtures writes fixtures.tsv in the
	# working directory, and the repository's file must survive a failed
	# recording.
	rundir="$out/record"
	rm -rf "$rundir"
	mkdir -p "$rundir"
	cp -r sql expected "$rundir/"
	cd "$rundir"
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
	[ "$mode" = record ] && echo "run.sh: recording failed; $here/fixtures.tsv is unchanged" >&2
	exit 1
fi
if [ "$mode" = record ]; then
	# same directory as the target, so the rename is atomic
	cp fixtures.tsv "$here/fixtures.tsv.new"
	mv "$here/fixtures.tsv.new" "$here/fixtures.tsv"
	echo "run.sh: recorded $(wc -l < "$here/fixtures.tsv") fixtures into $here/fixtures.tsv"
fi
