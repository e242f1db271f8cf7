"""Health as events: the group controller runs when its flavor says an instance's health changed,
not at its next poll; a lost event is caught by the slow poll; a burst of events is one pass.

Everything runs on a virtual clock through ``GroupController.tick`` (one turn of the loop without
waiting), so what is asserted is counts (passes by reason, listings, Healthy calls) and virtual
time, never wall time.
"""

from __future__ import annotations

import threading

from fakes import FakeWorld, group_spec

from mobykit.group.controller import GroupController, Options
from mobykit.group.spec import parse
from mobykit.group.wake import COMMIT, DONE, HEALTH, POLL, TIMER
from mobykit.spi.group import GroupSpec
from mobykit.spi.types import Health


def config(**kw):
    return parse(GroupSpec(**{k.lower(): v for k, v in group_spec(**kw).items()}))


def controller(world, cfg, *, inline=True, **opts):
    opts.setdefault("poll_interval", 60.0)
    opts.setdefault("idle_poll_interval", 600.0)
    return GroupController(cfg, world.instance, world.flavor, options=Options(**opts), clock=world.clock, inline=inline)


def settle(ctl):
    """Tick until nothing is pending (the passes that provisions/destroys woke), without moving time."""
    for _ in range(20):
        if ctl.tick() is None:
            return
    raise AssertionError("the controller keeps waking itself up")


class Watch:
    """Plays the moby flavor's console watch: after each step of the virtual clock, announces
    every instance whose health changed (``lose`` drops those announcements, as a lost event)."""

    def __init__(self, world):
        self.w = world
        self.seen: dict[str, Health] = {}
        self.lose = False

    def step(self):
        changed = []
        for inst in list(self.w.instances.values()):
            h = self.w.health(inst)
            if self.seen.get(inst.id) != h:
                self.seen[inst.id] = h
                changed.append(inst.id)
        if changed and not self.lose:
            self.w.flavor.announce(*changed)
        return changed


def test_a_readiness_event_wakes_the_controller_without_a_poll():
    w = FakeWorld(boot_seconds=3)
    ctl = controller(w, config(size=3))
    assert ctl.tick() == {COMMIT}  # the first pass provisions all 3 (inline)
    settle(ctl)
    assert not ctl.status().converged
    w.clock.advance(3)  # booted: the fake flavor would now say HEALTHY, if asked
    assert ctl.tick() is None  # nobody asks: the poll is 60 s away
    listings = w.describe_calls
    w.flavor.announce(*sorted(w.instances))
    assert ctl.tick() == {HEALTH}
    assert ctl.status().converged
    assert w.describe_calls == listings + 1
    assert ctl.passes[POLL] == 0


def test_a_lost_event_is_caught_by_the_slow_poll():
    w = FakeWorld(boot_seconds=3)
    ctl = controller(w, config(size=3))
    ctl.tick()
    settle(ctl)
    start = w.clock()
    w.clock.advance(3)
    passes = ctl.passes["total"]
    while not ctl.status().converged:  # no event ever comes
        ctl.tick()
        w.clock.advance(1)
        assert w.clock() - start < 120
    assert ctl.passes["total"] == passes + 1  # nothing ran between the last wake-up and the poll
    assert ctl.passes[POLL] == 1 and ctl.passes[HEALTH] == 0
    assert w.clock() - start >= 60 - 1  # the poll, not anything sooner, found it


def test_a_hundred_instances_turning_healthy_at_once_are_one_pass():
    w = FakeWorld(boot_seconds=3)
    ctl = controller(w, config(size=100))
    ctl.tick()
    settle(ctl)
    w.clock.advance(3)
    listings, asked = w.describe_calls, w.flavor.healthy_calls
    ids = sorted(w.instances)
    w.flavor.announce(*ids)
    w.flavor.announce(*ids)  # watches may repeat themselves
    assert ctl.tick() == {HEALTH}
    assert ctl.tick() is None  # 200 events, one pass
    assert ctl.status().converged and ctl.status().healthy == 100
    assert w.describe_calls == listings + 1
    assert w.flavor.healthy_calls == asked + 100  # one Healthy per instance, not per event


def test_events_about_other_instances_do_not_wake_the_group():
    w = FakeWorld()
    ctl = controller(w, config(size=2))
    ctl.tick()
    settle(ctl)
    w.flavor.announce("i-999999", "someone-elses")
    assert ctl.tick() is None
    assert ctl.passes[HEALTH] == 0


def test_an_idle_group_polls_slowly_once_converged_and_only_with_events():
    """The idle cost as a count: over an hour of virtual time a converged group whose flavor sends
    events lists its instances every idle_poll_interval; without events, every poll_interval."""
    for events, polls in ((True, 3600 / 600), (False, 3600 / 60)):
        w = FakeWorld(boot_seconds=0)
        if not events:
            w.flavor.subscribe_health = None  # a flavor over the wire has no events
        ctl = controller(w, config(size=3))
        ctl.tick()
        settle(ctl)
        Watch(w).step()
        w.flavor.announce(*w.instances)
        settle(ctl)
        if not events:  # the poll has to find them healthy
            w.clock.advance(60)
            ctl.tick()
        assert ctl.status().converged
        listings, asked = w.describe_calls, w.flavor.healthy_calls
        for _ in range(3600):
            w.clock.advance(1)
            ctl.tick()
        assert w.describe_calls - listings == polls
        assert w.flavor.healthy_calls - asked == 3 * polls


def test_a_roll_runs_as_fast_as_the_machines_boot():
    """Roll 3 with MaxSurge 1, MaxUnavailable 0, MinReadySeconds 3 on 3 s boots: each wave is a
    boot plus MinReadySeconds in virtual time, with no poll involved: the readiness event starts
    the MinReadySeconds timer, the timer destroys the old one, and the destroy's return starts
    the next provision, each in the pass it wakes."""
    w = FakeWorld(boot_seconds=3)
    watch = Watch(w)
    ctl = controller(w, config(size=3))
    ctl.tick()
    settle(ctl)
    w.clock.advance(3)
    watch.step()
    settle(ctl)
    assert ctl.status().converged
    v2 = config(size=3, version="v2", updating={"MaxSurge": 1, "MaxUnavailable": 0, "MinReadySeconds": 3})
    ctl.update(v2)
    t0, dt = w.clock(), 0.05
    while True:
        settle(ctl)
        if ctl.status().converged and ctl.config.hash == v2.hash:
            break
        w.clock.advance(dt)
        watch.step()
        assert w.clock() - t0 < 100
    took = w.clock() - t0
    assert 3 * (3 + 3) <= took <= 3 * (3 + 3) + 3 * 2 * dt + 1e-6
    assert ctl.passes[POLL] == 0
    assert ctl.passes[TIMER] == 3 and ctl.passes[HEALTH] >= 3
    # Each old one was destroyed in the pass its replacement became ready, and the next
    # replacement was provisioned at the same virtual instant.
    events = [(e.op, e.time) for e in w.events if e.op in ("provision", "destroy") and e.time >= t0]
    destroys = [t for op, t in events if op == "destroy"]
    provisions = [t for op, t in events if op == "provision"]
    assert len(destroys) == 3 and len(provisions) == 3
    assert provisions[1] == destroys[0] and provisions[2] == destroys[1]


def test_the_thread_wakes_on_a_readiness_event():
    """The real loop (its own thread) waits for a 1-hour poll, yet a readiness event runs it."""
    w = FakeWorld(boot_seconds=3)
    ctl = controller(w, config(size=3), inline=False, poll_interval=3600.0, idle_poll_interval=3600.0)
    ctl.start()
    try:
        assert _wait(lambda: len(w.instances) == 3 and ctl.passes[DONE] >= 1)
        assert not ctl.status().converged
        w.clock.advance(3)
        w.flavor.announce(*sorted(w.instances))
        assert _wait(lambda: ctl.status().converged)
        assert ctl.passes[POLL] == 0 and ctl.passes[HEALTH] >= 1
    finally:
        ctl.stop()
    assert w.flavor.listeners == []  # stopping unsubscribed it


def _wait(cond, limit: float = 30.0) -> bool:
    """Wait for a condition the controller's thread makes true (a bound on a hang, not a timing)."""
    done = threading.Event()
    for _ in range(int(limit / 0.01)):
        if cond():
            return True
        done.wait(0.01)
    return cond()
