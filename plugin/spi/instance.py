"""The Instance SPI (Infrakit Instance/0.6.1): make, find, tag and remove machines."""

from __future__ import annotations

from typing import Any, Protocol

from mobykit.spi.types import Description, DestroyReason, Spec

INTERFACE = ("Instance", "0.6.1")
# Older versions whose clients this SPI still serves, advertised by the older handshakes only.
# Instance/0.5.0 is Infrakit v0.5 (2017-05): the same methods and fields except that Destroy has no
# Context (it means terminate), so its requests are a subset of 0.6.1's.
OLDER_INTERFACES: tuple[tuple[str, str], ...] = (("Instance", "0.5.0"),)


class InstancePlugin(Protocol):
    """Every call takes the Infrakit ``type`` (the part after ``/`` in ``mobykit/libvirt``; may be "")."""

    def validate(self, type: str, properties: Any) -> None:
        """Raise InvalidArgument naming the bad key; return None when the properties are usable."""

    def provision(self, type: str, spec: Spec) -> str:
        """Create one instance and return its ID. The instance is visible to describe_instances,
        with its tags, before this returns, so a polling controller never over-provisions."""

    def label(self, type: str, instance: str, labels: dict[str, str]) -> None:
        """Merge ``labels`` into the instance's tags (never replace). NotFound if it is gone."""

    def destroy(self, type: str, instance: str, reason: DestroyReason) -> None:
        """Remove the instance and everything made for it. An unknown or gone ID succeeds."""

    def describe_instances(self, type: str, tags: dict[str, str], properties: bool) -> list[Description]:
        """Instances (pending ones too) whose tags include every given tag, sorted by ID."""
