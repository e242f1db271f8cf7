"""A fake Compute Engine REST server (no emulator of it exists), a faithful subset of the v1 API's
JSON shapes and behaviour for mobykit's GCP provider tests: see ``state.py`` for what is modelled and
``server.py`` for the routes and fault injection."""

from gce_fake.server import FakeCompute, running
from gce_fake.state import World

__all__ = ["FakeCompute", "World", "running"]
