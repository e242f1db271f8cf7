"""Machines as Compute Engine instances (``mobykit/gcp``), through google-cloud-compute over REST.

Why the design is what it is:
- Instances are the only state: tags are labels (server-side filters) and metadata items (exact
  values), escaped reversibly (``labels.py``); a restarted plugin lists exactly what it made.
- Every mutation carries a ``requestId`` kept across its retries (google-api-core ``Retry`` on 429 and
  5xx), so a retry after a lost answer is not a second instance; every mutation waits for its zone or
  global operation with operations clients built like the main one (``api.py``).
- A built image is published once per image id: its ``gcp`` format to Cloud Storage, then
  ``images.insert``, found again by the ``mobykit-image`` label (``publish.py``).
- Health reads serial port 1, read for all running instances in parallel when they are listed
  (``instances.ConsoleReader``), so a group's health pass is not one round trip per instance.

Modules: ``properties`` (request and config), ``labels``, ``api`` (clients, credentials, retries,
operation waits), ``publish``, ``instances`` (insert body, Machine, console), ``provider``.
"""

from __future__ import annotations

from mobykit.providers.gcp.properties import CONFIG_KEYS, ENV_ENDPOINT, PROPERTY_TYPES, GCPConfig
from mobykit.providers.gcp.provider import GCPProvider

__all__ = ["CONFIG_KEYS", "ENV_ENDPOINT", "GCPConfig", "GCPProvider", "PROPERTY_TYPES"]
