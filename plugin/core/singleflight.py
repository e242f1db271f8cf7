"""Identical reads in flight at the same time share one call, without ever answering stale.

Why: a group's controller, Prometheus and the CLI all poll DescribeInstances, over both
transports; a hundred clients asking for the same listing at once should cost the provider one
listing, not a hundred.

Why not the usual single-flight (join whatever call is running): a call that began before a
caller did may have read the provider before that caller's last write (a Label, a Destroy, a
Provision) and would hand it a result without that write. So a caller only ever joins a call
that has *not started yet*:

- no call running for the key: the caller runs one now;
- a call running: the caller queues behind it; the first to queue becomes the leader of the next
  call, everyone queued after it joins that one, and the leader starts it when the running call
  ends.

Every result a caller gets therefore comes from a call that started after the caller arrived, so
it reflects every write that completed before the caller's request did. The provider sees at most
one call per key at a time, and a caller waits at most for the end of the running call plus one
call of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Call(Generic[V]):
    """One call of the function, shared by every caller that joined it before it started."""

    done: threading.Event = field(default_factory=threading.Event)
    value: V | None = None
    error: BaseException | None = None
    joined: int = 1  # callers sharing this call (for tests and statistics)

    def result(self) -> V:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


@dataclass
class _Slot(Generic[V]):
    """The calls of one key: the one running, and the one queued behind it (not started yet)."""

    running: _Call[V] | None = None
    queued: _Call[V] | None = None


@dataclass(frozen=True)
class FlightStats:
    """How many calls were made and how many callers they served, since the group was made."""

    calls: int
    callers: int


class SingleFlight(Generic[K, V]):
    """Share calls of ``fn`` per key between concurrent callers (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[K, _Slot[V]] = {}
        self._calls = 0
        self._callers = 0

    def do(self, key: K, fn: Callable[[], V]) -> V:
        """``fn()``'s result for this caller, from a call that started after this caller arrived.
        Callers that shared a call share its result object (treat it as read-only) or its
        exception (re-raised to each of them)."""
        with self._lock:
            self._callers += 1
            slot = self._slots.setdefault(key, _Slot())
            if slot.queued is not None:
                slot.queued.joined += 1
                joined = slot.queued
            else:
                joined = None
                call: _Call[V] = _Call()
                ahead = slot.running
                if ahead is None:
                    slot.running = call
                else:
                    slot.queued = call
        if joined is not None:
            return joined.result()
        if ahead is not None:
            ahead.done.wait()
            with self._lock:
                # The call ahead has ended and cleared ``running``; ours starts now, so nobody may join it.
                slot.queued = None
                slot.running = call
        return self._run(key, slot, call, fn)

    def _run(self, key: K, slot: _Slot[V], call: _Call[V], fn: Callable[[], V]) -> V:
        try:
            call.value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to every caller of this call, then re-raised
            call.error = e
        finally:
            with self._lock:
                self._calls += 1
                slot.running = None
                if slot.queued is None and self._slots.get(key) is slot:
                    del self._slots[key]
            call.done.set()
        return call.result()

    def stats(self) -> FlightStats:
        with self._lock:
            return FlightStats(calls=self._calls, callers=self._callers)
