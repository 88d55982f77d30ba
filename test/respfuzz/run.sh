#!/usr/bin/env bash
# Response fuzzer, longer runs: bash test/respfuzz/run.sh [SEED] [CASES]
#
# Starts a throwaway cluster with fw_tier preloaded and the fuzz server
# (test/respfuzz/RespFuzz.pm), answers CASES calls with mutated provider
# responses of seed SEED, and checks: no ERROR escapes but the failure
# classes' SQLSTATEs (none with on_error = 'null'), no backend crash, one
# fw_tier.calls row per case.  It is the "fuzz" section of t/053_engine.pl
# (which runs 2,000 cases of seed 1 in the TAP suite).  Run as a non-root
# user with pg_config of the PostgreSQL to test first in PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" = 0 ]; then
	echo "respfuzz: run as a non-root user (initdb refuses root), e.g. su fwtest" >&2
	exit 2
fi
export FUZZ_SEED="${1:-1}" FUZZ_CASES="${2:-10000}" ENGINE_SECTIONS=fuzz
export PROVE_FLAGS="${PROVE_FLAGS:--v}"
exec bash test/run-tap.sh t/053_engine.pl
