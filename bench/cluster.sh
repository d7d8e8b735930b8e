#!/usr/bin/env bash
# Cluster benchmarks: pipeline nodes on one Redis and MariaDB with one
# storage worker, every run verified (exactly once, in order).
#
#   bench/cluster.sh [--quick] [--out DIR] [--skip-many | --only-many]
#
# On 3 nodes:
#   cluster-mixed   1:1 chat at 10,000 msgs/s, half the pairs spread over
#                   two nodes: same-node and cross-node send-to-deliver
#                   latency in one run
#   cluster-same / cluster-cross
#                   the same rate with every pair on one node, then every
#                   pair across nodes; the difference in Redis CPU per
#                   message is what routing costs Redis per cross-node push
#   cluster-storm-x reconnect storm with every connection's pair across
#                   nodes: resumes/s, nothing missing after the final sync
# On 6 nodes (unless --skip-many):
#   many-direct     100,000 connections (6 load generator processes over
#                   local source addresses), cross-node 1:1 at 10,000 msgs/s
#   many-group      the same users in groups of 100 spread over the nodes
#
# MANY_RATE and MANY_GROUP_RATE (default 10000 and 200 msgs/s) set the
# rates of the two 6-node runs.
#
# Writes JSON reports and Redis INFO snapshots to DIR (default
# target/bench/cluster-DATE) and prints a summary (bench/cluster.py).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

quick=0
three_runs=1
many_runs=1
out=target/bench/cluster-$(date +%Y-%m-%d-%H%M)
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --skip-many) many_runs=0 ;;
    --only-many) three_runs=0 ;;
    --out) out=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

conns=2000
rate=10000
duration=15
warmup=3
storm=18000
many=100000
many_nodes=6
many_rate=${MANY_RATE:-10000}
many_group_rate=${MANY_GROUP_RATE:-200}
if [ $quick = 1 ]; then
  conns=400
  rate=2000
  duration=4
  warmup=1
  storm=3000
  many=12000
fi
sources=127.0.0.2-127.0.0.20

cargo build --release -q -p im-server -p im-storage -p im-loadgen
bench_init

# loadgen REPORT FLAGS...: one verified run, with Redis's counters before
# and after it.
loadgen() {
  local report=$1
  shift
  echo "  im-loadgen $*" >&2
  redis_snapshot "$out/$report.redis-before"
  local cpu_before=0 p
  for p in $NODE_PIDS; do cpu_before=$((cpu_before + $(cpu_ticks "$p"))); done
  target/release/im-loadgen --quiet --json "$out/$report.json" "$@" \
    >"$out/$report.txt" 2>"$out/$report.err" || true
  local cpu_after=0
  for p in $NODE_PIDS; do cpu_after=$((cpu_after + $(cpu_ticks "$p"))); done
  echo "nodes_cpu_ticks $((cpu_after - cpu_before))" >"$out/$report.nodes"
  redis_snapshot "$out/$report.redis-after"
  grep -E '^(messages|storm|verification)' "$out/$report.txt" | sed 's/^/    /' >&2 || true
}

d=(--duration "$duration" --warmup "$warmup")
if [ $three_runs = 1 ]; then
echo "[cluster] 3 nodes" >&2
start_cluster 3
loadgen cluster-mixed --server "$SERVERS" --scenario direct --connections "$conns" \
  --rate "$rate" --cross-node-fraction 0.5 "${d[@]}"
loadgen cluster-same --server "$SERVERS" --scenario direct --connections "$conns" \
  --rate "$rate" --cross-node-fraction 0 "${d[@]}"
loadgen cluster-cross --server "$SERVERS" --scenario direct --connections "$conns" \
  --rate "$rate" --cross-node-fraction 1 "${d[@]}"
loadgen cluster-storm-x --server "$SERVERS" --scenario storm --connections "$storm" --ramp 0 \
  --rate 2000 --workers 2 --source-addrs "$sources" --duration 10 --warmup 2
redis-cli -p "$REDIS_PORT" info memory >"$out/cluster.redis-memory"
cp "$BENCH_DIR"/*.log "$out/" 2>/dev/null || true
stop_all
fi

if [ $many_runs = 1 ]; then
  echo "[cluster] $many connections over $many_nodes nodes" >&2
  start_cluster "$many_nodes"
  prefix="many$(date +%s)"
  common=(--server "$SERVERS" --connections "$many" --workers "$many_nodes"
    --source-addrs "$sources" --user-prefix "$prefix" --ramp 0)
  # Register the users once; the measured runs log them in.
  loadgen many-register "${common[@]}" --scenario idle --duration 1 --warmup 0 --settle 0
  loadgen many-direct "${common[@]}" --scenario direct --rate "$many_rate" "${d[@]}" --settle 5
  loadgen many-group "${common[@]}" --scenario group --group-size 100 --rate "$many_group_rate" "${d[@]}" --settle 5
  mkdir -p "$out/many-logs"
  cp "$BENCH_DIR"/*.log "$out/many-logs/" 2>/dev/null || true
  stop_all
fi

python3 bench/cluster.py "$out"
