#!/usr/bin/env bash
# Starts a throwaway Redis Cluster: 6 redis-server processes on free ports
# in DIR (3 masters with a replica each, formed by redis-cli --cluster
# create), cluster-node-timeout 1000 so that a failover takes seconds, AOF
# everysec. Prints the seed list (redis://127.0.0.1:PORT,...) once every
# node agrees the cluster is healthy and every replica is in sync, and
# writes the processes' pids to DIR/pids. The processes keep running after
# it exits (and hold none of its output open, so $(...) returns).
#   usage: tests/redis-cluster.sh DIR
set -euo pipefail
dir=$1
mkdir -p "$dir"
# A free port whose cluster bus port (10000 higher) is free too.
free_port() {
  python3 -c '
import random, socket
while True:
    port = random.randint(20000, 55000)
    try:
        for p in (port, port + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", p)); s.close()
    except OSError:
        continue
    print(port); break'
}
ports=()
: >"$dir/pids"
for i in 0 1 2 3 4 5; do
  port=$(free_port)
  mkdir -p "$dir/node$i"
  redis-server --bind 127.0.0.1 --port "$port" --save "" --dir "$dir/node$i" \
    --appendonly yes --appendfsync everysec --cluster-enabled yes \
    --cluster-config-file nodes.conf --cluster-node-timeout 1000 \
    --cluster-require-full-coverage no --daemonize no --logfile "$dir/node$i/log" \
    </dev/null >/dev/null 2>&1 &
  echo $! >>"$dir/pids"
  ports+=("$port")
done
for port in "${ports[@]}"; do
  for _ in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") \
  --cluster-replicas 1 --cluster-yes >"$dir/create.log"
for _ in $(seq 1 300); do
  ok=1
  for port in "${ports[@]}"; do
    redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' || ok=0
    redis-cli -p "$port" info replication | grep -qE 'role:master|master_link_status:up' || ok=0
  done
  [ $ok = 1 ] && break
  sleep 0.1
done
[ $ok = 1 ] || { echo "the Redis Cluster did not become healthy" >&2; exit 1; }
printf 'redis://127.0.0.1:%s,' "${ports[@]}" | sed 's/,$//'
echo
