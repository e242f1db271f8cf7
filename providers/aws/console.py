"""Console reads for health checks: GetConsoleOutput, fetched in parallel right after a listing.

Why: a health pass lists the group (one DescribeInstances) and then asks for each instance's
console, one after another. GetConsoleOutput takes one instance per call, so at 200 ms a call
a group of 20 spends 4 s per pass reading consoles serially. A tag-filtered listing therefore
starts the console reads of the instances it returned, in parallel; a ``console_output`` that
follows within ``max_age`` seconds takes that read (waiting for it if it is still running),
anything later reads afresh. A read is never older than ``max_age`` when it is handed out, and
only a group's listing (by ``infrakit.group``, not the core's namespace-wide lookups for Label and
Destroy) that found at most ``limit`` instances starts reads.
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
    clock: Callable[[], float] = time.monotonic
    _reads: dict[str, _Read] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None

    def prefetch(self, ids: list[str]) -> None:
        """Start reading these consoles now (a listing just returned them)."""
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
                if current is not None and not current.future.done():
                    continue  # one read in flight per instance is enough
                self._reads[iid] = _Read(now, self._pool.submit(self.read, iid))

    def get(self, instance_id: str) -> str:
        """The console: a prefetched read younger than ``max_age``, else a read made now."""
        with self._lock:
            r = self._reads.pop(instance_id, None)
        if r is not None and self.clock() - r.started <= self.max_age:
            return r.future.result()  # NotFound and other errors are raised as the direct read raises them
        return self.read(instance_id)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._reads.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
