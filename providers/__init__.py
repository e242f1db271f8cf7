"""Where machines run. Each cloud is one module behind ``providers.base.Provider``; SDKs are
imported only when their provider is used, so the CLI and other providers stay fast."""

from __future__ import annotations

import importlib
from typing import Any

from mobykit.errors import InvalidArgument

_REGISTRY = {
    "libvirt": "mobykit.providers.libvirt:LibvirtProvider",
    "aws": "mobykit.providers.aws:AWSProvider",
    "gcp": "mobykit.providers.gcp:GCPProvider",
    "memory": "mobykit.providers.memory:MemoryProvider",
}

NAMES = tuple(_REGISTRY)


def load(name: str, config: dict[str, Any] | None = None):
    """Instantiate the provider called ``name`` with its settings section from the config file."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(f"unknown provider {name!r} (known: {', '.join(NAMES)})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(config or {})
