"""Several ``mobykit serve --store etcd://`` replicas against a real 3-member etcd cluster, sharing
one fake cloud (``harness.sharedcloud``): one leader acts, commits on any replica reach it, a
leader killed with SIGKILL is replaced and what it was doing is finished, no two leader terms
interleave at the cloud, and without etcd nobody acts."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import time
import urllib.request

import pytest
import requests

from harness.etcd import etcd_cluster, free_ports
from harness.mobykit_server import run_cli
from harness.sharedcloud import MUTATIONS, SharedCloud, shared_cloud
from mobykit.cli.group import server_role
from mobykit.group.hash import instance_hash
from mobykit.rpc.client import connect
from mobykit.spi.group import GroupSpec

pytestmark = pytest.mark.slow
TTL = "2"  # seconds: short, so that every failover in these tests costs about 2 s


def spec(version: str = "v1", size: int = 3, min_ready: float = 0.0) -> GroupSpec:
    return GroupSpec(id="web", properties={
        "Allocation": {"Size": size},
        "Instance": {"Plugin": "mobykit/memory", "Properties": {"Version": version}},
        "Flavor": {"Plugin": "mobykit/echo", "Properties": {"Tags": {"health": "1"}}},
        "Updating": {"MinReadySeconds": min_ready},
    })


def members(sc: SharedCloud) -> dict[str, str]:
    return {m.id: m.tags.get("infrakit.config.hash") for m in sc.cloud.provider.list({"infrakit.group": "web"})}


def at(sc: SharedCloud, s: GroupSpec) -> bool:
    return sorted(members(sc).values()) == [instance_hash(s.properties)] * s.properties["Allocation"]["Size"]


def wait_for(cond, what: str, sc: SharedCloud, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {r.name}\n{r.output()[-3000:]}" for r in sc.replicas if r.alive)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.05)


def leader_of(sc: SharedCloud):
    live = [r for r in sc.replicas if r.alive]
    leaders = [r for r in live if server_role(r.address) == "leader"]
    return leaders[0] if len(leaders) == 1 else None


def assert_terms_never_interleave(sc: SharedCloud) -> None:
    """Every mutation came from a server holding a lease, and once a newer term acted at the
    cloud no older term did again."""
    calls = [c for c in sc.cloud.calls if c.op in MUTATIONS]
    assert all(c.term > 0 for c in calls), [c for c in calls if c.term <= 0]
    terms = [c.term for c in calls]
    assert terms == sorted(terms), terms


def replicas(sc: SharedCloud, url: str, n: int, *extra: str):
    rs = [sc.start_replica(f"r{len(sc.replicas)}", url, "--lease-ttl", TTL, *extra) for _ in range(n)]
    for r in rs:
        r.wait_listening()
    return rs


def test_commit_on_a_follower_reaches_the_leader_and_roles_are_reported(tmp_path):
    port = free_ports(1)[0]
    with etcd_cluster() as etcd, shared_cloud(tmp_path) as sc:
        a = replicas(sc, etcd.url, 1, "--metrics", f"127.0.0.1:{port}")[0]
        wait_for(lambda: leader_of(sc) is a, "a leader", sc)
        b = replicas(sc, etcd.url, 1)[0]
        assert server_role(b.address) == "follower"
        s = spec(size=2)
        connect(b.address).group.commit_group(s, False)  # the follower stores it; the leader acts
        wait_for(lambda: at(sc, s), "the group", sc)
        assert {c.server.split(":")[1] for c in sc.cloud.calls} == {str(a.proc.pid)}
        connect(b.address).group.set_size("web", 3)
        wait_for(lambda: at(sc, spec(size=3)), "the resize", sc)
        r = run_cli(["group", "--server", b.address, "describe", "web"])
        assert r.returncode == 0 and "server: follower" in r.stdout and "converged" in r.stdout, r.stdout + r.stderr
        # describe names the term, lease and TTL, and a follower names its leader
        assert re.search(r"server: follower \(term \d+, lease [0-9a-f]+, ttl 2s, leader \S+", r.stdout), r.stdout
        term = int(re.search(r"term (\d+)", r.stdout).group(1))
        assert f"server: leader (term {term}, lease " in run_cli(["group", "--server", a.address, "describe", "web"]).stdout
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert re.search(r'mobykit_server_role\{.*role="leader".*\} 1\.0', text), text
        assert re.search(r"mobykit_leader_term \d+\.0", text) and "mobykit_leader_lease_ttl_seconds 2.0" in text
        r = run_cli(["group", "--server", b.address, "free", "web"])
        assert r.returncode == 0, r.stderr
        assert run_cli(["group", "--server", a.address, "ls"]).stdout.strip() == "ID\tCONFIG\tSIZE"
        assert len(members(sc)) == 3  # freed, not destroyed


def test_kill_9_the_leader_20_times_during_converges_and_rolling_updates(tmp_path):
    rng = random.Random(13)
    with etcd_cluster() as etcd, shared_cloud(tmp_path) as sc:
        replicas(sc, etcd.url, 3)
        wait_for(lambda: leader_of(sc) is not None, "a leader", sc)
        current = spec(size=2)
        connect(sc.replicas[0].address).group.commit_group(current, False)
        wait_for(lambda: at(sc, current), "the first converge", sc)
        for i in range(20):
            rolling = i % 2 == 1
            # converge: 2 -> 5 instances; rolling update: a new version of 3, paced by MinReadySeconds
            if rolling:
                nxt = spec(f"roll{i}", size=3, min_ready=0.3)
                if sorted(members(sc).values()) != [instance_hash(current.properties)] * 3:
                    current = spec(current.properties["Instance"]["Properties"]["Version"], size=3)
                    connect(leader_of(sc).address).group.commit_group(current, False)
                    wait_for(lambda c=current: at(sc, c), "size 3 before the roll", sc)
            else:
                base = spec(current.properties["Instance"]["Properties"]["Version"], size=2)
                connect(leader_of(sc).address).group.commit_group(base, False)
                wait_for(lambda b=base: at(sc, b), "size 2 before the converge", sc)
                nxt = spec(current.properties["Instance"]["Properties"]["Version"], size=5)
            before = len(sc.cloud.calls)
            leader = leader_of(sc)
            follower = next(r for r in sc.replicas if r.alive and r is not leader)
            connect(follower.address).group.commit_group(nxt, False)
            time.sleep(rng.uniform(0.0, 0.8 if rolling else 0.3))
            leader.kill()
            sc.start_replica(f"r{len(sc.replicas)}", etcd.url, "--lease-ttl", TTL)
            wait_for(lambda n=nxt: at(sc, n), f"kill {i + 1}: the group at its target", sc)
            current = nxt
            calls = [(c.op, c.term, c.server.split(":")[1], c.id, c.tags.get("infrakit.config.hash", "")[:6])
                     for c in sc.cloud.calls[before:]]
            calls.append(("killed", leader.proc.pid))
            creates = [c for c in calls if c[0] == "create"]
            destroys = [c for c in calls if c[0] == "destroy"]
            if rolling:  # every instance replaced exactly once
                assert (len(creates), len(destroys)) == (3, 3), calls
            else:  # three more, none twice, none destroyed
                assert (len(creates), len(destroys)) == (3, 0), calls
            wait_for(lambda: leader_of(sc) is not None, "a leader after the kill", sc)
        assert sum(1 for r in sc.replicas if not r.alive) == 20
        assert len(sc.cloud.provider.list({})) == 3  # nothing leaked outside the group
        assert_terms_never_interleave(sc)
        assert len({c.term for c in sc.cloud.calls if c.op in MUTATIONS}) >= 10


def test_without_etcd_nobody_acts_and_everything_resumes(tmp_path):
    with etcd_cluster() as etcd, shared_cloud(tmp_path) as sc:
        replicas(sc, etcd.url, 2)
        wait_for(lambda: leader_of(sc) is not None, "a leader", sc)
        s = spec(size=3)
        connect(sc.replicas[1].address).group.commit_group(s, False)
        wait_for(lambda: at(sc, s), "the group", sc)
        # Every replica talks to the first member first: stop it. The others keep a quorum.
        etcd.stop(etcd.members[0])
        s = spec(size=4)
        connect(sc.replicas[0].address).group.commit_group(s, False)
        wait_for(lambda: at(sc, s), "the group, with a member down", sc)
        # All of etcd down: the leader's lease cannot be renewed; it stops acting within the TTL.
        for m in etcd.members[1:]:
            etcd.stop(m)
        time.sleep(float(TTL) + 0.5)
        calls = len(sc.cloud.calls)
        victim = sorted(members(sc))[0]
        sc.cloud.provider.destroy(victim)  # a machine lost behind the controllers' back
        time.sleep(1.5)  # several polls of a controller that would otherwise replace it at once
        assert len(sc.cloud.calls) == calls, sc.cloud.calls[calls:]
        assert all(server_role(r.address) != "leader" for r in sc.replicas)
        for m in etcd.members:
            etcd.restart(m)
        etcd.wait_healthy()
        wait_for(lambda: len(members(sc)) == 4 and at(sc, s), "the replacement after etcd is back", sc)
        assert victim not in members(sc)
        assert_terms_never_interleave(sc)


def test_bad_etcd_stores_are_one_error_and_nothing_is_overwritten(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))
    args = ["serve", "--no-infrakit", "--listen", f"unix:{tmp_path}/s.sock", "--store"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"etcd://127.0.0.1:{s.getsockname()[1]}"
        r = run_cli([*args, dead], env=env)
    assert r.returncode == 1 and re.search(r"mobykit: error: store etcd://127\.0\.0\.1:\d+: cannot reach etcd", r.stderr), r.stderr
    with etcd_cluster(1) as etcd:
        base = f"http://{etcd.members[0].endpoint}/v3/kv"

        def put(key: str, value: bytes) -> None:
            requests.post(f"{base}/put", json={"key": base64.b64encode(key.encode()).decode(),
                                               "value": base64.b64encode(value).decode()}, timeout=5).raise_for_status()

        def get(key: str) -> bytes:
            r = requests.post(f"{base}/range", json={"key": base64.b64encode(key.encode()).decode()}, timeout=5).json()
            return base64.b64decode(r["kvs"][0]["value"])

        put("/mobykit/format", b'{"format": 1}')
        put("/mobykit/groups/web", b'{"format": 1, "id": "web", "spec"')
        r = run_cli([*args, etcd.url], env=env)
        errs = [ln for ln in r.stderr.splitlines() if ln.startswith("mobykit: error:")]
        assert r.returncode == 1 and len(errs) == 1 and "key /mobykit/groups/web: corrupt store record" in errs[0], r.stderr
        assert get("/mobykit/groups/web") == b'{"format": 1, "id": "web", "spec"'
        put("/mobykit/format", json.dumps({"format": 2}).encode())
        r = run_cli([*args, etcd.url], env=env)
        assert r.returncode == 1 and "written by a newer mobykit (store format 2" in r.stderr, r.stderr
        assert get("/mobykit/format") == b'{"format": 2}'
