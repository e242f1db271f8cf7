"""The Group SPI (Infrakit Group/0.1.1): keep a set of instances at a spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from mobykit.spi.types import Description

INTERFACE = ("Group", "0.1.1")
# Infrakit v0.5 (2017-05) spoke Group/0.1.0: CommitGroup {Spec, Pretend}, FreeGroup, DescribeGroup and
# DestroyGroup {ID}, InspectGroups {}. Request fields added later (a plugin Name, InspectGroups' ID)
# are optional here, and the fields our replies carry beyond 0.1.0's (ID) are ignored by its decoder.
OLDER_INTERFACES: tuple[tuple[str, str], ...] = (("Group", "0.1.0"),)


@dataclass
class GroupSpec:
    """Infrakit's group.Spec: an ID and the group plugin's opaque properties
    (``{Allocation, Instance: {Plugin, Properties}, Flavor: {Plugin, Properties}, Updating}``)."""

    id: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupDescription:
    instances: list[Description] = field(default_factory=list)
    converged: bool = False


class GroupPlugin(Protocol):
    def commit_group(self, spec: GroupSpec, pretend: bool) -> str:
        """Adopt ``spec`` (or only explain what would happen); returns a human plan."""

    def free_group(self, id: str) -> None:
        """Stop managing the group; its instances keep running."""

    def describe_group(self, id: str) -> GroupDescription: ...

    def destroy_group(self, id: str) -> None:
        """Stop managing the group and destroy its instances."""

    def inspect_groups(self) -> list[GroupSpec]: ...

    def destroy_instances(self, id: str, instances: list[str]) -> None:
        """Destroy these members and shrink the target size by as many."""

    def size(self, id: str) -> int: ...

    def set_size(self, id: str, size: int) -> None: ...
