#!/usr/bin/env bash
# The standard benchmark suite: starts each deployment on this machine,
# runs the load generator's standard runs against it and prints one table.
#
#   bench/suite.sh [--quick] [--modes embedded,pipeline,cluster] [--out DIR]
#
# embedded: one im-server with its SQLite store (fsync on every commit).
# pipeline: Redis (AOF, appendfsync always), MariaDB (durable InnoDB), one
#           im-server and one im-storage-worker.
# cluster:  the same with three im-server nodes of one cluster; the load
#           generator spreads every pair and group over the nodes, so
#           nearly every delivery crosses nodes (bench/cluster.sh measures
#           more of the cluster: same against cross node, Redis cost,
#           100,000 connections over six nodes).
# Every run verifies every delivery (the table says if one did not).
# Besides both modes it runs 100,000 idle connections over six embedded
# server processes and six load generator processes, a registration storm
# at the default password hashing cost (bench/register-rss.sh) and the
# storage worker's rows/s (bench/worker-rows.sh). --quick shortens every run (to
# try the suite, not to quote). The JSON reports stay in DIR (default
# target/bench/DATE).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

quick=0
modes=embedded,pipeline,cluster
out=target/bench/$(date +%Y-%m-%d-%H%M)
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --modes) modes=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Scale of the runs.
idle=19000
many=100000
nodes=6
direct_conns=2000
duration=15
warmup=3
storm=18000
worker_rows=1000000
register=300
if [ $quick = 1 ]; then
  idle=2000
  many=6000
  direct_conns=200
  duration=3
  warmup=1
  storm=2000
  worker_rows=50000
fi
sources=127.0.0.2-127.0.0.20

cargo build --release -q -p im-server -p im-storage -p im-loadgen -p im-bench
bench_init
run_id=$(date +%s)

loadgen() {
  local report=$1
  shift
  echo "  im-loadgen $*" >&2
  # A failed verification makes im-loadgen exit 1; the table reports it.
  target/release/im-loadgen --quiet --json "$out/$report.json" "$@" \
    >"$out/$report.txt" 2>"$out/$report.err" || true
  tail -n +1 "$out/$report.txt" | grep -E '^(messages|storm|verification)' | sed 's/^/    /' >&2 || true
}

# Open file descriptors of a process: its connections, near enough.
fds() {
  ls "/proc/$1/fd" 2>/dev/null | wc -l
}

# Holds N idle connections against the servers whose pids are in
# $measure_pids and records RSS and slab growth per connection as
# "<mode>-idle" facts. The users are registered by a first short run, so
# that what is measured is connections, not new accounts.
idle_run() {
  local mode=$1 conns=$2 workers=$3 servers=$4
  local prefix="idle${run_id}${mode}"
  local common=(--server "$servers" --scenario idle --connections "$conns" --ramp 0
    --workers "$workers" --user-prefix "$prefix" --source-addrs "$sources")
  # Register the users, then log them all in once more, so that what is
  # measured next is connections, not new accounts or the store's page
  # cache filling with them.
  loadgen "$mode-idle-register" "${common[@]}" --duration 1 --warmup 0 --settle 0
  loadgen "$mode-idle-warm" "${common[@]}" --duration 1 --warmup 0 --settle 0
  # The closed connections' TIME_WAIT sockets hold slab for a minute.
  local _w
  for _w in $(seq 90); do
    [ "$(ss -Htan state time-wait | wc -l)" -lt 1000 ] && break
    sleep 1
  done
  local rss_before=0 p
  for p in $measure_pids; do rss_before=$((rss_before + $(rss_kib "$p"))); done
  local slab_before
  slab_before=$(slab_kib)
  loadgen "$mode-idle" "${common[@]}" --duration 30 --warmup 0 --settle 0 &
  local lg=$!
  local held=0 _
  for _ in $(seq 600); do
    kill -0 "$lg" 2>/dev/null || break
    held=0
    for p in $measure_pids; do held=$((held + $(fds "$p"))); done
    [ "$held" -ge "$conns" ] && break
    sleep 0.5
  done
  sleep 3
  local rss_hold=0
  for p in $measure_pids; do rss_hold=$((rss_hold + $(rss_kib "$p"))); done
  local slab_hold
  slab_hold=$(slab_kib)
  wait "$lg" || true
  printf '{"connections": %d, "rss_before_kib": %d, "rss_hold_kib": %d, "slab_before_kib": %d, "slab_hold_kib": %d}\n' \
    "$conns" "$rss_before" "$rss_hold" "$slab_before" "$slab_hold" >"$out/$mode-idle-memory.json"
}

standard_runs() {
  local mode=$1 server=$2
  local d=(--duration "$duration" --warmup "$warmup")
  echo "[$mode] idle connections" >&2
  measure_pids=${NODE_PIDS:-$SERVER_PID} idle_run "$mode" "$idle" 2 "$server"
  echo "[$mode] 1:1 chat" >&2
  loadgen "$mode-direct-20k" --server "$server" --scenario direct --connections "$direct_conns" --rate 20000 "${d[@]}"
  loadgen "$mode-direct-50k" --server "$server" --scenario direct --connections "$direct_conns" --rate 50000 "${d[@]}"
  loadgen "$mode-direct-max" --server "$server" --scenario direct --connections "$direct_conns" --rate 0 "${d[@]}"
  echo "[$mode] groups of 500" >&2
  loadgen "$mode-group-1k" --server "$server" --scenario group --group-size 500 --connections 2000 --rate 1000 "${d[@]}"
  loadgen "$mode-group-max" --server "$server" --scenario group --group-size 500 --connections 2000 --rate 0 --window 4 "${d[@]}"
  echo "[$mode] reconnect storm" >&2
  loadgen "$mode-storm" --server "$server" --scenario storm --connections "$storm" --ramp 0 --rate 2000 \
    --workers 2 --source-addrs "$sources" --duration 10 --warmup 2
}

for mode in ${modes//,/ }; do
  case $mode in
    embedded)
      start_server embedded
      standard_runs embedded "127.0.0.1:$SERVER_PORT"
      stop_all
      echo "[embedded] $many idle connections over $nodes server processes" >&2
      servers=() pids=()
      for i in $(seq "$nodes"); do
        # Each process may hold 20,000 open files here.
        start_server "node$i" --max-connections 19900
        servers+=("127.0.0.1:$SERVER_PORT")
        pids+=("$SERVER_PID")
      done
      measure_pids="${pids[*]}" idle_run many "$many" "$nodes" "$(IFS=,; echo "${servers[*]}")"
      stop_all
      echo "[embedded] registration storm at the default argon2 cost" >&2
      bench/register-rss.sh "$register" >"$out/embedded-register.txt" 2>&1 || true
      sed 's/^/    /' "$out/embedded-register.txt" >&2
      ;;
    pipeline)
      start_pipeline pipeline
      standard_runs pipeline "127.0.0.1:$SERVER_PORT"
      stop_all
      echo "[pipeline] storage worker rows/s" >&2
      bench/worker-rows.sh "$worker_rows" >"$out/pipeline-worker-rows.txt" 2>&1 || true
      grep -E '^(worker|LOAD DATA)' "$out/pipeline-worker-rows.txt" | sed 's/^/    /' >&2 || true
      ;;
    cluster)
      start_cluster 3
      standard_runs cluster "$SERVERS"
      stop_all
      unset NODE_PIDS
      ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
done

python3 bench/table.py "$out"
