"""The controller of one group: observe through the Instance plugin, plan, act, repeat.

Stateless by design: the tags on the instances (group, config hash, logical id) are the only
truth, so a controller that restarts with the same commit picks up exactly where the last one
stopped, including in the middle of a rolling update. What it keeps in memory is only what can be
lost safely: the committed spec, the previous one (for rollback), when each new instance was
first seen healthy (lost = wait MinReadySeconds again), what it has in flight, and its back-off.

It wakes on a commit, a size change, a finished provision/destroy, or a health change its flavor
reports (``subscribe_health``: the moby flavor's console watch), so it reacts within the time of one
plugin call (``wake.py``); many wake-ups before the next pass are one pass. It also re-checks every
``poll_interval`` seconds (``idle_poll_interval`` once converged, when its flavor reports health:
a lost event is still caught, later), and at the exact moment a MinReadySeconds or a back-off runs out.

Never double-provisions: a Provision that is running, or that returned after the listing in hand
was started, is counted as a member ("provisional") until a later listing shows it. Instances
whose Drain/Destroy is in flight still count against the surge bound but no longer as available.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from mobykit.errors import InProgress
from mobykit.group.model import BOOTSTRAP, GROUP_TAG, HASH_TAG, LOGICAL_ID_TAG, Member, Plan, Removal
from mobykit.group.quorum import plan_quorum
from mobykit.group.scaler import plan_scaled
from mobykit.group.spec import GroupConfig, plugin_type
from mobykit.group.wake import COMMIT, DONE, HEALTH, HealthSubscription, Pacer
from mobykit.spi.flavor import FlavorPlugin
from mobykit.spi.instance import InstancePlugin
from mobykit.spi.types import Description, DestroyReason, Health, Index, Spec

log = logging.getLogger("mobykit.group")


@dataclass
class Options:
    """Controller settings (the server's config, not the group spec)."""

    poll_interval: float = 5.0
    # The poll of a converged group whose flavor reports health changes (changes arrive as events;
    # this only catches a lost one, or an instance removed behind the controller's back).
    idle_poll_interval: float = 30.0
    max_parallel: int = 32  # concurrent provisions/destroys per group (Infrakit: unlimited); a cloud group of 20 converges in one wave
    self_logical_id: str | None = None  # the instance this controller runs on: never destroyed
    self_id: str | None = None
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_failures: int = 5  # provisions failing in a row before the group stops trying


@dataclass
class Status:
    """What the group is doing, for describe/CLI/metrics."""

    group: str
    hash: str
    target: int
    instances: int = 0
    by_config: dict[str, int] = field(default_factory=dict)
    healthy: int = 0
    unhealthy: int = 0
    ready_new: int = 0
    provisioning: int = 0
    destroying: int = 0
    updating: bool = False
    step: str = "starting"
    halted: str | None = None
    gave_up: str | None = None
    rolled_back_from: str | None = None
    converged: bool = False
    provisions: int = 0
    failures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.copy(v) for k, v in self.__dict__.items()}


class _Noop:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


class GroupController:
    def __init__(
        self,
        config: GroupConfig,
        instance: InstancePlugin,
        flavor: FlavorPlugin,
        *,
        options: Options | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = None,
        inline: bool = False,
    ):
        self.options = options or Options()
        self.instance = instance
        self.flavor = flavor
        self.clock = clock
        self.metrics = metrics or _Noop()
        self.inline = inline  # act synchronously inside reconcile() (deterministic tests)
        self._lock = threading.RLock()
        self._pacer = Pacer()  # passes by what caused them: self._pacer.passes (wake.py)
        self._wake = self._pacer.wake
        self.passes = self._pacer.passes
        self._health = HealthSubscription(self._is_member, lambda: self.wake(HEALTH))
        self._known: frozenset[str] = frozenset()  # the ids of the last listing (for health events)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._config = config
        self._previous: GroupConfig | None = None
        self._halted: str | None = None
        self._rolled_back_from: str | None = None
        self._healthy_since: dict[str, float] = {}
        self._seq = 0  # orders completions against listings
        self._provisioning: dict[int, str | None] = {}  # token -> logical id, call running
        self._provisioned: dict[str, tuple[int, str, str | None]] = {}  # id -> (seq, hash, lid)
        self._leaving: set[str] = set()
        self._destroyed: dict[str, int] = {}  # id -> seq the destroy returned at
        self._token = 0
        self._failures = 0
        self._retry_at = 0.0
        self._gave_up: str | None = None
        self._next_wake: float | None = None
        self._status = Status(config.id, config.hash, config.target)
        self._generation = 0  # bumped by every commit/resize: a pass that began before is stale
        # Hooks for the server (mobykit.group.plugin): ``guard`` raises NotLeader when this server may
        # not act (called before every provision and destroy); ``on_change`` persists after each pass.
        self.guard: Callable[[], None] | None = None
        self.on_change: Callable[[], None] | None = None

    # -- what the plugin calls ------------------------------------------------------------------

    @property
    def config(self) -> GroupConfig:
        with self._lock:
            return self._config

    def update(self, config: GroupConfig) -> None:
        """A new commit: becomes the desired state; the old one is kept for ``Rollback: auto``."""
        with self._lock:
            if config.hash != self._config.hash:
                self._previous = self._config
                self._rolled_back_from = None
            self._config = config
            self._generation += 1
            self._status.converged = False
            self._halted = None
            self._gave_up = None
            self._failures = 0
            self._retry_at = 0.0
        self.wake()

    def set_size(self, size: int) -> None:
        with self._lock:
            props = copy.deepcopy(self._config.properties)
            props.setdefault("Allocation", {})["Size"] = size
            self._config = replace(self._config, size=size, properties=props)
            self._generation += 1
            self._status.converged = False
            self._gave_up = None
            self._failures = 0
        self.wake()

    def status(self) -> Status:
        with self._lock:
            return replace(self._status, by_config=dict(self._status.by_config))

    def wake(self, reason: str = COMMIT) -> None:
        self._wake.set(reason)

    def _is_member(self, instance_id: str) -> bool:
        return instance_id in self._known or instance_id in self._provisioned

    def start(self) -> None:
        if self._thread is not None:
            return
        self._health.follow(self.flavor)
        self._pool = ThreadPoolExecutor(self.options.max_parallel, thread_name_prefix=f"group-{self._config.id}")
        self._thread = threading.Thread(target=self._loop, name=f"group-{self._config.id}", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop acting. Calls in flight finish (a Provision cannot be taken back halfway)."""
        self._stop.set()
        self._health.cancel()
        self._wake.set()
        if self._thread is not None and wait:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a plugin that is down must not kill the controller
                log.exception("reconcile failed group=%s", self._config.id)
            self._wake.wait(max(0.0, self._due() - self.clock()))

    def tick(self) -> frozenset[str] | None:
        """One turn of the loop, without waiting: a pass when something woke the controller or its
        poll or a timer is due by ``clock``. Returns why the pass ran, None when none ran (tests
        drive this with a virtual clock; the thread calls it between waits)."""
        if not self._stop.is_set():
            self._health.follow(self.flavor)  # a commit may have named another flavor
        reasons = self._pacer.take(self.clock(), self._poll_interval(), self._next_wake)
        if reasons:
            log.debug("pass group=%s reasons=%s", self._config.id, ",".join(sorted(reasons)))
            self.reconcile()
        return reasons

    def _poll_interval(self) -> float:
        o = self.options
        if self._health.live and self._status.converged:
            return max(o.poll_interval, o.idle_poll_interval)
        return o.poll_interval

    def _due(self) -> float:
        return self._pacer.due(self.clock(), self._poll_interval(), self._next_wake)

    # -- one pass -------------------------------------------------------------------------------

    def observe(self, cfg: GroupConfig) -> list[Member]:
        """List the group and classify every instance; adopt ``bootstrap`` ones."""
        itype, ftype = plugin_type(cfg.instance_plugin), plugin_type(cfg.flavor_plugin)
        with self._lock:
            listing_seq = self._seq
        listed = self.instance.describe_instances(itype, {GROUP_TAG: cfg.id}, False)
        now = self.clock()
        members: list[Member] = []
        seen: set[str] = set()
        with self._lock:
            destroyed = dict(self._destroyed)
            leaving = set(self._leaving)
        min_ready = cfg.updating.min_ready(self.options.poll_interval)
        next_wake = None
        healthy_since = self._healthy_since
        for d in listed:
            seen.add(d.id)
            if d.id in destroyed:
                # Our Destroy returned: it is gone even if the cloud still lists it for a while
                # (shutting down), so it is neither counted nor replaced twice.
                continue
            m = Member.from_description(d)
            if m.hash == BOOTSTRAP:
                self.instance.label(itype, d.id, {HASH_TAG: cfg.hash})
                m.hash = cfg.hash
                log.info("adopted group=%s instance=%s hash=%s", cfg.id, d.id, cfg.hash)
            m.leaving = d.id in leaving
            try:
                m.health = Health(self.flavor.healthy(ftype, cfg.flavor_properties, d))
            except Exception as e:  # a flavor that cannot tell is not a verdict
                log.warning("health check failed group=%s instance=%s error=%s", cfg.id, d.id, e)
                m.health = Health.UNKNOWN
            if m.health == Health.HEALTHY:
                since = healthy_since.setdefault(d.id, now)
                if m.hash != cfg.hash or now - since >= min_ready:
                    m.ready = True
                else:
                    wake_at = since + min_ready
                    next_wake = wake_at if next_wake is None else min(next_wake, wake_at)
            else:
                healthy_since.pop(d.id, None)
            members.append(m)
        with self._lock:
            # A provision still running may already be listed (the cloud made it before the listing
            # read; the call has not returned): a listed instance at this config that is new since
            # the last listing and no returned provision explains stands for one running provision.
            fresh = [m for m in members if m.hash == cfg.hash and m.id not in self._known and m.id not in self._provisioned]
            for gone in [i for i in healthy_since if i not in seen]:
                del healthy_since[gone]
            for i, seq in list(self._destroyed.items()):
                if seq <= listing_seq and i not in seen:
                    del self._destroyed[i]  # a listing begun after the destroy no longer shows it
            for i, (seq, h, lid) in list(self._provisioned.items()):
                if i in seen or seq <= listing_seq:  # returned before this listing began: it is in it
                    del self._provisioned[i]
                else:
                    members.append(Member(id=i, hash=h, logical_id=lid, provisional=True))
            for token, lid in self._provisioning.items():
                listed_already = next((m for m in fresh if m.logical_id == lid), None)
                if listed_already is not None:
                    fresh.remove(listed_already)
                    continue
                members.append(Member(id=f"(provisioning #{token})", hash=cfg.hash, logical_id=lid, provisional=True))
            self._next_wake = next_wake
            self._known = frozenset(seen)
        return members

    def destroy_instances(self, ids: list[str]) -> None:
        """Remove these members for good (the caller's thread, synchronously): they are marked as
        leaving before the target shrinks, so the controller never picks other victims meanwhile."""
        cfg = self.config
        with self._lock:
            self._leaving.update(ids)
            if not cfg.quorum:
                self.set_size(max(0, cfg.size - len(ids)))
                cfg = self.config
        try:
            for mid in ids:
                with self._lock:
                    self._leaving.discard(mid)
                self._remove(cfg, Removal(Member(id=mid, hash=None), DestroyReason.TERMINATE), raise_errors=True)
        finally:
            with self._lock:
                self._leaving.difference_update(ids)
            self.wake()

    def _is_self(self, m: Member) -> bool:
        o = self.options
        return bool((o.self_id and m.id == o.self_id) or (o.self_logical_id and m.logical_id == o.self_logical_id))

    def plan(self, cfg: GroupConfig, members: list[Member]) -> Plan:
        if cfg.quorum:
            return plan_quorum(members, logical_ids=cfg.logical_ids, current_hash=cfg.hash,
                               halted=self._halted is not None, is_self=self._is_self)
        return plan_scaled(
            members,
            target=cfg.size,
            current_hash=cfg.hash,
            surge=cfg.updating.max_surge.resolve(cfg.size),
            unavailable=cfg.updating.max_unavailable.resolve(cfg.size),
            halted=self._halted is not None,
            is_self=self._is_self,
        )

    def reconcile(self) -> Status:
        """One pass: observe, plan, act (in the pool, or inline). Returns the status after it."""
        with self._lock:
            cfg, generation = self._config, self._generation
        t0 = time.process_time()
        members = self.observe(cfg)
        plan = self.plan(cfg, members)
        if plan.halt and self._halted is None:
            self._halt(cfg, plan.halt)
            if self.config is not cfg:  # rolled back: plan again against the previous config
                cfg = self.config
                plan = self.plan(cfg, members)
        creates = self._admit_creates(plan.create)
        plan.create = creates
        self._update_status(cfg, members, plan, generation)
        self.metrics.reconciled(cfg.id, time.process_time() - t0)
        if self.on_change is not None:
            self.on_change()  # a halt or rollback is stored before anything acts on it
        for r in plan.remove:
            self._start_remove(cfg, r)
        base = sum(1 for m in members if not m.leaving)
        for i, lid in enumerate(creates):
            self._start_provision(cfg, lid, base + i + 1)
        return self.status()

    def _halt(self, cfg: GroupConfig, why: str) -> None:
        with self._lock:
            prev = self._previous
            if cfg.updating.rollback and prev is not None:
                log.warning("rolling back group=%s from=%s to=%s reason=%r", cfg.id, cfg.hash, prev.hash, why)
                # Re-commit the previous config, at the size asked for now.
                props = copy.deepcopy(prev.properties)
                props["Allocation"] = copy.deepcopy(cfg.properties.get("Allocation"))
                self._config = replace(prev, properties=props, size=cfg.size, logical_ids=list(cfg.logical_ids))
                self._previous = None
                self._rolled_back_from = cfg.hash
                self._halted = None
                self.metrics.rollback(cfg.id)
            else:
                extra = "" if not cfg.updating.rollback else " (no previous config to roll back to)"
                self._halted = f"rolling update halted: {why}{extra}; commit a fixed spec to continue"
                log.warning("halted group=%s hash=%s reason=%r", cfg.id, cfg.hash, why)

    def _admit_creates(self, wanted: list[str | None]) -> list[str | None]:
        """Apply the back-off: after a failure, one probe at a time and only when its time comes."""
        if not wanted:
            return []
        with self._lock:
            if self._gave_up:
                return []
            if self._failures:
                now = self.clock()
                if now < self._retry_at:
                    self._next_wake = self._retry_at if self._next_wake is None else min(self._next_wake, self._retry_at)
                    return []
                if self._provisioning:
                    return []
                return wanted[:1]
            return wanted

    # -- actions ----------------------------------------------------------------------------------

    def _run(self, fn: Callable[[], None]) -> None:
        if self.inline or self._pool is None:
            fn()
        else:
            self._pool.submit(fn)

    def _start_provision(self, cfg: GroupConfig, lid: str | None, sequence: int) -> None:
        with self._lock:
            self._token += 1
            token = self._token
            self._provisioning[token] = lid
        self._run(lambda: self._provision(cfg, lid, sequence, token))

    def _provision(self, cfg: GroupConfig, lid: str | None, sequence: int, token: int) -> None:
        tags = {GROUP_TAG: cfg.id, HASH_TAG: cfg.hash}
        if lid:
            tags[LOGICAL_ID_TAG] = lid
        iid = None
        error: Exception | None = None
        try:
            spec = Spec(properties=copy.deepcopy(cfg.instance_properties), tags=dict(tags), logical_id=lid)
            spec = self.flavor.prepare(plugin_type(cfg.flavor_plugin), cfg.flavor_properties, spec,
                                       cfg.allocation, Index(cfg.id, sequence))
            spec.tags = {**(spec.tags or {}), **tags}  # ours win: they are the group's only state
            if lid:
                spec.logical_id = lid
            if self.guard is not None:
                self.guard()
            iid = self.instance.provision(plugin_type(cfg.instance_plugin), spec)
        except Exception as e:
            error = e
        finally:
            with self._lock:
                self._provisioning.pop(token, None)
                self._seq += 1
                if iid is not None:
                    self._provisioned[iid] = (self._seq, cfg.hash, lid)
                    self._failures = 0
                    self._status.provisions += 1
                elif isinstance(error, InProgress):
                    # The flavor is still making what this provision needs (a cold image build):
                    # ask again at the next poll, without counting it towards giving up.
                    self._retry_at = max(self._retry_at, self.clock() + self.options.poll_interval)
                    log.info("provision waits group=%s: %s", cfg.id, error)
                elif error is not None:
                    self._record_failure(cfg, error)
            self.wake(DONE)
        if iid is not None:
            log.info("provisioned group=%s instance=%s hash=%s logical_id=%s", cfg.id, iid, cfg.hash, lid)
            self.metrics.provisioned(cfg.id, True)

    def _record_failure(self, cfg: GroupConfig, error: Exception) -> None:
        o = self.options
        self._failures += 1
        self._status.failures += 1
        delay = min(o.backoff_max, o.backoff_initial * 2 ** (self._failures - 1))
        self._retry_at = self.clock() + delay
        self.metrics.provisioned(cfg.id, False)
        log.warning("provision failed group=%s failures=%d retry_in=%.1fs error=%s", cfg.id, self._failures, delay, error)
        if self._failures >= o.max_failures:
            self._gave_up = (f"stopped provisioning after {self._failures} failures in a row; last: {error}; "
                             "commit again or change the size to retry")
            log.error("gave up group=%s reason=%r", cfg.id, self._gave_up)

    def _start_remove(self, cfg: GroupConfig, removal: Removal) -> None:
        mid = removal.member.id
        with self._lock:
            if mid in self._leaving:
                return
            self._leaving.add(mid)
        self._run(lambda: self._remove(cfg, removal))

    def _remove(self, cfg: GroupConfig, removal: Removal, raise_errors: bool = False) -> None:
        m = removal.member
        with self._lock:
            self._leaving.add(m.id)
        ok = False
        try:
            if self.guard is not None:
                self.guard()
            desc = m.description or Description(id=m.id)
            # Infrakit's SkipBeforeInstanceDestroy "drain": a rolling update destroys without
            # draining (a termination, e.g. scale down, still drains).
            if not (cfg.updating.skip_drain and removal.reason == DestroyReason.ROLLING_UPDATE):
                self.flavor.drain(plugin_type(cfg.flavor_plugin), cfg.flavor_properties, desc)
            self.instance.destroy(plugin_type(cfg.instance_plugin), m.id, removal.reason)
            ok = True
        except Exception as e:
            log.warning("destroy failed group=%s instance=%s error=%s", cfg.id, m.id, e)
            self.metrics.destroy_failed(cfg.id)
            if raise_errors:
                raise
        finally:
            with self._lock:
                self._leaving.discard(m.id)
                self._seq += 1
                if ok:
                    self._destroyed[m.id] = self._seq
                    self._healthy_since.pop(m.id, None)
            self.wake(DONE)
        if ok:
            log.info("destroyed group=%s instance=%s reason=%s", cfg.id, m.id, removal.reason.value)
            self.metrics.destroyed(cfg.id, removal.reason.value)

    def _update_status(self, cfg: GroupConfig, members: list[Member], plan: Plan, generation: int) -> None:
        with self._lock:
            s = self._status
            s.group, s.hash, s.target = cfg.id, cfg.hash, cfg.target
            listed = [m for m in members if not m.provisional]
            s.instances = len(listed)
            s.by_config = {}
            for m in listed:
                s.by_config[m.hash or "?"] = s.by_config.get(m.hash or "?", 0) + 1
            s.healthy = sum(1 for m in listed if m.health == Health.HEALTHY)
            s.unhealthy = sum(1 for m in listed if m.health == Health.UNHEALTHY)
            s.ready_new = sum(1 for m in listed if m.ready and m.hash == cfg.hash)
            s.provisioning = sum(1 for m in members if m.provisional) + len(plan.create)
            s.destroying = sum(1 for m in members if m.leaving) + len(plan.remove)
            s.updating = plan.updating
            s.halted = self._halted
            s.gave_up = self._gave_up
            s.rolled_back_from = self._rolled_back_from
            s.step = self._gave_up or self._halted or plan.step
            if self._rolled_back_from and not self._halted:
                s.step = f"rolled back from {self._rolled_back_from}: {plan.step}"
            s.converged = plan.converged and generation == self._generation
            self.metrics.observe(s, members)
