"""Planning for groups sized by a count (``Allocation.Size``): scale up, scale down, roll.

One rule covers all three, so there is no mode to get stuck in: make new-config instances up to
the target within the surge bound; remove other-config instances when they are unavailable anyway
or when availability allows; remove new-config instances beyond the target, worst first.
"""

from __future__ import annotations

from mobykit.group.model import Member, Plan, Removal, scale_down_order
from mobykit.group.rolling import budget, failed_new
from mobykit.spi.types import DestroyReason


def plan_scaled(
    members: list[Member],
    *,
    target: int,
    current_hash: str,
    surge: int,
    unavailable: int,
    halted: bool,
    is_self=lambda m: False,
) -> Plan:
    present = [m for m in members if not m.leaving]
    new = [m for m in present if m.hash == current_hash]
    old = [m for m in present if m.hash != current_hash]
    plan = Plan(updating=bool(old))
    b = budget(members, target, surge, unavailable, len(new))
    take = b.can_take

    # New-config instances beyond the target (a scale down): worst first, never one still in flight.
    surplus = len(new) - target
    if surplus > 0:
        for m in scale_down_order([m for m in new if not m.provisional], current_hash):
            if surplus <= 0:
                break
            if is_self(m):
                continue
            if m.ready:
                if take <= 0:
                    continue
                take -= 1
            plan.remove.append(Removal(m, DestroyReason.TERMINATE))
            surplus -= 1

    failed = failed_new(present, current_hash) if old else None
    if failed is not None:
        plan.halt = f"new instance {failed.id} is unhealthy"
        halted = True

    waiting_self = None
    if old and not halted:
        # Replace old ones: an unavailable one costs no capacity; an available one only if budget allows.
        for m in scale_down_order(old, current_hash):
            if is_self(m):
                waiting_self = m
                continue
            if m.ready:
                if take <= 0:
                    continue
                take -= 1
            plan.remove.append(Removal(m, DestroyReason.ROLLING_UPDATE))

    if not halted:
        plan.create = [None] * b.can_create

    ready_new = sum(1 for m in new if m.ready)
    if halted:
        plan.step = f"halted: {plan.halt}" if plan.halt else "halted"
    elif old:
        plan.step = (f"rolling update: {ready_new}/{target} ready at the new config, {len(old)} to replace"
                     + (f" (self {waiting_self.id} is left for another manager)" if waiting_self else ""))
    elif len(present) < target or plan.create:
        plan.step = f"scaling up: {len(present)}/{target}"
    elif plan.remove or len(present) > target:
        plan.step = f"scaling down: {len(present)} -> {target}"
    elif ready_new < target:
        plan.step = f"waiting for health: {ready_new}/{target} ready"
    else:
        plan.step = f"converged: {target} instances"
    plan.converged = (not old and len(members) == target and ready_new == target
                      and not plan.create and not plan.remove)
    return plan
