"""The Group SPI (Infrakit Group/0.1.1) over one controller per committed group.

The transports (gRPC, Infrakit's JSON-RPC) call this; it only ever talks to Instance and Flavor
plugins found by name through the resolvers it is given, so the same code drives our own core
(``mobykit/libvirt``, ``mobykit/aws``...) or any Infrakit-compatible plugin behind a socket.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mobykit.errors import FailedPrecondition, InvalidArgument, MobykitError, NotFound
from mobykit.group.controller import GroupController, Options, Status
from mobykit.group.model import BOOTSTRAP, GROUP_TAG, Member
from mobykit.group.spec import GroupConfig, parse, plugin_type
from mobykit.spi.flavor import FlavorPlugin
from mobykit.spi.group import GroupDescription, GroupSpec
from mobykit.spi.instance import InstancePlugin
from mobykit.spi.types import DestroyReason

log = logging.getLogger("mobykit.group")

InstanceResolver = Callable[[str], InstancePlugin]  # "mobykit/libvirt" -> the plugin serving it
FlavorResolver = Callable[[str], FlavorPlugin]


class GroupPluginImpl:
    def __init__(
        self,
        instance: InstanceResolver,
        flavor: FlavorResolver,
        *,
        options: Options | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = None,
        run: bool = True,
    ):
        """``run=False`` leaves controllers unstarted (tests drive ``reconcile()`` themselves)."""
        self._resolve_instance = instance
        self._resolve_flavor = flavor
        self.options = options or Options()
        self.clock = clock
        self.metrics = metrics
        self.run = run
        self._lock = threading.Lock()
        self._groups: dict[str, GroupController] = {}

    # -- helpers --------------------------------------------------------------------------------

    def _plugins(self, cfg: GroupConfig) -> tuple[InstancePlugin, FlavorPlugin]:
        try:
            instance = self._resolve_instance(cfg.instance_plugin)
        except (KeyError, LookupError, MobykitError) as e:
            raise InvalidArgument(f"Properties.Instance.Plugin: no instance plugin {cfg.instance_plugin!r} ({e})") from None
        try:
            flavor = self._resolve_flavor(cfg.flavor_plugin)
        except (KeyError, LookupError, MobykitError) as e:
            raise InvalidArgument(f"Properties.Flavor.Plugin: no flavor plugin {cfg.flavor_plugin!r} ({e})") from None
        return instance, flavor

    def _get(self, id: str) -> GroupController:
        with self._lock:
            ctl = self._groups.get(id)
        if ctl is None:
            raise NotFound(f"group {id!r} is not managed here")
        return ctl

    def controller(self, id: str) -> GroupController:
        return self._get(id)

    def status(self, id: str) -> Status:
        """More than DescribeGroup says: the step in progress, halts, counts by config and health."""
        return self._get(id).status()

    def close(self) -> None:
        """Stop every controller (instances keep running): for server shutdown."""
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for ctl in groups:
            ctl.stop()

    # -- the SPI ----------------------------------------------------------------------------------

    def commit_group(self, spec: GroupSpec, pretend: bool) -> str:
        cfg = parse(spec)
        instance, flavor = self._plugins(cfg)
        instance.validate(plugin_type(cfg.instance_plugin), cfg.instance_properties)
        flavor.validate(plugin_type(cfg.flavor_plugin), cfg.flavor_properties, cfg.allocation)
        members = [Member.from_description(d) for d in
                   instance.describe_instances(plugin_type(cfg.instance_plugin), {GROUP_TAG: cfg.id}, False)]
        plan = describe_plan(cfg, members)
        if pretend:
            return f"Would commit group {cfg.id} (config {cfg.hash}): {plan}"
        with self._lock:
            ctl = self._groups.get(cfg.id)
            if ctl is None:
                ctl = GroupController(cfg, instance, flavor, options=self.options, clock=self.clock,
                                      metrics=self.metrics)
                self._groups[cfg.id] = ctl
                if self.run:
                    ctl.start()
            else:
                ctl.instance, ctl.flavor = instance, flavor
                ctl.update(cfg)
        log.info("committed group=%s hash=%s plan=%r", cfg.id, cfg.hash, plan)
        return f"Committed group {cfg.id} (config {cfg.hash}): {plan}"

    def free_group(self, id: str) -> None:
        ctl = self._get(id)
        with self._lock:
            self._groups.pop(id, None)
        ctl.stop()

    def describe_group(self, id: str) -> GroupDescription:
        ctl = self._get(id)
        cfg = ctl.config
        descs = ctl.instance.describe_instances(plugin_type(cfg.instance_plugin), {GROUP_TAG: id}, False)
        return GroupDescription(instances=sorted(descs, key=lambda d: d.id), converged=ctl.status().converged)

    def destroy_group(self, id: str) -> None:
        ctl = self._get(id)
        with self._lock:
            self._groups.pop(id, None)
        ctl.stop()
        cfg = ctl.config
        itype = plugin_type(cfg.instance_plugin)
        for d in ctl.instance.describe_instances(itype, {GROUP_TAG: id}, False):
            ctl.instance.destroy(itype, d.id, DestroyReason.TERMINATE)

    def inspect_groups(self) -> list[GroupSpec]:
        with self._lock:
            ctls = sorted(self._groups.items())
        return [ctl.config.spec() for _, ctl in ctls]

    def destroy_instances(self, id: str, instances: list[str]) -> None:
        ctl = self._get(id)
        cfg = ctl.config
        known = {d.id for d in ctl.instance.describe_instances(plugin_type(cfg.instance_plugin), {GROUP_TAG: id}, False)}
        missing = [i for i in instances if i not in known]
        if missing:
            raise NotFound(f"group {id!r} has no instance {', '.join(missing)}")
        ctl.destroy_instances(list(dict.fromkeys(instances)))

    def size(self, id: str) -> int:
        return self._get(id).config.target

    def set_size(self, id: str, size: int) -> None:
        ctl = self._get(id)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"size: must be a count >= 0, got {size!r}")
        if ctl.config.quorum:
            raise FailedPrecondition(f"group {id!r} is sized by its LogicalIDs; commit a spec to change them")
        ctl.set_size(size)


def describe_plan(cfg: GroupConfig, members: list[Member]) -> str:
    """One line that says what committing ``cfg`` over these instances will do."""
    current = [m for m in members if m.hash in (cfg.hash, BOOTSTRAP)]
    other = [m for m in members if m.hash not in (cfg.hash, BOOTSTRAP)]
    n, have = cfg.target, len(members)
    adopt = sum(1 for m in members if m.hash == BOOTSTRAP)
    parts = []
    if other:
        if cfg.quorum:
            parts.append(f"rolling update of {len(other)} instances, one logical id at a time")
        else:
            surge = cfg.updating.max_surge.resolve(cfg.size)
            unav = cfg.updating.max_unavailable.resolve(cfg.size)
            pace = f", min ready {cfg.updating.min_ready_seconds:g}s" if cfg.updating.min_ready_seconds else ""
            parts.append(f"rolling update of {len(other)} instances, surge {surge}, max unavailable {unav}{pace}")
        if have != n:
            parts.append(f"size {have} -> {n}")
    elif have < n:
        parts.append(f"scale up from {have} to {n} instances" if have else f"create {n} instances")
    elif have > n:
        parts.append(f"scale down from {have} to {n} instances")
    else:
        parts.append(f"no change, {len(current)} instances at this config")
    if adopt:
        parts.append(f"adopt {adopt} bootstrap instances")
    if cfg.updating.rollback and other:
        parts.append("roll back automatically if a new instance is unhealthy")
    return "; ".join(parts)
