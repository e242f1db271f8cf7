"""The libvirt-python module, imported on first use.

Why lazily: libvirt-python is an optional extra (``mobykit[libvirt]``), and the CLI, the other
providers and ``mobykit.providers.libvirt``'s pure helpers (``created_ns`` for the moby flavor,
``parse_publish``) must import without it.
"""

from __future__ import annotations

from typing import Any

from mobykit.errors import Unavailable


def libvirt() -> Any:
    """The ``libvirt`` module, with its default error printer silenced (errors reach us as
    exceptions; libvirt would also print each one on stderr)."""
    try:
        import libvirt as module
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise Unavailable(f"the libvirt provider needs libvirt-python: {e}") from None
    module.registerErrorHandler(lambda _ctx, _err: None, None)
    return module


def is_test(conn: Any) -> bool:
    """True for libvirt's mock driver (``test:///default``, or a daemon's ``test+unix://``), which
    has no volume upload or download and runs no qemu."""
    return conn.getType().upper() == "TEST"
