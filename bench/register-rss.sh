#!/usr/bin/env bash
# A registration storm at the default argon2id cost (19 MiB, 2 passes):
# starts a release im-server on fresh data, registers USERS accounts at
# once (one connection each, then they all disconnect) and prints what it
# took and the server's RSS before and after.
#   bench/register-rss.sh [USERS]        (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
users=${1:-300}
cargo build --release -q -p im-server -p im-loadgen
bench_init
port=$(free_port)
# Default password hashing: the cost is what is measured.
# shellcheck disable=SC2086 # BENCH_LIMITS holds several flags
target/release/im-server --listen "127.0.0.1:$port" --data-dir "$BENCH_DIR/data" \
  --auth-timeout-secs 120 $BENCH_LIMITS >"$BENCH_DIR/server.log" 2>&1 &
pid=$!
bench_pids+=("$pid")
wait_port "$port"
sleep 1
before=$(rss_kib "$pid")
start=$(date +%s.%N)
target/release/im-loadgen --quiet --server "127.0.0.1:$port" --scenario idle \
  --connections "$users" --ramp 0 --duration 1 --warmup 0 --settle 0 \
  --json "$BENCH_DIR/report.json" >"$BENCH_DIR/loadgen.txt" 2>&1
end=$(date +%s.%N)
# The connections are closed; give the server a moment to let them go.
sleep 2
after=$(rss_kib "$pid")
python3 - "$BENCH_DIR/report.json" "$users" "$start" "$end" "$before" "$after" <<'PY'
import json, sys
report, users, start, end, before, after = sys.argv[1:]
r = json.load(open(report))
users, before, after = int(users), int(before), int(after)
secs = float(end) - float(start)
held = r["connections_established"]
print(f"registration storm: {held} of {users} users registered in {secs:.1f} s "
      f"({held / secs:.0f}/s with the load generator's start-up), server RSS "
      f"{before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after "
      f"(+{(after - before) / 1024:.1f} MiB)")
PY
