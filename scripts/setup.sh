#!/usr/bin/env bash
# Installs what fw_tier needs on Debian 12, builds and installs the
# extension and the simulator.  Idempotent; runs as root (re-running itself through sudo if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/root.sh
fw_require_root "$@"

PKGS="postgresql-15 postgresql-server-dev-15 libcurl4-openssl-dev libmicrohttpd-dev
      libipc-run-perl make gcc nodejs npm curl wrk nginx-light"

missing=""
for p in $PKGS; do
	dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
# node and npm may come from elsewhere than Debian (e.g. a preinstalled node)
if command -v node >/dev/null && command -v npm >/dev/null; then
	missing=$(echo "$missing" | tr ' ' '\n' | grep -v -x -e nodejs -e npm | tr '\n' ' ')
fi
if [ -n "${missing// /}" ]; then
	echo "setup: installing$missing"
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi

# The throwaway clusters run as this unprivileged user (initdb refuses root).
id fwtest >/dev/null 2>&1 || useradd -m -s /bin/bash fwtest

export PATH="$(pg_config --bindir):$PATH"
make -s fwsim
make -s
make -s install
