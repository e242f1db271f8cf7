"""InstanceCore: Infrakit's Instance SPI (0.6.1) over mobykit's providers.

Why a core between the transports and the providers: the SPI's promises (tags merged on Label,
unknown IDs destroyed successfully, results sorted, pending machines listed, built images
published before boot) are the same for every cloud, so they are kept once here and each provider
only speaks its own API (see ``mobykit.providers.base``).

Which provider serves a call: ``properties["Provider"]`` when the request has properties (Validate,
Provision), else the Infrakit Type (``libvirt`` for the plugin name ``mobykit/libvirt``), else the
config's ``default_provider``, else ``libvirt``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from mobykit import providers as provider_registry
from mobykit.core import config as configuration
from mobykit.core.singleflight import SingleFlight
from mobykit.errors import InvalidArgument, NotFound, Unavailable
from mobykit.providers.base import Machine, MachineSpec
from mobykit.spi.types import Description, DestroyReason, Spec

log = logging.getLogger("mobykit.core")

PROVIDER_KEY = "Provider"
IMAGE_KEY = "Image"
NAMESPACE_KEY = "NamespaceTags"
DEFAULT_PROVIDER = "libvirt"


class InstanceCore:
    """Implements ``mobykit.spi.instance.InstancePlugin``.

    ``providers`` injects ready provider objects by name (tests, or a server that shares one
    provider between the core and other components); others are loaded on first use with their
    config section and then kept, so a provider's connection is made once.
    """

    def __init__(self, config: dict[str, Any] | None = None, providers: dict[str, Any] | None = None):
        self.config = configuration.check(config or {})
        self.default = self.config.get("default_provider") or DEFAULT_PROVIDER
        self._providers: dict[str, Any] = dict(providers or {})
        self._lock = threading.Lock()
        # Label is read-modify-write on the provider's tags: serialise it per instance id.
        self._label_locks: dict[str, threading.Lock] = {}
        # Concurrent identical listings (both transports, the group controllers) share one provider
        # call; never one that started before the caller did (see mobykit.core.singleflight).
        self.listings: SingleFlight[tuple[str, tuple[tuple[str, str], ...]], list[Machine]] = SingleFlight()

    # -- provider selection -------------------------------------------------------------------

    def known_names(self) -> list[str]:
        return sorted(set(provider_registry.NAMES) | set(self._providers))

    def provider(self, name: str):
        """The provider called ``name``: injected, already loaded, or loaded now."""
        with self._lock:
            if name in self._providers:
                return self._providers[name]
            if name not in provider_registry.NAMES:
                raise InvalidArgument(f"unknown provider {name!r} (known: {', '.join(self.known_names())})")
            settings = configuration.provider_settings(self.config, name)
            settings.pop(NAMESPACE_KEY, None)  # kept by the core (below), not the provider's business
            try:
                p = provider_registry.load(name, settings)
            except ImportError as e:
                # The provider's module or its SDK is not installed on this server.
                raise Unavailable(f"provider {name!r} is not available on this server: {e}") from None
            self._providers[name] = p
            return p

    def _name(self, type: str, properties: Any = None) -> str:
        if isinstance(properties, dict) and PROVIDER_KEY in properties:
            name = properties[PROVIDER_KEY]
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"Properties.{PROVIDER_KEY}: must be a provider name, got {name!r}")
            return name
        return type or self.default

    # -- the SPI ------------------------------------------------------------------------------

    def validate(self, type: str, properties: Any) -> None:
        self._validated(type, properties)

    def namespace(self, name: str) -> dict[str, str]:
        """The provider's ``NamespaceTags`` (config): put on every instance it makes and required of
        every instance it lists, so two deployments sharing one account never see each other's."""
        tags = configuration.provider_settings(self.config, name).get(NAMESPACE_KEY) or {}
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise InvalidArgument(f"config: providers.{name}.{NAMESPACE_KEY}: must be a mapping of strings")
        return dict(tags)

    def _validated(self, type: str, properties: Any) -> tuple[Any, dict[str, Any]]:
        if properties is None:
            properties = {}
        if not isinstance(properties, dict):
            raise InvalidArgument(f"Properties: must be an object, got {_json_type(properties)}")
        name = self._name(type, properties)
        provider = self.provider(name)
        own = {k: v for k, v in properties.items() if k != PROVIDER_KEY}
        provider.validate(own)
        return provider, own

    def provision(self, type: str, spec: Spec) -> str:
        _check_str_map(spec.tags, "Spec.Tags")
        if spec.logical_id is not None and not isinstance(spec.logical_id, str):
            raise InvalidArgument("Spec.LogicalID: must be a string")
        if not isinstance(spec.init, str):
            raise InvalidArgument("Spec.Init: must be a string")
        provider, props = self._validated(type, spec.properties)
        namespace = self.namespace(self._name(type, spec.properties))
        self._publish_image(provider, props)
        machine = provider.create(
            MachineSpec(properties=props, tags={**spec.tags, **namespace}, user_data=spec.init,
                        logical_id=spec.logical_id, namespace=dict(namespace),
                        attachments=_attachments(spec.attachments))
        )
        log.info("provisioned %s on %s", machine.id, getattr(provider, "name", "?"))
        return machine.id

    def label(self, type: str, instance: str, labels: dict[str, str]) -> None:
        if not instance:
            raise InvalidArgument("Instance: an instance id is required")
        _check_str_map(labels, "Labels")
        name = self._name(type)
        provider = self.provider(name)
        with self._lock:
            lock = self._label_locks.setdefault(instance, threading.Lock())
        with lock:
            current = self._find(provider, instance, self.namespace(name))
            if current is None:
                raise NotFound(f"instance {instance!r} not found")
            merged = dict(current.tags)
            merged.update(labels)
            merged.update(self.namespace(name))  # a label cannot move an instance out of its namespace
            provider.set_tags(instance, merged)

    def destroy(self, type: str, instance: str, reason: DestroyReason = DestroyReason.TERMINATE) -> None:
        if not instance:
            raise InvalidArgument("Instance: an instance id is required")
        name = self._name(type)
        provider = self.provider(name)
        namespace = self.namespace(name)
        if namespace and self._find(provider, instance, namespace) is None:
            return  # not ours (another deployment's, or gone): destroying it "succeeds", touching nothing
        try:
            provider.destroy(instance)
        except NotFound:
            pass  # already gone: the SPI says destroying it succeeds
        log.info("destroyed %s (%s)", instance, DestroyReason(reason).value)

    def describe_instances(self, type: str, tags: dict[str, str], properties: bool = False) -> list[Description]:
        _check_str_map(tags, "Tags")
        name = self._name(type)
        provider = self.provider(name)
        wanted = {**tags, **self.namespace(name)}
        # The shared result is read-only: each caller builds its own Descriptions from it.
        key = (name, tuple(sorted(wanted.items())))
        machines = self.listings.do(key, lambda: provider.list(dict(wanted)))
        out = []
        for m in machines:
            if m.state == "terminated" or not wanted.items() <= m.tags.items():
                continue
            props = None
            if properties:
                # The provider's view of the machine, plus its lifecycle state (ours wins on "State").
                props = dict(m.properties or {})
                props["State"] = m.state
            out.append(Description(id=m.id, tags=dict(m.tags), logical_id=m.logical_id, properties=props))
        out.sort(key=lambda d: d.id)
        return out

    # -- helpers ------------------------------------------------------------------------------

    def _find(self, provider, instance: str, namespace: dict[str, str] | None = None):
        namespace = namespace or {}
        find = getattr(provider, "find", None)  # FindsById: also the machines its listing leaves out
        if callable(find):
            m = find(instance)
            return m if m is not None and m.state != "terminated" and namespace.items() <= m.tags.items() else None
        for m in provider.list(dict(namespace)):
            if m.id == instance and m.state != "terminated" and namespace.items() <= m.tags.items():
                return m
        return None

    def _publish_image(self, provider, props: dict[str, Any]) -> None:
        """A built image id in Properties.Image is made bootable on the provider before create."""
        image = props.get(IMAGE_KEY)
        if not (isinstance(image, str) and image.startswith("sha256:")):
            return
        try:
            from mobykit.image import store
        except ModuleNotFoundError as e:
            if e.name not in ("mobykit.image.store",):
                raise
            log.warning("image store not available; not publishing %s", image)
            return
        boot = store.get(image, cache=configured_cache(self.config))
        provider.publish_image(boot, props)


def configured_cache(config: dict[str, Any]):
    """The image cache named by the config's ``cache`` key (None: the store's default)."""
    if not config.get("cache"):
        return None
    from mobykit.image.cache import Cache

    return Cache(config["cache"])


def _check_str_map(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: must be an object of strings, got {_json_type(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"{field}.{k}: must be a string, got {_json_type(v)}")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _attachments(given: Any) -> list[tuple[str, str]]:
    """Infrakit's Spec.Attachments as (ID, Type), each ID a non-empty string."""
    out = []
    for i, a in enumerate(given or []):
        if not isinstance(getattr(a, "id", None), str) or not a.id:
            raise InvalidArgument(f"Spec.Attachments[{i}].ID: must be a volume id or name")
        out.append((a.id, a.type if isinstance(a.type, str) else ""))
    return out
