"""The Group SPI (Infrakit Group/0.1.1) over one controller per committed group.

The transports (gRPC, Infrakit's JSON-RPC) call this; it only ever talks to Instance and Flavor
plugins found by name through the resolvers it is given, so the same code drives our own core
(``mobykit/libvirt``, ``mobykit/aws``...) or any Infrakit-compatible plugin behind a socket.

With a store (``mobykit serve --store``, ``mobykit.group.store``) every commit, resize and free is
written there first and the controllers run only on the leader (``mobykit.group.leader``): a
request to a follower is stored and the leader applies it from its watch of the store; a request
to the leader is also applied in-process at once. On gaining leadership every stored group is
resumed with what its previous controller knew; on losing it every controller stops.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from mobykit.errors import FailedPrecondition, InvalidArgument, MobykitError, NotFound, Unavailable
from mobykit.group.controller import GroupController, Options, Status
from mobykit.group.model import BOOTSTRAP, GROUP_TAG, HASH_TAG, Member
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
        store: Any = None,
        leadership: Any = None,
    ):
        """``run=False`` leaves controllers unstarted (tests drive ``reconcile()`` themselves).
        ``store`` (a ``mobykit.group.store.Store``) and ``leadership`` (``mobykit.group.leader``):
        see the module docstring; call ``start()`` once the server is ready."""
        self._resolve_instance = instance
        self._resolve_flavor = flavor
        self.options = options or Options()
        self.clock = clock
        self.metrics = metrics
        self.run = run
        self._lock = threading.RLock()
        self._groups: dict[str, GroupController] = {}
        self.store = store
        if store is not None and leadership is None:
            from mobykit.group.leader import SoleLeader

            leadership = SoleLeader()
        self.leadership = leadership
        self._records: dict[str, Any] = {}  # id -> GroupRecord, as last read or written
        self._applied: dict[str, str] = {}  # id -> the record commit the local controller runs
        self._walls: dict[str, Any] = {}  # id -> state.WallClock
        self._active_term = 0  # the term whose controllers run here (0: none)
        self._role_wake = threading.Event()
        self._closed = threading.Event()
        self._role_thread: threading.Thread | None = None
        self._persist_lock = threading.Lock()
        self.on_role: Callable[[Any], None] | None = None  # told every role change (health, logs)

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
        """More than DescribeGroup says: the step in progress, halts, counts by config and health.
        On a follower: what the store says (the leader's last stored decisions)."""
        with self._lock:
            ctl = self._groups.get(id)
        if ctl is not None or self.store is None:
            return self._get(id).status()
        from mobykit.group.store.state import config_of

        rec = self._stored(id)
        cfg = config_of(rec.spec)
        role = self.leadership.role()
        return Status(cfg.id, cfg.hash, cfg.target, halted=rec.halted, gave_up=rec.gave_up,
                      rolled_back_from=rec.rolled_back_from,
                      step=rec.gave_up or rec.halted or f"run by the leader ({role.leader or 'none elected yet'})")

    def close(self) -> None:
        """Stop every controller (instances keep running): for server shutdown."""
        self._closed.set()
        self._role_wake.set()
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
            self._active_term = 0
        for ctl in groups:
            ctl.stop()
        if self.leadership is not None:
            self.leadership.stop()
        if self.store is not None:
            self.store.close()

    # -- the store and leadership (mobykit serve --store) ---------------------------------------

    def start(self) -> None:
        """Read the store (a bad one raises here, before anything is served), follow it, and
        campaign: the leader resumes every stored group."""
        if self.store is None:
            return
        self._records = self.store.load()
        self.store.watch(self._on_event)
        self._role_thread = threading.Thread(target=self._role_loop, name="group-role", daemon=True)
        self._role_thread.start()
        self.leadership.start(self._role_wake.set)

    def role(self):
        return self.leadership.role() if self.leadership is not None else None

    def _role_loop(self) -> None:
        while not self._closed.is_set():
            self._role_wake.wait(0.5)
            self._role_wake.clear()
            if self._closed.is_set():
                return
            try:
                term = self.leadership.term if self.leadership.is_leader else 0
                if term != self._active_term:
                    self._stop_controllers()
                    if term:
                        self._resume(term)
                if self.on_role is not None:
                    self.on_role(self.leadership.role())
            except Exception:  # the store is down: try again at the next wake
                log.exception("cannot take up the leader's work")
                self._stop_controllers()

    def _stop_controllers(self) -> None:
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
            self._applied.clear()
            was, self._active_term = self._active_term, 0
        for ctl in groups:
            ctl.stop(wait=False)
        if was:
            log.info("stopped %d group controller(s): no longer the leader (term %d)", len(groups), was)

    def _resume(self, term: int) -> None:
        records = self.store.load()
        with self._lock:
            self._records = records
            self._active_term = term
        for rec in records.values():
            try:
                self._apply(rec)
            except Exception as e:  # one unusable group must not keep the others from resuming
                log.error("cannot resume group=%s: %s", rec.id, e)
        log.info("leader (term %d): resumed %d group(s)", term, len(records))

    def _on_event(self, ev) -> None:
        with self._lock:
            if ev.record is None:
                self._records.pop(ev.id, None)
                ctl = self._groups.pop(ev.id, None)
                self._applied.pop(ev.id, None)
                if ctl is not None:
                    ctl.stop(wait=False)
                return
            cur = self._records.get(ev.id)
            if cur is None or ev.record.revision >= cur.revision:
                self._records[ev.id] = ev.record
            apply = self._active_term and ev.record.commit != self._applied.get(ev.id)
        if apply:
            try:
                self._apply(ev.record)
            except Exception as e:
                log.error("cannot apply the commit of group=%s: %s", ev.id, e)

    def _apply(self, rec, plugins: tuple[InstancePlugin, FlavorPlugin] | None = None) -> None:
        """Make the local controller run ``rec`` (the leader only)."""
        from mobykit.group.store.state import WallClock, config_of, restore

        cfg = config_of(rec.spec)
        with self._lock:
            if not self._active_term or self._applied.get(rec.id) == rec.commit:
                return
            instance, flavor = plugins or self._plugins(cfg)
            ctl = self._groups.get(cfg.id)
            if ctl is None:
                ctl = self._new_controller(cfg, instance, flavor)
                wall = self._walls[cfg.id] = WallClock(self.clock)
                restore(ctl, rec, wall)
                self._applied[cfg.id] = rec.commit
                if self.run:
                    ctl.start()
                return
            ctl.instance, ctl.flavor = instance, flavor
            if ctl.config.hash == cfg.hash and ctl.config.size != cfg.size and not cfg.quorum:
                ctl.set_size(cfg.size)
            else:
                ctl.update(cfg)
            with ctl._lock:  # what the committing server computed (it saw the store, we may lag)
                ctl._previous = config_of(rec.previous) if rec.previous else None
            self._applied[cfg.id] = rec.commit

    def _new_controller(self, cfg: GroupConfig, instance: InstancePlugin, flavor: FlavorPlugin) -> GroupController:
        ctl = GroupController(cfg, instance, flavor, options=self.options, clock=self.clock, metrics=self.metrics)
        self._groups[cfg.id] = ctl
        if self.store is not None:
            ctl.guard = self.leadership.check
            ctl.on_change = lambda id=cfg.id: self._persist(id)
        return ctl

    def _persist(self, id: str) -> None:
        """After a pass: store what the controller decided (halts, rollbacks, first-healthy times),
        only if it changed, only if it still runs the stored commit, only while we lead."""
        from mobykit.group.store.state import apply_snapshot, snapshot

        with self._persist_lock:
            with self._lock:
                ctl, rec, wall = self._groups.get(id), self._records.get(id), self._walls.get(id)
                applied = self._applied.get(id)
            if ctl is None or rec is None or wall is None or applied != rec.commit:
                return  # freed, or a newer commit is on its way to the controller
            snap = snapshot(ctl, wall)
            if all(getattr(rec, k) == v for k, v in snap.items()):
                return
            new = apply_snapshot(rec, snap)
            guard = self.leadership.guard()
            try:
                ok = self.store.put(new, expect=rec.revision, guard=guard)
                if not ok:
                    fresh = self.store.get(id)
            except MobykitError as e:
                log.warning("cannot store the state of group=%s: %s", id, e)
                return
            with self._lock:
                if ok:
                    self._records[id] = new
                elif fresh is not None and fresh.revision >= self._records.get(id, rec).revision:
                    self._records[id] = fresh  # someone wrote since: the next pass compares with that

    def _store_write(self, id: str, change: Callable[[Any], Any]) -> Any:
        """Read-modify-write one record, compare-and-swap, retried on a concurrent writer."""
        for _ in range(20):
            cur = self.store.get(id)
            new = change(cur)
            if self.store.put(new, expect=cur.revision if cur is not None else 0):
                with self._lock:
                    self._records[id] = new
                return new
        raise Unavailable(f"store {self.store.url}: group {id!r} kept changing under this request; try again")

    def _commit_record(self, cfg: GroupConfig):
        from mobykit.group.store.base import GroupRecord
        from mobykit.group.store.state import config_of, spec_dict

        def change(cur):
            previous = None
            if cur is not None:
                previous = cur.spec if config_of(cur.spec).hash != cfg.hash else cur.previous
            return GroupRecord(id=cfg.id, spec=spec_dict(cfg.spec()), commit=uuid.uuid4().hex, previous=previous,
                               healthy_since=dict(cur.healthy_since) if cur is not None else {})
        return self._store_write(cfg.id, change)

    def _stored(self, id: str):
        with self._lock:
            rec = self._records.get(id)
        if rec is None:
            raise NotFound(f"group {id!r} is not managed here")
        return rec

    def _leader_only(self, what: str) -> None:
        if self.store is not None and not self._active_term:
            role = self.leadership.role()
            raise FailedPrecondition(f"{what}: this server is a follower; send it to the leader "
                                     f"({role.leader or 'none elected yet'})")

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
        if self.store is not None:
            rec = self._commit_record(cfg)  # stored first: it outlives this server from now on
            self._apply(rec, (instance, flavor))  # the leader acts now; a follower's leader, from its watch
            log.info("committed group=%s hash=%s plan=%r stored=%s", cfg.id, cfg.hash, plan, self.store.url)
            return f"Committed group {cfg.id} (config {cfg.hash}): {plan}"
        with self._lock:
            ctl = self._groups.get(cfg.id)
            if ctl is None:
                ctl = self._new_controller(cfg, instance, flavor)
                if self.run:
                    ctl.start()
            else:
                ctl.instance, ctl.flavor = instance, flavor
                ctl.update(cfg)
        log.info("committed group=%s hash=%s plan=%r", cfg.id, cfg.hash, plan)
        return f"Committed group {cfg.id} (config {cfg.hash}): {plan}"

    def free_group(self, id: str) -> None:
        if self.store is not None:
            self._stored(id)
            self.store.delete(id)
            with self._lock:
                self._records.pop(id, None)
                self._applied.pop(id, None)
                ctl = self._groups.pop(id, None)
            if ctl is not None:
                ctl.stop()
            return
        ctl = self._get(id)
        with self._lock:
            self._groups.pop(id, None)
        ctl.stop()

    def _config(self, id: str) -> tuple[GroupConfig, InstancePlugin, GroupController | None]:
        """The group's config and instance plugin: the local controller's, else the store's."""
        with self._lock:
            ctl = self._groups.get(id)
        if ctl is not None:
            return ctl.config, ctl.instance, ctl
        if self.store is None:
            raise NotFound(f"group {id!r} is not managed here")
        from mobykit.group.store.state import config_of

        cfg = config_of(self._stored(id).spec)
        return cfg, self._plugins(cfg)[0], None

    def describe_group(self, id: str) -> GroupDescription:
        cfg, instance, ctl = self._config(id)
        descs = instance.describe_instances(plugin_type(cfg.instance_plugin), {GROUP_TAG: id}, False)
        if ctl is not None:
            converged = ctl.status().converged
        else:  # a follower: all at the committed config and as many as asked (health is the leader's)
            converged = len(descs) == cfg.target and all((d.tags or {}).get(HASH_TAG) == cfg.hash for d in descs)
        return GroupDescription(instances=sorted(descs, key=lambda d: d.id), converged=converged)

    def destroy_group(self, id: str) -> None:
        if self.store is not None:
            self._leader_only(f"destroy group {id!r}")
            self._stored(id)
            self.store.delete(id)
            with self._lock:
                self._records.pop(id, None)
                self._applied.pop(id, None)
        ctl = self._get(id)
        with self._lock:
            self._groups.pop(id, None)
        ctl.stop()
        cfg = ctl.config
        itype = plugin_type(cfg.instance_plugin)
        for d in ctl.instance.describe_instances(itype, {GROUP_TAG: id}, False):
            if self.leadership is not None:
                self.leadership.check()
            ctl.instance.destroy(itype, d.id, DestroyReason.TERMINATE)

    def inspect_groups(self) -> list[GroupSpec]:
        if self.store is not None and not self._active_term:
            from mobykit.group.store.state import group_spec

            with self._lock:
                recs = sorted(self._records.items())
            return [group_spec(r.spec) for _, r in recs]
        with self._lock:
            ctls = sorted(self._groups.items())
        return [ctl.config.spec() for _, ctl in ctls]

    def destroy_instances(self, id: str, instances: list[str]) -> None:
        if self.store is not None:
            self._leader_only(f"destroy instances of group {id!r}")
        ctl = self._get(id)
        cfg = ctl.config
        known = {d.id for d in ctl.instance.describe_instances(plugin_type(cfg.instance_plugin), {GROUP_TAG: id}, False)}
        missing = [i for i in instances if i not in known]
        if missing:
            raise NotFound(f"group {id!r} has no instance {', '.join(missing)}")
        ctl.destroy_instances(list(dict.fromkeys(instances)))

    def size(self, id: str) -> int:
        return self._config(id)[0].target

    def set_size(self, id: str, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"size: must be a count >= 0, got {size!r}")
        cfg = self._config(id)[0]
        if cfg.quorum:
            raise FailedPrecondition(f"group {id!r} is sized by its LogicalIDs; commit a spec to change them")
        if self.store is None:
            self._get(id).set_size(size)
            return

        def change(cur):
            if cur is None:
                raise NotFound(f"group {id!r} is not managed here")
            new = cur.copy()
            props = new.spec.setdefault("Properties", {})
            props.setdefault("Allocation", {})["Size"] = size
            new.commit, new.gave_up = uuid.uuid4().hex, None
            return new
        self._apply(self._store_write(id, change))


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
