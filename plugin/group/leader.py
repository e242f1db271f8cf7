"""Who runs the group controllers: one leader among the replicas sharing a store.

With a ``file:`` store there is one server and it is always the leader (``SoleLeader``). With
etcd, ``EtcdElection`` campaigns for the key ``/mobykit/leader`` with a lease: the replica whose
txn creates the key leads, and the key's create_revision is its **term** (strictly increasing, so
terms order leaders). It keeps the lease alive every TTL/3. Why a deposed leader cannot act
after its successor starts: etcd expires a lease no earlier than TTL after the last keep-alive
it answered, and we count our own validity from before we *sent* that keep-alive, minus a margin
(``check()``, called before every provision and destroy); a successor can only create the key
after the expiry. Writes to the store also compare the key's create_revision with our term, so
even a write delayed past the lease fails instead of landing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mobykit.errors import Unavailable
from mobykit.group.store.base import NotLeader

log = logging.getLogger("mobykit.leader")

DEFAULT_TTL = 10.0


@dataclass(frozen=True)
class Role:
    """What ``describe``, health and /metrics say about this server."""

    role: str  # "leader" | "follower" | "candidate" (no etcd reachable)
    term: int
    lease: str  # hex lease id, "" when none
    leader: str  # the leader's name as it wrote it in the key, "" when unknown
    ttl: float
    name: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SoleLeader:
    """A single server on a ``file:`` store: its flock is its lease, for as long as it runs."""

    def __init__(self, name: str | None = None):
        self.name = name or default_name()
        self.term = 1

    def start(self, on_change: Callable[[], None]) -> None:
        on_change()

    @property
    def is_leader(self) -> bool:
        return True

    def check(self) -> None:
        """Always allowed: nobody else can hold the store."""

    def guard(self) -> None:
        return None

    def role(self) -> Role:
        return Role("leader", self.term, "", self.name, 0.0, self.name)

    def stop(self) -> None:
        pass


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _TermGuard:
    """A store write's condition: the leader key is still the one we created (our term)."""

    def __init__(self, term: int):
        self.term = term

    def condition(self) -> list[dict[str, Any]]:
        from mobykit.group.store.etcd import LEADER_KEY, b64

        return [{"key": b64(LEADER_KEY), "target": "CREATE", "create_revision": str(self.term)}]


class EtcdElection:
    def __init__(self, client, ttl: float = DEFAULT_TTL, name: str | None = None):
        self.client = client
        self.ttl = max(1, int(round(ttl)))
        self.name = name or default_name()
        self.margin = min(1.0, self.ttl * 0.25)  # clock-rate slack and the check-to-act gap
        self._lock = threading.Lock()
        self._role = "candidate"
        self._term = 0
        self._lease = 0
        self._leader = ""
        self._valid_until = 0.0
        self._stop = threading.Event()
        self._leader_gone = threading.Event()
        self._on_change: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None

    # -- what the controllers and the plugin ask ----------------------------------------------------

    @property
    def is_leader(self) -> bool:
        with self._lock:
            return self._role == "leader" and time.monotonic() < self._valid_until

    @property
    def term(self) -> int:
        """Our term while our lease is surely alive, else 0."""
        with self._lock:
            return self._term if self._role == "leader" and time.monotonic() < self._valid_until else 0

    def check(self) -> None:
        """Raise NotLeader unless our lease is surely still alive at etcd: before every action."""
        with self._lock:
            if self._role != "leader":
                raise NotLeader(f"{self.name} is not the leader (leader: {self._leader or 'unknown'})")
            if time.monotonic() >= self._valid_until:
                raise NotLeader(f"{self.name}: leader lease {self._lease:x} not renewed in time; not acting")

    def guard(self) -> _TermGuard | None:
        with self._lock:
            return _TermGuard(self._term) if self._role == "leader" else None

    def role(self) -> Role:
        with self._lock:
            role = self._role if (self._role != "leader" or time.monotonic() < self._valid_until) else "candidate"
            return Role(role, self._term, f"{self._lease:x}" if self._lease else "", self._leader, float(self.ttl),
                        self.name)

    # -- the campaign --------------------------------------------------------------------------------

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Step down: stop renewing and revoke the lease, so a successor need not wait for the TTL."""
        self._stop.set()
        self._leader_gone.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl + 5)
        self._set("candidate", 0, self._lease, "")
        if self._lease:
            try:
                self.client.revoke(self._lease)
            except Exception:  # etcd gone: the lease expires by itself
                pass

    def _set(self, role: str, term: int, lease: int, leader: str, valid_until: float | None = None) -> None:
        with self._lock:
            changed = (role, term) != (self._role, self._term)
            self._role, self._term, self._lease, self._leader = role, term, lease, leader
            if valid_until is not None:
                self._valid_until = valid_until
        if changed:
            log.info("role=%s term=%d lease=%x leader=%s", role, term, lease, leader)
            self._on_change()

    def _run(self) -> None:
        from mobykit.group.store.etcd import LEADER_KEY, b64, unb64, watch_stream

        watcher_stop = threading.Event()
        watcher: threading.Thread | None = None

        def on_events(events: list[dict], _rev: int) -> None:
            if any(e.get("type") == "DELETE" for e in events):
                self._leader_gone.set()

        try:
            while not self._stop.is_set():
                self._leader_gone.clear()  # before looking: a deletion from now on wakes the wait below
                try:
                    held = self.client.range(LEADER_KEY)
                    kvs = held.get("kvs") or []
                    if not kvs:  # nobody leads: campaign
                        t0 = time.monotonic()
                        lease, granted = self.client.grant(self.ttl)
                        r = self.client.txn(
                            [{"key": b64(LEADER_KEY), "target": "CREATE", "create_revision": "0"}],
                            [{"request_put": {"key": b64(LEADER_KEY), "value": b64(self.name), "lease": str(lease)}}],
                            [{"request_range": {"key": b64(LEADER_KEY)}}])
                        if r.get("succeeded"):
                            term = int(r["header"]["revision"])  # the revision that created the key
                            self._set("leader", term, lease, self.name, valid_until=t0 + granted - self.margin)
                            self._lead(lease, granted)
                            continue
                        self.client.revoke(lease)  # someone else won meanwhile
                        kvs = (r.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
                        held = r
                        if not kvs:
                            continue
                except Unavailable as e:
                    self._set("candidate", 0, 0, "")
                    log.warning("cannot campaign: %s", e)
                    self._stop.wait(min(1.0, self.ttl / 4))
                    continue
                # A follower reports the leader's term and lease (the key's create revision and lease)
                # so `describe` on any replica says which term acts; it never guards with them.
                self._set("follower", int(kvs[0].get("create_revision") or 0), int(kvs[0].get("lease") or 0),
                          unb64(kvs[0].get("value", "")).decode(errors="replace"))
                if watcher is None or not watcher.is_alive():
                    # One watch for the server's life: it resumes after the last revision it saw.
                    rev = int(held["header"]["revision"])
                    watcher = threading.Thread(target=watch_stream, daemon=True, name="leader-watch",
                                               args=(self.client, LEADER_KEY, None, rev + 1, on_events, watcher_stop))
                    watcher.start()
                # The key's deletion (the lease expired or was revoked) wakes us at once; the timeout
                # only covers a watch that broke without telling.
                self._leader_gone.wait(self.ttl / 2)
        finally:
            watcher_stop.set()

    def _lead(self, lease: int, granted: int) -> None:
        """Keep the lease alive until it cannot be, or until stop(); then step down."""
        interval = max(0.2, granted / 3)
        while not self._stop.wait(interval):
            t0 = time.monotonic()
            try:
                ttl = self.client.keepalive(lease)
            except Unavailable as e:
                with self._lock:
                    left = self._valid_until - time.monotonic()
                log.warning("lease keep-alive failed (%.1fs left): %s", left, e)
                if left <= 0:
                    break
                interval = 0.2  # retry soon, on the next member
                continue
            if ttl <= 0:
                log.warning("lease %x expired at etcd", lease)
                break
            with self._lock:
                self._valid_until = t0 + ttl - self.margin
            interval = max(0.2, granted / 3)
        if not self._stop.is_set():
            self._set("candidate", 0, 0, "")
            try:
                self.client.revoke(lease)
            except Unavailable:
                pass


def election_for(store, ttl: float = DEFAULT_TTL, name: str | None = None):
    """The leadership that fits ``store``: an etcd election, or the sole server of a file store."""
    client = getattr(store, "client", None)
    if client is not None and hasattr(client, "grant"):
        return EtcdElection(client, ttl=ttl, name=name)
    return SoleLeader(name)


class RoleCollector:
    """/metrics: ``mobykit_server_role{role,name,leader}`` (1 for the current role),
    ``mobykit_leader_term`` and ``mobykit_leader_lease_ttl_seconds``; read at scrape time."""

    def __init__(self, role: Callable[[], Role]):
        self._role = role

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        r = self._role()
        g = GaugeMetricFamily("mobykit_server_role", "This server's role among the replicas of its store (1 = current)",
                              labels=["role", "name", "leader", "lease"])
        for role in ("leader", "follower", "candidate"):
            g.add_metric([role, r.name, r.leader, r.lease], 1.0 if r.role == role else 0.0)
        yield g
        yield GaugeMetricFamily("mobykit_leader_term", "The leader term this server runs controllers for (0 = none)",
                                value=float(r.term if r.role == "leader" else 0))
        yield GaugeMetricFamily("mobykit_leader_lease_ttl_seconds", "The leader lease TTL", value=r.ttl)
