# Sourced by the benchmarks: a throwaway cluster with fw_tier preloaded and
# an nginx fixed-answer endpoint, both on loopback, both stopped on exit.
# Run as root (the cluster runs as fwtest).
set -euo pipefail
BINDIR=$(pg_config --bindir)
BENCH_WORK=$(mktemp -d /tmp/fw_tier-bench.XXXXXX)
chown fwtest "$BENCH_WORK"
PGPORT_BENCH=$((20000 + RANDOM % 20000))
# More clusters (bench/overhead/compare.sh) register "bindir datadir" here.
BENCH_CLUSTERS=""
_bench_cleanup() {
	su fwtest -s /bin/bash -c "'$BINDIR/pg_ctl' -D '$BENCH_WORK/data' -m fast stop" >/dev/null 2>&1 || true
	local b d
	while read -r b d; do
		[ -n "$d" ] && su fwtest -s /bin/bash -c "'$b/pg_ctl' -D '$d' -m fast stop" >/dev/null 2>&1 || true
	done <<<"$BENCH_CLUSTERS"
	[ -f "$BENCH_WORK/nginx.pid" ] && kill "$(cat "$BENCH_WORK/nginx.pid")" 2>/dev/null || true
	[ -n "${FWSIM_PID:-}" ] && kill "$FWSIM_PID" 2>/dev/null || true
	rm -rf "$BENCH_WORK"
}
trap _bench_cleanup EXIT

# start_nginx PORT: POST anywhere -> a fixed chat.completion
start_nginx() {
	local port=$1
	cat > "$BENCH_WORK/nginx.conf" <<CONF
worker_processes 1;
pid $BENCH_WORK/nginx.pid;
error_log $BENCH_WORK/nginx.err;
events { worker_connections 1024; }
http {
	access_log off;
	keepalive_requests 10000000;
	keepalive_timeout 300s;
	client_body_temp_path $BENCH_WORK/nginx_tmp;
	server {
		listen 127.0.0.1:$port;
		location / {
			default_type application/json;
			return 200 '{"id":"fixed","object":"chat.completion","created":1,"model":"accounts/fireworks/models/kimi-k2p6","choices":[{"index":0,"message":{"role":"assistant","content":"fixed answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6,"prompt_tokens_details":{"cached_tokens":0}}}';
		}
	}
}
CONF
	nginx -c "$BENCH_WORK/nginx.conf"
	for _ in $(seq 1 50); do [ -s "$BENCH_WORK/nginx.pid" ] && break; sleep 0.1; done
}

# start_cluster EXTRA_CONF: initdb + start, fw_tier created in postgres
start_cluster() {
	su fwtest -s /bin/bash -c "'$BINDIR/initdb' -D '$BENCH_WORK/data' -A trust -U postgres" >/dev/null
	cat >> "$BENCH_WORK/data/postgresql.conf" <<CONF
port = $PGPORT_BENCH
listen_addresses = ''
unix_socket_directories = '$BENCH_WORK'
shared_preload_libraries = 'fw_tier'
$1
CONF
	su fwtest -s /bin/bash -c "'$BINDIR/pg_ctl' -D '$BENCH_WORK/data' -l '$BENCH_WORK/pg.log' -w start" >/dev/null
	bpsql -c "CREATE EXTENSION fw_tier" >/dev/null
}

bpsql() { su fwtest -s /bin/bash -c "$(printf '%q ' "$BINDIR/psql" -X -q -A -t -h "$BENCH_WORK" -p "$PGPORT_BENCH" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@")"; }

# start_reference: the nginx fixed-answer endpoint ($URL) and the plain
# libcurl loop ($BENCH_WORK/curl_loop URL N) the overhead figures compare to
start_reference() {
	gcc -O2 -o "$BENCH_WORK/curl_loop" bench/overhead/curl_loop.c $(curl-config --libs)
	NGINX_PORT=$((PGPORT_BENCH + 1))
	start_nginx $NGINX_PORT
	URL="http://127.0.0.1:$NGINX_PORT"
}

# fw_rate: sequential fw_complete calls/s in one backend ($N calls, after a
# 1,000-call warm-up)
fw_rate() {
	bpsql -c "SELECT count(fw_complete('x', 'batch')) FROM generate_series(1, 1000)" >/dev/null
	bpsql -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); n bigint;
	  BEGIN SELECT count(fw_complete('x', 'batch')) INTO n FROM generate_series(1, $N);
	  RAISE NOTICE '%', round($N / extract(epoch FROM clock_timestamp() - t0), 1); END \$\$" 2>&1 |
		sed -n 's/^NOTICE: *//p'
}

# best A B: the larger number
best() { echo "$1 $2" | awk '{print (($1 > $2) ? $1 : $2)}'; }

# pid of the fw_tier background process of a type ('launcher', 'flusher')
fw_worker_pid() { bpsql -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'fw_tier $1'"; }

# pause_drain / resume_drain: nothing is written to fw_tier.calls while
# paused.  The launcher is stopped (so it starts no flusher) and the
# running flusher is let go idle and exit (it does after one idle second).
pause_drain() {
	LAUNCHER_PID=$(fw_worker_pid launcher)
	[ -n "$LAUNCHER_PID" ] || { echo "fw_tier launcher is not running" >&2; exit 1; }
	bpsql -c "SELECT fw_flush()" >/dev/null
	kill -STOP "$LAUNCHER_PID"
	for _ in $(seq 1 100); do
		[ -z "$(fw_worker_pid flusher)" ] && return 0
		sleep 0.1
	done
	echo "fw_tier flusher did not go idle" >&2
	exit 1
}
resume_drain() { [ -n "${LAUNCHER_PID:-}" ] && kill -CONT "$LAUNCHER_PID" 2>/dev/null || true; }

# build_copy (bench/overhead/compare.sh, bench/calllog OLD_REV): revisions
# side by side, each in a private relocated PostgreSQL copy
BENCH_ROOT=$(pwd)
# build_copy NAME REV: PostgreSQL copy with fw_tier of REV installed;
# prints its bindir
build_copy() {
	local name=$1 rev=$2 pg="$BENCH_WORK/pg-$1" src="$BENCH_WORK/src-$1"
	mkdir -p "$pg/usr/lib" "$pg/usr/share" "$pg/usr/include"
	cp -a /usr/lib/postgresql "$pg/usr/lib/"
	cp -a /usr/share/postgresql "$pg/usr/share/"
	cp -a /usr/include/postgresql "$pg/usr/include/"
	mkdir -p "$src"
	if [ -n "$rev" ]; then
		git -C "$BENCH_ROOT" archive "$rev" | tar -x -C "$src"
	else
		(cd "$BENCH_ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$src")
	fi
	local bin="$pg/usr/lib/postgresql/15/bin"
	(cd "$src" && PATH="$bin:$PATH" make -s >/dev/null && PATH="$bin:$PATH" make -s install >/dev/null)
	echo "$bin"
}

# cluster NAME BINDIR PORT [EXTRA_CONF]: start a cluster of that copy, fw_tier
# created in postgres, pointed at $URL (start_reference first)
cluster() {
	local name=$1 bin=$2 port=$3 data="$BENCH_WORK/data-$1"
	su fwtest -s /bin/bash -c "'$bin/initdb' -D '$data' -A trust -U postgres" >/dev/null
	cat >> "$data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$BENCH_WORK'
shared_preload_libraries = 'fw_tier'
fw_tier.base_url = '$URL/inference/v1'
fw_tier.api_key = 'bench'
${4:-}
CONF
	BENCH_CLUSTERS="$BENCH_CLUSTERS
$bin $data"
	su fwtest -s /bin/bash -c "'$bin/pg_ctl' -D '$data' -l '$BENCH_WORK/pg-$name.log' -w start" >/dev/null
	su fwtest -s /bin/bash -c "'$bin/psql' -X -q -h '$BENCH_WORK' -p $port -U postgres -d postgres -c 'CREATE EXTENSION fw_tier'" >/dev/null
}

