#!/usr/bin/env python3
"""Summarises a bench/cluster.sh results directory: latency same node
against cross node, what routing costs Redis per cross-node push, the
reconnect storm across nodes and the 100,000-connection runs."""

import json
import os
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")


def load(results, name):
    try:
        with open(os.path.join(results, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def info(path):
    """INFO output as {field: value} (commandstats as {cmd: {calls, usec}})."""
    fields, commands = {}, {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if ":" not in line or line.startswith("#"):
                    continue
                key, value = line.split(":", 1)
                if key.startswith("cmdstat_"):
                    stats = dict(kv.split("=") for kv in value.split(","))
                    commands[key[len("cmdstat_"):]] = {
                        "calls": int(stats["calls"]), "usec": int(stats["usec"])}
                else:
                    fields[key] = value
    except OSError:
        pass
    return fields, commands


def redis_cost(results, run):
    """Redis CPU seconds and per-command usec spent during a run."""
    before, cb = info(os.path.join(results, run + ".redis-before"))
    after, ca = info(os.path.join(results, run + ".redis-after"))
    if not before or not after:
        return None, {}
    cpu = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_sys", "used_cpu_user"))
    usec = {c: ca[c]["usec"] - cb.get(c, {"usec": 0})["usec"] for c in ca}
    calls = {c: ca[c]["calls"] - cb.get(c, {"calls": 0})["calls"] for c in ca}
    return cpu, {c: (calls[c], usec[c]) for c in ca if calls[c]}


def verdict(r):
    bad = [f"{r[k]} {k.split('_')[1]}" for k in
           ("messages_lost", "sends_unanswered", "messages_duplicated", "messages_misrouted") if r.get(k)]
    if r.get("connections_failed"):
        bad.append(f"{r['connections_failed']} connections failed")
    return "verified" if not bad else "**" + ", ".join(bad) + "**"


def ms(us):
    return f"{us / 1000:.1f} ms"


def main():
    results = sys.argv[1]
    mixed = load(results, "cluster-mixed")
    if mixed:
        lat = mixed["latency_us"]
        same, cross = lat["same_node"], lat["cross_node"]
        ratio = cross["p99"] / same["p99"] if same["p99"] else float("nan")
        print(f"3 nodes, 1:1 at {mixed['throughput_msgs_per_s']:,.0f} msgs/s, half the pairs "
              f"across nodes ({verdict(mixed)}, {mixed['messages_recovered']} recovered by the "
              f"final sync): same node p50 {ms(same['p50'])} / p99 {ms(same['p99'])}, "
              f"cross node p50 {ms(cross['p50'])} / p99 {ms(cross['p99'])} "
              f"(cross/same p99 {ratio:.2f}x)")
    runs = {name: load(results, name) for name in ("cluster-same", "cluster-cross")}
    if all(runs.values()):
        costs = {}
        for name, r in runs.items():
            cpu, cmds = redis_cost(results, name)
            nodes = 0
            try:
                with open(os.path.join(results, name + ".nodes")) as f:
                    nodes = int(f.read().split()[1]) / CLK_TCK
            except (OSError, ValueError, IndexError):
                pass
            costs[name] = (cpu, cmds, nodes, r)
            print(f"{name}: {r['throughput_msgs_per_s']:,.0f} msgs/s, "
                  f"{r['cross_node_deliveries']:,} cross-node deliveries, deliver p99 "
                  f"{ms(r['latency_us']['deliver']['p99'])}, Redis CPU {cpu:.1f} s, "
                  f"nodes' CPU {nodes:.1f} s, {verdict(r)}")
        (cpu_s, cmd_s, node_s, same), (cpu_x, cmd_x, node_x, cross) = (
            costs["cluster-same"], costs["cluster-cross"])
        per_msg = lambda cpu, r: cpu * 1e6 / max(r["messages_acked"], 1)
        extra = per_msg(cpu_x, cross) - per_msg(cpu_s, same)
        pushes = cross["cross_node_deliveries"] / max(cross["messages_acked"], 1)
        print(f"Redis CPU per message: {per_msg(cpu_s, same):.1f} us on one node, "
              f"{per_msg(cpu_x, cross):.1f} us across nodes: {extra:.1f} us more, "
              f"{extra / max(pushes, 1e-9):.1f} us per cross-node push")
        node_per = lambda cpu, r: cpu * 1e6 / max(r["messages_acked"], 1)
        print(f"Nodes' CPU per message: {node_per(node_s, same):.1f} us on one node, "
              f"{node_per(node_x, cross):.1f} us across nodes")
        for cmd in ("spublish", "smembers", "evalsha"):
            for name, cmds in (("same", cmd_s), ("cross", cmd_x)):
                if cmd in cmds:
                    calls, usec = cmds[cmd]
                    print(f"  {cmd} ({name}): {calls:,} calls, {usec / max(calls, 1):.1f} us each")
    storm = load(results, "cluster-storm-x")
    if storm:
        print(f"Reconnect storm across 3 nodes, {storm['connections_target']:,} connections: "
              f"{storm['reconnects_per_s']:,.0f} resumes/s, {storm['messages_lost']} lost after "
              f"sync ({storm['messages_recovered']} recovered by the final sync), {verdict(storm)}")
    mem, _ = info(os.path.join(results, "cluster.redis-memory"))
    if mem:
        print(f"Redis used_memory after the 3-node runs: {int(mem['used_memory']) / 2**20:.1f} MiB")
    for name, what in (("many-direct", "1:1, every pair across nodes"),
                       ("many-group", "groups of 100 over the nodes")):
        r = load(results, name)
        if r:
            per = ("deliveries_per_s", "deliveries/s") if name == "many-group" else (
                "throughput_msgs_per_s", "msgs/s")
            d = r["latency_us"]["deliver"]
            print(f"{r['connections_established']:,} of {r['connections_target']:,} connections "
                  f"over 6 nodes, {what}: {r[per[0]]:,.0f} {per[1]}, deliver p50 {ms(d['p50'])} / "
                  f"p99 {ms(d['p99'])}, {r['cross_node_deliveries']:,} cross-node deliveries, "
                  f"{r['messages_recovered']} recovered by the final sync, {verdict(r)}")


if __name__ == "__main__":
    main()
