"""What the planners see and say: members of a group as observed, and the plan for one pass.

Kept apart from the controller so that planning is a pure function of an observation: the same
listing always gives the same plan, which is what makes the controller restartable (the tags on
the instances are the only state) and its tests deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mobykit.spi.types import Description, DestroyReason, Health

GROUP_TAG = "infrakit.group"
HASH_TAG = "infrakit.config.hash"
OLD_HASH_TAG = "infrakit.config_sha"  # what Infrakit wrote before it was renamed
LOGICAL_ID_TAG = "infrakit.logical_id"
BOOTSTRAP = "bootstrap"  # a hash of "bootstrap" means: adopt me, I am already right


@dataclass
class Member:
    """One instance of the group as one pass sees it."""

    id: str
    hash: str | None
    logical_id: str | None = None
    health: Health = Health.UNKNOWN
    ready: bool = False  # HEALTHY, and for the current config healthy for MinReadySeconds
    description: Description | None = None
    provisional: bool = False  # a Provision returned (or is running) but no listing shows it yet
    leaving: bool = False  # a Drain/Destroy of it is in flight

    @staticmethod
    def from_description(d: Description) -> Member:
        tags = d.tags or {}
        return Member(
            id=d.id,
            hash=tags.get(HASH_TAG) or tags.get(OLD_HASH_TAG),
            logical_id=d.logical_id or tags.get(LOGICAL_ID_TAG),
            description=d,
        )


@dataclass
class Removal:
    member: Member
    reason: DestroyReason


@dataclass
class Plan:
    """What one pass decided. ``create`` holds one entry per instance to make (its logical id or None)."""

    create: list[str | None] = field(default_factory=list)
    remove: list[Removal] = field(default_factory=list)
    halt: str | None = None  # why a rolling update must stop (a new instance is UNHEALTHY)
    step: str = ""  # what is happening, for people
    converged: bool = False
    updating: bool = False  # some instance still has another config


def scale_down_order(members: list[Member], current_hash: str) -> list[Member]:
    """Who goes first when there are too many: other configs, then unhealthy (UNHEALTHY before
    UNKNOWN), then the oldest (lowest ID: every provider's IDs sort by creation, and Infrakit
    itself removes the lowest IDs)."""
    rank = {Health.UNHEALTHY: 0, Health.UNKNOWN: 1, Health.HEALTHY: 2}
    return sorted(members, key=lambda m: (m.hash == current_hash, rank[m.health], m.ready, m.id))
