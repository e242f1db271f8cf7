"""Infrakit's SPIs as Python interfaces: Instance/0.6.1, Flavor/0.1.1, Group/0.1.1.

One small file per SPI, as Infrakit's pkg/spi has. Transports (gRPC, JSON-RPC) in ``mobykit.rpc``
adapt these; implementations live in ``mobykit.core``, ``mobykit.flavor`` and ``mobykit.group``.
"""

from mobykit.spi.types import (  # noqa: F401
    Allocation,
    Attachment,
    Description,
    DestroyReason,
    Health,
    Index,
    Spec,
)
