#!/usr/bin/env bash
# Runs the whole test suite:
#  - unit and property tests of every crate;
#  - the end-to-end tests in tests/it against the embedded store, including
#    the storage worker and crash tests (which start their own Redis and
#    MariaDB so they can kill them);
#  - the same end-to-end chat tests again against the production pipeline
#    (Redis Streams + MySQL + storage worker), and the chat tests once more
#    with the messages on two MySQL shards (one on each MariaDB);
#  - the chat and cluster tests once more with the pipeline on a Redis
#    Cluster (6 processes: 3 masters with a replica each).
# It starts a throwaway redis-server (AOF on), a Redis Cluster and two
# MariaDB servers on free ports in a temp directory, unless REDIS_URL /
# REDIS_CLUSTER_NODES / MYSQL_URL / MYSQL_URL_2 point elsewhere, and stops
# them afterwards. Tests use their own key prefixes and databases.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing $2 (for $1)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}
need redis-server redis-server
need mariadbd mariadb-server
need mariadb-install-db mariadb-server
need mariadb mariadb-client

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ -z "${REDIS_URL:-}" ]; then
  port=$(free_port)
  mkdir -p "$work/redis"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --dir "$work/redis" \
    --appendonly yes --appendfsync always --daemonize no --logfile "$work/redis/log" &
  pids+=($!)
  export REDIS_URL="redis://127.0.0.1:$port"
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
fi

# Starts a MariaDB in $work/$1 on a free port; sets started_url.
start_mariadb() {
  local name=$1 port
  port=$(free_port)
  mariadb-install-db --no-defaults --datadir="$work/$name" --user="$(id -un)" \
    --auth-root-authentication-method=normal --skip-test-db >"$work/$name-install.log" 2>&1
  mariadbd --no-defaults --datadir="$work/$name" --socket="$work/$name.sock" \
    --pid-file="$work/$name.pid" --port="$port" --bind-address=127.0.0.1 --user="$(id -un)" \
    --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=256M \
    --max-connections=1000 >"$work/$name.log" 2>&1 &
  pids+=($!)
  until mariadb -h127.0.0.1 -P"$port" -uroot -e 'SELECT 1' >/dev/null 2>&1; do sleep 0.1; done
  started_url="mysql://root@127.0.0.1:$port"
}

if [ -z "${MYSQL_URL:-}" ]; then
  start_mariadb mysql
  export MYSQL_URL="$started_url"
fi
# A second server for the tests whose messages spread over two shards.
if [ -z "${MYSQL_URL_2:-}" ]; then
  start_mariadb mysql2
  export MYSQL_URL_2="$started_url"
fi

if [ -z "${REDIS_CLUSTER_NODES:-}" ]; then
  REDIS_CLUSTER_NODES=$(tests/redis-cluster.sh "$work/redis-cluster")
  while read -r pid; do pids+=("$pid"); done <"$work/redis-cluster/pids"
  export REDIS_CLUSTER_NODES
fi

# The process-level tests run the im-server and im-storage-worker binaries.
cargo build --workspace --bins
cargo test --workspace "$@"
IM_TEST_STORE=pipeline cargo test -p im-tests --test it "$@" -- --skip crash:: --skip worker:: --skip cluster:: --skip redis_cluster:: --skip shards::
IM_TEST_STORE=pipeline IM_TEST_MYSQL_SHARDS=2 cargo test -p im-tests --test it "$@" -- chat::
# The third deployment, a Redis Cluster: the chat and cluster tests run on
# it (the store contract tests and the Redis Cluster tests, failovers
# included, already ran above).
IM_TEST_STORE=pipeline-cluster cargo test -p im-tests --test it "$@" -- chat:: cluster:: --skip redis_cluster::
