"""The ``moby`` flavor: instances boot an image built from a LinuxKit-style spec, healthy once it says so.

Properties::

    Image:  "path/spec.yml" | ["a.yml", "b.yml"] | {inline spec}     (required)
    Init:   [lines]            appended after the instance spec's own Init, joined with newlines
    Tags:   {k: v}             merged into the instance tags
    Health: {Mode: console|running|tcp|http, Port: N, Path: "/", Deadline: "300s"}
    Drain:  {Command: "sh cmd" | [argv], Grace: "10s"}

Prepare builds the image on demand (``mobykit.image.store.build_and_store``, which skips the build
when the spec's inputs are unchanged) and writes the id into the instance properties
(``Image: sha256:...``) and into the tag ``mobykit.image``. Why both: the instance core boots by the
property, while Infrakit's config hash covers only the group spec, so the tag is what lets a user and
the group controller see which image each instance runs after a spec's contents change. When the
instance properties say ``Boot: disk`` (libvirt), the build job also makes the image's disk format,
so that Provision only uploads it.

Why Prepare does not simply build and return: Infrakit's client gives up after 15 s, and a cold build
(a kernel and packages from Debian) takes minutes. So the build runs in the background
(``mobykit.image.inflight``), keyed by the spec documents (real paths, or inline text and base:
``store.build_key``), and Prepare waits for it at most ``PrepareWait`` (config
``flavors: {moby: {PrepareWait: "10s"}}``, default 10 s, under Infrakit's 15). A build still running
then fails Prepare with Unavailable (gRPC UNAVAILABLE, JSON-RPC -32000) saying since when and at which
step it is, and that the call should be retried; the build goes on. Concurrent Prepares of one spec
share one build; the next Prepare after a build whose callers all gave up gets its image (or its error)
at once; a Prepare after a result was handed over builds again, a no-op when nothing changed, so an
edited spec file and a failed build are picked up and retried. Validate, Healthy and Drain never wait
on builds. Paths are checked on the request thread (refusals come back at once) and again when opened.

Healthy (``mobykit.flavor.health``, served from ``mobykit.flavor.healthwatch``, which follows or
polls each console and tells ``subscribe_health`` listeners, the group controllers, when an
instance's health changes): UNKNOWN until the console shows ``mobykit: ready <image id>``
(and, for tcp/http, a probe of 127.0.0.1:Port passes); HEALTHY from then on; UNHEALTHY when the
console says ``mobykit: not ready``, the instance is gone, or Deadline passes (measured from the
instance's creation time: Description properties ``CreatedNs``/``Created``, else the time encoded
in a libvirt instance id, else when this flavor first saw it). Mode ``running`` asks the provider
for its state instead of reading the console (for drivers without a console, e.g. test:///default).

How the flavor reaches the console: constructor injection. ``instances`` is either an object with
``provider(name)`` (the server passes its InstanceCore, so connections are shared) or an
``InstanceProbe`` itself (tests); when absent an InstanceCore is made from ``config``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mobykit.core import paths as server_paths
from mobykit.errors import FailedPrecondition, InvalidArgument
from mobykit.flavor import health as probes
from mobykit.flavor.healthwatch import HealthWatch, PortCheck
from mobykit.flavor.properties import duration, fields, join_init, string_list, string_map
from mobykit.image.inflight import Builds
from mobykit.image.progress import Progress
from mobykit.providers.base import BootImage
from mobykit.spi.types import Allocation, Description, Health, Index, Spec

if TYPE_CHECKING:  # the spec loader is imported when a Prepare builds, not by every server start
    from mobykit.spec.load import SpecSource

KEYS = ("Image", "Init", "Tags", "Health", "Drain")
HEALTH_KEYS = ("Mode", "Port", "Path", "Deadline")
PORTS_KEPT = 4096
DRAIN_KEYS = ("Command", "Grace")
MODES = ("console", "running", "tcp", "http")
IMAGE_TAG = "mobykit.image"
DEFAULT_DEADLINE = 300.0
DRAIN_TIMEOUT = 60.0  # a drain command that hangs must not hang the group controller forever
CONFIG_KEYS = ("PrepareWait",)  # config: flavors: {moby: {...}}
PREPARE_WAIT = 10.0  # under Infrakit's 15 s client timeout, so our answer reaches it before it gives up

# What builds the image of a Prepare: the checked spec documents and a Progress the build reports its
# steps to (what a Prepare that cannot wait is told). The default is ``store.build_and_store``.
BuildFn = Callable[[list["SpecSource"], Progress], BootImage]


@dataclass
class HealthCheck:
    mode: str = "console"
    port: int | None = None
    path: str = "/"
    deadline: float = DEFAULT_DEADLINE


@dataclass
class DrainStep:
    command: list[str] | None = None
    grace: float = 0.0


@dataclass
class MobyProperties:
    image: Any
    init: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    health: HealthCheck = field(default_factory=HealthCheck)
    drain: DrainStep = field(default_factory=DrainStep)


def parse(properties: Any, check_files: bool = True) -> MobyProperties:
    """Check and read the flavor properties; InvalidArgument names the bad field. Healthy and Drain
    pass ``check_files=False``: a spec file moved after the instance booted does not make it sick."""
    props = fields(properties, KEYS, "Properties")
    image = props.get("Image")
    if image is None or image == "" or image == [] or image == {}:
        raise InvalidArgument("Properties.Image: required: a spec file path, a list of paths, or an inline spec")
    if isinstance(image, str):
        spec_paths = [image]
    elif isinstance(image, list):
        if not all(isinstance(p, str) and p for p in image):
            raise InvalidArgument("Properties.Image: a list must hold spec file paths")
        spec_paths = image
    elif isinstance(image, dict):
        spec_paths = []
    else:
        raise InvalidArgument("Properties.Image: expected a spec path, a list of paths, or an inline spec object")
    for i, p in enumerate(spec_paths if check_files else ()):
        name = f"Properties.Image[{i}]" if isinstance(image, list) else "Properties.Image"
        if not server_paths.resolve(p, name).is_file():  # refused outside the server's allowed roots
            raise InvalidArgument(f"{name}: {p}: no such spec file")

    h = fields(props.get("Health"), HEALTH_KEYS, "Properties.Health")
    mode = h.get("Mode", "console")
    if mode not in MODES:
        raise InvalidArgument(f"Properties.Health.Mode: {mode!r} is not one of {', '.join(MODES)}")
    port = h.get("Port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        raise InvalidArgument(f"Properties.Health.Port: {port!r} is not a port number")
    if mode in ("tcp", "http") and port is None:
        raise InvalidArgument(f"Properties.Health.Port: required for Mode {mode} (the published port on 127.0.0.1)")
    path = h.get("Path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgument(f"Properties.Health.Path: {path!r} must start with /")
    check = HealthCheck(mode=mode, port=port, path=path,
                        deadline=duration(h.get("Deadline"), "Properties.Health.Deadline", DEFAULT_DEADLINE))

    d = fields(props.get("Drain"), DRAIN_KEYS, "Properties.Drain")
    command = d.get("Command")
    if isinstance(command, str):
        argv = ["/bin/sh", "-c", command] if command.strip() else None
    elif command is None:
        argv = None
    else:
        argv = string_list(command, "Properties.Drain.Command") or None
    drain = DrainStep(command=argv, grace=duration(d.get("Grace"), "Properties.Drain.Grace", 0.0))

    return MobyProperties(
        image=image,
        init=string_list(props.get("Init"), "Properties.Init"),
        tags=string_map(props.get("Tags"), "Properties.Tags"),
        health=check,
        drain=drain,
    )


class MobyFlavor:
    """Implements ``mobykit.spi.flavor.FlavorPlugin`` (see the module docstring)."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        instances: Any = None,
        build: BuildFn | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.config = dict(config or {})
        section = self.config.get("flavors") or {}
        if not isinstance(section, dict):
            raise InvalidArgument("config: flavors: must be a mapping of flavor name to settings")
        settings = fields(section.get("moby"), CONFIG_KEYS, "config: flavors.moby")
        self.prepare_wait = duration(settings.get("PrepareWait"), "config: flavors.moby.PrepareWait", PREPARE_WAIT)
        self._instances = instances
        self._probe: probes.InstanceProbe | None = None
        self._build = build or self._build_with_store
        self.builds: Builds[BootImage] = Builds()  # shared by every Prepare of this flavor
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._first_seen: dict[str, float] = {}
        self._watch: HealthWatch | None = None
        # Published ports by instance id, for tcp/http health: fixed from an instance's creation,
        # so looked up once (a listing) and kept, the oldest dropped past PORTS_KEPT.
        self._ports: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # -- wiring ---------------------------------------------------------------------------------

    def _build_with_store(self, sources: list[SpecSource], progress: Progress) -> BootImage:
        from mobykit.image import store

        cache = None
        if self.config.get("cache"):
            from mobykit.image.cache import Cache

            cache = Cache(self.config["cache"])
        return store.build_and_store(sources, cache=cache, field="Properties.Image", progress=progress)

    def close(self) -> None:
        """Start no more builds (a stopping server); running ones are daemon threads and end with it."""
        self.builds.close()
        with self._lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def watch(self) -> HealthWatch:
        """The health watch Healthy is served from (made on first use, over ``probe()``)."""
        with self._lock:
            if self._watch is None:
                self._watch = HealthWatch(self.probe, clock=self.clock)
            return self._watch

    def subscribe_health(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(instance id)`` whenever what Healthy would answer for it may have
        changed (the group controller's wake-up, ``mobykit.group.wake``); returns the unsubscribe."""
        return self.watch().subscribe(listener)

    def probe(self) -> probes.InstanceProbe:
        with self._lock:
            if self._probe is None:
                inst = self._instances
                if inst is not None and hasattr(inst, "console_output") and hasattr(inst, "state"):
                    self._probe = inst
                else:
                    if inst is None:
                        from mobykit.core.instance import InstanceCore

                        inst = InstanceCore(self.config)
                    names = [self.config.get("default_provider") or "libvirt"]
                    names += sorted((self.config.get("providers") or {}).keys())
                    self._probe = probes.ProviderProbe(inst.provider, names)
            return self._probe

    def _host_port(self, instance: Description, port: int) -> int:
        """The 127.0.0.1 port a tcp/http probe of guest ``port`` goes to (``health.host_port``):
        from the Description's ``Ports`` when the caller listed properties, else from the provider."""
        published = _published(instance)
        if published is None:
            with self._lock:
                published = self._ports.get(instance.id)
            if published is None:
                lookup = getattr(self.probe(), "published_ports", None)
                published = lookup(instance.id) if callable(lookup) else {}
                if published is not None:
                    with self._lock:
                        self._ports[instance.id] = published
                        while len(self._ports) > PORTS_KEPT:
                            self._ports.popitem(last=False)
        return probes.host_port(published, port)

    # -- the SPI --------------------------------------------------------------------------------

    def validate(self, type: str, properties: Any, allocation: Allocation) -> None:
        parse(properties)

    def prepare(self, type: str, properties: Any, spec: Spec, allocation: Allocation, index: Index) -> Spec:
        props = parse(properties)
        if spec.properties is not None and not isinstance(spec.properties, dict):
            raise InvalidArgument("Instance.Properties: must be an object for the moby flavor to set Image")
        image = self._image(props.image, disk=_boots_disk(spec))
        out = copy.deepcopy(spec)
        out.properties = {**(spec.properties or {}), "Image": image.id}
        out.tags = {**(spec.tags or {}), **props.tags, IMAGE_TAG: image.id}
        out.init = join_init(spec.init or "", props.init)
        return out

    def healthy(self, type: str, properties: Any, instance: Description) -> Health:
        check = parse(properties, check_files=False).health
        iid = instance.id
        image_id = (instance.tags or {}).get(IMAGE_TAG) or _prop(instance, "Image")
        if check.mode == "running":
            state = self.probe().state(iid)
            if state == "running":
                return Health.HEALTHY
            if state in (None, "stopping", "stopped", "terminated"):
                return Health.UNHEALTHY
            return self._before_deadline(instance, check)
        port = None
        if check.port and check.mode != "console":
            port = PortCheck(check.mode, self._host_port(instance, check.port), check.path)
        seen = self.watch().seen(iid, image_id, port=port,
                                 deadline_at=self._created(instance) + check.deadline)
        if seen.gone or seen.verdict is False:
            return Health.UNHEALTHY
        if seen.verdict is True and (port is None or seen.port_ok):
            return Health.HEALTHY
        return self._before_deadline(instance, check)

    def drain(self, type: str, properties: Any, instance: Description) -> None:
        step = parse(properties, check_files=False).drain
        if step.command:
            env = dict(os.environ, MOBYKIT_INSTANCE_ID=instance.id,
                       MOBYKIT_INSTANCE_TAGS=json.dumps(instance.tags or {}, sort_keys=True),
                       MOBYKIT_INSTANCE_LOGICAL_ID=instance.logical_id or "")
            try:
                r = subprocess.run(step.command, env=env, capture_output=True, text=True, timeout=DRAIN_TIMEOUT,
                                   stdin=subprocess.DEVNULL, check=False)
            except subprocess.TimeoutExpired:
                raise FailedPrecondition(
                    f"Drain.Command for {instance.id}: still running after {DRAIN_TIMEOUT:.0f}s") from None
            except OSError as e:
                raise FailedPrecondition(f"Drain.Command for {instance.id}: cannot run {step.command[0]}: {e}") from None
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip()[-300:]
                raise FailedPrecondition(f"Drain.Command for {instance.id}: exit status {r.returncode}: {tail}")
        if step.grace > 0:
            self.sleep(step.grace)

    # -- helpers --------------------------------------------------------------------------------

    def _image(self, image: Any, *, disk: bool = False) -> BootImage:
        """The built image of the ``Image`` property, through the shared builds in flight (see the
        module docstring). The sources are made here, on the request thread, so a refused path is
        answered at once; the build reads them through the same checks when it opens them.

        ``disk``: the instance boots the image's disk (libvirt ``Boot: disk``), so the build job
        also makes that format, inside the same wait budget, rather than leaving it to Provision
        (which would make it on first use, behind Infrakit's 15 s too)."""
        from mobykit.image import store

        sources = store.spec_sources(image, "Properties.Image")
        label = "Properties.Image " + ", ".join(str(s.path) if s.path is not None else "(inline spec)"
                                                for s in sources)
        key = store.build_key(sources)

        def job(progress: Progress) -> BootImage:
            built = self._build(sources, progress)
            if disk and built.files is not None:  # a stand-in image (tests) has no store to make it from
                from mobykit.providers.libvirt.properties import DISK_FORMAT

                task = progress.task(f"format {DISK_FORMAT}")
                built.format(DISK_FORMAT)
                task.done()
            return built

        if disk:
            key, label = key + "+disk", label + " (with its disk)"
        return self.builds.get(key, label, job, self.prepare_wait)

    def _created(self, instance: Description) -> float:
        """Seconds since the epoch when the instance was made (see the module docstring)."""
        ns = _prop(instance, "CreatedNs")
        if isinstance(ns, int) and not isinstance(ns, bool):
            return ns / 1e9
        stamp = _prop(instance, "Created")
        if isinstance(stamp, str):
            try:
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
        from mobykit.providers.libvirt import created_ns

        ns = created_ns(instance.id)
        if ns is not None:
            return ns / 1e9
        with self._lock:
            return self._first_seen.setdefault(instance.id, self.clock())

    def _before_deadline(self, instance: Description, check: HealthCheck) -> Health:
        if self.clock() - self._created(instance) > check.deadline:
            return Health.UNHEALTHY
        return Health.UNKNOWN


def _boots_disk(spec: Spec) -> bool:
    """Whether the instance boots the image's disk (libvirt ``Boot: disk``) rather than its kernel."""
    return isinstance(spec.properties, dict) and spec.properties.get("Boot") == "disk"


def _published(instance: Description) -> dict[str, Any] | None:
    ports = _prop(instance, "Ports")
    return ports if isinstance(ports, dict) else None


def _prop(instance: Description, key: str) -> Any:
    props = instance.properties
    return props.get(key) if isinstance(props, dict) else None
