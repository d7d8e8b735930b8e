#!/usr/bin/env python3
"""Kernel memory per TCP socket, measured rather than guessed.

    sudo bench/socket-kmem.py mem [--pairs 40000] [--send 0] [--reply 0] [--conntrack]
    sudo bench/socket-kmem.py ports
    sudo bench/socket-kmem.py fill [--notsent-lowat 16384]

Runs itself in a fresh network namespace (unshare -n), so nothing it does
(nftables rules, sysctls of the namespace, exhausted port ranges) touches
the host's own network.

mem: opens PAIRS loopback connection pairs spread over worker processes
(each stays under a 20,000 open-files limit), registers the accepted end of
every pair with epoll as im-server does, and diffs /proc/slabinfo,
/proc/meminfo and /proc/net/sockstat before and after. The result is per
TCP socket (a pair is two sockets) and per pair for what only one end has
(the epoll item, the conntrack entry). Then, optionally, each client writes
--send bytes its server end does not read, and each server end writes
--reply bytes its client does not read, and the queued-data cost is shown
in pages charged to TCP (the unit of net.ipv4.tcp_mem). --conntrack adds an
nftables rule that makes conntrack track every connection of the namespace.

ports: shows where ephemeral ports run out, with the namespace's
ip_local_port_range shrunk to 1,000 ports so it takes seconds: connections
from one source address to one listening address, then from other source
addresses and to a second listening port.

fill: how much one connection whose client stopped reading can hold in
the kernel (the server's send buffer plus the client's receive buffer),
with autotuning and with SO_SNDBUF/SO_RCVBUF pinned small (what
--send-buffer-bytes and --recv-buffer-bytes set), optionally with
net.ipv4.tcp_notsent_lowat set in the namespace. Needs root (unshare),
and nft for --conntrack.

Slab counts are system-wide: other work on the box adds noise, so use
many pairs and compare two runs.
"""

import argparse
import errno
import os
import select
import socket
import subprocess
import sys
import time
from multiprocessing import Pipe, Process

IP_BIND_ADDRESS_NO_PORT = 24
PAIRS_PER_WORKER = 9_000


def slabinfo():
    caches = {}
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith(("slabinfo", "#")):
                continue
            p = line.split()
            caches[p[0]] = (int(p[1]), int(p[2]), int(p[3]))
    return caches


def slab_aliases():
    """Caches the kernel merged into one: slabinfo shows one name for all."""
    groups = {}
    base = "/sys/kernel/slab"
    try:
        names = os.listdir(base)
    except OSError:
        return {}
    for name in names:
        path = os.path.join(base, name)
        if os.path.islink(path):
            groups.setdefault(os.readlink(path), []).append(name)
    aliases = {}
    for members in groups.values():
        for name in members:
            aliases[name] = sorted(m for m in members if m != name)
    return aliases


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0])
    return out


def tcp_mem_pages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                p = line.split()
                return int(p[p.index("mem") + 1])
    return 0


def conntrack_count():
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())
    except OSError:
        return 0


def snapshot():
    return slabinfo(), meminfo(), tcp_mem_pages(), conntrack_count()


def worker(index, pairs, conn, epoll_server_ends):
    src = f"127.0.0.{2 + index}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    addr = listener.getsockname()
    ep = select.epoll()
    clients, servers = [], []
    for _ in range(pairs):
        c = socket.socket()
        c.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        c.bind((src, 0))
        c.connect(addr)
        s, _ = listener.accept()
        s.setblocking(False)
        c.setblocking(False)
        if epoll_server_ends:
            ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        clients.append(c)
        servers.append(s)
    conn.send("ready")
    while True:
        cmd, n = conn.recv()
        if cmd == "exit":
            return
        ends = clients if cmd == "send" else servers
        data = b"x" * n
        short = 0
        for sock in ends:
            try:
                if sock.send(data) < n:
                    short += 1
            except BlockingIOError:
                short += 1
        conn.send(short)


def run_workers(pairs, epoll_server_ends):
    count = (pairs + PAIRS_PER_WORKER - 1) // PAIRS_PER_WORKER
    links, procs = [], []
    for i in range(count):
        share = pairs // count + (1 if i < pairs % count else 0)
        parent, child = Pipe()
        p = Process(target=worker, args=(i, share, child, epoll_server_ends))
        p.start()
        links.append(parent)
        procs.append(p)
    for link in links:
        assert link.recv() == "ready"
    return links, procs


def settle():
    time.sleep(3)


def report(title, before, after, pairs, sockets):
    (slab0, mem0, pages0, ct0), (slab1, mem1, pages1, ct1) = before, after
    print(f"\n== {title}: {pairs} pairs ({sockets} sockets)")
    rows = []
    for name, (act1, num1, size) in slab1.items():
        act0, num0, _ = slab0.get(name, (0, 0, size))
        d_objs = act1 - act0
        if abs(d_objs) >= pairs // 2:
            rows.append((d_objs * size, name, d_objs, size))
    rows.sort(reverse=True)
    aliases = slab_aliases()
    print(f"{'slab cache':<22}{'objects':>10}{'size':>7}{'per pair':>10}{'per socket':>12}  merged with")
    total = 0
    for bytes_, name, d_objs, size in rows:
        total += bytes_
        print(
            f"{name:<22}{d_objs:>10}{size:>7}{d_objs / pairs:>10.2f}"
            f"{bytes_ / sockets:>11.0f}B  {' '.join(aliases.get(name, [])[:6])}"
        )
    print(f"{'sum of these caches':<49}{total / sockets:>11.0f}B per socket")
    for key in ("Slab", "SUnreclaim"):
        d = (mem1[key] - mem0[key]) * 1024
        print(f"/proc/meminfo {key + ':':<12} {d / sockets:>8.0f} B per socket")
    d = pages1 - pages0
    print(
        f"sockstat TCP mem      {d} pages ({d * 4096 / sockets:.0f} B per socket)"
        f"   conntrack entries {ct1 - ct0}"
    )


def enable_conntrack():
    rules = (
        "add table inet kmem\n"
        "add chain inet kmem in { type filter hook input priority 0; }\n"
        "add rule inet kmem in ct state established,related accept\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True)


def mem(args):
    if args.conntrack:
        enable_conntrack()
    before = snapshot()
    links, procs = run_workers(args.pairs, not args.no_epoll)
    settle()
    idle = snapshot()
    report("idle connections", before, idle, args.pairs, 2 * args.pairs)
    last = idle
    for cmd, n in (("send", args.send), ("reply", args.reply)):
        if n == 0:
            continue
        short = 0
        for link in links:
            link.send((cmd, n))
        for link in links:
            short += link.recv()
        settle()
        now = snapshot()
        who = "client→server (server not reading)" if cmd == "send" else "server→client (client not reading)"
        report(f"after {n} bytes {who}, {short} short writes", last, now, args.pairs, 2 * args.pairs)
        last = now
    for link in links:
        link.send(("exit", 0))
    for p in procs:
        p.join()


def connect_until_refused(src, dst, limit=100_000):
    """Connects from src (an address, or None for the kernel's choice) to
    dst until the kernel refuses; returns the sockets and the error."""
    socks = []
    while len(socks) < limit:
        c = socket.socket()
        try:
            if src is not None:
                c.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                c.bind((src, 0))
            c.connect(dst)
        except OSError as e:
            c.close()
            return socks, errno.errorcode.get(e.errno, str(e.errno))
        socks.append(c)
    return socks, "none"


def ports(_args):
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("40000 40999")
    print("ip_local_port_range in this namespace: 40000 40999 (1,000 ports)")
    listeners = []
    for port in (7000, 7001):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen(4096)
        s.setblocking(False)
        listeners.append(s)
    held = []

    def drain():
        for s in listeners:
            while True:
                try:
                    held.append(s.accept()[0])
                except BlockingIOError:
                    break

    total = 0
    for src, port in (
        (None, 7000),
        ("127.0.0.2", 7000),
        ("127.0.0.3", 7000),
        ("127.0.0.2", 7001),
    ):
        got, err = [], "none"
        while True:  # accept as we go so the backlog never fills
            batch, err = connect_until_refused(src, ("127.0.0.1", port), limit=2_000)
            got += batch
            drain()
            if err != "none" or not batch:
                break
            if len(got) > 5_000:
                break
        held += got
        total += len(got)
        print(
            f"from {src or 'any (no bind)':<14} to 127.0.0.1:{port}: "
            f"{len(got):>5} connections, then {err}   (total {total})"
        )


def fill_one(sndbuf, rcvbuf):
    """Bytes one connection queues in the kernel when the reader stops
    reading: the writer's send buffer plus the reader's receive buffer."""
    listener = socket.socket()
    if rcvbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    reader = socket.socket()  # the slow client: never reads
    if rcvbuf:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    reader.connect(listener.getsockname())
    writer, _ = listener.accept()  # the server end
    if sndbuf:
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    writer.setblocking(False)
    chunk = b"x" * 4096
    queued = 0
    for _ in range(3):  # retry: the window may open a little after a pause
        while True:
            try:
                queued += writer.send(chunk)
            except BlockingIOError:
                break
        time.sleep(0.2)
    return (
        queued,
        writer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        reader.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    )


def fill(args):
    if args.notsent_lowat:
        with open("/proc/sys/net/ipv4/tcp_notsent_lowat", "w") as f:
            f.write(str(args.notsent_lowat))
        print(f"net.ipv4.tcp_notsent_lowat = {args.notsent_lowat} in this namespace")
    print("one connection, the client stops reading, the server end writes until EAGAIN")
    print("(getsockopt shows the kernel's doubled value: half is meant for overhead)")
    print(f"{'SO_SNDBUF/SO_RCVBUF set':<26}{'bytes queued':>14}{'server sndbuf':>15}{'client rcvbuf':>15}")
    for size in (0, 65536, 16384, 4096):
        queued, snd, rcv = fill_one(size, size)
        label = "none (autotuning)" if size == 0 else f"{size} bytes each"
        print(f"{label:<26}{queued:>14}{snd:>15}{rcv:>15}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("mem")
    m.add_argument("--pairs", type=int, default=40_000)
    m.add_argument("--send", type=int, default=0, help="bytes each client writes unread")
    m.add_argument("--reply", type=int, default=0, help="bytes each server end writes unread")
    m.add_argument("--conntrack", action="store_true")
    m.add_argument("--no-epoll", action="store_true")
    sub.add_parser("ports")
    f = sub.add_parser("fill")
    f.add_argument("--notsent-lowat", type=int, default=0, help="set net.ipv4.tcp_notsent_lowat first")
    args = ap.parse_args()
    if os.environ.get("KMEM_IN_NETNS") != "1":
        env = dict(os.environ, KMEM_IN_NETNS="1")
        cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable] + sys.argv
        sys.exit(subprocess.run(cmd, env=env).returncode)
    print(f"kernel {os.uname().release}, page size {os.sysconf('SC_PAGE_SIZE')}")
    {"mem": mem, "ports": ports, "fill": fill}[args.mode](args)


if __name__ == "__main__":
    main()
