#!/usr/bin/env bash
# Measures storage worker throughput (rows/s from Redis Streams into
# MariaDB) next to LOAD DATA: starts a throwaway redis-server and mariadbd
# (temp directories, free ports, durable settings) and runs a release
# im-worker-bench against them.
#   bench/worker-rows.sh [ROWS] [im-worker-bench flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
rows=${1:-1000000}
shift || true
cargo build --release -q -p im-bench --bin im-worker-bench
bench_init
# Redis as in production: AOF, fsync once a second.
start_redis --appendfsync everysec
start_mariadb --local-infile=1 --innodb-doublewrite=1 --max-connections=200 ${MYSQLD_EXTRA:-}
echo "redis-server $(redis-server --version | awk '{print $3}'), $(mariadbd --version | awk '{print $2, $3}'), $(nproc) cores"
target/release/im-worker-bench --redis-url "redis://127.0.0.1:$REDIS_PORT" \
  --mysql-url "mysql://root@127.0.0.1:$MYSQL_PORT" --rows "$rows" \
  --pids "$MYSQL_PID,$REDIS_PID" "$@"
