"""Machines as libvirt domains: qemu direct kernel boot (or the image's disk), user-mode networking,
serial console to a file.

Why the design is what it is:
- The domain is the only state. Tags, logical id, image id, creation time and the volumes made for
  the instance live in the domain's ``<metadata>`` under our XML namespace (``metadata.py``), so
  ``list`` is one ``listAllDomains`` call and a restarted plugin loses nothing.
- Listings are cheap: what a listing derives from a domain is cached by domain UUID and dropped on
  libvirt's lifecycle and metadata-change events and on our own writes (``cache.py``,
  ``events.py``); without events every listing re-reads every domain, as before.
- Everything the guest needs (kernel, initrd, cidata ISO, the console log) is a volume in a ``dir``
  storage pool (``storage.py``), uploaded and downloaded through libvirt's stream API.
- ``Boot: disk`` boots the image's ``qcow2-bios`` disk instead: one base volume per image id and
  a qcow2 overlay per instance backed by it (``diskboot.py``); destroy removes the overlay only.
- Published ports (``Publish``, loopback only) are qemu ``hostfwd`` arguments (``domain.py``);
  ``"0:80"`` asks for any free host port, read back from qemu after the start (``ports.py``).
  Every published port is kept in the domain metadata and reported as Description property
  ``Ports`` (``{"80": 34567, "53/udp": 40001}``), so a user reaches each VM without asking qemu.
- ``list`` shows a domain only once ``create`` has finished with it (the metadata carries a
  ``creating`` mark until then). A group controller counts a Provision in flight as a member until
  it returns; were the half-made domain listed too, it would count it twice and scale down. A
  create that never finished (the plugin died) is listed again after CREATE_GRACE seconds, so the
  domain is found and cleaned up rather than leaked.
- IDs are ``mobykit-<20-digit ns timestamp>-<4 hex>``: they sort by creation time and never repeat.

Connection URI: property ``URI``, else config ``URI``, else ``$MOBYKIT_LIBVIRT_URI``, else
``qemu:///session``. ``test:///default`` (libvirt's in-process mock) is supported for fast tests:
it has no volume upload/download, so there images are referenced by path and the console is empty.

Modules: ``properties`` (what a request may say, ids), ``metadata``, ``domain`` (XML and Machine),
``storage``, ``diskboot``, ``ports``, ``events`` and ``cache`` (listings), ``provider`` (``LibvirtProvider``).
Everything other code imports is re-exported here.
"""

from __future__ import annotations

from mobykit.providers.libvirt.cache import DomainCache, DomainView
from mobykit.providers.libvirt.domain import QEMU_NS
from mobykit.providers.libvirt.metadata import NS, NS_PREFIX, InstanceMeta
from mobykit.providers.libvirt.properties import (
    CONFIG_KEYS,
    CREATE_GRACE,
    DEFAULT_CMDLINE,
    DEFAULT_POOL,
    DEFAULT_URI,
    ENV_URI,
    ID_PREFIX,
    PROPERTY_DEFAULTS,
    created_ns,
    new_id,
    parse_publish,
    validate_properties,
)
from mobykit.providers.libvirt.provider import LibvirtProvider

__all__ = [
    "CONFIG_KEYS",
    "CREATE_GRACE",
    "DEFAULT_CMDLINE",
    "DEFAULT_POOL",
    "DEFAULT_URI",
    "DomainCache",
    "DomainView",
    "ENV_URI",
    "ID_PREFIX",
    "InstanceMeta",
    "LibvirtProvider",
    "NS",
    "NS_PREFIX",
    "PROPERTY_DEFAULTS",
    "QEMU_NS",
    "created_ns",
    "new_id",
    "parse_publish",
    "validate_properties",
]
