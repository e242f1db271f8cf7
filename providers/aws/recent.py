"""Instances this provider launched that EC2's listings may not show yet (read-your-writes).

Why: DescribeInstances is eventually consistent; an instance RunInstances just returned can be
missing from a listing made right after (AWS documents this for the EC2 API). The Provider
interface promises that a created machine is listed once ``create`` returns, and the group
controller relies on it: it stops counting a returned Provision as a member once a listing that
began after it returned comes back, so a listing missing the new instance would make it launch a
second one. So ``list`` adds the instances launched here that EC2 has not shown yet, with their
RunInstances view (state pending), for at most ``trust`` seconds: once a listing has shown one,
EC2 has caught up and is the only truth from then on (stopped or terminated ones drop out as
EC2 says), and one that no listing shows within ``trust`` seconds is taken to be gone.

It also makes a group's listing show the whole wave of launches that returned while it ran, so
the controller's pass after a wave does not need another one for the stragglers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mobykit.providers.base import Machine

TRUST = 10.0  # seconds a launch is listed without EC2 showing it (its consistency lag is ~1 s)


@dataclass
class Recent:
    """Launches not yet seen in a listing, by instance id."""

    trust: float = TRUST
    clock: Callable[[], float] = time.monotonic
    _launched: dict[str, tuple[Machine, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def launched(self, machine: Machine) -> None:
        with self._lock:
            self._launched[machine.id] = (machine, self.clock())

    def retagged(self, instance_id: str, tags: dict[str, str]) -> None:
        """Its tags were replaced (Label) before any listing showed it."""
        with self._lock:
            found = self._launched.get(instance_id)
            if found is not None:
                m, at = found
                self._launched[instance_id] = (replace(m, tags=dict(tags)), at)

    def get(self, instance_id: str) -> Machine | None:
        """A launch EC2 may not show yet, while it is trusted (Destroy of a just-launched instance)."""
        with self._lock:
            found = self._launched.get(instance_id)
            return found[0] if found is not None and self.clock() - found[1] <= self.trust else None

    def gone(self, instance_id: str) -> None:
        with self._lock:
            self._launched.pop(instance_id, None)

    def merge(self, listed: list[Machine], tags: dict[str, str]) -> list[Machine]:
        """``listed`` (EC2's answer for ``tags``) plus the launches it does not show yet that have
        every one of ``tags``. Launches it shows are forgotten: EC2 has caught up with them."""
        now = self.clock()
        shown = {m.id for m in listed}
        extra = []
        with self._lock:
            for iid, (m, at) in list(self._launched.items()):
                if iid in shown or now - at > self.trust:
                    del self._launched[iid]
                elif tags.items() <= m.tags.items():
                    extra.append(m)
        return sorted([*listed, *extra], key=lambda m: m.id)
