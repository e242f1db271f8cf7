"""Infrakit-style fake Instance and Flavor plugins over a virtual clock, for group tests.

Like Infrakit's own group tests (testplugin.go), the fakes keep instances in a dict, but they
also model time: an instance is UNKNOWN until its boot time has passed, then HEALTHY, or, when its
properties say ``Broken: true``, UNHEALTHY once the flavor's deadline passes. Every mutation is
recorded and handed to observers, so a test can check an invariant at EVERY instant, and any call
can be made to "crash" the controller (raise a BaseException the controller does not catch),
before or after the call takes effect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mobykit.errors import Unavailable
from mobykit.spi.types import Allocation, Description, DestroyReason, Health, Index, Spec


class VirtualClock:
    def __init__(self, start: float = 1000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    sleep = advance


class Crash(BaseException):
    """The controller process dies here (not an Exception: nothing in the controller catches it)."""


@dataclass
class FakeInstance:
    id: str
    tags: dict[str, str]
    logical_id: str | None
    properties: Any
    init: str
    created: float


@dataclass
class Event:
    time: float
    op: str  # provision | destroy | label | drain | prepare
    id: str
    hash: str | None
    reason: str | None = None


@dataclass
class FakeWorld:
    clock: VirtualClock = field(default_factory=VirtualClock)
    boot_seconds: float = 3.0
    deadline_seconds: float = 10.0
    instances: dict[str, FakeInstance] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    observers: list[Callable[[FakeWorld, Event], None]] = field(default_factory=list)
    crash_at: int | None = None  # the n-th mutating call (0-based) crashes
    crash_after: bool = False  # ...after taking effect (else before)
    calls: int = 0
    fail_provisions: int = 0  # the next n Provision calls fail
    always_fail: bool = False
    describe_calls: int = 0
    counter: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self.instance = FakeInstancePlugin(self)
        self.flavor = FakeFlavorPlugin(self)

    # crash injection around every mutating call
    def mutate(self, op: str, effect: Callable[[], Event | None]) -> Any:
        with self.lock:
            n = self.calls
            self.calls += 1
            if self.crash_at == n and not self.crash_after:
                raise Crash(f"crash before call {n} ({op})")
            event = effect()
            if event is not None:
                self.events.append(event)
                for obs in self.observers:
                    obs(self, event)
            if self.crash_at == n and self.crash_after:
                raise Crash(f"crash after call {n} ({op})")
            return event

    def group(self, group: str) -> list[FakeInstance]:
        return [i for i in self.instances.values() if i.tags.get("infrakit.group") == group]

    def health(self, inst: FakeInstance) -> Health:
        props = inst.properties if isinstance(inst.properties, dict) else {}
        age = self.clock() - inst.created
        if props.get("Broken"):
            return Health.UNHEALTHY if age >= self.deadline_seconds else Health.UNKNOWN
        return Health.HEALTHY if age >= self.boot_seconds else Health.UNKNOWN

    def healthy_count(self, group: str) -> int:
        return sum(1 for i in self.group(group) if self.health(i) == Health.HEALTHY)


class FakeInstancePlugin:
    def __init__(self, world: FakeWorld):
        self.w = world

    def validate(self, type: str, properties: Any) -> None:
        if not isinstance(properties, dict):
            from mobykit.errors import InvalidArgument

            raise InvalidArgument("Properties: must be an object")

    def provision(self, type: str, spec: Spec) -> str:
        w = self.w

        def effect() -> Event:
            if w.always_fail or w.fail_provisions > 0:
                w.fail_provisions = max(0, w.fail_provisions - 1)
                raise Unavailable("fake: out of capacity")
            w.counter += 1
            iid = f"i-{w.counter:06d}"
            w.instances[iid] = FakeInstance(iid, dict(spec.tags), spec.logical_id, spec.properties, spec.init, w.clock())
            return Event(w.clock(), "provision", iid, spec.tags.get("infrakit.config.hash"))

        return w.mutate("provision", effect).id

    def label(self, type: str, instance: str, labels: dict[str, str]) -> None:
        w = self.w

        def effect() -> Event:
            w.instances[instance].tags.update(labels)
            return Event(w.clock(), "label", instance, labels.get("infrakit.config.hash"))

        w.mutate("label", effect)

    def destroy(self, type: str, instance: str, reason: DestroyReason) -> None:
        w = self.w

        def effect() -> Event | None:
            inst = w.instances.pop(instance, None)
            if inst is None:
                return None
            return Event(w.clock(), "destroy", instance, inst.tags.get("infrakit.config.hash"), DestroyReason(reason).value)

        w.mutate("destroy", effect)

    def describe_instances(self, type: str, tags: dict[str, str], properties: bool) -> list[Description]:
        with self.w.lock:
            self.w.describe_calls += 1
            return [
                Description(i.id, dict(i.tags), i.logical_id, i.properties if properties else None)
                for i in sorted(self.w.instances.values(), key=lambda i: i.id)
                if all(i.tags.get(k) == v for k, v in tags.items())
            ]


class FakeFlavorPlugin:
    """Vanilla-like (Init lines and Tags from its properties) with boot-time health.

    Health events as the moby flavor's console watch sends them: ``subscribe_health`` registers a
    listener, and ``announce(id)`` (the test plays the watch) calls every listener with that id.
    ``events=False`` makes it a flavor without events (one reached over Infrakit's JSON-RPC)."""

    def __init__(self, world: FakeWorld):
        self.w = world
        self.prepared: list[Index] = []
        self.listeners: list[Callable[[str], None]] = []
        self.healthy_calls = 0

    def subscribe_health(self, listener: Callable[[str], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def announce(self, *instance_ids: str) -> None:
        for iid in instance_ids:
            for listener in list(self.listeners):
                listener(iid)

    def validate(self, type: str, properties: Any, allocation: Allocation) -> None:
        return None

    def prepare(self, type: str, properties: Any, spec: Spec, allocation: Allocation, index: Index) -> Spec:
        props = properties or {}
        self.prepared.append(index)
        spec.tags = {**spec.tags, **props.get("Tags", {})}
        spec.init = "\n".join([spec.init, *props.get("Init", [])]).strip("\n")
        return spec

    def healthy(self, type: str, properties: Any, instance: Description) -> Health:
        with self.w.lock:
            self.healthy_calls += 1
            inst = self.w.instances.get(instance.id)
            return Health.UNKNOWN if inst is None else self.w.health(inst)

    def drain(self, type: str, properties: Any, instance: Description) -> None:
        w = self.w
        w.mutate("drain", lambda: Event(w.clock(), "drain", instance.id, instance.tags.get("infrakit.config.hash")))


def group_spec(id: str = "workers", size: int = 3, *, version: str = "v1", broken: bool = False,
               updating: dict | None = None, logical_ids: list[str] | None = None) -> dict:
    """A group spec document (Infrakit's {ID, Properties}) whose config hash changes with ``version``."""
    props: dict[str, Any] = {
        "Allocation": {"LogicalIDs": logical_ids} if logical_ids else {"Size": size},
        "Instance": {"Plugin": "fake/compute", "Properties": {"Image": version, **({"Broken": True} if broken else {})}},
        "Flavor": {"Plugin": "fake/vanilla", "Properties": {"Init": ["echo hi"], "Tags": {"role": "worker"}}},
    }
    if updating is not None:
        props["Updating"] = updating
    return {"ID": id, "Properties": props}


class ProviderInstancePlugin:
    """The Instance SPI over a ``mobykit.providers`` Provider (e.g. the memory provider), the way
    the core does it, kept minimal so group tests and the bench need no server."""

    def __init__(self, provider: Any):
        self.p = provider

    def validate(self, type: str, properties: Any) -> None:
        self.p.validate(properties)

    def provision(self, type: str, spec: Spec) -> str:
        from mobykit.providers.base import MachineSpec

        return self.p.create(MachineSpec(dict(spec.properties or {}), dict(spec.tags), spec.init, spec.logical_id)).id

    def label(self, type: str, instance: str, labels: dict[str, str]) -> None:
        m = next((m for m in self.p.list({}) if m.id == instance), None)
        if m is None:
            from mobykit.errors import NotFound

            raise NotFound(instance)
        self.p.set_tags(instance, {**m.tags, **labels})

    def destroy(self, type: str, instance: str, reason: DestroyReason) -> None:
        self.p.destroy(instance)

    def describe_instances(self, type: str, tags: dict[str, str], properties: bool) -> list[Description]:
        return sorted((Description(m.id, m.tags, m.logical_id, m.properties if properties else None)
                       for m in self.p.list(tags)), key=lambda d: d.id)


class ConsoleFlavor:
    """Health from the console, as the moby flavor does: HEALTHY once it says ``mobykit: ready``."""

    def __init__(self, provider: Any):
        self.p = provider

    def validate(self, type: str, properties: Any, allocation: Allocation) -> None:
        return None

    def prepare(self, type: str, properties: Any, spec: Spec, allocation: Allocation, index: Index) -> Spec:
        return spec

    def healthy(self, type: str, properties: Any, instance: Description) -> Health:
        try:
            return Health.HEALTHY if "mobykit: ready" in self.p.console_output(instance.id) else Health.UNKNOWN
        except Exception:
            return Health.UNKNOWN

    def drain(self, type: str, properties: Any, instance: Description) -> None:
        return None
