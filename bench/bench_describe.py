"""DescribeInstances over 1,000 instances: in-process (the floor), gRPC (unix socket) and
Infrakit's JSON-RPC (unix socket), p50 and p99 latency of one call.

    .venv/bin/python bench/bench_describe.py [--instances 1000] [--calls 200] [--tag-filter]

Uses the memory provider, so the numbers are the transports' and the core's cost, not a cloud's.
Servers run in this process on temp-dir sockets, removed at exit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness.mobykit_server import UnixHTTPConnection, grpc_server, jsonrpc_server, memory_plugins, post_raw  # noqa: E402
from mobykit.rpc.client import connect  # noqa: E402
from mobykit.spi.types import Spec  # noqa: E402


def measure(fn, calls: int) -> tuple[float, float, int]:
    fn()  # warm up (connections, caches)
    samples = []
    n = 0
    for _ in range(calls):
        t0 = time.perf_counter()
        n = fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(round(0.99 * (len(samples) - 1))))]
    return statistics.median(samples) * 1e3, p99 * 1e3, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--tag-filter", action="store_true", help="filter on a tag half the instances have")
    args = p.parse_args(argv)

    plugins = memory_plugins()
    for i in range(args.instances):
        tags = {"infrakit.group": "web" if i % 2 else "db", "infrakit.config.hash": "h" * 32, "n": str(i)}
        plugins.instance.provision("", Spec(properties={"Memory": 512, "Image": "bench"}, tags=tags))
    tags = {"infrakit.group": "web"} if args.tag_filter else {}

    rows = []
    rows.append(("in-process", *measure(lambda: len(plugins.instance.describe_instances("", tags, False)), args.calls)))
    with grpc_server(plugins) as (_, bound, _tmp), connect(bound[0]) as c:
        rows.append(("gRPC (unix)", *measure(lambda: len(c.instance.describe_instances("", tags, False)), args.calls)))
    with jsonrpc_server(plugins) as server:
        conn = UnixHTTPConnection(server.path)
        body = json.dumps({"jsonrpc": "2.0", "method": "Instance.DescribeInstances", "params": {"Type": "", "Tags": tags}, "id": 1}).encode()

        def jsonrpc_call() -> int:
            _, _, raw = post_raw(server.path, body, conn)
            return len(json.loads(raw)["result"]["Descriptions"])

        rows.append(("JSON-RPC (unix)", *measure(jsonrpc_call, args.calls)))
        conn.close()

    print(f"DescribeInstances, {args.instances} instances, {args.calls} calls each, filter={tags or 'none'}")
    print(f"{'transport':<18}{'p50 ms':>10}{'p99 ms':>10}{'returned':>10}")
    for name, p50, p99, n in rows:
        print(f"{name:<18}{p50:>10.2f}{p99:>10.2f}{n:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
