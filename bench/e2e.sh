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
target/release/im-pairs-bench --server "127.0.0.1:$SERVER_PORT" "${bench_flags[@]}" "$@"
