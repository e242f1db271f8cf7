"""The Flavor SPI (Infrakit Flavor/0.1.1): what runs on an instance, and whether it is healthy."""

from __future__ import annotations

from typing import Any, Protocol

from mobykit.spi.types import Allocation, Description, Health, Index, Spec

INTERFACE = ("Flavor", "0.1.1")
# Infrakit v0.5 (2017-05) spoke Flavor/0.1.0: the same four methods; a field an older client does
# not send (Type, Index) takes its zero value, as Go's decoder would give it.
OLDER_INTERFACES: tuple[tuple[str, str], ...] = (("Flavor", "0.1.0"),)


class FlavorPlugin(Protocol):
    def validate(self, type: str, properties: Any, allocation: Allocation) -> None:
        """Raise InvalidArgument naming the bad key."""

    def prepare(self, type: str, properties: Any, spec: Spec, allocation: Allocation, index: Index) -> Spec:
        """Return ``spec`` with this flavor's init, tags and instance properties applied."""

    def healthy(self, type: str, properties: Any, instance: Description) -> Health:
        """UNKNOWN until the instance proves itself, HEALTHY after, UNHEALTHY past its deadline."""

    def drain(self, type: str, properties: Any, instance: Description) -> None:
        """Prepare the instance to be destroyed (e.g. run a drain command, wait a grace period)."""
