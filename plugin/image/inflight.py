"""Builds in flight: one per spec, shared by every request for it, outliving callers that give up.

Why: Infrakit's client abandons a call after 15 s (``INFRAKIT_CLIENT_TIMEOUT``) and its group
controller retries Prepare on its next poll, but a cold build (a kernel and packages from Debian)
takes minutes, and a group of N instances asks for the same image N times at once. So:

- a build runs on a thread of its own, never on the caller's; ``Builds.get`` waits for it up to a
  budget and then raises ``BuildInProgress`` (Unavailable: gRPC UNAVAILABLE, JSON-RPC -32000), which
  says since when the build runs and which step it is at, so the caller's log shows why to retry;
- requests with the same key (the same spec documents) join the build that is running;
- a build that finishes while nobody waits keeps its result, or its error, for the next request of
  that key, which gets it at once: the error of a build whose callers all gave up still reaches a
  log, and a retry after a cold build costs nothing;
- a result that someone received is dropped, so the next request builds again. The image store makes
  that a no-op when the spec's inputs are unchanged, picks up a spec file edited since, and retries
  after a failure: failures are never cached beyond that one hand-over (a registry outage heals).
  An unclaimed result is dropped after ``keep`` seconds too, for the same reason.

At most ``workers`` builds run at once (each is CPU- and disk-heavy); the others queue and say so.
The threads are daemons: a stopping server does not wait minutes for a cold build (the build moves
its outputs into place by rename, so one cut short leaves only temporary directories behind).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

from mobykit.errors import InProgress, Unavailable
from mobykit.image.progress import Progress, Task

log = logging.getLogger("mobykit.image")

T = TypeVar("T")

DEFAULT_WORKERS = 2
DEFAULT_KEEP = 300.0


class BuildInProgress(InProgress):
    """The build a request needs is still running; the request should be made again. ``since`` is
    the wall-clock start (seconds since the epoch), ``elapsed`` seconds, ``step`` what it is doing."""

    def __init__(self, label: str, since: float, elapsed: float, step: str):
        self.label, self.since, self.elapsed, self.step = label, since, elapsed, step
        stamp = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        super().__init__(f"{label}: the image is still being built (since {stamp}, {elapsed:.0f}s): {step}; "
                         "the build goes on: retry to join it or to get its result")


class StepProgress(Progress):
    """A Progress that renders nothing and remembers the step a build is at, for BuildInProgress.

    Why a Progress: the build already reports its long steps through one (pulls, unpacks, the tar,
    each format), so the step is known without touching the build. Before the first step the build
    is loading the spec and resolving its images (including building ``@pkg:`` packages)."""

    STAGES = (("unpack ", "assembling"), ("write ", "writing the image"), ("format ", "writing formats"))

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self._current: tuple[str, Task] | None = None
        self._finished = False

    def task(self, description: str, total: int | None = None) -> Task:
        t = super().task(description, total)
        with self._lock:
            self._current, self._finished = (description, t), False
        return t

    def _done(self, task_id, task: Task) -> None:
        with self._lock:
            if self._current is not None and self._current[1] is task:
                self._finished = True

    def step(self) -> str:
        """``stage: current step (percent)``, e.g. ``pulling: docker.io/x/y layer 0123abcd4567 (35%)``."""
        with self._lock:
            current, finished = self._current, self._finished
        if current is None:
            return "resolving: loading the spec and resolving its images and packages"
        description, task = current
        stage = next((name for prefix, name in self.STAGES if description.startswith(prefix)), "pulling")
        if finished:
            return f"{stage}: {description} done"
        if task.total:
            return f"{stage}: {description} ({min(100, task.completed * 100 // task.total)}%)"
        return f"{stage}: {description}"


@dataclass(eq=False)
class _Job(Generic[T]):
    key: str
    label: str
    since: float  # wall clock, for people
    started: float  # the Builds clock, for the elapsed time
    progress: StepProgress = field(default_factory=StepProgress)
    done: threading.Event = field(default_factory=threading.Event)
    running: bool = False  # False while queued for a worker slot
    waiting: int = 0  # requests waiting for it now
    result: T | None = None
    error: BaseException | None = None
    finished: float | None = None  # the Builds clock, for dropping a result nobody collected


class Builds(Generic[T]):
    """The builds in flight, by key (see the module docstring). Thread-safe."""

    def __init__(self, workers: int = DEFAULT_WORKERS, *, keep: float = DEFAULT_KEEP,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.workers, self.keep, self.clock, self.wall = workers, keep, clock, wall
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job[T]] = {}
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def get(self, key: str, label: str, build: Callable[[Progress], T], wait: float) -> T:
        """The result of ``build`` for ``key``: the running build's (joined), a finished one nobody
        collected yet, or a new one's. Waits at most ``wait`` seconds, then raises BuildInProgress;
        the build's own error is raised to every caller that waited for it."""
        with self._lock:
            if self._closed:
                raise Unavailable(f"{label}: the server is stopping; no new builds are started")
            self._drop_expired()
            job = self._jobs.get(key)
            if job is None:
                job = _Job(key=key, label=label, since=self.wall(), started=self.clock())
                self._jobs[key] = job
                thread = threading.Thread(target=self._run, args=(job, build), name=f"build-{key[:12]}", daemon=True)
                self._threads.add(thread)
                thread.start()
            job.waiting += 1
        try:
            job.done.wait(wait)
        finally:
            with self._lock:
                job.waiting -= 1
                # Asked again under the lock rather than taken from wait()'s answer, so a build that
                # finishes as the wait runs out is either handed over here or kept for the next request.
                finished = job.done.is_set()
                if finished and self._jobs.get(key) is job:
                    del self._jobs[key]  # received: the next request builds again (see the module docstring)
        if not finished:
            raise self._in_progress(job)
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def status(self, key: str) -> BuildInProgress | None:
        """What a request for ``key`` would be told now, or None when no build of it is running."""
        with self._lock:
            job = self._jobs.get(key)
            return None if job is None or job.done.is_set() else self._in_progress(job)

    def waiting(self, key: str) -> int:
        """How many requests are waiting for the build of ``key`` now (the log says it; tests use it
        to know that concurrent requests have joined)."""
        with self._lock:
            job = self._jobs.get(key)
            return 0 if job is None else job.waiting

    def close(self, timeout: float = 0.0) -> None:
        """Start no more builds; wait up to ``timeout`` seconds for running ones (they are daemon
        threads, so a process that exits does not wait for them)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- internals ------------------------------------------------------------------------------

    def _in_progress(self, job: _Job[T]) -> BuildInProgress:
        if job.running:
            step = job.progress.step()
        else:
            step = f"queued: {self.workers} other build(s) are running"
        return BuildInProgress(job.label, job.since, self.clock() - job.started, step)

    def _drop_expired(self) -> None:
        now = self.clock()
        for key, job in list(self._jobs.items()):
            if job.finished is not None and now - job.finished > self.keep:
                del self._jobs[key]

    def _run(self, job: _Job[T], build: Callable[[Progress], T]) -> None:
        try:
            with self._slots:
                job.running = True
                log.info("build started: %s", job.label)
                try:
                    job.result = build(job.progress)
                except BaseException as e:  # handed to the callers, who report it
                    job.error = e
            elapsed, waiting = self.clock() - job.started, job.waiting
            if job.error is None:
                log.info("build finished: %s in %.1fs (%d request(s) waiting)", job.label, elapsed, waiting)
            else:
                log.warning("build failed: %s after %.1fs (%d request(s) waiting): %s", job.label, elapsed, waiting,
                            job.error)
        finally:
            job.finished = self.clock()
            job.done.set()
            with self._lock:
                self._threads.discard(threading.current_thread())
