# Shared by the bench scripts (source it): throwaway deployments on free
# ports in a temp directory, stopped when the script exits.
#
#   bench_init                    temp dir in $BENCH_DIR, cleanup on exit
#   free_port                     an unused TCP port
#   start_redis [flags...]        redis-server (AOF, fsync always, rewritten past
#                                 $AOF_REWRITE_MIN_SIZE, 1gb as docs/operations.md
#                                 recommends; also given $REDIS_FLAGS); sets REDIS_PORT, REDIS_PID
#   start_mariadb [flags...]      durable mariadbd; sets MYSQL_PORT, MYSQL_PID, MYSQL_URL (database im)
#   start_server NAME [flags...]  release im-server (also given $SERVER_FLAGS); sets SERVER_PORT, SERVER_PID
#   start_pipeline NAME [flags...] Redis, MariaDB, a storage worker and an im-server on them
#   start_worker NAME [flags...]  release im-storage-worker against $REDIS_PORT / $MYSQL_URL (also
#                                 given $WORKER_FLAGS); sets WORKER_PID
#   start_cluster N [flags...]    Redis, MariaDB, a storage worker and N im-server nodes of one
#                                 cluster; sets SERVERS (comma list) and NODE_PIDS
#   redis_snapshot FILE           INFO cpu and commandstats of $REDIS_PORT into FILE
#   wait_port PORT                until something listens there
#   client CMD...                 runs CMD, then prints "client-ticks N", the CPU it used
#   per_message N NAME TICKS ...  " NAME us ...": CPU microseconds per message over N messages
#   stop_all                      stops everything started so far

bench_pids=()

bench_init() {
  BENCH_DIR=$(mktemp -d)
  trap 'stop_all; rm -rf "$BENCH_DIR"' EXIT
}

stop_all() {
  local p
  for p in "${bench_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${bench_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bench_pids=()
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local _
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

start_redis() {
  REDIS_PORT=$(free_port)
  mkdir -p "$BENCH_DIR/redis-$REDIS_PORT"
  # shellcheck disable=SC2086 # REDIS_FLAGS holds several flags
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
    --dir "$BENCH_DIR/redis-$REDIS_PORT" --appendonly yes --appendfsync always \
    --auto-aof-rewrite-min-size "${AOF_REWRITE_MIN_SIZE:-1gb}" --daemonize no --logfile "$BENCH_DIR/redis-$REDIS_PORT/log" \
    ${REDIS_FLAGS:-} "$@" &
  REDIS_PID=$!
  bench_pids+=("$REDIS_PID")
  until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
}

start_mariadb() {
  MYSQL_PORT=$(free_port)
  local dir="$BENCH_DIR/mysql-$MYSQL_PORT"
  mariadb-install-db --no-defaults --datadir="$dir" --user="$(id -un)" \
    --auth-root-authentication-method=normal --skip-test-db >"$dir.install.log" 2>&1
  # Durable InnoDB: the redo log is flushed at every commit.
  mariadbd --no-defaults --datadir="$dir" --socket="$dir.sock" --pid-file="$dir.pid" \
    --port="$MYSQL_PORT" --bind-address=127.0.0.1 --user="$(id -un)" \
    --skip-name-resolve --skip-log-bin --innodb-flush-log-at-trx-commit=1 \
    --innodb-buffer-pool-size=1G --innodb-log-file-size=512M \
    --max-connections=1000 "$@" >"$dir.log" 2>&1 &
  MYSQL_PID=$!
  bench_pids+=("$MYSQL_PID")
  until mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot -e 'CREATE DATABASE IF NOT EXISTS im' >/dev/null 2>&1; do
    sleep 0.1
  done
  MYSQL_URL="mysql://root@127.0.0.1:$MYSQL_PORT/im"
}

# The abuse limits off (0): the load generator opens thousands of
# connections from 127.0.0.1 and sends at rates no single person would,
# which the defaults that protect a public service refuse.
BENCH_LIMITS="--max-msgs-per-user-per-sec 0 --max-requests-per-conn-per-sec 0 \
  --max-new-conns-per-addr-per-sec 0 --max-conns-per-addr 0 \
  --max-groups-created-per-user-per-hour 0 --max-members-added-per-minute 0"

# Cheap password hashing: registering simulated users is not what is
# measured. Generous timeouts: the load generator's users are slow to
# log in during a ramp of thousands per second.
start_server() {
  local name=$1
  shift
  SERVER_PORT=$(free_port)
  # shellcheck disable=SC2086 # BENCH_LIMITS and SERVER_FLAGS hold several flags
  target/release/im-server --listen "127.0.0.1:$SERVER_PORT" \
    --data-dir "$BENCH_DIR/$name" \
    --argon2-memory-kib 64 --argon2-iterations 1 --auth-timeout-secs 60 \
    $BENCH_LIMITS ${SERVER_FLAGS:-} "$@" >"$BENCH_DIR/$name.log" 2>&1 &
  SERVER_PID=$!
  bench_pids+=("$SERVER_PID")
  wait_port "$SERVER_PORT"
}

start_pipeline() {
  local name=$1
  shift
  start_redis
  start_mariadb
  start_worker worker
  start_server "$name" --redis-url "redis://127.0.0.1:$REDIS_PORT" --mysql-url "$MYSQL_URL" "$@"
}

start_cluster() {
  local n=$1
  shift
  start_redis
  start_mariadb
  start_worker worker
  local i servers=() pids=()
  for i in $(seq "$n"); do
    # Each process may hold 20,000 open files here.
    start_server "node$i" --redis-url "redis://127.0.0.1:$REDIS_PORT" --mysql-url "$MYSQL_URL" \
      --node-id "node$i" --token-secret "a token secret every bench cluster node shares" --max-connections 19900 "$@"
    servers+=("127.0.0.1:$SERVER_PORT")
    pids+=("$SERVER_PID")
  done
  SERVERS=$(IFS=,; echo "${servers[*]}")
  NODE_PIDS="${pids[*]}"
  # Formed: every node sees the others (they read the view twice a second).
  sleep 2
}

redis_snapshot() {
  redis-cli -p "$REDIS_PORT" info cpu >"$1"
  redis-cli -p "$REDIS_PORT" info commandstats >>"$1"
}

start_worker() {
  local name=$1
  shift
  # shellcheck disable=SC2086 # WORKER_FLAGS holds several flags
  target/release/im-storage-worker --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    --mysql-url "$MYSQL_URL" --consumer "$name" ${WORKER_FLAGS:-} "$@" >"$BENCH_DIR/$name.log" 2>&1 &
  WORKER_PID=$!
  bench_pids+=("$WORKER_PID")
}

# CPU time a process has used, in clock ticks (user + system).
cpu_ticks() {
  awk '{print $14 + $15}' "/proc/$1/stat"
}

# Runs a bench client: its output, then "client-ticks N", the CPU it used
# (the waited-for children of the shell that ran it).
client() {
  bash -c '"$@"; echo "client-ticks $(awk "{print \$16 + \$17}" /proc/$$/stat)"' client "$@"
}

# " name us name us ...": CPU microseconds per message (N messages) from
# name/ticks pairs.
per_message() {
  local n=$1
  shift
  awk -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN {for (i = 1; i < ARGC; i += 2) printf " %s %.1f", ARGV[i], ARGV[i + 1] / hz * 1e6 / n; exit}' "$@"
}

# Resident set size of a process, in KiB.
rss_kib() {
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status"
}

# Kernel slab memory, in KiB.
slab_kib() {
  awk '/^Slab:/ {print $2}' /proc/meminfo
}
