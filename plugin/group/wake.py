"""What wakes a group controller: coalesced reasons, counted, and the health events that cause them.

Why a module of its own: the controller used to learn health only by polling Flavor.Healthy every
PollInterval, so each wave of a rolling update waited for the next poll. Flavors that can tell
(``subscribe_health``, the moby flavor's console watch) now call back when an instance's health
changes, and the controller runs at once. Many such calls before the loop gets to run again are
one pass (100 instances turning healthy together cost one listing, not 100): ``Wake`` keeps only
the set of reasons, and the loop takes them all at once.

The counts (passes by reason) are what the tests and the bench assert on, rather than on time:
"the readiness event woke it and no poll did" is a count, not a stopwatch.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mobykit.group")

# Why a pass ran. POLL and TIMER are the controller's own clock; the others are events.
POLL = "poll"  # the poll interval ran out with nothing else happening
TIMER = "timer"  # a MinReadySeconds or a back-off it was waiting for ran out
HEALTH = "health"  # the flavor said an instance's health changed
DONE = "done"  # a provision or destroy it started returned
COMMIT = "commit"  # a commit, a size change, a DestroyInstances


class Wake:
    """A set of pending reasons with the waiting half of ``threading.Event`` (``set``/``wait``/
    ``clear``/``is_set``), so a burst of ``set`` calls is one wake-up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reasons: set[str] = set()
        self.signals: Counter[str] = Counter()  # every set(), for diagnostics: passes are counted elsewhere

    def set(self, reason: str = COMMIT) -> None:
        with self._cond:
            self.signals[reason] += 1
            self._reasons.add(reason)
            self._cond.notify_all()

    def is_set(self) -> bool:
        with self._cond:
            return bool(self._reasons)

    def wait(self, timeout: float | None = None) -> bool:
        """Until a reason is pending or ``timeout`` seconds pass; the reasons stay (``take`` them)."""
        with self._cond:
            if not self._reasons and (timeout is None or timeout > 0):
                self._cond.wait(timeout)
            return bool(self._reasons)

    def take(self) -> frozenset[str]:
        """The pending reasons, now cleared."""
        with self._cond:
            reasons, self._reasons = frozenset(self._reasons), set()
            return reasons

    def clear(self) -> None:
        self.take()


class HealthSubscription:
    """The controller's subscription to its flavor's health events, if the flavor offers them.

    ``wanted(instance id)`` says whether an id is one of the group's (the flavor's watch serves every
    group of the server); ``wake()`` is called for each event about one. ``follow(flavor)`` moves
    the subscription when a commit names another flavor. A flavor reached over the wire (Infrakit's
    JSON-RPC) has no ``subscribe_health``: then ``live`` is False and the controller keeps polling
    at its PollInterval."""

    def __init__(self, wanted: Callable[[str], bool], wake: Callable[[], None]):
        self._wanted, self._wake = wanted, wake
        self._flavor: Any = None
        self._cancel: Callable[[], None] | None = None
        self.events = 0  # events about the group's instances (each one a wake-up request)

    @property
    def live(self) -> bool:
        return self._cancel is not None

    def follow(self, flavor: Any) -> None:
        if flavor is self._flavor:
            return
        self.cancel()
        self._flavor = flavor
        subscribe = getattr(flavor, "subscribe_health", None)
        if callable(subscribe):
            try:
                self._cancel = subscribe(self._event)
            except Exception as e:  # noqa: BLE001 - events only save time; polling still works
                log.warning("no health events from the flavor (polling instead): %s", e)
                self._cancel = None

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()
        self._cancel, self._flavor = None, None

    def _event(self, instance_id: str) -> None:
        if self._wanted(instance_id):
            self.events += 1
            self._wake()


class Pacer:
    """When the controller's next pass runs: on a wake-up, when its poll is due, or when a timer it
    waits for (MinReadySeconds, a back-off) runs out, all by the controller's clock. Counts the
    passes by reason (``passes``, plus ``"total"``)."""

    def __init__(self) -> None:
        self.wake = Wake()
        self.last: float | None = None  # when the last pass began
        self.passes: Counter[str] = Counter()

    def take(self, now: float, poll: float, timer: float | None) -> frozenset[str] | None:
        """The reasons for a pass now (cleared, counted), None when nothing calls for one."""
        reasons = set(self.wake.take())
        if timer is not None and now >= timer:
            reasons.add(TIMER)
        if self.last is None:
            reasons.add(COMMIT)
        elif now >= self.last + poll:
            reasons.add(POLL)
        if not reasons:
            return None
        self.last = now
        self.passes.update(reasons)
        self.passes["total"] += 1
        return frozenset(reasons)

    def due(self, now: float, poll: float, timer: float | None) -> float:
        """When the next pass is due without an event."""
        due = (self.last if self.last is not None else now) + poll
        return due if timer is None else min(due, timer)
