#!/usr/bin/env bash
# Measures storage worker throughput (rows/s from Redis Streams into
# MariaDB) next to LOAD DATA: starts a throwaway redis-server and mariadbd
# (temp directories, free ports, durable settings) and runs a release
# im-worker-bench against them.
#   bench/worker-rows.sh [ROWS] [im-worker-bench flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}
shift || true
cargo build --release -q -p im-bench --bin im-worker-bench
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port)
mport=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
# Redis as in production: AOF, fsync once a second.
redis-server --bind 127.0.0.1 --port "$rport" --save "" --dir "$dir" \
  --appendonly yes --appendfsync everysec --daemonize no --logfile "$dir/redis.log" &
pids+=($!)
redis_pid=$!
mariadb-install-db --no-defaults --datadir="$dir/data" --user=root \
  --auth-root-authentication-method=normal --skip-test-db >/dev/null 2>&1
# Durable InnoDB: the redo log is flushed at every commit.
mariadbd --no-defaults --datadir="$dir/data" --socket="$dir/mysql.sock" \
  --pid-file="$dir/mysql.pid" --port="$mport" --bind-address=127.0.0.1 --user=root \
  --skip-name-resolve --skip-log-bin --local-infile=1 \
  --innodb-flush-log-at-trx-commit=1 --innodb-doublewrite=1 \
  --innodb-buffer-pool-size=1G --innodb-log-file-size=512M \
  --max-connections=200 ${MYSQLD_EXTRA:-} >"$dir/mysql.log" 2>&1 &
pids+=($!)
mysql_pid=$!
for _ in $(seq 300); do
  mariadb -h127.0.0.1 -P"$mport" -uroot -e 'SELECT 1' >/dev/null 2>&1 && break
  sleep 0.1
done
echo "redis-server $(redis-server --version | awk '{print $3}'), $(mariadbd --version | awk '{print $2, $3}'), $(nproc) cores"
target/release/im-worker-bench --redis-url "redis://127.0.0.1:$rport" \
  --mysql-url "mysql://root@127.0.0.1:$mport" --rows "$rows" \
  --pids "$mysql_pid,$redis_pid" "$@"
