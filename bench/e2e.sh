#!/usr/bin/env bash
# End-to-end persisted 1:1 messages per second on one box: starts a
# throwaway deployment and runs im-pairs-bench against it.
#   bench/e2e.sh embedded [im-pairs-bench flags...]
#   bench/e2e.sh pipeline [im-pairs-bench flags...]
# embedded: im-server with its SQLite store (fsync on every commit).
# pipeline: Redis (AOF, appendfsync always), MariaDB (durable InnoDB),
#           im-server and im-storage-worker; the run also waits until every
#           message is in MySQL.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-pipeline}
shift || true
cargo build --release -q -p im-server -p im-storage -p im-bench
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
port=$(free_port)
server_flags=(--listen "127.0.0.1:$port" --data-dir "$dir/node" --argon2-memory-kib 64 --argon2-iterations 1)
bench_flags=()
if [ "$mode" = pipeline ]; then
  rport=$(free_port)
  mport=$(free_port)
  redis-server --bind 127.0.0.1 --port "$rport" --save "" --dir "$dir" \
    --appendonly yes --appendfsync always --daemonize no --logfile "$dir/redis.log" &
  pids+=($!)
  mariadb-install-db --no-defaults --datadir="$dir/mysql" --user=root \
    --auth-root-authentication-method=normal --skip-test-db >/dev/null 2>&1
  mariadbd --no-defaults --datadir="$dir/mysql" --socket="$dir/mysql.sock" \
    --pid-file="$dir/mysql.pid" --port="$mport" --bind-address=127.0.0.1 --user=root \
    --skip-name-resolve --skip-log-bin --innodb-flush-log-at-trx-commit=1 \
    --innodb-buffer-pool-size=1G --innodb-log-file-size=512M >"$dir/mysql.log" 2>&1 &
  pids+=($!)
  until mariadb -h127.0.0.1 -P"$mport" -uroot -e 'CREATE DATABASE IF NOT EXISTS im' >/dev/null 2>&1; do sleep 0.1; done
  until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.1; done
  mysql_url="mysql://root@127.0.0.1:$mport/im"
  server_flags+=(--redis-url "redis://127.0.0.1:$rport" --mysql-url "$mysql_url")
  target/release/im-storage-worker --redis-url "redis://127.0.0.1:$rport" \
    --mysql-url "$mysql_url" --consumer bench >"$dir/worker.log" 2>&1 &
  pids+=($!)
  bench_flags+=(--mysql-url "$mysql_url")
fi
target/release/im-server "${server_flags[@]}" >"$dir/server.log" 2>&1 &
pids+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.1; done
echo "$mode mode, $(nproc) cores, everything on this machine"
target/release/im-pairs-bench --server "127.0.0.1:$port" "${bench_flags[@]}" "$@"
