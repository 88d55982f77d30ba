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

# Optional (issue 12): pgvector for t/071_pgvector.pl and bench/embed, built
# from the vendored release when the server has none.  Skipped cleanly
# where the tarball is absent (a user's machine): that test then skips.
PGVECTOR_TGZ=../shared/vendor/pgvector-0.8.6.tar.gz
if [ -f "$(pg_config --sharedir)/extension/vector.control" ]; then
	echo "setup: pgvector already installed"
elif [ -f "$PGVECTOR_TGZ" ]; then
	echo "setup: building pgvector from $PGVECTOR_TGZ"
	build=$(mktemp -d)
	tar -xzf "$PGVECTOR_TGZ" -C "$build"
	(cd "$build"/pgvector-* && make -s OPTFLAGS="" && make -s install)
	rm -rf "$build"
else
	echo "setup: pgvector not installed and $PGVECTOR_TGZ absent: skipping (t/071_pgvector.pl will skip)"
fi
