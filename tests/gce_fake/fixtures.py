"""Shared fixtures of the GCP provider tests: the fake Compute server and gcp-storage-emulator
(behind a fault-injecting proxy), no Application Default Credentials, and two small real images.
A pytest plugin: test modules load it with ``pytest_plugins = ("gce_fake.fixtures",)``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gce_fake.common import BUCKET
from gce_fake.server import FakeCompute, running
from gce_fake.state import World
from gce_fake.storage import FaultProxy, emulator
from harness.images import SPEC, standard_images
from mobykit.core import paths
from mobykit.image import store
from mobykit.image.cache import Cache


@pytest.fixture
def env(monkeypatch, tmp_path) -> None:
    """No Application Default Credentials anywhere (so loopback endpoints use anonymous ones)."""
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "MOBYKIT_GCP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata-server probe
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


@pytest.fixture
def cloud(env, monkeypatch) -> Iterator[tuple[FakeCompute, object]]:
    """Fake Compute, and the storage emulator behind a proxy that injects faults when asked to
    (``fake.storage_faults.fault_rate``)."""
    with emulator(BUCKET) as gcs:
        proxy = FaultProxy(gcs.endpoint, seed=3)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        fake = FakeCompute(world=World(storage_exists=gcs.exists))
        fake.storage_faults = proxy  # type: ignore[attr-defined]
        try:
            with running(fake):
                yield fake, gcs
        finally:
            proxy.stop()


@pytest.fixture
def images(tmp_path) -> Iterator[dict]:
    """Two small real images (v1, v2 differ in one file) built into a cache; the path policy allows
    their specs for the flavor's builds."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "app.json").write_text('{"app": true}\n')
    (root / "v1.yml").write_text(SPEC)
    (root / "v2.yml").write_text(SPEC.replace("welcome", "welcome v2"))
    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    with paths.using(paths.PathPolicy.under([root])):
        built = {v: store.build_and_store(str(root / f"{v}.yml"), cache=cache) for v in ("v1", "v2")}
        yield {"root": root, "cache": cache, **built}
