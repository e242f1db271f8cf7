"""A controller's memory to a record and back.

Kept here rather than in ``controller.py`` (which stays about reconciling): these two functions
are the only code that knows which of the controller's fields must outlive a restart. First-healthy
times are kept in wall-clock seconds in the store (a monotonic clock means nothing to another
process) and converted back on restore, so MinReadySeconds already served is not served again.
"""

from __future__ import annotations

import time
from typing import Any

from mobykit.group.controller import GroupController
from mobykit.group.spec import GroupConfig, parse
from mobykit.group.store.base import GroupRecord
from mobykit.spi.group import GroupSpec


def spec_dict(spec: GroupSpec) -> dict[str, Any]:
    return {"ID": spec.id, "Properties": spec.properties}


def group_spec(doc: dict[str, Any]) -> GroupSpec:
    return GroupSpec(id=doc["ID"], properties=doc.get("Properties"))


def config_of(doc: dict[str, Any]) -> GroupConfig:
    return parse(group_spec(doc))


class WallClock:
    """Monotonic <-> wall-clock seconds for one controller, each instance converted once (so an
    unchanged controller always gives an identical snapshot and nothing is rewritten)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.walls: dict[str, float] = {}

    def to_wall(self, healthy_since: dict[str, float]) -> dict[str, float]:
        offset = time.time() - self.clock()
        self.walls = {i: self.walls.get(i, round(s + offset, 3)) for i, s in healthy_since.items()}
        return dict(self.walls)

    def to_mono(self, walls: dict[str, float]) -> dict[str, float]:
        offset = time.time() - self.clock()
        self.walls = dict(walls)
        return {i: w - offset for i, w in walls.items()}


def snapshot(ctl: GroupController, wall: WallClock) -> dict[str, Any]:
    """The fields of a record this controller decides (everything but ``commit``)."""
    with ctl._lock:
        return {
            "spec": spec_dict(ctl._config.spec()),
            "previous": spec_dict(ctl._previous.spec()) if ctl._previous is not None else None,
            "halted": ctl._halted,
            "gave_up": ctl._gave_up,
            "rolled_back_from": ctl._rolled_back_from,
            "healthy_since": wall.to_wall(dict(ctl._healthy_since)),
        }


def restore(ctl: GroupController, rec: GroupRecord, wall: WallClock) -> None:
    """Give a new controller what its predecessor knew (before it starts)."""
    with ctl._lock:
        ctl._previous = config_of(rec.previous) if rec.previous else None
        ctl._halted = rec.halted
        ctl._gave_up = rec.gave_up
        ctl._rolled_back_from = rec.rolled_back_from
        ctl._healthy_since = wall.to_mono(rec.healthy_since)
        ctl._status.halted, ctl._status.gave_up = rec.halted, rec.gave_up


def apply_snapshot(rec: GroupRecord, snap: dict[str, Any]) -> GroupRecord:
    out = rec.copy()
    for k, v in snap.items():
        setattr(out, k, v)
    return out
