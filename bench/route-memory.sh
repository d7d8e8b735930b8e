#!/usr/bin/env bash
# Redis memory per connected user of the cluster's routes: writes the keys
# a node writes for USERS users (default 100,000) on one incarnation, as
# server/src/cluster/router.rs lays them out (the route set and the
# incarnation's index bucket), into a throwaway redis-server, and prints
# the used_memory delta per user.
set -euo pipefail
users=${1:-100000}
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --save "" --appendonly no --daemonize yes --dir "$dir" >/dev/null
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
used() { redis-cli -p "$port" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
before=$(used)
python3 - "$users" <<'PY' | redis-cli -p "$port" --pipe >/dev/null
import sys
def cmd(*args):
    out = "*%d\r\n" % len(args)
    for a in args:
        out += "$%d\r\n%s\r\n" % (len(a), a)
    return out
inc = "7"
w = sys.stdout.write
for user in range(1, int(sys.argv[1]) + 1):
    w(cmd("SADD", "im:rt:%d" % user, inc))
    w(cmd("SADD", "im:ni:%s:%d" % (inc, user % 4096), str(user)))
PY
after=$(used)
echo "users=$users redis_bytes_per_user=$(( (after - before) / users )) route_encoding=$(redis-cli -p "$port" object encoding im:rt:1) index_encoding=$(redis-cli -p "$port" object encoding im:ni:7:1)"
