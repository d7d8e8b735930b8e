#!/usr/bin/env bash
# What formatting a record head ("<seq>:<tick>:") costs inside Redis's
# Lua, the two ways: `..` on numbers (Lua's number-to-string, through the
# C library's floating-point printer) against string.format("%d"). Each
# builds 200,000 heads in one EVAL on a throwaway redis-server.
#   bench/lua-format.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init
start_redis
loop() {
  redis-cli -p "$REDIS_PORT" EVAL "local t = redis.call('TIME'); local n = 0
    for i = 1, 200000 do local h = $1; n = n + #h end
    local u = redis.call('TIME'); return (u[1] - t[1]) * 1000000 + (u[2] - t[2])" 0
}
concat=$(loop '(i + 1000) .. ":" .. (i + 17325000000000) .. ":"')
format=$(loop 'string.format("%d:%d:", i + 1000, i + 17325000000000)')
awk -v c="$concat" -v f="$format" 'BEGIN {
  printf "record head with ..: %.2f us; with string.format: %.2f us\n", c / 200000, f / 200000 }'
