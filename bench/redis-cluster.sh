#!/usr/bin/env bash
# The pipeline on one Redis against a local Redis Cluster (3 masters with a
# replica each, all on this machine), with and without replica acks, in
# one run: the standard 1:1 run (im-loadgen --scenario direct, 2,000
# connections) at 5,000 msgs/s offered (RATES="..." for others) and at
# saturation, every delivery verified. Redis AOF everysec everywhere; one
# im-server, one storage worker and MariaDB (durable InnoDB) each time, on
# a fresh database and key prefix.
#   bench/redis-cluster.sh [SECONDS]
# Then the storage worker's rows/s into one MariaDB against two MySQL
# shards (two MariaDB servers on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
duration=${1:-15}
cargo build --release -q -p im-server -p im-storage -p im-loadgen -p im-bench
bench_init
start_redis --appendfsync everysec
single="redis://127.0.0.1:$REDIS_PORT"
nodes=$(tests/redis-cluster.sh "$BENCH_DIR/redis-cluster")
while read -r pid; do bench_pids+=("$pid"); done <"$BENCH_DIR/redis-cluster/pids"
start_mariadb
server_url=${MYSQL_URL%/im}
echo "redis-server $(redis-server --version | awk '{print $3}'), $(mariadbd --version | awk '{print $2, $3}'), $(nproc) cores, everything on this machine"

run() {
  local name=$1
  shift
  mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot -e "CREATE DATABASE $name"
  local db="$server_url/$name"
  # A key prefix per run: the runs share the Redis Cluster.
  target/release/im-storage-worker "$@" --mysql-url "$db" --consumer "$name" --redis-prefix "$name" \
    >"$BENCH_DIR/$name-worker.log" 2>&1 &
  local worker=$!
  start_server "$name" "$@" --mysql-url "$db" --redis-prefix "$name"
  local server=$SERVER_PID
  local rate
  for rate in ${RATES:-5000 0}; do
    target/release/im-loadgen --quiet --server "127.0.0.1:$SERVER_PORT" --scenario direct \
      --connections 2000 --rate "$rate" --duration "$duration" --warmup 3 \
      --user-prefix "$name$rate" >"$BENCH_DIR/$name-$rate.txt" 2>&1 || true
    printf '%-28s offered %-6s ' "$name" "$([ "$rate" = 0 ] && echo max || echo "$rate")"
    awk '/^messages:/ {printf "%s msgs/s acked, %s refused; ", $(NF-7), $6}
         /^  deliver/ {printf "deliver p50 %s ms p99 %s ms; ", $3, $9}
         /^verification:/ {printf "%s lost, %s duplicated", $2, $6}' "$BENCH_DIR/$name-$rate.txt"
    echo
  done
  kill "$server" "$worker" 2>/dev/null || true
  wait "$server" "$worker" 2>/dev/null || true
}

run one_redis --redis-url "$single"
run cluster_acks0 --redis-cluster-nodes "$nodes" --redis-replica-acks 0
run cluster_acks1 --redis-cluster-nodes "$nodes" --redis-replica-acks 1

echo "storage worker, 1,000,000 rows: one MariaDB against two shards"
first_mysql=$MYSQL_PORT
start_mariadb
second_mysql=$MYSQL_PORT
for shards in 1 2; do
  flags=()
  if [ "$shards" = 2 ]; then
    flags=(--mysql-shards "mysql://root@127.0.0.1:$first_mysql,mysql://root@127.0.0.1:$second_mysql")
  fi
  target/release/im-worker-bench --redis-url "$single" --mysql-url "mysql://root@127.0.0.1:$first_mysql" \
    --rows 1000000 --no-load-data "${flags[@]}" 2>&1 | grep -E '^worker' | sed "s/^/  $shards shard(s): /"
done
