#!/usr/bin/env bash
# What one append call writes to the AOF, command by command: a quiet 1:1
# run on the production pipeline (AOF everysec), then bench/aof-bytes.py
# over the AOF. At the default load (20 connections, 20 msgs/s) every call
# carries one message, the case where per-call writes weigh most.
#
#   bench/aof-bytes.sh [CONNECTIONS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
conns=${1:-20}
rate=${2:-20}
cargo build --release -q -p im-server -p im-storage -p im-loadgen
bench_init
REDIS_FLAGS="--appendfsync everysec" start_pipeline node
target/release/im-loadgen --quiet --server "127.0.0.1:$SERVER_PORT" --scenario direct \
  --connections "$conns" --rate "$rate" --duration 5 --warmup 1 >"$BENCH_DIR/loadgen.txt" 2>&1
grep -E '^(messages|verification)' "$BENCH_DIR/loadgen.txt"
# Written out within a second (everysec).
sleep 1.5
python3 bench/aof-bytes.py "$BENCH_DIR"/redis-"$REDIS_PORT"/appendonlydir/*.incr.aof
