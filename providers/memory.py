"""A provider that keeps its machines in a dict: the fast, deterministic stand-in for a cloud.

Why it exists: the group controller, the core and the transports all need a provider whose timing
and failures a test can dial in (slow provisions, slow boots, flaky creates) without booting a
VM. Everything a real provider promises is kept: tags live on the machine and are the only state,
``create`` returns only once the machine is listed, IDs sort in creation order, and a machine is
``pending`` until its boot latency has passed, then ``running`` with a console that says
``mobykit: ready sha256:<image>`` (what our init prints), so console-based health works unchanged.

Settings (config keys, also plain attributes that a test may change at any time):
    provision_latency, boot_latency, destroy_latency   seconds (default 0)
    create_failure_rate, destroy_failure_rate, boot_failure_rate   0..1 (default 0)
    seed        RNG seed for the failure draws (default 0, so runs repeat exactly)
    clock       callable returning seconds (default time.monotonic) - pass a virtual clock
    sleep       callable(seconds) (default time.sleep) - pass the virtual clock's sleep
    id_prefix   prefix of machine IDs (default "mem-")
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mobykit.errors import InvalidArgument, NotFound, Unavailable
from mobykit.providers.base import BootImage, Machine, MachineSpec

_NO_IMAGE = "sha256:" + "0" * 64
_RATE_KEYS = ("create_failure_rate", "destroy_failure_rate", "boot_failure_rate")
_LATENCY_KEYS = ("provision_latency", "boot_latency", "destroy_latency")


@dataclass
class _Record:
    """One machine as this fake cloud holds it (the provider's own truth, not a cache)."""

    id: str
    tags: dict[str, str]
    properties: dict[str, Any]
    logical_id: str | None
    user_data: str
    created: float
    ready_at: float
    boot_fails: bool
    state: str = "pending"
    console: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Event:
    """One call the provider served, for tests that check ordering or invariants."""

    time: float
    op: str  # "create" | "destroy" | "set_tags" | "create_failed" | "destroy_failed"
    id: str
    tags: dict[str, str]


class MemoryProvider:
    name: ClassVar[str] = "memory"

    def __init__(self, config: dict[str, Any] | None = None):
        config = dict(config or {})
        for key in _LATENCY_KEYS + _RATE_KEYS:
            value = config.get(key, 0.0)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"providers.memory.{key}: must be a number >= 0, got {value!r}")
            if key in _RATE_KEYS and value > 1:
                raise InvalidArgument(f"providers.memory.{key}: must be between 0 and 1, got {value!r}")
            setattr(self, key, float(value))
        self.clock: Callable[[], float] = config.get("clock") or time.monotonic
        self.sleep: Callable[[float], None] = config.get("sleep") or time.sleep
        self.id_prefix: str = str(config.get("id_prefix", "mem-"))
        self._rng = random.Random(config.get("seed", 0))
        self._lock = threading.RLock()
        self._machines: dict[str, _Record] = {}
        self._counter = 0
        self.images: dict[str, BootImage] = {}
        self.events: list[Event] = []

    # -- the Provider interface ------------------------------------------------------------

    def validate(self, properties: dict[str, Any]) -> None:
        """Any keys are accepted (it is a fake); the ones it reads must have the right type."""
        if not isinstance(properties, dict):
            raise InvalidArgument(f"Properties: must be an object, got {type(properties).__name__}")
        image = properties.get("Image")
        if image is not None and not isinstance(image, str):
            raise InvalidArgument(f"Properties.Image: must be a string, got {type(image).__name__}")

    def publish_image(self, image: BootImage, properties: dict[str, Any]) -> str:
        with self._lock:
            self.images[image.id] = image
        return f"memory:{image.id}"

    def create(self, spec: MachineSpec) -> Machine:
        self.validate(spec.properties)
        if self.provision_latency:
            self.sleep(self.provision_latency)
        with self._lock:
            if self._draw(self.create_failure_rate):
                self.events.append(Event(self.clock(), "create_failed", "", dict(spec.tags)))
                raise Unavailable("memory: injected create failure")
            self._counter += 1
            # Zero padded so that string order is creation order, as the SPI's sort by ID expects.
            mid = f"{self.id_prefix}{self._counter:08d}"
            now = self.clock()
            rec = _Record(
                id=mid,
                tags=dict(spec.tags),
                properties=copy.deepcopy(spec.properties),
                logical_id=spec.logical_id,
                user_data=spec.user_data,
                created=now,
                ready_at=now + self.boot_latency,
                boot_fails=self._draw(self.boot_failure_rate),
            )
            self._machines[mid] = rec
            self.events.append(Event(now, "create", mid, dict(rec.tags)))
            return self._machine(rec)

    def set_tags(self, id: str, tags: dict[str, str]) -> None:
        with self._lock:
            rec = self._get(id)
            rec.tags = dict(tags)
            self.events.append(Event(self.clock(), "set_tags", id, dict(tags)))

    def destroy(self, id: str) -> None:
        if self.destroy_latency:
            with self._lock:
                rec = self._machines.get(id)
                if rec is not None:
                    rec.state = "stopping"
            self.sleep(self.destroy_latency)
        with self._lock:
            if self._draw(self.destroy_failure_rate):
                rec = self._machines.get(id)
                if rec is not None and rec.state == "stopping":
                    rec.state = "running"
                self.events.append(Event(self.clock(), "destroy_failed", id, {}))
                raise Unavailable(f"memory: injected destroy failure for {id}")
            rec = self._machines.pop(id, None)
            if rec is not None:
                self.events.append(Event(self.clock(), "destroy", id, dict(rec.tags)))

    def list(self, tags: dict[str, str]) -> list[Machine]:
        with self._lock:
            return [
                self._machine(rec)
                for rec in self._machines.values()
                if all(rec.tags.get(k) == v for k, v in tags.items())
            ]

    def console_output(self, id: str) -> str:
        with self._lock:
            rec = self._get(id)
            self._advance(rec)
            return "".join(rec.console)

    # -- helpers for tests --------------------------------------------------------------------

    def crash(self, id: str, message: str = "Kernel panic - not syncing") -> None:
        """Make a machine die as a real one does: it stays listed, stopped, its console says why."""
        with self._lock:
            rec = self._get(id)
            rec.state = "stopped"
            rec.console.append(f"{message}\n")

    def write_console(self, id: str, text: str) -> None:
        """Append to a machine's console (e.g. to fake what a service printed)."""
        with self._lock:
            self._get(id).console.append(text)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._machines)

    # -- internals ----------------------------------------------------------------------------

    def _draw(self, rate: float) -> bool:
        # Always draw, even at rate 0, so that changing one rate does not reshuffle the others.
        return self._rng.random() < rate

    def _get(self, id: str) -> _Record:
        rec = self._machines.get(id)
        if rec is None:
            raise NotFound(f"memory: no machine {id!r}")
        return rec

    def _advance(self, rec: _Record) -> None:
        """Move a pending machine to running once its boot latency has passed (lazily, on read,
        so no timer thread is needed and a virtual clock drives it exactly)."""
        if rec.state != "pending" or self.clock() < rec.ready_at:
            return
        rec.state = "running"
        if rec.boot_fails:
            rec.console.append("mobykit: init failed: injected boot failure\n")
            return
        image = rec.properties.get("Image") or _NO_IMAGE
        if not str(image).startswith("sha256:"):
            image = f"sha256:{image}"
        rec.console.append(f"mobykit: ready {image}\n")

    def _machine(self, rec: _Record) -> Machine:
        self._advance(rec)
        return Machine(
            id=rec.id,
            tags=dict(rec.tags),
            state=rec.state,
            logical_id=rec.logical_id,
            properties=copy.deepcopy(rec.properties),
        )
