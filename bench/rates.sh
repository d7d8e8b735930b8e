#!/usr/bin/env bash
# The standard 1:1 run (im-loadgen --scenario direct, 2,000 connections,
# every delivery verified) at several offered rates on one deployment: the
# latency well before saturation, what is refused above it, and the
# saturated rate (rate 0).
#
#   bench/rates.sh pipeline|embedded [RATE...]     (default 20000 50000 0)
#
# pipeline: Redis with AOF $AOF (everysec unless set; `always` for fsync
# before every ack), one storage worker, durable MariaDB, one im-server.
# embedded: im-server alone (SQLite, fsync at every commit).
# $DURATION seconds per rate (15), after a 3 s warm-up; $LOADGEN_FLAGS are
# added to every im-loadgen run (e.g. "--window 16": fewer sends in flight
# at saturation, so none is refused). Each rate's line
# ends with the CPU each process used per acknowledged message, in µs
# (warm-up and connection set-up included). In pipeline mode each line
# also says how long after the run MySQL held every acknowledged message
# (the backlog must drain within 60 s for them to count as persisted), and
# Redis's own counters: messages and µs per append-script call, and the
# storage worker's reads per second.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
mode=${1:-pipeline}
shift || true
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(20000 50000 0)
duration=${DURATION:-15}
cargo build --release -q -p im-server -p im-storage -p im-loadgen
bench_init
if [ "$mode" = pipeline ]; then
  start_redis --appendfsync "${AOF:-everysec}"
  start_mariadb
  start_worker worker
  start_server node --redis-url "redis://127.0.0.1:$REDIS_PORT" --mysql-url "$MYSQL_URL"
  names=(im-server redis-server im-storage-worker mariadbd)
  pids=("$SERVER_PID" "$REDIS_PID" "$WORKER_PID" "$MYSQL_PID")
  echo "pipeline, Redis AOF ${AOF:-everysec}, $(nproc) cores, everything on this machine"
else
  start_server node
  names=(im-server)
  pids=("$SERVER_PID")
  echo "embedded, $(nproc) cores, everything on this machine"
fi
total_acked=0
for rate in "${rates[@]}"; do
  before=()
  for p in "${pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
  [ "$mode" = pipeline ] && redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
  began=$(date +%s.%N)
  client target/release/im-loadgen --quiet --server "127.0.0.1:$SERVER_PORT" --scenario direct \
    --connections 2000 --rate "$rate" --duration "$duration" --warmup 3 \
    --user-prefix "r$rate" ${LOADGEN_FLAGS:-} >"$BENCH_DIR/rate-$rate.txt" 2>&1 || true
  used=(im-loadgen "$(awk '/^client-ticks/ {print $2}' "$BENCH_DIR/rate-$rate.txt")")
  for i in "${!pids[@]}"; do used+=("${names[$i]}" $(( $(cpu_ticks "${pids[$i]}") - before[i] ))); done
  ended=$(date +%s.%N)
  acked=$(awk '/^messages:/ {print $4}' "$BENCH_DIR/rate-$rate.txt")
  [ "$mode" = pipeline ] && redis-cli -p "$REDIS_PORT" info commandstats >"$BENCH_DIR/stats-$rate.txt"
  printf 'offered %-6s ' "$([ "$rate" = 0 ] && echo max || echo "$rate")"
  awk '/^messages:/ {printf "%s msgs/s acked, %s refused; ", $(NF-7), $6}
       /^  deliver/ {printf "deliver p50 %s ms p99 %s ms; ", $3, $9}
       /^verification:/ {printf "%s lost, %s duplicated", $2, $6}' "$BENCH_DIR/rate-$rate.txt"
  if [ "$mode" = pipeline ]; then
    total_acked=$((total_acked + ${acked:-0}))
    start=$(date +%s.%N)
    stored=0
    for _ in $(seq 600); do
      stored=$(mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot im -N -e 'SELECT COUNT(*) FROM messages' 2>/dev/null || echo 0)
      [ "$stored" -ge "$total_acked" ] && break
      sleep 0.1
    done
    awk -v s="$stored" -v t="$total_acked" -v a="$start" -v b="$(date +%s.%N)" \
      'BEGIN {if (s >= t) printf "; all in MySQL %.1f s after", b - a; else printf "; only %d of %d in MySQL after 60 s", s, t}'
  fi
  echo
  echo "  CPU us per message:$(per_message "${acked:-1}" "${used[@]}")"
  if [ "$mode" = pipeline ]; then
    # The append script's calls (EVALSHA) and the worker's reads of new
    # entries (XREADGROUP), from Redis's own counters over the run.
    awk -F'[:=,]' -v n="${acked:-1}" -v t="$(awk -v a="$began" -v b="$ended" 'BEGIN {print b - a}')" '
      $1 == "cmdstat_evalsha" {calls = $3; usec = $7}
      $1 == "cmdstat_xreadgroup" {reads = $3}
      END {printf "  Redis: %.1f messages and %.0f us per script call (nearly all appends); %.0f worker reads/s\n",
        n / (calls ? calls : 1), usec, reads / t}' "$BENCH_DIR/stats-$rate.txt"
  fi
done
