"""Planning for groups of named members (``Allocation.LogicalIDs``, Infrakit's quorum groups).

Each logical id (often an IP address or a volume) may be held by one instance only, so nothing can
surge: a replacement is destroy first, then create, one id at a time, and the next id waits until
the new holder is ready. That keeps a quorum (e.g. 3 managers) short of at most one member.
"""

from __future__ import annotations

from mobykit.group.model import Member, Plan, Removal, scale_down_order
from mobykit.group.rolling import failed_new
from mobykit.spi.types import DestroyReason


def plan_quorum(
    members: list[Member],
    *,
    logical_ids: list[str],
    current_hash: str,
    halted: bool,
    is_self=lambda m: False,
) -> Plan:
    wanted = set(logical_ids)
    plan = Plan()
    holders: dict[str, list[Member]] = {}
    for m in members:
        if m.logical_id in wanted:
            holders.setdefault(m.logical_id, []).append(m)
        elif not m.leaving and not m.provisional and not is_self(m):
            plan.remove.append(Removal(m, DestroyReason.TERMINATE))  # no longer wanted

    # Duplicates for one id: keep the best (current config, ready, oldest); remove the rest.
    for lid, ms in holders.items():
        live = [m for m in ms if not m.leaving]
        if len(live) > 1:
            keep = sorted(live, key=lambda m: (m.hash != current_hash, not m.ready, m.provisional is False, m.id))[0]
            for m in scale_down_order([m for m in live if m is not keep and not m.provisional], current_hash):
                if not is_self(m):
                    plan.remove.append(Removal(m, DestroyReason.TERMINATE))
            holders[lid] = [keep] + [m for m in ms if m.leaving]

    present = [m for ms in holders.values() for m in ms if not m.leaving]
    old = [m for m in present if m.hash != current_hash]
    plan.updating = bool(old)
    failed = failed_new(present, current_hash) if old else None
    if failed is not None:
        plan.halt = f"new instance {failed.id} ({failed.logical_id}) is unhealthy"
        halted = True

    # Missing ids are created once their previous holder is fully gone (an id is never shared).
    # While halted, only ids that lost their instance are refilled, so the quorum is not left short.
    missing = [lid for lid in logical_ids if not holders.get(lid)]
    plan.create = list(missing)

    busy = bool(missing) or any(m.leaving for ms in holders.values() for m in ms) or any(
        not m.ready for m in present if m.hash == current_hash)
    waiting_self = None
    if old and not halted and not busy:
        for lid in logical_ids:
            m = next((m for m in holders.get(lid, []) if not m.leaving), None)
            if m is None or m.hash == current_hash:
                continue
            if is_self(m):
                waiting_self = m
                continue
            plan.remove.append(Removal(m, DestroyReason.ROLLING_UPDATE))
            break

    ready = sum(1 for m in present if m.ready and m.hash == current_hash)
    n = len(logical_ids)
    if halted:
        plan.step = f"halted: {plan.halt}" if plan.halt else "halted"
    elif old:
        plan.step = (f"rolling update (one id at a time): {ready}/{n} ready at the new config"
                     + (f" (self {waiting_self.id} is left for another manager)" if waiting_self else ""))
    elif missing:
        plan.step = f"creating {', '.join(missing)}"
    elif ready < n:
        plan.step = f"waiting for health: {ready}/{n} ready"
    else:
        plan.step = f"converged: {n} logical ids"
    plan.converged = (not old and not missing and ready == n and len(members) == n and not plan.remove)
    return plan
