#!/bin/bash
# Builds fwsim and runs its whole test suite:
#   1. Perl TAP tests (prove test/fwsim/t)
#   2. conformance with the official OpenAI Node SDK (npm ci + node --test)
# Exits non-zero on any failure.  FWSIM_SKIP_CONFORMANCE=1 skips step 2.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"

echo "== build"
make -s

# 1,000-connection test: make sure this shell may open enough sockets
ulimit -n 4096 2>/dev/null || true

echo "== prove t/"
prove t/

if [ "${FWSIM_SKIP_CONFORMANCE:-0}" = 1 ]; then
    echo "== conformance skipped (FWSIM_SKIP_CONFORMANCE=1)"
    exit 0
fi
echo "== conformance (openai npm SDK)"
cd conformance
if [ ! -d node_modules/openai ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
node --test fwsim.test.mjs
echo "== fwsim: all tests passed"
