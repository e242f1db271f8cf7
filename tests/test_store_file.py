"""The ``file:`` store: records survive, a second server is refused, bad stores are one clear error
with nothing overwritten; and a real ``mobykit serve`` killed with SIGKILL at every step of a
rolling update resumes it from the store (halts and rollback targets included)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from harness.mobykit_server import run_cli
from harness.sharedcloud import shared_cloud
from mobykit.group.hash import instance_hash
from mobykit.group.store import GroupRecord, StoreError, open_store
from mobykit.rpc.client import connect
from mobykit.spi.group import GroupSpec


def record(id="web", size=2, commit="c1") -> GroupRecord:
    return GroupRecord(id=id, spec={"ID": id, "Properties": {"Allocation": {"Size": size}}}, commit=commit,
                       halted="rolling update halted: x", healthy_since={"i-1": 1700000000.5})


def test_records_round_trip_and_a_second_server_is_refused(tmp_path):
    store = open_store(f"file:{tmp_path}/state")
    try:
        assert store.put(record("web/a b"), expect=0)
        assert not store.put(record("web/a b", commit="c2"), expect=0)  # compare-and-swap
        loaded = store.load()
        assert loaded["web/a b"].halted == "rolling update halted: x"
        assert loaded["web/a b"].healthy_since == {"i-1": 1700000000.5}
        with pytest.raises(StoreError, match=rf"in use by another mobykit serve \(pid {os.getpid()}\)"):
            open_store(f"file:{tmp_path}/state")
        (tmp_path / "state" / "groups" / ".tmp-web.json.1.2").write_text("{half")  # a kill mid-write
        assert set(store.load()) == {"web/a b"}
        assert store.delete("web/a b") and store.load() == {}
    finally:
        store.close()
    open_store(f"file:{tmp_path}/state").close()  # the lock went with the first server


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "format").write_text('{"format": 99}'), "written by a newer mobykit \\(store format 99"),
    (lambda d: (d / "groups" / "web.json").write_bytes(b'{"format": 1, "id": "web", "sp'), "corrupt store record"),
    (lambda d: (d / "groups" / "web.json").write_text('{"format": 7, "id": "web"}'), "newer mobykit"),
])
def test_a_bad_store_is_one_error_and_nothing_is_overwritten(tmp_path, damage, message):
    root = tmp_path / "state"
    store = open_store(f"file:{root}")
    store.put(record("web"))
    store.close()
    damage(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    r = run_cli(["serve", "--no-infrakit", "--listen", f"unix:{tmp_path}/s.sock", "--store", f"file:{root}"],
                env=dict(os.environ, HOME=str(tmp_path)), timeout=60)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mobykit: error:")]
    assert len(lines) == 1 and str(root) in lines[0] and re.search(message, lines[0]), r.stderr
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    assert not (tmp_path / "s.sock").exists()


def test_unknown_store_url_is_named(tmp_path):
    r = run_cli(["serve", "--no-infrakit", "--listen", f"unix:{tmp_path}/s.sock", "--store", "zk://x:1"],
                env=dict(os.environ, HOME=str(tmp_path)))
    assert r.returncode == 2 and "store 'zk://x:1': expected file:DIR or etcd://" in r.stderr


# -- a real server killed at every step ----------------------------------------------------------


def spec(version: str, size: int = 5, health: str = "1", rollback: bool = False) -> GroupSpec:
    updating = {"MinReadySeconds": 0.3}
    if rollback:
        updating["Rollback"] = "auto"
    return GroupSpec(id="web", properties={
        "Allocation": {"Size": size},
        "Instance": {"Plugin": "mobykit/memory", "Properties": {"Version": version}},
        "Flavor": {"Plugin": "mobykit/echo", "Properties": {"Tags": {"health": health}}},
        "Updating": updating,
    })


def chash(s: GroupSpec) -> str:
    return instance_hash(s.properties)


def members(cloud) -> dict[str, str]:
    return {m.id: m.tags.get("infrakit.config.hash") for m in cloud.cloud.provider.list({"infrakit.group": "web"})}


def wait_for(cond, what: str, replica, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; server log:\n{replica.output()}")
        time.sleep(0.05)


def stored(root: Path) -> dict:
    return json.loads((root / "groups" / "web.json").read_text())


@pytest.mark.slow
def test_kill_9_at_every_step_of_a_rolling_update_resumes_from_the_file_store(tmp_path):
    root = tmp_path / "state"
    store = f"file:{root}"
    with shared_cloud(tmp_path) as sc:
        def start():
            r = sc.start_replica("one", store, home=tmp_path / "home")
            r.wait_listening()
            return r

        server = start()
        v1, v2 = spec("v1"), spec("v2")
        connect(server.address).group.commit_group(v1, False)
        wait_for(lambda: sorted(members(sc).values()) == [chash(v1)] * 5, "v1 x5", server)
        connect(server.address).group.commit_group(v2, False)
        kills = 0
        seen = len(sc.cloud.calls)
        while sorted(members(sc).values()) != [chash(v2)] * 5:
            wait_for(lambda seen=seen: len(sc.cloud.calls) > seen or sorted(members(sc).values()) == [chash(v2)] * 5,
                     "a step of the update", server)
            server.kill()  # SIGKILL right after a create or a destroy
            kills += 1
            # counted before the restart: a step the new server takes while it starts is one to kill it after
            seen = len(sc.cloud.calls)
            server = start()
        assert kills >= 5
        creates = [c for c in sc.cloud.calls if c.op == "create" and c.tags["infrakit.config.hash"] == chash(v2)]
        assert len(creates) == 5, creates  # no slot provisioned twice across the restarts
        assert len(members(sc)) == 5  # and none leaked

        # Halted stays halted: an unhealthy config halts the roll; a restart does not resume it.
        v3 = spec("v3", health="2")
        connect(server.address).group.commit_group(v3, False)
        wait_for(lambda: (stored(root).get("halted") or "").startswith("rolling update halted"), "the halt", server)
        server.kill()
        calls = len(sc.cloud.calls)
        server = start()
        wait_for(lambda: "resumed 1 group(s)" in server.output(), "the resume", server)
        time.sleep(1.0)  # five polls of the restarted controller
        assert len(sc.cloud.calls) == calls, sc.cloud.calls[calls:]
        assert stored(root)["halted"].startswith("rolling update halted")

        # Rollback after a restart: commit an unhealthy v4 with Rollback: auto over a healthy v1,
        # kill the server while the first v4 instance is still being created, restart: it goes back.
        connect(server.address).group.commit_group(v1, False)
        wait_for(lambda: sorted(members(sc).values()) == [chash(v1)] * 5, "back on v1", server)
        v4 = spec("v4", health="2", rollback=True)
        sc.cloud.provider.provision_latency = 1.0
        connect(server.address).group.commit_group(v4, False)
        server.kill()
        assert stored(root)["previous"]["Properties"]["Instance"]["Properties"] == {"Version": "v1"}
        sc.cloud.provider.provision_latency = 0.0
        server = start()
        wait_for(lambda: stored(root).get("rolled_back_from") == chash(v4), "the rollback", server)
        wait_for(lambda: sorted(members(sc).values()) == [chash(v1)] * 5, "v1 again", server)
        assert stored(root)["spec"]["Properties"]["Instance"]["Properties"] == {"Version": "v1"}
        r = run_cli(["group", "--server", server.address, "ls"])
        assert r.returncode == 0 and f"web\t{chash(v1)}\t5" in r.stdout, r.stderr
