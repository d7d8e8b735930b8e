#!/usr/bin/env bash
# A dead node's TLS clients moving to the others: three pipeline nodes
# with TLS listeners, CONNECTIONS users chatting over TLS (1:1, every pair
# across nodes), then node 1 is killed (-9) mid-run; its users reconnect
# to nodes 2 and 3 and resume. Run twice side by side: with a ticket-key
# file all nodes share (the storm resumes TLS sessions) and with each
# node's own random keys (the storm makes full handshakes). Prints, per
# run, the survivors' full handshakes and resumptions during the storm,
# their CPU time in it, and the load generator's verdict.
#   bench/tls-failover.sh [CONNECTIONS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
conns=${1:-6000}
rate=${2:-2000}
cargo build --release -q -p im-server -p im-storage -p im-loadgen -p im-bench
bench_init
target/release/im-cert --dir "$BENCH_DIR/pki" >/dev/null
secret_hex() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }
secret_hex >"$BENCH_DIR/ticket-keys"

# metric PORT NAME: a counter of a node's /metrics.
metric() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(next((l.split()[1] for l in text.splitlines() if l.startswith(sys.argv[2] + " ")), "0"))
PY
}

run() {
  local label=$1 tickets=$2
  start_redis
  start_mariadb
  start_worker worker
  local i tls=() admins=() pids=()
  for i in 1 2 3; do
    local tls_port admin_port
    tls_port=$(free_port)
    admin_port=$(free_port)
    local extra=()
    [ "$tickets" = shared ] && extra=(--tls-ticket-key-file "$BENCH_DIR/ticket-keys")
    start_server "$label-node$i" --redis-url "redis://127.0.0.1:$REDIS_PORT" --mysql-url "$MYSQL_URL" \
      --node-id "node$i" --token-secret "a token secret every bench cluster node shares" \
      --max-connections 19900 --admin-listen "127.0.0.1:$admin_port" \
      --tls-listen "127.0.0.1:$tls_port" --tls-cert "$BENCH_DIR/pki/cert.pem" \
      --tls-key "$BENCH_DIR/pki/key.pem" "${extra[@]}"
    wait_port "$tls_port"
    tls+=("127.0.0.1:$tls_port")
    admins+=("$admin_port")
    pids+=("$SERVER_PID")
  done
  sleep 2
  local servers
  servers=$(IFS=,; echo "${tls[*]}")
  target/release/im-loadgen --quiet --json "$BENCH_DIR/$label.json" --server "$servers" \
    --ca-file "$BENCH_DIR/pki/ca.pem" --scenario direct --connections "$conns" --rate "$rate" \
    --cross-node-fraction 1 --duration 16 --warmup 2 --ramp 0 \
    >"$BENCH_DIR/$label.txt" 2>"$BENCH_DIR/$label.err" &
  local lg=$!
  # Ramp done and chatting: take the survivors' counters, kill node 1.
  sleep 8
  local full0=0 res0=0 cpu0=0 p
  for i in 1 2; do
    full0=$((full0 + $(metric "${admins[$i]}" im_tls_handshakes_total)))
    res0=$((res0 + $(metric "${admins[$i]}" im_tls_resumptions_total)))
    cpu0=$((cpu0 + $(cpu_ticks "${pids[$i]}")))
  done
  kill -9 "${pids[0]}"
  local killed_at
  killed_at=$(date +%s.%N)
  # The storm: until the survivors stop taking new handshakes.
  local last=-1 now=0 settled_at
  while true; do
    sleep 0.5
    now=0
    for i in 1 2; do
      now=$((now + $(metric "${admins[$i]}" im_tls_handshakes_total) + $(metric "${admins[$i]}" im_tls_resumptions_total)))
    done
    [ "$now" = "$last" ] && break
    last=$now
    settled_at=$(date +%s.%N)
  done
  local full1=0 res1=0 cpu1=0
  for i in 1 2; do
    full1=$((full1 + $(metric "${admins[$i]}" im_tls_handshakes_total)))
    res1=$((res1 + $(metric "${admins[$i]}" im_tls_resumptions_total)))
    cpu1=$((cpu1 + $(cpu_ticks "${pids[$i]}")))
  done
  wait "$lg" || true
  local moved=$(( (full1 - full0) + (res1 - res0) ))
  echo "== ticket keys: $tickets"
  echo "storm: $moved connections moved to nodes 2 and 3 in $(python3 -c "print(f'{$settled_at - $killed_at:.1f}')") s:" \
    "$((full1 - full0)) full handshakes, $((res1 - res0)) resumed;" \
    "survivors' CPU $(( (cpu1 - cpu0) * 10 )) ms (until settled, with their chat load)"
  grep -E '^(messages|verification)' "$BENCH_DIR/$label.txt" || cat "$BENCH_DIR/$label.err"
  stop_all
}

run shared shared
run own own
