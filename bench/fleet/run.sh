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

# mean FIELD over the seeds of one configuration
cell() {
	local field=$1
	shift
	local s
	for s in $(seq 1 "$SEEDS"); do
		timeout 120 "$work/fleetsim" --seed "$s" "$@"
	done | awk -v f="$field" '{
		for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == f) { sum += kv[2]; n++ } }
	} END { if (f == "cost_ratio") printf "%.3f", sum / n; else printf "%.1f", sum / n }'
}

echo "| trace | load | N | calls/s per server | never | fixed, local | fixed, shared (poll ${POLL} s) | fixed, shared (poll ${POLL_SLOW} s) | probe, local | probe, shared (poll ${POLL} s) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for t in $TRACES; do
	tr=bench/economics/traces/$t.sched
	for load in split each; do
		for n in $SERVERS; do
			if [ "$load" = split ]; then
				r=$(awk -v t="$TOTAL" -v n="$n" 'BEGIN { printf "%g", t / n }')
			else
				r=$EACH
			fi
			base=(--trace "$tr" --servers "$n" --rate "$r")
			never=$(cell shed_never_per_spike "${base[@]}")
			fl=$(cell shed_per_spike "${base[@]}" --policy fixed --signal local)
			fs=$(cell shed_per_spike "${base[@]}" --policy fixed --signal shared --poll "$POLL")
			fs2=$(cell shed_per_spike "${base[@]}" --policy fixed --signal shared --poll "$POLL_SLOW")
			pl=$(cell shed_per_spike "${base[@]}" --policy probe --signal local)
			ps=$(cell shed_per_spike "${base[@]}" --policy probe --signal shared --poll "$POLL")
			echo "| $t | $load | $n | $r | $never | $fl | $fs | $fs2 | $pl | $ps |"
		done
	done
done
echo
echo "Cost per call (Standard 1, Priority 1.5; shed attempts free), same runs:"
echo
echo "| trace | load | N | fixed, local | fixed, shared | probe, local | probe, shared |"
echo "|---|---|---|---|---|---|---|"
for t in $TRACES; do
	tr=bench/economics/traces/$t.sched
	for load in split each; do
		for n in $SERVERS; do
			if [ "$load" = split ]; then
				r=$(awk -v t="$TOTAL" -v n="$n" 'BEGIN { printf "%g", t / n }')
			else
				r=$EACH
			fi
			base=(--trace "$tr" --servers "$n" --rate "$r")
			echo "| $t | $load | $n | $(cell cost_ratio "${base[@]}" --policy fixed --signal local) |" \
				"$(cell cost_ratio "${base[@]}" --policy fixed --signal shared --poll "$POLL") |" \
				"$(cell cost_ratio "${base[@]}" --policy probe --signal local) |" \
				"$(cell cost_ratio "${base[@]}" --policy probe --signal shared --poll "$POLL") |"
		done
	done
done
