#!/usr/bin/env bash
# The standard 1:1 run (im-loadgen --scenario direct, 2,000 connections,
# every delivery verified) at several offered rates on one deployment: the
# latency well before saturation, what is refused above it, and the
# saturated rate (rate 0).
#
#   bench/rates.sh pipeline|embedded|cross [RATE...]
#                                   (default 20000 50000 0; cross: 0)
#
# pipeline: Redis with AOF $AOF (everysec unless set; `always` for fsync
# before every ack), one storage worker, durable MariaDB, one im-server.
# embedded: im-server alone (SQLite, fsync at every commit).
# cross: the pipeline with two im-server nodes of one cluster; each rate
# runs on one node, then over both with every pair across them (each
# message pushed from the sender's node to the other), and the line of
# the second ends with its rate as a share of the first.
# $DURATION seconds per rate (15), after a 3 s warm-up; $LOADGEN_FLAGS are
# added to every im-loadgen run (e.g. "--window 16": fewer sends in flight
# at saturation, so none is refused). Each rate's line
# ends with the CPU each process used per acknowledged message, in µs
# (warm-up and connection set-up included). In pipeline mode each line
# also says how long after the run MySQL held every acknowledged message
# (the backlog must drain within 60 s for them to count as persisted), and
# Redis's own counters: messages and µs per append-script call, the
# storage worker's reads per second, and the AOF's growth per message
# against the size of the record.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
mode=${1:-pipeline}
shift || true
rates=("$@")
if [ ${#rates[@]} -eq 0 ]; then
  if [ "$mode" = cross ]; then rates=(0); else rates=(20000 50000 0); fi
fi
duration=${DURATION:-15}
cargo build --release -q -p im-server -p im-storage -p im-loadgen
bench_init
case $mode in
  pipeline)
    start_redis --appendfsync "${AOF:-everysec}"
    start_mariadb
    start_worker worker
    start_server node --redis-url "redis://127.0.0.1:$REDIS_PORT" --mysql-url "$MYSQL_URL"
    names=(im-server redis-server im-storage-worker mariadbd)
    pids=("$SERVER_PID" "$REDIS_PID" "$WORKER_PID" "$MYSQL_PID")
    one_node="127.0.0.1:$SERVER_PORT"
    echo "pipeline, Redis AOF ${AOF:-everysec}, $(nproc) cores, everything on this machine"
    ;;
  cross)
    REDIS_FLAGS="--appendfsync ${AOF:-everysec}" start_cluster 2
    read -r node1 node2 <<<"$NODE_PIDS"
    names=(im-server-1 im-server-2 redis-server im-storage-worker mariadbd)
    pids=("$node1" "$node2" "$REDIS_PID" "$WORKER_PID" "$MYSQL_PID")
    one_node=${SERVERS%%,*}
    echo "pipeline with two nodes, Redis AOF ${AOF:-everysec}, $(nproc) cores, everything on this machine"
    ;;
  embedded)
    start_server node
    names=(im-server)
    pids=("$SERVER_PID")
    one_node="127.0.0.1:$SERVER_PORT"
    echo "embedded, $(nproc) cores, everything on this machine"
    ;;
  *)
    echo "usage: bench/rates.sh pipeline|embedded|cross [RATE...]" >&2
    exit 2
    ;;
esac
total_acked=0
aof_size() {
  redis-cli -p "$REDIS_PORT" info persistence | awk -F: '/^aof_current_size/ {print $2 + 0}'
}
# run LABEL RATE [im-loadgen flags...]: one verified run, its line, its
# CPU per message and (with Redis) its counters; sets ACKED_RATE.
run() {
  local label=$1 rate=$2 out
  shift 2
  out="$BENCH_DIR/run-$label-$rate.txt"
  before=()
  for p in "${pids[@]}"; do before+=("$(cpu_ticks "$p")"); done
  [ "$mode" != embedded ] && redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
  [ "$mode" != embedded ] && aof_before=$(aof_size)
  began=$(date +%s.%N)
  # shellcheck disable=SC2086 # LOADGEN_FLAGS holds several flags
  client target/release/im-loadgen --quiet --scenario direct \
    --connections 2000 --rate "$rate" --duration "$duration" --warmup 3 \
    --user-prefix "r$label$rate" "$@" ${LOADGEN_FLAGS:-} >"$out" 2>&1 || true
  used=(im-loadgen "$(awk '/^client-ticks/ {print $2}' "$out")")
  for i in "${!pids[@]}"; do used+=("${names[$i]}" $(( $(cpu_ticks "${pids[$i]}") - before[i] ))); done
  ended=$(date +%s.%N)
  acked=$(awk '/^messages:/ {print $4}' "$out")
  ACKED_RATE=$(awk '/^messages:/ {print $(NF-7)}' "$out")
  [ "$mode" != embedded ] && redis-cli -p "$REDIS_PORT" info commandstats >"$out.stats"
  printf 'offered %-6s ' "$([ "$rate" = 0 ] && echo max || echo "$rate")"
  [ "$mode" = cross ] && printf '%-10s ' "$label"
  awk '/^messages:/ {printf "%s msgs/s acked, %s refused; ", $(NF-7), $6}
       /^  deliver/ {printf "deliver p50 %s ms p99 %s ms; ", $3, $9}
       /^verification:/ {printf "%s lost, %s duplicated", $2, $6}' "$out"
  [ "$mode" = cross ] && awk '/^verification:/ {
       for (i = 1; i <= NF; i++) if ($i == "cross-node") printf ", %s pushed across nodes", $(i - 1)}' "$out"
  if [ "$mode" != embedded ]; then
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
  if [ "$mode" != embedded ]; then
    # The append script's calls (EVALSHA) and the worker's reads of new
    # entries (XREADGROUP), from Redis's own counters over the run.
    awk -F'[:=,]' -v n="${acked:-1}" -v t="$(awk -v a="$began" -v b="$ended" 'BEGIN {print b - a}')" '
      $1 == "cmdstat_evalsha" {calls = $3; usec = $7}
      $1 == "cmdstat_xreadgroup" {reads = $3}
      END {printf "  Redis: %.1f messages and %.0f us per script call (nearly all appends); %.0f worker reads/s\n",
        n / (calls ? calls : 1), usec, reads / t}' "$out.stats"
    # What the AOF grew by (every write of the run, the worker's included)
    # against the record a message is stored as ("<seq>:<tick>:" and the
    # body, as in the stream).
    record=$(mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot im -N -e \
      'SELECT AVG(LENGTH(body) + LENGTH(seq) + LENGTH(message_id >> 10) + 2) FROM messages')
    awk -v a="$(( $(aof_size) - aof_before ))" -v n="${acked:-1}" -v r="${record:-0}" 'BEGIN {
      if (n > 0 && r > 0) printf "  AOF: %.0f bytes per message, %.1fx its %.0f-byte record\n", a / n, a / n / r, r}'
  fi
}

for rate in "${rates[@]}"; do
  if [ "$mode" = cross ]; then
    run one-node "$rate" --server "$one_node"
    alone=$ACKED_RATE
    run two-nodes "$rate" --server "$SERVERS" --cross-node-fraction 1
    awk -v a="${alone:-0}" -v b="${ACKED_RATE:-0}" \
      'BEGIN {if (a > 0) printf "  two nodes, every pair across them: %.2fx the one-node rate\n", b / a}'
  else
    run node "$rate" --server "$one_node"
  fi
done
