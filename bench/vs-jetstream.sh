#!/usr/bin/env bash
# Persisted 1:1 messages per second against NATS JetStream, side by side in
# one run, the same shape on both: PAIRS sender/receiver pairs on 2 x PAIRS
# connections, MESSAGES messages of 128 bytes per sender, at most 64
# unacknowledged per sender, every delivery checked once and in order.
#
#   bench/vs-jetstream.sh [PAIRS] [MESSAGES]      (default 50 pairs = 100 connections, 10000)
#
# Ours: im-server + Redis (AOF everysec, then always) + one storage worker
# + MariaDB (durable InnoDB); a send counts when it is acknowledged and
# delivered, and the run also waits until MySQL has every message (the
# backlog must drain within 60 s). JetStream: nats-server (the Debian
# package) with a file-storage stream, publishes that wait for their
# PubAck, one push consumer per receiving connection. Its fsync setting is
# printed next to ours: before 2.10 nats-server fsyncs its files every two
# minutes and cannot be told otherwise (2.10 added `sync_interval`). For
# each setup it also prints the CPU microseconds per message of every
# process (bench client included), so the distance is explained.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
pairs=${1:-50}
messages=${2:-10000}
if ! command -v nats-server >/dev/null; then
  apt-get install -y nats-server >/dev/null
fi
cargo build --release -q -p im-server -p im-storage -p im-bench
bench_init
echo "$(nproc) cores; $(redis-server --version | awk '{print $3}'), $(mariadbd --version | awk '{print $2, $3}'), nats-server $(nats-server --version | awk '{print $2}')"
echo "$pairs pairs ($((2 * pairs)) connections), $messages messages of 128 B each"

total=$((pairs * messages))

declare -A rate cpu
for fsync in everysec always; do
  start_redis --appendfsync "$fsync"
  start_mariadb
  start_worker worker
  start_server node --redis-url "redis://127.0.0.1:$REDIS_PORT" --mysql-url "$MYSQL_URL"
  pids=("$SERVER_PID" "$REDIS_PID" "$WORKER_PID" "$MYSQL_PID")
  before=()
  for p in "${pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
  out=$(client target/release/im-pairs-bench --server "127.0.0.1:$SERVER_PORT" --pairs "$pairs" \
    --messages "$messages" --size 128 --mysql-url "$MYSQL_URL")
  used=()
  for i in "${!pids[@]}"; do used+=($(( $(cpu_ticks "${pids[$i]}") - before[i] ))); done
  rate[$fsync]=$(echo "$out" | awk '/acknowledged and delivered/ {print $(NF-7)}')
  cpu[$fsync]=$(per_message "$total" client "$(echo "$out" | awk '/^client-ticks/ {print $2}')" \
    im-server "${used[0]}" redis-server "${used[1]}" im-storage-worker "${used[2]}" mariadbd "${used[3]}")
  echo "ours, Redis AOF appendfsync $fsync: $(echo "$out" | grep -v '^client-ticks' | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
  echo "  CPU us per message:${cpu[$fsync]}"
  stop_all
done

nats_port=$(free_port)
monitor_port=$(free_port)
mkdir -p "$BENCH_DIR/nats"
nats-server -js -sd "$BENCH_DIR/nats" -a 127.0.0.1 -p "$nats_port" -m "$monitor_port" \
  >"$BENCH_DIR/nats.log" 2>&1 &
nats_pid=$!
bench_pids+=("$nats_pid")
wait_port "$nats_port"
sync=$(python3 -c '
import json, sys, urllib.request
config = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/jsz"))["config"]
print(config.get("sync_interval") or "every 2 min, fixed before 2.10")
' "$monitor_port")
before=$(cpu_ticks "$nats_pid")
out=$(client target/release/im-jetstream-bench --server "nats://127.0.0.1:$nats_port" --pairs "$pairs" \
  --messages "$messages" --size 128)
used=$(( $(cpu_ticks "$nats_pid") - before ))
js=$(echo "$out" | awk '/deliveries\/s/ {for (i = 1; i <= NF; i++) if ($(i + 1) == "deliveries/s") print $i}')
js_cpu=$(per_message "$total" client "$(echo "$out" | awk '/^client-ticks/ {print $2}')" nats-server "$used")
echo "JetStream, file storage, fsync $sync: $(echo "$out" | grep -v '^client-ticks')"
echo "  CPU us per message:$js_cpu"
stop_all

echo
echo "| setup | persisted deliveries/s | against JetStream | CPU µs per message |"
echo "|---|---|---|---|"
for fsync in everysec always; do
  awk -v s="$fsync" -v r="${rate[$fsync]}" -v j="$js" -v c="${cpu[$fsync]}" \
    'BEGIN {printf "| ours, AOF %s | %.0f | %.2fx |%s |\n", s, r, r / j, c}'
done
awk -v j="$js" -v s="$sync" -v c="$js_cpu" 'BEGIN {printf "| JetStream, fsync %s | %.0f | 1.00x |%s |\n", s, j, c}'
