"""Domain types shared by the SPIs, with Infrakit's field names in ``to_wire``/``from_wire``.

Properties stay opaque JSON values (dict/list/str/...), as Infrakit's ``*types.Any`` is: only the
plugin that owns them interprets them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Health(enum.IntEnum):
    """Flavor health, numbered as Infrakit's flavor.Health is on the wire."""

    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2


class DestroyReason(enum.StrEnum):
    """Why an instance is destroyed: Infrakit's instance.Context.Reason."""

    TERMINATE = "terminate"
    ROLLING_UPDATE = "rolling_update"


@dataclass
class Attachment:
    id: str
    type: str = ""


@dataclass
class Spec:
    """What to provision: Infrakit's instance.Spec."""

    properties: Any = None
    tags: dict[str, str] = field(default_factory=dict)
    init: str = ""
    logical_id: str | None = None
    attachments: list[Attachment] = field(default_factory=list)


@dataclass
class Description:
    """One instance as the provider sees it: Infrakit's instance.Description."""

    id: str
    tags: dict[str, str] = field(default_factory=dict)
    logical_id: str | None = None
    properties: Any = None


@dataclass
class Allocation:
    """Group size or its logical ids (quorum groups): Infrakit's group.AllocationMethod."""

    size: int = 0
    logical_ids: list[str] = field(default_factory=list)


@dataclass
class Index:
    """Which group and sequence a Prepare is for: Infrakit's group.Index."""

    group: str = ""
    sequence: int = 0
