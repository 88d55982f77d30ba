#!/usr/bin/env bash
# bench/fleet: shed requests per spike across N servers sharing one
# Fireworks account, per-server escalation (fw_tier today: each server
# learns of an overload from its own first 503 Overloaded) versus a shared
# signal (one server's 503 opens the window on every server, seen at each
# server's next poll).  docs/fleet.md explains the model and the figures.
#
# The simulation is bench/fleet/fleetsim.c (deterministic for a seed, no
# clock; a run takes well under a second).  Each cell is the mean over
# SEEDS seeds of the 503 Overloaded answers the whole fleet received, per
# spike of the trace.  Two loads:
#   split  one account's TOTAL calls/s (default 100, bench/economics's
#          load) split evenly over the N servers
#   each   every server sends EACH calls/s (default 0.1: a quiet fleet): the fleet grows
# Columns: never (a fleet that never escalates: expected shed), fixed and
# probe window policies, each with the local signal and the shared one
# (POLL seconds between a server's polls of the shared point, default 1;
# POLL_SLOW, default 10, for a second fixed column).
#
# Run from anywhere:  bash bench/fleet/run.sh
# TRACES="burst flapping" (names of bench/economics/traces/*.sched),
# SERVERS="1 10 100", SEEDS=5, TOTAL=100, EACH=0.1, POLL=1, POLL_SLOW=10.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRACES=${TRACES:-burst flapping}
SERVERS=${SERVERS:-1 10 100}
SEEDS=${SEEDS:-5}
TOTAL=${TOTAL:-100}
EACH=${EACH:-0.1}
POLL=${POLL:-1}
POLL_SLOW=${POLL_SLOW:-10}

work=$(mktemp -d /tmp/fw_tier-fleet.XXXXXX)
trap 'rm -rf "$work"' EXIT
cc -O2 -Wall -o "$work/fleetsim" bench/fleet/fleetsim.c -lm

# the means over the seeds of one configuration: shed per spike, cost
# ratio, a never-escalating fleet's shed per spike
means() {
	local s
	for s in $(seq 1 "$SEEDS"); do
		timeout 120 "$work/fleetsim" --seed "$s" "$@"
	done | awk '{
		for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] += kv[2] } n++
	} END { printf "%.1f %.3f %.1f\n", v["shed_per_spike"] / n, v["cost_ratio"] / n, v["shed_never_per_spike"] / n }'
}

# the per-server rate of a load and N
rate_of() {
	if [ "$1" = split ]; then
		awk -v t="$TOTAL" -v n="$2" 'BEGIN { printf "%g", t / n }'
	else
		echo "$EACH"
	fi
}

shed_rows=""
cost_rows=""
for t in $TRACES; do
	tr=bench/economics/traces/$t.sched
	for load in split each; do
		for n in $SERVERS; do
			r=$(rate_of "$load" "$n")
			base=(--trace "$tr" --servers "$n" --rate "$r")
			read -r fl fl_c never < <(means "${base[@]}" --policy fixed --signal local)
			read -r fs fs_c _ < <(means "${base[@]}" --policy fixed --signal shared --poll "$POLL")
			read -r fs2 _ _ < <(means "${base[@]}" --policy fixed --signal shared --poll "$POLL_SLOW")
			read -r pl pl_c _ < <(means "${base[@]}" --policy probe --signal local)
			read -r ps ps_c _ < <(means "${base[@]}" --policy probe --signal shared --poll "$POLL")
			shed_rows+="| $t | $load | $n | $r | $never | $fl | $fs | $fs2 | $pl | $ps |"$'\n'
			cost_rows+="| $t | $load | $n | $fl_c | $fs_c | $pl_c | $ps_c |"$'\n'
		done
	done
done

echo "| trace | load | N | calls/s per server | never | fixed, local | fixed, shared (poll ${POLL} s) | fixed, shared (poll ${POLL_SLOW} s) | probe, local | probe, shared (poll ${POLL} s) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s' "$shed_rows"
echo
echo "Cost per call (Standard 1, Priority 1.5; shed attempts free), same runs:"
echo
echo "| trace | load | N | fixed, local | fixed, shared | probe, local | probe, shared |"
echo "|---|---|---|---|---|---|---|"
printf '%s' "$cost_rows"
