"""Rolling update arithmetic: how many may be added or taken away right now.

The bounds are those of a GCE managed instance group (and Kubernetes deployments): at any instant
at most ``size + MaxSurge`` instances exist (those being provisioned or destroyed count), and at
least ``size - MaxUnavailable`` are available. Infrakit only knew "one at a time, destroy first",
which is MaxSurge 0, MaxUnavailable 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from mobykit.group.model import Member
from mobykit.spi.types import Health


@dataclass(frozen=True)
class Budget:
    can_create: int  # new instances that may be started now
    can_take: int  # available instances that may be taken away now


def budget(members: list[Member], target: int, surge: int, unavailable: int, new_count: int) -> Budget:
    total = len(members)  # leaving and provisional ones exist too, for the surge bound
    available = sum(1 for m in members if m.ready and not m.leaving)
    create = max(0, min(target + surge - total, target - new_count))
    take = max(0, available - max(0, target - unavailable))
    return Budget(create, take)


def failed_new(members: list[Member], current_hash: str) -> Member | None:
    """A new-config instance the flavor gave up on: the update must halt (or roll back)."""
    for m in members:
        if m.hash == current_hash and m.health == Health.UNHEALTHY and not m.leaving:
            return m
    return None
