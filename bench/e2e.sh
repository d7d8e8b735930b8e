#!/usr/bin/env bash
# End-to-end persisted 1:1 messages per second on one box: starts a
# throwaway deployment and runs im-pairs-bench against it.
#   bench/e2e.sh embedded [im-pairs-bench flags...]
#   bench/e2e.sh pipeline [im-pairs-bench flags...]
# embedded: im-server with its SQLite store (fsync on every commit).
# pipeline: Redis (AOF, appendfsync always), MariaDB (durable InnoDB),
#           im-server and im-storage-worker; the run also waits until every
#           message is in MySQL, then prints the CPU seconds each process
#           used and Redis's time in the append script per message.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
mode=${1:-pipeline}
shift || true
cargo build --release -q -p im-server -p im-storage -p im-bench
bench_init
bench_flags=()
if [ "$mode" = pipeline ]; then
  start_pipeline node
  bench_flags+=(--mysql-url "$MYSQL_URL")
else
  start_server node
fi
echo "$mode mode, $(nproc) cores, everything on this machine"
if [ "$mode" != pipeline ]; then
  exec target/release/im-pairs-bench --server "127.0.0.1:$SERVER_PORT" "$@"
fi
pids=("$SERVER_PID" "$REDIS_PID" "$MYSQL_PID" "$WORKER_PID")
names=(im-server redis-server mariadbd im-storage-worker)
before=()
for p in "${pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
out=$(target/release/im-pairs-bench --server "127.0.0.1:$SERVER_PORT" "${bench_flags[@]}" "$@")
echo "$out"
hz=$(getconf CLK_TCK)
line="cpu seconds during the run:"
for i in "${!pids[@]}"; do
  used=$(( $(cpu_ticks "${pids[$i]}") - before[i] ))
  line+=" ${names[$i]} $(awk -v t="$used" -v hz="$hz" 'BEGIN {printf "%.2f", t / hz}')"
done
echo "$line"
messages=$(echo "$out" | awk '/acknowledged and delivered/ {print $1; exit}')
redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,]' -v n="$messages" \
  '/^cmdstat_evalsha:/ {printf "append script: %.1f us of Redis time per message\n", $4 / n}'
