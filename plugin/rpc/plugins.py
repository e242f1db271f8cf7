"""What a server serves, shared by the gRPC and JSON-RPC transports (no grpc import here, so the
JSON-RPC side and the in-process benchmark stay light)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobykit.errors import InvalidArgument, MobykitError

# Where ``mobykit serve`` listens when not told, and so where clients look when not told.
DEFAULT_ADDRESS = "unix:" + str(Path("~/.mobykit/mobykit.sock").expanduser())


class Unimplemented(MobykitError):
    """A service whose plugin is not present on this server (gRPC UNIMPLEMENTED)."""


@dataclass
class Plugins:
    """The SPI objects behind the transports. ``flavors`` maps Infrakit type ("moby", "vanilla")
    to a FlavorPlugin; ``instance_types`` are the Infrakit types advertised for the instance
    plugin (each selects the provider of that name); ``config`` is the loaded config file."""

    instance: Any = None
    flavors: dict[str, Any] = field(default_factory=dict)
    group: Any = None
    instance_types: tuple[str, ...] = ("libvirt", "aws", "gcp")
    config: dict[str, Any] = field(default_factory=dict)

    def flavor(self, type: str):
        if not self.flavors:
            raise Unimplemented("no flavor plugin is configured on this server")
        if not type:
            type = next(iter(self.flavors))
        try:
            return self.flavors[type]
        except KeyError:
            raise InvalidArgument(f"Type: unknown flavor {type!r} (known: {', '.join(self.flavors)})") from None
