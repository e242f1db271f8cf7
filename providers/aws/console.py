"""Console reads for health checks: GetConsoleOutput, fetched in parallel with a group's listing.

Why: a health pass lists the group (one DescribeInstances) and then asks for each instance's
console, one after another. GetConsoleOutput takes one instance per call, so at 200 ms a call
a group of 20 spends 4 s per pass reading consoles serially. A group's listing therefore starts
the console reads of its instances in parallel; a ``console_output`` that follows within
``max_age`` seconds takes that read (waiting for it if it is still running), anything later reads
afresh. A read is never older than ``max_age`` when it is handed out (and serves every pass in
that time: a controller woken by each returning provision lists again at once, and a console
read half a second ago says what a new one would), and only a group's listing
(by ``infrakit.group``, not the core's namespace-wide lookups for Label and Destroy) that found at
most ``limit`` instances starts reads.

The reads do not even wait for the listing: the instances a group's listing will show are, but
for changes, the ones its previous listing showed plus the ones this provider launched with its
tags since (``Expected``), so their reads start when the listing starts and a health pass costs
one round trip, not two (a listing, then the consoles). An instance launched with a group's tags
while that group's listing runs is one the listing will show (``recent.py`` adds it), so its read
starts when its RunInstances returns: the controller lists as soon as the first launch of a wave
returns, and the rest of the wave comes back during that listing. Instances the listing shows that
were not expected are read when it returns; reads of expected ones it does not show are never
handed out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

MAX_AGE = 2.0  # seconds a prefetched console may be handed out after its read started
LIMIT = 100  # instances a listing may hold for its consoles to be prefetched
PARALLEL = 32  # a group of 20 reads every console in one wave


Key = tuple[tuple[str, str], ...]


@dataclass
class Expected:
    """By a group listing's tags: the instance ids its next listing is expected to show."""

    _ids: dict[Key, set[str]] = field(default_factory=dict)
    _listing: dict[Key, int] = field(default_factory=dict)  # listings by these tags running now
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def key(tags: dict[str, str]) -> Key:
        return tuple(sorted(tags.items()))

    def before(self, tags: dict[str, str]) -> frozenset[str]:
        """A listing by ``tags`` starts: what it should show (and from now on, launches are kept)."""
        key = self.key(tags)
        with self._lock:
            self._listing[key] = self._listing.get(key, 0) + 1
            return frozenset(self._ids.setdefault(key, set()))

    def after(self, tags: dict[str, str], before: frozenset[str], listed: list[str] | None) -> None:
        """The listing returned ``listed``: that, plus what was launched while it ran, is expected
        next. ``listed`` None: it failed (what is expected stays as it was)."""
        key = self.key(tags)
        with self._lock:
            running = self._listing.get(key, 0) - 1
            if running > 0:
                self._listing[key] = running
            else:
                self._listing.pop(key, None)
            if listed is None:
                return
            current = self._ids.setdefault(key, set())
            launched_meanwhile = current - before
            self._ids[key] = set(listed) | launched_meanwhile

    def launched(self, instance_id: str, tags: dict[str, str]) -> bool:
        """An instance was launched with ``tags``: the next listing of every group whose tags it has
        is expected to show it. True when such a listing is running now (it will show it)."""
        listing = False
        with self._lock:
            for key, ids in self._ids.items():
                if all(tags.get(k) == v for k, v in key):
                    ids.add(instance_id)
                    listing = listing or self._listing.get(key, 0) > 0
        return listing

    def gone(self, instance_id: str) -> None:
        with self._lock:
            for ids in self._ids.values():
                ids.discard(instance_id)


@dataclass
class _Read:
    started: float
    future: Future


@dataclass
class ConsoleReads:
    """Prefetched console reads by instance id (``read`` is the plain GetConsoleOutput)."""

    read: Callable[[str], str]
    max_age: float = MAX_AGE
    limit: int = LIMIT
    share: bool = True  # a read serves every caller while young (False: one caller; bench comparisons)
    clock: Callable[[], float] = time.monotonic
    _reads: dict[str, _Read] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None

    def prefetch(self, ids: list[str]) -> None:
        """Start reading these consoles now (a group's listing is about to show, or just showed,
        them), except where a read is in flight or started less than ``max_age / 2`` ago: the next
        pass (a provision returning wakes the controller again at once) uses that one."""
        if not ids or len(ids) > self.limit or self.max_age <= 0:
            return
        now = self.clock()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="aws-console")
            for stale in [i for i, r in self._reads.items() if now - r.started > self.max_age]:
                del self._reads[stale]
            for iid in ids:
                current = self._reads.get(iid)
                if current is not None and (not current.future.done()
                                            or self.share and now - current.started < self.max_age / 2):
                    continue
                self._reads[iid] = _Read(now, self._pool.submit(self.read, iid))

    def get(self, instance_id: str) -> str:
        """The console: a prefetched read younger than ``max_age`` (any number of callers may be
        given one), else a read made now. A prefetched read that failed is raised once, as the
        direct read would raise it (NotFound for a gone instance), and then forgotten."""
        with self._lock:
            r = self._reads.get(instance_id) if self.share else self._reads.pop(instance_id, None)
        if r is not None and self.clock() - r.started <= self.max_age:
            try:
                return r.future.result()
            except BaseException:
                with self._lock:
                    if self._reads.get(instance_id) is r:
                        del self._reads[instance_id]
                raise
        return self.read(instance_id)

    def forget(self, instance_id: str) -> None:
        with self._lock:
            self._reads.pop(instance_id, None)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._reads.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
