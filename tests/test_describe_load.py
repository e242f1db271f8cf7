"""DescribeInstances under load: shared listings that are never stale, and the libvirt listing cache.

What is checked, each in a way that fails if the mechanism is missing or wrong:
- concurrent identical describes share one provider call (an instrumented provider counts them),
  while other tag filters are not held up;
- a describe that starts after a Label, Destroy or Provision completed sees it, even while an
  older listing is still in flight (joining that one would answer stale);
- the libvirt provider's per-domain cache serves repeated listings without re-reading domains,
  and drops a view when the domain changes outside mobykit (metadata changed, stopped, undefined)
  through events, and at once without events, and on our own writes even if no event ever comes;
- a view read while its domain changed is never stored, nor one whose state could not be read;
- 20 clients (10 gRPC, 10 Infrakit JSON-RPC) x 20 describes against a real ``mobykit serve`` on
  libvirt's test driver, with Labels going on meanwhile: no failure, and every answer is at least
  as new as the last Label completed before its call began.
No assertion is about time; waits for asynchronous events poll up to a generous deadline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from harness.libvirtd import remove_everything
from harness.mobykit_server import UnixHTTPConnection, post_raw, serve_process
from mobykit.core.instance import InstanceCore
from mobykit.core.singleflight import SingleFlight
from mobykit.errors import Unavailable
from mobykit.providers.base import Machine, MachineSpec
from mobykit.providers.libvirt import NS, DomainCache, InstanceMeta, LibvirtProvider, events
from mobykit.providers.memory import MemoryProvider
from mobykit.spi.types import Spec

try:
    import libvirt
except ImportError:  # pragma: no cover - the libvirt extra is not installed
    libvirt = None
needs_libvirt = pytest.mark.skipif(libvirt is None, reason="libvirt-python is not installed")

DEADLINE = 15.0  # seconds a condition that depends on another thread or an event may take


def _wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


class HeldProvider(MemoryProvider):
    """A memory provider that counts ``list`` calls and can hold one: the held call reads the
    machines first, then waits for ``release``, as a slow cloud answers with what it read."""

    def __init__(self) -> None:
        super().__init__()
        self.list_calls = 0
        self._count = threading.Lock()
        self._hold: threading.Event | None = None
        self.holding = threading.Event()

    def hold_next_list(self) -> threading.Event:
        release = threading.Event()
        self._hold = release
        return release

    def list(self, tags: dict[str, str]) -> list[Machine]:
        with self._count:
            self.list_calls += 1
            hold, self._hold = self._hold, None
        machines = super().list(tags)
        if hold is not None:
            self.holding.set()
            hold.wait(DEADLINE)
        return machines


class Calls:
    """Describe calls on background threads; results and errors kept by thread."""

    def __init__(self, core: InstanceCore):
        self.core = core
        self.threads: list[threading.Thread] = []
        self.results: dict[int, list[str]] = {}
        self.errors: list[BaseException] = []

    def start(self, tags: dict[str, str]) -> int:
        n = len(self.threads)

        def run() -> None:
            try:
                self.results[n] = [d.id for d in self.core.describe_instances("", tags)]
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        self.threads.append(t)
        t.start()
        return n

    def join(self) -> None:
        for t in self.threads:
            t.join(DEADLINE)
        assert not [t for t in self.threads if t.is_alive()]


@pytest.fixture
def held() -> tuple[InstanceCore, HeldProvider]:
    provider = HeldProvider()
    core = InstanceCore({"default_provider": "memory"}, providers={"memory": provider})
    for i in range(3):
        core.provision("", Spec(properties={}, tags={"g": "web", "n": str(i)}))
    return core, provider


# -- single-flight in the core ----------------------------------------------------------------------


def test_concurrent_identical_describes_share_one_provider_call(held):
    core, provider = held
    calls = Calls(core)
    release = provider.hold_next_list()
    first = calls.start({"g": "web"})
    assert provider.holding.wait(DEADLINE)
    before = provider.list_calls
    waiting = [calls.start({"g": "web"}) for _ in range(8)]
    _wait_until(lambda: core.listings.stats().callers == 9, "eight callers queued behind the held listing")
    other = calls.start({"g": "db"})  # another key is not held up by the held listing
    calls.threads[other].join(DEADLINE)
    assert calls.results[other] == []
    release.set()
    calls.join()
    assert not calls.errors
    # The held call, the other key's call, and ONE call for the eight callers that queued.
    assert provider.list_calls - before == 2
    expected = [d.id for d in core.describe_instances("", {"g": "web"})]
    assert len(expected) == 3
    assert calls.results[first] == expected
    assert all(calls.results[n] == expected for n in waiting)


@pytest.mark.parametrize("write", ["label", "destroy", "provision"])
def test_a_describe_started_after_a_write_sees_it_while_an_older_listing_is_in_flight(held, write):
    core, provider = held
    ids = [d.id for d in core.describe_instances("", {"g": "web"})]
    calls = Calls(core)
    release = provider.hold_next_list()
    old = calls.start({"g": "web"})
    assert provider.holding.wait(DEADLINE)  # this listing has read the machines: it predates the write
    if write == "label":
        core.label("", ids[0], {"g": "db"})
        expected = ids[1:]
    elif write == "destroy":
        core.destroy("", ids[1])
        expected = [ids[0], ids[2]]
    else:
        new = core.provision("", Spec(properties={}, tags={"g": "web"}))
        expected = [*ids, new]
    callers = core.listings.stats().callers
    after = calls.start({"g": "web"})
    _wait_until(lambda: core.listings.stats().callers == callers + 1, "the later describe has arrived")
    release.set()
    calls.join()
    assert not calls.errors
    assert calls.results[old] == ids  # what the held listing read before the write
    assert calls.results[after] == expected


def test_one_failed_call_fails_everyone_who_shared_it_and_only_them():
    flights: SingleFlight[str, int] = SingleFlight()
    started, release = threading.Event(), threading.Event()
    outcomes: list[object] = []

    def failing() -> int:
        started.set()
        release.wait(DEADLINE)
        raise Unavailable("cloud down")

    def caller(fn: Callable[[], int]) -> None:
        try:
            outcomes.append(flights.do("k", fn))
        except Unavailable as e:
            outcomes.append(e)

    runner = threading.Thread(target=caller, args=(failing,))
    runner.start()
    assert started.wait(DEADLINE)
    # Both queue behind the failing call and share the next one, which succeeds.
    queued = [threading.Thread(target=caller, args=(lambda: 7,)) for _ in range(2)]
    for t in queued:
        t.start()
    _wait_until(lambda: flights.stats().callers == 3, "two callers queued")
    release.set()
    for t in [runner, *queued]:
        t.join(DEADLINE)
    assert sorted(map(str, outcomes)) == ["7", "7", "cloud down"]
    assert flights.stats().calls == 2
    assert flights.do("k", lambda: 8) == 8  # nothing is left behind for the key


# -- the libvirt listing cache -----------------------------------------------------------------------

URI = "test:///default"
POOL = "mobykit-load"


def _spec(tags: dict[str, str]) -> MachineSpec:
    return MachineSpec(properties={"Kernel": "/boot/vmlinuz-test", "Initrd": "/boot/initrd-test"}, tags=tags)


def _cleanup(p: LibvirtProvider) -> None:
    remove_everything(p, URI, POOL)


@pytest.fixture
def make_provider() -> Iterator[Callable[[], LibvirtProvider]]:
    """Providers on the mock driver (built when the test asks, after any monkeypatching); every
    domain and volume they made is removed afterwards (test:///default lives as long as the process)."""
    made: list[LibvirtProvider] = []

    def make() -> LibvirtProvider:
        made.append(LibvirtProvider({"URI": URI, "Pool": POOL}))
        return made[-1]

    yield make
    for p in made:
        _cleanup(p)


@pytest.fixture
def outside() -> Iterator[object]:
    """A connection of someone else's (virsh, another plugin) to the same mock driver."""
    conn = libvirt.open(URI)
    yield conn
    conn.close()


def _retag(conn, instance_id: str, tags: dict[str, str]) -> None:
    """Change an instance's tags as another client would: raw metadata, no mobykit code."""
    dom = conn.lookupByName(instance_id)
    meta = InstanceMeta.parse(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0))
    meta.tags = tags
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta.xml(), "other", NS,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def _tags(p: LibvirtProvider, instance_id: str) -> dict[str, str] | None:
    return next((m.tags for m in p.list({}) if m.id == instance_id), None)


@needs_libvirt
def test_repeated_listings_reuse_each_domains_view(make_provider, outside):
    p = make_provider()
    ids = [p.create(_spec({"g": "web", "n": str(i)})).id for i in range(3)]
    cache = p.listing_cache()
    assert cache.live, "the mock driver delivers events in this process"
    # The creates' own events arrive a little later and drop views. Events come in order, so once
    # the event of a later change is seen, none of theirs is still on its way.
    _retag(outside, ids[0], {"g": "web", "n": "0", "seen": "1"})
    _wait_until(lambda: "seen" in (_tags(p, ids[0]) or {}), "the retag's event")
    assert [m.id for m in p.list({"g": "web"})] == ids
    before = cache.stats()
    for _ in range(3):
        assert [m.id for m in p.list({"g": "web"})] == ids
    after = cache.stats()
    assert after.reads == before.reads  # no domain was read again
    assert after.hits - before.hits == 9
    listed = p.list({})[0]
    listed.tags["g"] = "changed by a caller"
    listed.properties["Volumes"].append("x")
    assert p.list({})[0].tags["g"] == "web" and "x" not in p.list({})[0].properties["Volumes"]


@needs_libvirt
def test_a_change_outside_mobykit_reaches_the_listing_through_events(make_provider, outside):
    p = make_provider()
    a, b = (p.create(_spec({"g": "web"})).id for _ in range(2))
    assert len(p.list({"g": "web"})) == 2  # both views cached now
    _retag(outside, a, {"g": "db"})
    _wait_until(lambda: _tags(p, a) == {"g": "db"}, "the metadata-change event dropped the view")
    outside.lookupByName(b).destroy()
    _wait_until(lambda: next(m.state for m in p.list({}) if m.id == b) == "stopped",
                "the lifecycle event dropped the view")
    outside.lookupByName(b).undefine()
    assert b not in [m.id for m in p.list({})]  # at once: the domain list is never cached


@needs_libvirt
def test_without_events_every_listing_sees_outside_changes_at_once(make_provider, outside, monkeypatch):
    monkeypatch.setattr(events, "subscribe", lambda *_args: None)  # a driver that gives no events
    p = make_provider()
    a = p.create(_spec({"g": "web"})).id
    cache = p.listing_cache()
    assert not cache.live
    assert _tags(p, a) == {"g": "web"}
    reads = cache.stats().reads
    _retag(outside, a, {"g": "db"})
    assert _tags(p, a) == {"g": "db"}
    outside.lookupByName(a).destroy()
    assert next(m.state for m in p.list({}) if m.id == a) == "stopped"
    assert cache.stats().reads - reads == 2  # every listing re-read the domain
    outside.lookupByName(a).undefine()
    assert p.list({}) == []


@needs_libvirt
def test_our_own_writes_are_seen_at_once_even_if_no_event_ever_comes(make_provider, outside, monkeypatch):
    # Events "delivered" for this connection, but none ever arrives: only our own invalidation works.
    monkeypatch.setattr(events, "subscribe", lambda conn, *_args: events.Subscription(conn))
    p = make_provider()
    a = p.create(_spec({"g": "web"})).id
    assert p.listing_cache().live
    assert _tags(p, a) == {"g": "web"}
    p.set_tags(a, {"g": "web", "v": "2"})
    assert _tags(p, a) == {"g": "web", "v": "2"}
    b = p.create(_spec({"g": "web"})).id
    assert [m.id for m in p.list({"g": "web"})] == [a, b]
    p.destroy(a)
    assert [m.id for m in p.list({})] == [b]
    # The premise: views really are trusted here, so an outside change goes unseen without its event.
    _retag(outside, b, {"g": "db"})
    assert _tags(p, b) == {"g": "web"}


@dataclass
class FakeDomain:
    """A domain whose metadata read can run a hook (an event arriving in the middle of the read)."""

    uuid: str
    text: str
    during_read: Callable[[], None] | None = None
    state_fails: bool = False

    def name(self) -> str:
        return "mobykit-00000000000000000001-beef"

    def UUIDString(self) -> str:  # noqa: N802 - libvirt's name
        return self.uuid

    def metadata(self, _type: int, _ns: str, _flags: int) -> str:
        if self.during_read is not None:
            hook, self.during_read = self.during_read, None
            hook()
        return self.text

    def state(self) -> list[int]:
        if self.state_fails:
            self.state_fails = False
            raise libvirt.libvirtError("the daemon hiccupped")
        return [1, 0]


@needs_libvirt
def test_a_view_read_while_its_domain_changed_is_not_kept():
    cache = DomainCache("test:///fake")
    cache.set_live(True)
    meta = InstanceMeta(tags={"g": "web"}, logical_id=None, image=None, created=1, volumes=[], pool="p")
    dom = FakeDomain("u-1", meta.xml())
    dom.during_read = lambda: cache.invalidate("u-1")
    assert [v.meta.tags for v in cache.views([dom])] == [{"g": "web"}]
    assert cache.stats().reads == 1
    list(cache.views([dom]))
    assert cache.stats().reads == 2  # read again: the first read may predate the change
    list(cache.views([dom]))
    assert cache.stats().reads == 2 and cache.stats().hits == 1



@needs_libvirt
def test_a_state_that_could_not_be_read_is_not_kept():
    """Kept, "terminated" would hide a live instance from every listing until its next event."""
    cache = DomainCache("test:///fake")
    cache.set_live(True)
    meta = InstanceMeta(tags={}, logical_id=None, image=None, created=1, volumes=[], pool="p")
    dom = FakeDomain("u-2", meta.xml(), state_fails=True)
    assert [v.machine.state for v in cache.views([dom])] == ["terminated"]
    assert [v.machine.state for v in cache.views([dom])] == ["running"]
    assert cache.stats().reads == 2

# -- many clients against a real server ----------------------------------------------------------------


GROUP = {"infrakit.group": "load"}


def _connect(path: str) -> UnixHTTPConnection:
    """A keep-alive connection to the JSON-RPC socket, opened before the load starts. A refused
    connect is retried: the server listens with socketserver's backlog of 5, and a connect beyond
    a full backlog fails at once with EAGAIN on a unix socket. Accepting connections is not what
    this test is about; every call after the connect counts."""
    deadline = time.monotonic() + DEADLINE
    while True:
        conn = UnixHTTPConnection(path)
        try:
            conn.connect()
            return conn
        except BlockingIOError:
            conn.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@dataclass
class Answer:
    began: float
    ids: list[str]
    gen: int  # the "gen" tag of the instance the writer relabels (-1: absent)


@needs_libvirt
def test_twenty_clients_on_both_transports_get_complete_fresh_answers(tmp_path):
    from mobykit.rpc.client import connect

    config = {"default_provider": "libvirt", "providers": {"libvirt": {"URI": URI, "Pool": "mobykit"}}}
    with serve_process(["--listen", f"unix:{tmp_path / 'grpc.sock'}"], config, expect=2) as sp:
        grpc_address = next(a for a in sp.addresses if a.startswith("unix:"))
        infrakit = next(a for a in sp.addresses if a.startswith("infrakit:")).removeprefix("infrakit:")
        props = {"Kernel": str(sp.workdir / "vmlinuz"), "Initrd": str(sp.workdir / "initrd")}
        with connect(grpc_address) as admin:
            ids = sorted(admin.instance.provision("libvirt", Spec(properties=props, tags=dict(GROUP)))
                         for _ in range(20))
            target = ids[0]
            admin.instance.label("libvirt", target, {"gen": "0"})
            labelled: list[tuple[float, int]] = []  # (when the Label returned, its gen)
            answers: list[Answer] = []
            failures: list[str] = []
            lock = threading.Lock()

            def record(began: float, descriptions: list[tuple[str, dict[str, str]]]) -> None:
                gen = next((int(t.get("gen", -1)) for i, t in descriptions if i == target), -1)
                with lock:
                    answers.append(Answer(began, sorted(i for i, _t in descriptions), gen))

            def grpc_client() -> None:
                with connect(grpc_address) as c:
                    for _ in range(20):
                        began = time.monotonic()
                        try:
                            listed = c.instance.describe_instances("libvirt", GROUP)
                            record(began, [(d.id, d.tags) for d in listed])
                        except Exception as e:  # noqa: BLE001 - counted
                            failures.append(f"gRPC: {e}")

            def jsonrpc_client(conn: UnixHTTPConnection) -> None:
                body = json.dumps({"jsonrpc": "2.0", "method": "Instance.DescribeInstances",
                                   "params": {"Type": "libvirt", "Tags": GROUP}, "id": 1}).encode()
                for _ in range(20):
                    began = time.monotonic()
                    try:
                        status, _, raw = post_raw(infrakit, body, conn)
                        result = json.loads(raw)["result"]["Descriptions"]
                        record(began, [(d["ID"], d["Tags"]) for d in result])
                    except Exception as e:  # noqa: BLE001 - counted
                        failures.append(f"JSON-RPC: {e}")
                conn.close()

            def writer(stop: threading.Event) -> None:
                gen = 0
                while not stop.is_set():
                    gen += 1
                    admin.instance.label("libvirt", target, {"gen": str(gen)})
                    with lock:
                        labelled.append((time.monotonic(), gen))

            stop = threading.Event()
            relabel = threading.Thread(target=writer, args=(stop,))
            clients = [threading.Thread(target=grpc_client) for _ in range(10)]
            opened = [_connect(infrakit) for _ in range(10)]
            clients += [threading.Thread(target=jsonrpc_client, args=(conn,)) for conn in opened]
            relabel.start()
            for t in clients:
                t.start()
            for t in clients:
                t.join(120)
            stop.set()
            relabel.join(30)
            assert not [t for t in clients if t.is_alive()]
    assert failures == []
    assert len(answers) == 400
    assert all(a.ids == ids for a in answers), "an answer missed instances or listed others"
    assert labelled, "the writer never labelled"
    stale = [(a.gen, max((g for done, g in labelled if done < a.began), default=0)) for a in answers]
    assert [s for s in stale if s[0] < s[1]] == [], "answers older than a Label completed before the call"
