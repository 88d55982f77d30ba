#!/bin/bash
# Compares fwsim (--time-scale 0) with nginx returning a fixed chat.completion
# JSON, both over one keep-alive connection (wrk -t1 -c1), loopback only.
# Prints both req/s and "RESULT fwsim/nginx = X.XX (target >= 0.50)".
# Exit: 0 when the ratio meets the target, 1 when it is below, 2 on setup errors.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
FWSIM_DIR="$ROOT/test/fwsim"
DURATION=${BENCH_DURATION:-5s}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}

command -v wrk >/dev/null || { echo "vs_nginx: wrk not found" >&2; exit 2; }
[ -x "$NGINX" ] || { echo "vs_nginx: nginx not found" >&2; exit 2; }
make -s -C "$FWSIM_DIR" >/dev/null || { echo "vs_nginx: cannot build fwsim" >&2; exit 2; }

TMP=$(mktemp -d /tmp/fwsim-bench.XXXXXX)
FW_PID= ; NGX_STARTED=
cleanup() {
    [ -n "$FW_PID" ] && kill "$FW_PID" 2>/dev/null && wait "$FW_PID" 2>/dev/null
    [ -n "$NGX_STARTED" ] && [ -f "$TMP/nginx.pid" ] && kill "$(cat "$TMP/nginx.pid")" 2>/dev/null
    sleep 0.2; rm -rf "$TMP"
}
trap cleanup EXIT

# fwsim on an ephemeral loopback port
"$FWSIM_DIR/fwsim" --port 0 --port-file "$TMP/fwsim.port" --time-scale 0 --quiet \
    >"$TMP/fwsim.out" 2>"$TMP/fwsim.err" &
FW_PID=$!
for _ in $(seq 50); do [ -s "$TMP/fwsim.port" ] && break; sleep 0.1; done
[ -s "$TMP/fwsim.port" ] || { echo "vs_nginx: fwsim did not start" >&2; cat "$TMP/fwsim.err" >&2; exit 2; }
FW_PORT=$(cat "$TMP/fwsim.port")

# nginx: find a free loopback port by trying a few
BODY='{"id":"fwsim-0000000000000000","object":"chat.completion","created":1700000000,"model":"accounts/fireworks/models/kimi-k2p6","choices":[{"index":0,"message":{"role":"assistant","content":"Echo: Hello from the benchmark"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}}'
for NGX_PORT in $(shuf -i 20000-60000 -n 10); do
    cat >"$TMP/nginx.conf" <<CONF
worker_processes 1;
daemon on;
pid $TMP/nginx.pid;
error_log $TMP/nginx.err warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $TMP/body;
    proxy_temp_path $TMP/proxy;
    fastcgi_temp_path $TMP/fastcgi;
    uwsgi_temp_path $TMP/uwsgi;
    scgi_temp_path $TMP/scgi;
    server {
        listen 127.0.0.1:$NGX_PORT;
        default_type application/json;
        location / { return 200 '$BODY'; }
    }
}
CONF
    if "$NGINX" -p "$TMP" -c "$TMP/nginx.conf" 2>>"$TMP/nginx.start"; then NGX_STARTED=1; break; fi
done
[ -n "$NGX_STARTED" ] || { echo "vs_nginx: nginx did not start" >&2; cat "$TMP/nginx.start" >&2; exit 2; }
sleep 0.2

run_wrk() {  # $1 = port; prints req/s
    local out
    out=$(timeout 60 wrk -t1 -c1 -d"$DURATION" -s "$HERE/post.lua" "http://127.0.0.1:$1/inference/v1/chat/completions" 2>&1)
    echo "$out" | sed 's/^/    /' >&2
    if ! echo "$out" | grep -q '^NON2XX 0 SOCKET_ERRORS 0$'; then
        echo "vs_nginx: errors or non-2xx answers on port $1" >&2
        echo 0; return
    fi
    echo "$out" | awk '/^Requests\/sec:/ {print $2}'
}

echo "nginx (fixed JSON) on 127.0.0.1:$NGX_PORT:" >&2
NGX_RPS=$(run_wrk "$NGX_PORT")
echo "fwsim --time-scale 0 on 127.0.0.1:$FW_PORT:" >&2
FW_RPS=$(run_wrk "$FW_PORT")

echo "nginx req/s: $NGX_RPS"
echo "fwsim req/s: $FW_RPS"
RATIO=$(awk -v a="$FW_RPS" -v b="$NGX_RPS" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "0.00" }')
echo "RESULT fwsim/nginx = $RATIO (target >= 0.50)"
awk -v r="$RATIO" 'BEGIN { exit (r >= 0.50) ? 0 : 1 }'
