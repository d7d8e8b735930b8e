#!/usr/bin/env bash
# Where the time goes in a 1:1 run: starts a throwaway deployment, runs the
# load generator against it and samples every CPU of the machine with perf
# in the middle of the run. Prints the system calls the server and the
# load generator make per acknowledged message, the CPU share of each
# process and thread group, then the hottest functions of the server (and
# of Redis).
#
#   bench/profile.sh embedded|pipeline [im-loadgen flags...]
#
# Default load: 2,000 connections, 50,000 msgs/s offered, 25 s. Server
# flags come from $SERVER_FLAGS (e.g. SERVER_FLAGS="--send-queue 4096").
# Needs perf (linux-perf); the perf data stays in
# target/bench/profile-MODE.data.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
mode=${1:-embedded}
shift || true
command -v perf >/dev/null || { echo "perf is not installed (apt install linux-perf)" >&2; exit 2; }
cargo build --release -q -p im-server -p im-storage -p im-loadgen
bench_init
case $mode in
  embedded) start_server node ;;
  pipeline) start_pipeline node ;;
  *) echo "usage: bench/profile.sh embedded|pipeline [im-loadgen flags...]" >&2; exit 2 ;;
esac
flags=(--scenario direct --connections 2000 --rate 50000 --duration 25 --warmup 5)
[ $# -gt 0 ] && flags=("$@")
mkdir -p target/bench
data=target/bench/profile-$mode.data
target/release/im-loadgen --quiet --server "127.0.0.1:$SERVER_PORT" "${flags[@]}" >"$BENCH_DIR/loadgen.txt" 2>&1 &
lg=$!
# Connections are up and the load steady by then.
sleep 12
# System calls over the same 10 s, the server's and the load generator's
# (its worker processes included).
counting=()
for who in server loadgen; do
  case $who in
    server) targets=$SERVER_PID ;;
    loadgen) targets=$(pgrep -d, -f target/release/im-loadgen) ;;
  esac
  perf stat -x, -e raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom -p "$targets" \
    -o "$BENCH_DIR/syscalls-$who.txt" -- sleep 10 &
  counting+=($!)
done
perf record -a -g -F 499 -o "$data" -- sleep 10 2>/dev/null
wait "$lg" "${counting[@]}" || true
grep -E '^(scenario|messages|latency|  ack|  deliver|verification)' "$BENCH_DIR/loadgen.txt"
rate=$(awk '/^messages:/ {print $(NF-7)}' "$BENCH_DIR/loadgen.txt")
for who in server loadgen; do
  awk -F, -v who="$who" -v r="${rate:-0}" 'r > 0 && /raw_syscalls/ {all = $1}
    r > 0 && /sys_enter_recvfrom/ {reads = $1}
    END {if (r > 0) printf "system calls per acknowledged message (%s, over the 10 s): %.2f, of which reads %.2f\n",
      who, all / (r * 10), reads / (r * 10)}' "$BENCH_DIR/syscalls-$who.txt"
done
# The lists are cut with awk, which reads to the end: head would stop
# perf report with SIGPIPE, which pipefail makes fatal.
echo
echo "CPU share by thread name over 10 s (100% = all $(nproc) CPUs):"
perf report -i "$data" --sort comm --stdio --no-children -g none 2>/dev/null \
  | grep -E '^ +[0-9]' | awk 'n++ < 15'
for comm in im-worker im-store-writer im-shard-0 redis-server; do
  perf report -i "$data" --comm "$comm" --stdio -q >/dev/null 2>&1 || continue
  echo
  echo "hottest functions in $comm threads (share of all samples):"
  perf report -i "$data" --comm "$comm" --sort dso,sym --stdio --no-children -g none 2>/dev/null \
    | grep -E '^ +[0-9]' | awk 'n++ < 12'
done
