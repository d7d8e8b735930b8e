#!/usr/bin/env bash
# Measures server RSS per idle authenticated connection, plain and TLS side
# by side: for each, starts a fresh release im-server, opens N idle
# logged-in connections from a separate process (TLS: full handshakes),
# prints the per-connection figures, then drops and reopens them all (TLS:
# resumed from tickets) and prints the reconnect rate and the server's CPU
# time per connection.
#   bench/idle-rss.sh [CONNECTIONS] [USERS] [MODES]   (MODES: plain,tls)
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-19000}
users=${2:-2000}
modes=${3:-plain,tls}
cargo build --release -q -p im-server -p im-bench
data=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null || true; rm -rf "$data"' EXIT
target/release/im-cert --dir "$data/pki" >/dev/null

for mode in ${modes//,/ }; do
  port=$((20000 + RANDOM % 20000))
  tls_port=$((port + 1))
  rm -rf "$data/db"
  flags=()
  bench_flags=(--server "127.0.0.1:$port")
  if [ "$mode" = tls ]; then
    flags=(--tls-listen "127.0.0.1:$tls_port" --tls-cert "$data/pki/cert.pem"
           --tls-key "$data/pki/key.pem")
    bench_flags=(--server "127.0.0.1:$tls_port" --ca-file "$data/pki/ca.pem")
  fi
  # Cheap password hashing: registering the users is not what is measured.
  target/release/im-server --listen 127.0.0.1:$port --data-dir "$data/db" \
    --argon2-memory-kib 64 --argon2-iterations 1 --heartbeat-timeout-secs 600 \
    --auth-timeout-secs 60 --max-new-conns-per-addr-per-sec 0 --max-conns-per-addr 0 \
    --max-requests-per-conn-per-sec 0 "${flags[@]}" >"$data/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  echo "== $mode"
  target/release/im-idle-bench "${bench_flags[@]}" --pid $pid --connections "$conns" --users "$users"
  kill $pid; wait $pid 2>/dev/null || true; pid=
done
