"""Names and helpers the GCP provider tests share (the fixtures are in ``fixtures.py``, a pytest
plugin the test modules load with ``pytest_plugins``)."""

from __future__ import annotations

from typing import Any

from gce_fake.server import FakeCompute

PROJECT, ZONE, ZONE2, BUCKET = "proj-1", "us-central1-a", "us-central1-b", "mobykit-images"
WAIT = 120.0  # bound of every wait (a liveness bound on a loaded 2-core machine, not a measure)


def config(fake: FakeCompute, **extra: Any) -> dict[str, Any]:
    """A ``providers.gcp`` section for ``fake``."""
    return {"Project": PROJECT, "Zone": ZONE, "Zones": [ZONE2], "Bucket": BUCKET, "Endpoint": fake.endpoint, **extra}


def instances(fake: FakeCompute) -> list[dict[str, Any]]:
    """What the fake holds, as GCE's JSON."""
    with fake.world.lock:
        return [dict(v) for v in fake.world.instances.values()]


def label_of(value: str) -> str:
    """The label value a tag value is written as."""
    from mobykit.providers.gcp.labels import label_value

    return label_value(value)
