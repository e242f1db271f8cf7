"""Store and leadership benchmark (issue 13): failover time against the lease TTL, and the latency
from a commit to the first provider call through etcd against the in-process path.

    .venv/bin/python bench/bench_store.py [--rounds 20] [--ttl 2]

Everything is real processes: a 3-member etcd cluster from Debian's etcd-server on loopback
(``tests/harness/etcd.py``), ``mobykit serve`` replicas (``tests/harness/replica.py``) sharing one
memory-provider cloud hosted by this process (``tests/harness/sharedcloud.py``), which timestamps
every provider call with this process's monotonic clock.

Failover: three replicas with ``--lease-ttl TTL`` (2 s here, not the default 10 s, so 20 rounds
take a minute); the leader is killed with SIGKILL at a random point of its keep-alive cycle and a
size change is committed on a follower at once; the figure is the time from the kill to the new
leader's first provider call, against TTL.

Commit latency: a commit (size +1) over gRPC to (a) a single server on a ``file:`` store (the
in-process path: stored, then applied by the same process; the floor), (b) the etcd leader (stored
in etcd, applied in-process) and (c) an etcd follower (stored in etcd; the leader acts on its
watch), each to the first provider create. Medians of ``--rounds``, interleaved.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.etcd import etcd_cluster  # noqa: E402
from harness.sharedcloud import shared_cloud  # noqa: E402
from mobykit.cli.group import server_role  # noqa: E402
from mobykit.rpc.client import connect  # noqa: E402
from mobykit.spi.group import GroupSpec  # noqa: E402


def spec(group: str, size: int) -> GroupSpec:
    return GroupSpec(id=group, properties={
        "Allocation": {"Size": size},
        "Instance": {"Plugin": "mobykit/memory", "Properties": {}},
        "Flavor": {"Plugin": "mobykit/echo", "Properties": {"Tags": {"health": "1"}}},
    })


def count(sc, group: str) -> int:
    return len(sc.cloud.provider.list({"infrakit.group": group}))


def wait(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("benchmark step did not finish")
        time.sleep(0.002)


def first_create_after(sc, group: str, t0: float) -> float:
    wait(lambda: any(c.op == "create" and c.at >= t0 and c.tags.get("infrakit.group") == group for c in sc.cloud.calls))
    return min(c.at for c in sc.cloud.calls if c.op == "create" and c.at >= t0 and c.tags.get("infrakit.group") == group)


def leader(sc):
    live = [r for r in sc.replicas if r.alive and r.name != "solo"]
    for _ in range(400):
        found = [r for r in live if server_role(r.address) == "leader"]
        if len(found) == 1:
            return found[0]
        time.sleep(0.05)
    raise TimeoutError("no leader")


def commit_latency(sc, address: str, group: str) -> float:
    """Size 1 -> 2: seconds from the commit call to the first create; then back to 1 (unmeasured)."""
    c = connect(address).group
    t0 = time.monotonic()
    c.commit_group(spec(group, 2), False)
    dt = first_create_after(sc, group, t0) - t0
    wait(lambda: count(sc, group) == 2)
    c.commit_group(spec(group, 1), False)
    wait(lambda: count(sc, group) == 1)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--ttl", type=float, default=2.0)
    args = ap.parse_args()
    rng = random.Random(13)
    ttl = str(args.ttl)
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    with etcd_cluster() as etcd, shared_cloud(root) as sc:
        solo = sc.start_replica("solo", f"file:{root}/state")
        reps = [sc.start_replica(f"r{i}", etcd.url, "--lease-ttl", ttl) for i in range(3)]
        for r in [solo, *reps]:
            r.wait_listening()
        lead = leader(sc)
        follower = next(r for r in reps if r is not lead)
        for g, addr in (("solo", solo.address), ("lead", lead.address), ("follow", follower.address)):
            connect(addr).group.commit_group(spec(g, 1), False)
            wait(lambda g=g: count(sc, g) == 1)
        lat: dict[str, list[float]] = {"in-process (file: store)": [], "etcd, commit on the leader": [],
                                       "etcd, commit on a follower": []}
        for _ in range(args.rounds):
            lat["in-process (file: store)"].append(commit_latency(sc, solo.address, "solo"))
            lat["etcd, commit on the leader"].append(commit_latency(sc, lead.address, "lead"))
            lat["etcd, commit on a follower"].append(commit_latency(sc, follower.address, "follow"))
        floor = statistics.median(lat["in-process (file: store)"])
        print(f"load average: {os.getloadavg()[0]:.2f}")
        print(f"\ncommit -> first provider create (median of {args.rounds}; ms, and ratio to in-process)")
        for name, xs in lat.items():
            m = statistics.median(xs)
            print(f"  {name:<30} {m * 1000:7.1f} ms  max {max(xs) * 1000:7.1f} ms  {m / floor:5.2f}x")

        # Failover: kill the leader, commit on a follower, time to the new leader's first action.
        connect(follower.address).group.commit_group(spec("fo", 1), False)
        wait(lambda: count(sc, "fo") == 1)
        failovers = []
        size = 1
        for i in range(args.rounds):
            lead = leader(sc)
            follower = next(r for r in sc.replicas if r.alive and r is not lead and r.name != "solo")
            time.sleep(rng.uniform(0, args.ttl / 3))  # a random point of the keep-alive cycle
            t0 = time.monotonic()
            lead.kill()
            size += 1
            connect(follower.address).group.commit_group(spec("fo", size), False)
            failovers.append(first_create_after(sc, "fo", t0) - t0)
            sc.start_replica(f"n{i}", etcd.url, "--lease-ttl", ttl).wait_listening()
            wait(lambda s=size: count(sc, "fo") == s)
        m = statistics.median(failovers)
        print(f"\nfailover (leader killed -> new leader's first create), lease TTL {args.ttl:g} s, {args.rounds} kills")
        print(f"  median {m:.2f} s ({m / args.ttl:.2f} x TTL)  max {max(failovers):.2f} s "
              f"({max(failovers) / args.ttl:.2f} x TTL)  min {min(failovers):.2f} s")
        print(f"load average: {os.getloadavg()[0]:.2f}")
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
