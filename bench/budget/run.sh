#!/usr/bin/env bash
# bench/budget: the per-call cost of a spend limit (issue 13).  Sequential
# fw_complete calls in one backend against the fixed-answer nginx
# endpoint, with no budget and with one budget in force on the workload
# (reserve before, settle after each call), in the same run: rounds
# alternate, and so does the order within a round.  Prints the median of
# the per-round with/without ratios and best-of.  Target: the budget costs
# no more than 3% (ratio >= 0.97).  Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20000}
ROUNDS=${ROUNDS:-5}
. bench/lib.sh

start_reference
start_cluster "fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'"
bpsql -c "SELECT fw_tier.set_price('accounts/fireworks/models/kimi-k2p6', 'standard', 1, 0.5, 4)" >/dev/null

# rate WITH_BUDGET: calls/s of fw_complete on workload 'batch'
rate() {
	if [ "$1" = 1 ]; then
		bpsql -c "INSERT INTO fw_tier.budgets (budget, workload, period, limit_usd) VALUES ('bench', 'batch', 'month', 1000000) ON CONFLICT DO NOTHING" >/dev/null
	else
		bpsql -c "DELETE FROM fw_tier.budgets" >/dev/null
	fi
	fw_rate
}

ratios=""; best_none=0; best_one=0
for r in $(seq 1 "$ROUNDS"); do
	if [ $((r % 2)) = 1 ]; then none=$(rate 0); one=$(rate 1); else one=$(rate 1); none=$(rate 0); fi
	ratio=$(echo "$one $none" | awk '{printf "%.3f", $1 / $2}')
	echo "round $r: no budget $none calls/s, one budget $one calls/s, ratio $ratio"
	ratios="$ratios $ratio"
	best_none=$(best "$none" "$best_none")
	best_one=$(best "$one" "$best_one")
done
median=$(echo $ratios | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
bestratio=$(echo "$best_one $best_none" | awk '{printf "%.3f", $1 / $2}')
spent=$(bpsql -c "SELECT spent_usd FROM fw_tier.budget_status WHERE budget = 'bench'" || true)
echo "RESULT budget: with/without one budget = $median median of $ROUNDS rounds, best-of $bestratio ($best_one vs $best_none calls/s; target >= 0.97); spend kept in the last budget run: \$${spent:-?}"
