#!/usr/bin/env python3
"""Prints what the append script's calls wrote to an AOF: for the
MULTI/EXEC blocks that hold an XADD (one per append call), the bytes each
command wrote per stored message, and the messages per call. Run by
bench/aof-bytes.sh.

    bench/aof-bytes.py FILE.incr.aof
"""
import sys
from collections import Counter


def commands(data):
    """The AOF's commands as (words, bytes written)."""
    i = 0
    while i < len(data):
        start = i
        if data[i:i + 1] != b"*":
            raise SystemExit(f"not a RESP array at byte {i}")
        j = data.index(b"\r\n", i)
        n = int(data[i + 1:j])
        i = j + 2
        words = []
        for _ in range(n):
            j = data.index(b"\r\n", i)
            length = int(data[i + 1:j])
            i = j + 2
            words.append(data[i:i + length])
            i += length + 2
        yield words, i - start


def main():
    data = open(sys.argv[1], "rb").read()
    blocks, block = [], None
    for words, size in commands(data):
        name = words[0].upper()
        if name == b"MULTI":
            block = [(name, words, size)]
        elif block is not None:
            block.append((name, words, size))
            if name == b"EXEC":
                blocks.append(block)
                block = None
    calls = [b for b in blocks if any(name == b"XADD" for name, _, _ in b)]
    # An XADD's fields after the id are "m" and a record, once per message.
    messages = sum((len(words) - 3) // 2 for b in calls for name, words, _ in b if name == b"XADD")
    if not messages:
        raise SystemExit("no append calls in this AOF")
    written = Counter()
    for b in calls:
        for name, words, size in b:
            key = name.decode()
            if name == b"HSET":
                # The counters (":seq"), the dedup entries (":dedup:<B>")
                # and the call memo (":calls").
                kind = words[1].decode(errors="replace").split("}:", 1)[-1]
                key = "HSET " + kind.split(":", 1)[0]
            written[key] += size
    print(f"{len(calls)} append calls, {messages / len(calls):.1f} messages a call")
    for key, size in written.most_common():
        print(f"  {key:<14} {size / messages:6.0f} bytes per message")
    print(f"  {'all':<14} {sum(written.values()) / messages:6.0f} bytes per message")


if __name__ == "__main__":
    main()
