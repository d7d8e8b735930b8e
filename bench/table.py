#!/usr/bin/env python3
"""Prints the benchmark suite's table (Markdown) from a results directory
written by bench/suite.sh: im-loadgen JSON reports named MODE-RUN.json, idle
memory samples MODE-idle-memory.json and the storage worker's output."""

import json
import os
import platform
import re
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024 / 1024
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}"


def verdict(r):
    """Empty when verification passed, else what went wrong."""
    if r is None:
        return "no report"
    bad = [f"{r[k]} {k.split('_')[1]}" for k in
           ("messages_lost", "sends_unanswered", "messages_duplicated", "messages_misrouted") if r.get(k)]
    if r["connections_failed"]:
        bad.append(f"{r['connections_failed']} connections failed")
    return ", ".join(bad)


def ms(us):
    return f"{us / 1000:.1f} ms" if us < 100_000 else f"{us / 1_000_000:.2f} s"


def k(n):
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def flow(r, per="throughput_msgs_per_s", unit="msgs/s"):
    if r is None:
        return "not run"
    d = r["latency_us"]["deliver"]
    text = f"{k(r[per])} {unit}, deliver p50 {ms(d['p50'])} / p99 {ms(d['p99'])}"
    if r.get("messages_rejected"):
        text += f" ({k(r['messages_rejected'])} sends refused as overloaded)"
    v = verdict(r)
    return f"{text} **{v}**" if v else text


def idle(results, mode):
    r = load(os.path.join(results, f"{mode}-idle.json"))
    mem = load(os.path.join(results, f"{mode}-idle-memory.json"))
    if r is None or mem is None:
        return ("not run", "not run", "not run")
    held = r["connections_established"]
    v = verdict(r)
    held_text = f"{held:,} of {r['connections_target']:,}" + (f" **{v}**" if v else "")
    n = max(mem["connections"], 1)
    rss = (mem["rss_hold_kib"] - mem["rss_before_kib"]) * 1024 / n
    # Loopback: both ends of every connection are sockets of this box.
    slab = (mem["slab_hold_kib"] - mem["slab_before_kib"]) / (2 * n)
    return (held_text, f"{rss:.0f} B", f"{slab:.1f} KiB")


def storm(r):
    if r is None:
        return "not run"
    text = (f"{k(r['reconnects_per_s'])} resumes/s, {r['messages_lost']} lost after sync "
            f"({r['messages_recovered']} recovered by the final sync)")
    v = verdict(r)
    return f"{text} **{v}**" if v else text


def worker_rows(results):
    try:
        with open(os.path.join(results, "pipeline-worker-rows.txt")) as f:
            text = f.read()
    except OSError:
        return "not run"
    worker = re.search(r"^worker: .*?= (\d+) rows/s", text, re.M)
    load_data = re.search(r"^LOAD DATA: .*?= (\d+) rows/s", text, re.M)
    if not worker:
        return "failed (see pipeline-worker-rows.txt)"
    out = f"{k(int(worker.group(1)))} rows/s"
    if load_data:
        out += f" (LOAD DATA of the same rows: {k(int(load_data.group(1)))} rows/s)"
    return out


def registration(results):
    try:
        with open(os.path.join(results, "embedded-register.txt")) as f:
            text = f.read()
    except OSError:
        return "not run"
    m = re.search(r"(\d+) of (\d+) users registered in ([\d.]+) s .*?RSS ([\d.]+) MiB before, "
                  r"([\d.]+) MiB after", text)
    if not m:
        return "failed (see embedded-register.txt)"
    held, users, secs, before, after = m.groups()
    return (f"{held} of {users} in {float(secs):.1f} s, server RSS {before} MiB before, "
            f"{after} MiB after (+{float(after) - float(before):.1f} MiB)")


def main():
    results = sys.argv[1]
    modes = [m for m in ("embedded", "pipeline", "cluster")
             if any(f.startswith(m + "-") for f in os.listdir(results))]
    get = lambda mode, run: load(os.path.join(results, f"{mode}-{run}.json"))
    rows = []
    idles = {m: idle(results, m) for m in modes}
    rows.append(("idle connections held, one server process (cluster: over 3 nodes)",
                 *[idles[m][0] for m in modes]))
    rows.append(("server RSS per idle connection", *[idles[m][1] for m in modes]))
    rows.append(("kernel slab per socket (loopback: 2 per connection)", *[idles[m][2] for m in modes]))
    rows.append(("registration storm, 300 new users at the default argon2 cost",
                 *[registration(results) if m == "embedded" else "n/a (same code)" for m in modes]))
    cross = lambda r: f"{k(r['cross_node_deliveries'])} crossed nodes" if r else "not run"
    direct = lambda run: [flow(get(m, run)) for m in modes]
    conns = next((get(m, "direct-20k")["connections_target"] for m in modes
                  if get(m, "direct-20k")), 0)
    rows.append((f"1:1, {conns:,} connections, 20k msgs/s offered", *direct("direct-20k")))
    rows.append((f"1:1, {conns:,} connections, 50k msgs/s offered", *direct("direct-50k")))
    rows.append((f"1:1, {conns:,} connections, saturation", *direct("direct-max")))
    group = lambda run: [flow(get(m, run), "deliveries_per_s", "deliveries/s") for m in modes]
    rows.append(("groups of 500, 1,000 msgs/s offered", *group("group-1k")))
    rows.append(("groups of 500, saturation", *group("group-max")))
    storms = [get(m, "storm") for m in modes]
    n = next((s["connections_target"] for s in storms if s), 0)
    rows.append((f"reconnect storm, {n:,} connections", *[storm(s) for s in storms]))
    rows.append(("storage worker, Redis Streams to MySQL",
                 *[worker_rows(results) if m == "pipeline" else "n/a" for m in modes]))
    if "cluster" in modes:
        rows.append(("deliveries that crossed nodes (1:1 at 20k msgs/s)",
                     *[cross(get(m, "direct-20k")) if m == "cluster" else "n/a" for m in modes]))

    print(f"\n{machine()}; loadgen, servers, Redis and MariaDB on this one machine\n")
    print("| measurement | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    many = idle(results, "many")
    r = load(os.path.join(results, "many-idle.json"))
    if r is not None:
        print(f"\nIdle connections over {r['workers']} server and {r['workers']} load generator "
              f"processes (embedded): {many[0]} held, {many[1]} RSS per connection, "
              f"{many[2]} slab per socket.")


if __name__ == "__main__":
    main()
