#!/usr/bin/env bash
# Measures server RSS per idle authenticated connection: starts a release
# im-server on a fresh data directory, opens N idle logged-in connections
# from a separate process and prints the per-connection figures.
#   bench/idle-rss.sh [CONNECTIONS] [USERS]
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-19000}
users=${2:-2000}
cargo build --release -q -p im-server -p im-bench
data=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$data"' EXIT
# Cheap password hashing: registering the users is not what is measured.
target/release/im-server --listen 127.0.0.1:$port --data-dir "$data" \
  --argon2-memory-kib 64 --argon2-iterations 1 --heartbeat-timeout-secs 600 \
  --auth-timeout-secs 60 --max-new-conns-per-addr-per-sec 0 --max-conns-per-addr 0 \
  --max-requests-per-conn-per-sec 0 >"$data/server.log" 2>&1 &
pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
target/release/im-idle-bench --server 127.0.0.1:$port --pid $pid --connections "$conns" --users "$users"
