"""Issue 16's clustered example, end to end: specs/groups/etcd.yml on a real session libvirtd under
TCG, through ``mobykit serve`` (``make demo``'s stack, mobykit.demo.stack).

Three etcd members (logical ids 10.77.0.11-13: their addresses on the group's private network)
converge with their data on persistent volumes; 1,000 keys are written; the group is committed
with specs/images/etcd-v2.yml and rolls one member at a time while a client keeps writing through
the members' published client ports. Then every key written before and every write acknowledged
during the roll is read back; every poll during the roll found at least two members' etcd
answering (a quorum of live members: the roll never had two members down at once); the members
are the same three etcd members as before (ids from their volumes), now on the new image.

The helpers here (etcd's v3 JSON gateway over http.client, the writer, the poller) are also what
bench/bench_etcd_roll.py measures with.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.libvirtd import libvirtd_session  # noqa: F401 (the session daemon fixture)

ROOT = Path(__file__).resolve().parent.parent
GROUP = ROOT / "specs" / "groups" / "etcd.yml"
IMAGE_V1 = ROOT / "specs" / "images" / "etcd.yml"
IMAGE_V2 = ROOT / "specs" / "images" / "etcd-v2.yml"
CLIENT_PORT = "2379"
KEYS = 1000


# --- etcd's v3 JSON gateway (grpc-gateway: /v3/kv/..., base64 keys and values) ---------------

def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def call(port: int, path: str, body: dict, timeout: float = 3.0) -> dict:
    """POST ``body`` to etcd's gateway on 127.0.0.1:``port``; OSError on any failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise OSError(f"etcd {path}: HTTP {r.status}: {data[:200]!r}")
        return json.loads(data or b"{}")
    except (http.client.HTTPException, ValueError) as e:
        raise OSError(f"etcd {path}: {e}") from None
    finally:
        conn.close()


def put_many(port: int, items: dict[str, str], timeout: float = 10.0) -> None:
    """Every item in one transaction (etcd allows 128 operations per txn)."""
    ops = [{"requestPut": {"key": _b64(k), "value": _b64(v)}} for k, v in items.items()]
    call(port, "/v3/kv/txn", {"success": ops}, timeout)


def read_prefix(port: int, prefix: str, timeout: float = 30.0) -> dict[str, str]:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    out = call(port, "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)}, timeout)
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in out.get("kvs", [])}


def status(port: int, timeout: float = 2.0) -> dict:
    """The member's /v3/maintenance/status: its member id (header.member_id), the leader's id."""
    return call(port, "/v3/maintenance/status", {}, timeout)


# --- the group, as the server lists it -------------------------------------------------------

@dataclass
class Member:
    id: str
    logical_id: str
    hash: str
    image: str
    health: str
    port: int | None


def members(st, group_id: str, flavor_props: dict) -> list[Member]:
    from mobykit.demo import GROUP_TAG, HASH_TAG, IMAGE_TAG
    from mobykit.errors import MobykitError

    out = []
    for d in st.clients.instance.describe_instances("libvirt", {GROUP_TAG: group_id}, True):
        try:
            health = st.clients.flavor.healthy("moby", flavor_props, d).name
        except MobykitError:
            health = "UNKNOWN"
        ports = (d.properties or {}).get("Ports") or {}
        tags = d.tags or {}
        out.append(Member(d.id, d.logical_id or "", tags.get(HASH_TAG, "?"), tags.get(IMAGE_TAG, "?"), health,
                          ports.get(CLIENT_PORT)))
    return out


def wait_converged(st, spec, timeout: float, on_listing=None) -> list[Member]:
    """Until every logical id is held by one HEALTHY member on the committed config and the
    controller says converged; AssertionError with the server log's tail on timeout."""
    from mobykit.group.hash import instance_hash

    want = instance_hash(spec.properties)
    lids = set(spec.properties["Allocation"]["LogicalIDs"])
    props = spec.properties["Flavor"]["Properties"]
    deadline = time.monotonic() + timeout
    mark = len(st.serve_log.read_text(errors="replace"))
    while True:
        ms = members(st, spec.id, props)
        if on_listing:
            on_listing(ms)
        if ({m.logical_id for m in ms} == lids and len(ms) == len(lids)
                and all(m.hash == want and m.health == "HEALTHY" for m in ms)
                and st.clients.group.describe_group(spec.id).converged):
            return ms
        log = st.serve_log.read_text(errors="replace")
        # the controller stops provisioning after repeated failures and says so only in its log
        if f"gave up group={spec.id} " in log[mark:] or time.monotonic() > deadline:
            raise AssertionError(f"group {spec.id} not converged ({timeout:.0f}s at most): {ms}\n"
                                 f"server log ends:\n{log[-2500:]}")
        time.sleep(1.0)


# --- the client during the roll --------------------------------------------------------------

@dataclass
class WriterStats:
    acked: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    failures: int = 0
    ok_times: list[float] = field(default_factory=list)  # monotonic times of acknowledged writes


class Writer:
    """Writes roll/NNNNNN keys one after another, each to the first member (in turn) that takes
    it; the ports come from the latest listing. Records every acknowledged write and when."""

    def __init__(self, ports: list[int], pause: float = 0.05):
        self.ports = list(ports)
        self.pause = pause
        self.stats = WriterStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="etcd-writer", daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n, turn = 0, 0
        while not self._stop.is_set():
            key, value = f"roll/{n:06d}", f"value-{n}"
            ports = list(self.ports)
            for i in range(len(ports)):
                port = ports[(turn + i) % len(ports)]
                self.stats.attempts += 1
                try:
                    put_many(port, {key: value}, timeout=2.0)
                except OSError:
                    self.stats.failures += 1
                    continue
                self.stats.acked[key] = value
                self.stats.ok_times.append(time.monotonic())
                n += 1
                break
            turn += 1
            self._stop.wait(self.pause)


def availability(ok_times: list[float], start: float, end: float, window: float = 0.1) -> float:
    """The share of ``window``-second windows in [start, end) holding an acknowledged write."""
    count = max(1, int((end - start) / window))
    hit = {int((t - start) / window) for t in ok_times if start <= t < end}
    return len({w for w in hit if 0 <= w < count}) / count


class Liveness:
    """Polls every known member's etcd status; ``min_alive`` is the fewest members alive in one
    round during the roll. Alive: it answered in this round or the one before (a status call can
    time out on this loaded 2-core machine under TCG; a member really down - destroyed, or booting
    until its etcd serves - misses every round for a whole boot, so two of them down at once
    cannot hide behind one retry)."""

    def __init__(self, get_ports, interval: float = 0.5, timeout: float = 5.0):
        self.get_ports = get_ports
        self.interval = interval
        self.timeout = timeout
        self.min_alive: int | None = None
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="etcd-liveness", daemon=True)

    def __enter__(self) -> Liveness:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        before: set[int] = set()
        while not self._stop.is_set():
            ports = list(self.get_ports())
            now = set()
            for port in ports:
                with contextlib.suppress(OSError):
                    status(port, timeout=self.timeout)
                    now.add(port)
            alive = sum(1 for p in ports if p in now or p in before)
            before = now
            self.rounds += 1
            self.min_alive = alive if self.min_alive is None else min(self.min_alive, alive)
            self._stop.wait(self.interval)


@dataclass
class RollOutcome:
    before: list[Member]
    after: list[Member]
    seconds: float
    writer: WriterStats
    min_alive: int
    liveness_rounds: int
    availability: float
    member_ids_before: set[str]
    member_ids_after: set[str]
    read_back: dict[str, str]
    seeded: dict[str, str]


def run_roll(st, spec1, spec2, *, timeout: float = 900.0, say=lambda _m: None) -> RollOutcome:
    """Converge ``spec1``, write KEYS keys, roll to ``spec2`` under a writer; what was seen."""
    st.clients.group.commit_group(spec1, False)
    before = wait_converged(st, spec1, timeout)
    say(f"converged: {[(m.logical_id, m.port) for m in before]}")
    ports = [m.port for m in before]
    seeded = {f"seed/{i:04d}": f"seed-value-{i}" for i in range(KEYS)}
    items = list(seeded.items())
    for i in range(0, len(items), 100):
        put_many(ports[i // 100 % len(ports)], dict(items[i:i + 100]))
    ids_before = {status(p)["header"]["member_id"] for p in ports}

    latest = {"ports": ports}

    def on_listing(ms: list[Member]) -> None:
        now = [m.port for m in ms if m.port]
        if now:
            latest["ports"] = now
            writer.ports = now

    with Writer(ports) as writer, Liveness(lambda: latest["ports"]) as live:
        t0 = time.monotonic()
        st.clients.group.commit_group(spec2, False)
        after = wait_converged(st, spec2, timeout, on_listing=on_listing)
        t1 = time.monotonic()
    say(f"rolled in {t1 - t0:.1f}s; writes {len(writer.stats.acked)} acked of {writer.stats.attempts} attempts; "
        f"fewest live members {live.min_alive} in {live.rounds} polls; "
        f"availability {availability(writer.stats.ok_times, t0, t1):.1%} of 100 ms windows")
    new_ports = [m.port for m in after]
    ids_after = {status(p)["header"]["member_id"] for p in new_ports}
    read = {}
    for prefix in ("seed/", "roll/"):
        read.update(read_prefix(new_ports[0], prefix))
    return RollOutcome(before, after, t1 - t0, writer.stats, live.min_alive or 0, live.rounds,
                       availability(writer.stats.ok_times, t0, t1), ids_before, ids_after, read, seeded)


def volumes_of(libvirt_config: dict, group_id: str) -> list[str]:
    import libvirt

    conn = libvirt.open(libvirt_config["URI"])
    try:
        pool = conn.storagePoolLookupByName((libvirt_config.get("Pool") or "mobykit") + "-volumes")
        pool.refresh(0)
        return sorted(n for n in pool.listVolumes() if n.startswith(f"{group_id}-"))
    except libvirt.libvirtError:
        return []
    finally:
        conn.close()


def remove_volumes(libvirt_config: dict, group_id: str) -> None:
    """The group's persistent volumes (a roll never removes them; the test must)."""
    import libvirt

    conn = libvirt.open(libvirt_config["URI"])
    try:
        pool = conn.storagePoolLookupByName((libvirt_config.get("Pool") or "mobykit") + "-volumes")
        for name in pool.listVolumes():
            if name.startswith(f"{group_id}-"):
                with contextlib.suppress(libvirt.libvirtError):
                    pool.storageVolLookupByName(name).delete(0)
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


# --- the tests -------------------------------------------------------------------------------

def test_the_two_etcd_images_differ_in_one_file():
    v1, v2 = IMAGE_V1.read_text().splitlines(), IMAGE_V2.read_text().splitlines()
    changed = [(a, b) for a, b in zip([x for x in v1 if not x.startswith("#")],
                                      [x for x in v2 if not x.startswith("#")], strict=True) if a != b]
    assert changed == [('    contents: "v1\\n"', '    contents: "v2\\n"')]


def test_the_etcd_group_is_a_quorum_group_with_volumes_and_a_private_network():
    from mobykit.group.spec import load

    p = load(GROUP).spec().properties
    lids = p["Allocation"]["LogicalIDs"]
    inst = p["Instance"]["Properties"]
    assert len(lids) == 3 and "Size" not in p["Allocation"]
    assert inst["Volumes"] == [{"Name": "data", "SizeGb": 1}] and inst["Publish"] == ["0:2379"]
    import ipaddress

    assert all(ipaddress.ip_address(lid) in ipaddress.ip_network(inst["PrivateNetwork"]) for lid in lids)
    flavor = p["Flavor"]["Properties"]
    assert flavor["Init"] == ["members=" + " ".join(lids)]  # membership = the logical ids
    # health = this member is up and the cluster has a leader: etcd's /health on its published 2379
    assert flavor["Health"] == {"Mode": "http", "Port": 2379, "Path": "/health", "Deadline": "300s"}
    assert p["Updating"]["MinReadySeconds"] >= 5


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_etcd_keeps_quorum_and_every_write_through_a_rolling_upgrade(libvirtd_session):  # noqa: F811
    pytest.importorskip("libvirt")
    import os

    from mobykit import demo
    from mobykit.image.cache import Cache, default_root

    cache = Cache(os.environ.get("MOBYKIT_CACHE") or default_root())
    image1, image2 = demo.build_image(IMAGE_V1, cache=cache), demo.build_image(IMAGE_V2, cache=cache)
    spec1, spec2 = demo.group_spec(GROUP, IMAGE_V1), demo.group_spec(GROUP, IMAGE_V2)
    config = libvirtd_session.config
    try:
        with demo.stack(libvirt_config=config, cache_root=cache.root, group_id=spec1.id) as st:
            out = run_roll(st, spec1, spec2, say=print)
            vols = volumes_of(config, spec1.id)
    finally:
        remove_volumes(config, spec1.id)

    assert {m.image for m in out.before} == {image1.id} and {m.image for m in out.after} == {image2.id}
    assert not {m.id for m in out.before} & {m.id for m in out.after}  # every VM was replaced
    # the same three etcd members (their ids live on their volumes), one volume per logical id
    assert out.member_ids_after == out.member_ids_before and len(out.member_ids_before) == 3
    assert vols == [f"etcd-{lid}-data" for lid in sorted(m.logical_id for m in out.before)]
    # quorum: in every poll during the roll at least two members' etcd answered
    assert out.liveness_rounds > 0 and out.min_alive >= 2, out.min_alive
    # every key written before and every write acknowledged during the roll reads back
    assert {k: out.read_back.get(k) for k in out.seeded} == out.seeded
    assert out.writer.acked, "no write succeeded during the roll"
    assert {k: out.read_back.get(k) for k in out.writer.acked} == out.writer.acked
