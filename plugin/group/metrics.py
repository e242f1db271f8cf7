"""Prometheus metrics of the group controllers, in a registry the server exposes on /metrics.

Gauges are set from each pass's observation (so they are the provider's truth, not counters that
drift), counters count the calls made. The registry is our own, not prometheus_client's global
one, so that several servers (or tests) in one process do not collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mobykit.spi.types import Health


class GroupMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.instances = Gauge("mobykit_group_instances", "Instances of a group by config hash and health",
                               ["group", "config", "health"], registry=r)
        self.target = Gauge("mobykit_group_target_size", "Target size of a group", ["group"], registry=r)
        self.update_progress = Gauge("mobykit_group_update_progress",
                                     "Fraction of the target that is ready at the committed config (1 = done)",
                                     ["group"], registry=r)
        self.updating = Gauge("mobykit_group_updating", "1 while some instance has another config", ["group"], registry=r)
        self.halted = Gauge("mobykit_group_halted", "1 while a rolling update is halted or provisioning gave up",
                            ["group"], registry=r)
        self.provisions = Counter("mobykit_group_provisions", "Provision calls by result", ["group", "result"], registry=r)
        self.destroys = Counter("mobykit_group_destroys", "Instances destroyed by reason", ["group", "reason"], registry=r)
        self.failures = Counter("mobykit_group_failures", "Failed plugin calls by operation", ["group", "op"], registry=r)
        self.rollbacks = Counter("mobykit_group_rollbacks", "Automatic rollbacks", ["group"], registry=r)
        self.reconcile_cpu = Histogram("mobykit_group_reconcile_cpu_seconds", "CPU time of one reconcile pass",
                                       ["group"], registry=r,
                                       buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
        self._seen: dict[str, set[tuple[str, str]]] = {}

    def observe(self, status: Any, members: list) -> None:
        group = status.group
        counts: dict[tuple[str, str], int] = {}
        for m in members:
            if m.provisional:
                continue
            key = (m.hash or "", Health(m.health).name.lower())
            counts[key] = counts.get(key, 0) + 1
        for key in self._seen.get(group, set()) - set(counts):
            self.instances.remove(group, *key)  # a config that is gone should not linger at its last value
        for (config, health), n in counts.items():
            self.instances.labels(group, config, health).set(n)
        self._seen[group] = set(counts)
        self.target.labels(group).set(status.target)
        self.update_progress.labels(group).set(status.ready_new / status.target if status.target else 1.0)
        self.updating.labels(group).set(1 if status.updating else 0)
        self.halted.labels(group).set(1 if (status.halted or status.gave_up) else 0)

    def provisioned(self, group: str, ok: bool) -> None:
        self.provisions.labels(group, "ok" if ok else "failed").inc()
        if not ok:
            self.failures.labels(group, "provision").inc()

    def destroyed(self, group: str, reason: str) -> None:
        self.destroys.labels(group, reason).inc()

    def destroy_failed(self, group: str) -> None:
        self.failures.labels(group, "destroy").inc()

    def rollback(self, group: str) -> None:
        self.rollbacks.labels(group).inc()

    def reconciled(self, group: str, cpu_seconds: float) -> None:
        self.reconcile_cpu.labels(group).observe(cpu_seconds)
