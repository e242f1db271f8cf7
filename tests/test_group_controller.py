"""The group controller against Infrakit-style fake plugins on a virtual clock (deterministic)."""

from __future__ import annotations

import pytest
from fakes import Crash, FakeWorld, group_spec

from mobykit.group.controller import GroupController, Options
from mobykit.group.spec import parse
from mobykit.spi.group import GroupSpec


def config(**kw):
    return parse(GroupSpec(**{k.lower(): v for k, v in group_spec(**kw).items()}))


def controller(world, cfg, **opts):
    opts.setdefault("poll_interval", 1.0)
    opts.setdefault("backoff_initial", 1.0)
    return GroupController(cfg, world.instance, world.flavor, options=Options(**opts), clock=world.clock, inline=True)


def run(ctl, world, *, until=None, steps=200, dt=0.5):
    """Reconcile, advance the virtual clock, repeat until ``until()`` or the status converges."""
    for _ in range(steps):
        st = ctl.reconcile()
        if (until() if until else st.converged):
            return st
        world.clock.advance(dt)
    raise AssertionError(f"did not settle: {ctl.status()}")


def hashes(world, group="workers"):
    return sorted(i.tags["infrakit.config.hash"] for i in world.group(group))


class Bounds:
    """Checks the rolling-update bounds after EVERY provision and destroy."""

    def __init__(self, world, size, surge, unavailable, group="workers"):
        self.size, self.surge, self.unavailable, self.group = size, surge, unavailable, group
        self.max_total = 0
        self.min_healthy = None
        self.violations: list[str] = []  # recorded, not raised: the controller catches plugin errors
        world.observers.append(self)

    def __call__(self, world, event):
        total = len(world.group(self.group))
        healthy = world.healthy_count(self.group)
        self.max_total = max(self.max_total, total)
        self.min_healthy = healthy if self.min_healthy is None else min(self.min_healthy, healthy)
        if total > self.size + self.surge:
            self.violations.append(f"{total} instances exist at {event}")
        if healthy < self.size - self.unavailable:
            self.violations.append(f"only {healthy} healthy at {event}")


def test_scale_up_from_zero_creates_all_at_once_with_tags_and_index():
    w = FakeWorld()
    cfg = config(size=4)
    st = run(controller(w, cfg), w)
    assert st.converged and st.instances == 4
    provisions = [e for e in w.events if e.op == "provision"]
    assert len(provisions) == 4
    assert len({e.time for e in provisions}) == 1  # all in the first pass, not one per poll
    for inst in w.group("workers"):
        assert inst.tags["infrakit.config.hash"] == cfg.hash
        assert inst.tags["role"] == "worker"  # the flavor's Prepare was applied
        assert inst.init == "echo hi"
    assert {i.group for i in w.flavor.prepared} == {"workers"}


def test_scale_down_removes_unhealthy_then_oldest_and_size_zero_removes_all():
    w = FakeWorld()
    ctl = controller(w, config(size=4))
    run(ctl, w)
    ids = sorted(w.instances)
    # Make the newest one unhealthy: it must go first, then the oldest.
    w.instances[ids[3]].properties = {"Image": "v1", "Broken": True}
    w.instances[ids[3]].created -= 100
    ctl.set_size(2)
    run(ctl, w, until=lambda: len(w.group("workers")) == 2)
    destroyed = [e.id for e in w.events if e.op == "destroy"]
    assert destroyed == [ids[3], ids[0]]
    assert all(e.reason == "terminate" for e in w.events if e.op == "destroy")
    ctl.set_size(0)
    st = run(ctl, w)
    assert w.group("workers") == [] and st.converged


def test_scale_down_never_destroys_self():
    w = FakeWorld()
    ctl = controller(w, config(size=3), self_id="i-000001")
    run(ctl, w)
    ctl.set_size(0)
    run(ctl, w, until=lambda: len(w.group("workers")) == 1)
    for _ in range(5):
        ctl.reconcile()
        w.clock.advance(1)
    assert [i.id for i in w.group("workers")] == ["i-000001"]


@pytest.mark.parametrize(
    "size,updating,surge,unavailable",
    [
        (5, {}, 1, 0),
        (10, {"MaxSurge": 2}, 2, 0),
        (6, {"MaxSurge": 0, "MaxUnavailable": 2}, 0, 2),
        (10, {"MaxSurge": "25%", "MaxUnavailable": "10%"}, 3, 1),  # percentages round up, as GCE
        (4, {"MaxSurge": 4, "MinReadySeconds": 5}, 4, 0),
    ],
)
def test_rolling_update_never_exceeds_surge_or_unavailable(size, updating, surge, unavailable):
    w = FakeWorld()
    ctl = controller(w, config(size=size, updating=updating))
    run(ctl, w)
    bounds = Bounds(w, size, surge, unavailable)
    new = config(size=size, version="v2", updating=updating)
    ctl.update(new)
    st = run(ctl, w, steps=1000)
    assert bounds.violations == []
    assert hashes(w) == [new.hash] * size
    assert st.converged
    assert bounds.max_total == size + surge or surge == 0  # the surge is actually used
    rolled = [e for e in w.events if e.op == "destroy"]
    assert len(rolled) == size and all(e.reason == "rolling_update" for e in rolled)
    drained = [e.id for e in w.events if e.op == "drain"]
    assert drained == [e.id for e in rolled]  # every old one drained before it was destroyed


def test_min_ready_seconds_gates_the_next_replacement():
    w = FakeWorld(boot_seconds=3)
    ctl = controller(w, config(size=2))
    run(ctl, w)
    ctl.update(config(size=2, version="v2", updating={"MaxSurge": 1, "MinReadySeconds": 20}))
    run(ctl, w, steps=1000)
    new_provs = [e for e in w.events if e.op == "provision"][2:]
    first_destroy = next(e for e in w.events if e.op == "destroy")
    # The first old instance goes only after the first new one has been healthy for 20 s.
    assert first_destroy.time - new_provs[0].time >= 3 + 20


def test_unhealthy_new_instance_halts_the_update_with_a_clear_status():
    w = FakeWorld(deadline_seconds=10)
    ctl = controller(w, config(size=3))
    run(ctl, w)
    old = hashes(w)
    ctl.update(config(size=3, version="v2", broken=True))
    st = run(ctl, w, until=lambda: ctl.status().halted is not None)
    assert "unhealthy" in st.halted and "i-000004" in st.halted
    for _ in range(20):
        ctl.reconcile()
        w.clock.advance(1)
    # Nothing old was touched and no more broken ones were made.
    assert [e.op for e in w.events].count("destroy") == 0
    assert [e.op for e in w.events].count("provision") == 4
    assert sum(1 for h in hashes(w) if h == old[0]) == 3
    # A fixed commit clears the halt and finishes.
    fixed = config(size=3, version="v3")
    ctl.update(fixed)
    run(ctl, w, steps=1000)
    assert hashes(w) == [fixed.hash] * 3


def test_rollback_auto_recommits_the_previous_config():
    w = FakeWorld(deadline_seconds=10)
    v1 = config(size=3)
    ctl = controller(w, v1)
    run(ctl, w)
    ctl.update(config(size=3, version="v2", broken=True, updating={"Rollback": "auto"}))
    st = run(ctl, w, steps=1000)
    assert st.converged and st.rolled_back_from is not None
    assert ctl.config.hash == v1.hash
    assert hashes(w) == [v1.hash] * 3
    assert "i-000004" not in w.instances  # the broken one was removed


def test_logical_ids_one_per_id_replaced_one_at_a_time():
    w = FakeWorld()
    lids = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    ctl = controller(w, config(logical_ids=lids))
    run(ctl, w)
    assert sorted(i.logical_id for i in w.group("workers")) == lids
    assert all(i.tags["infrakit.logical_id"] == i.logical_id for i in w.group("workers"))

    violations = []

    def one_per_id(world, event):
        held = [i.logical_id for i in world.group("workers")]
        if len(held) != len(set(held)):
            violations.append(f"an id is held twice at {event}")
        if world.healthy_count("workers") < 2:
            violations.append(f"quorum lost at {event}")

    w.observers.append(one_per_id)
    new = config(logical_ids=lids, version="v2")
    ctl.update(new)
    run(ctl, w, steps=1000)
    assert violations == []
    assert hashes(w) == [new.hash] * 3
    assert sorted(i.logical_id for i in w.group("workers")) == lids


def test_bootstrap_instances_are_adopted_not_replaced():
    w = FakeWorld()
    cfg = config(size=2)
    from mobykit.spi.types import Spec

    for _ in range(2):
        w.instance.provision("", Spec({"Image": "v1"}, {"infrakit.group": "workers", "infrakit.config.hash": "bootstrap"}))
    w.clock.advance(5)
    ctl = controller(w, cfg)
    st = run(ctl, w)
    assert st.converged
    assert hashes(w) == [cfg.hash] * 2
    assert [e.op for e in w.events].count("provision") == 2  # the two made above, none by the controller
    assert [e.op for e in w.events].count("destroy") == 0


def test_old_config_sha_tag_is_read():
    w = FakeWorld()
    cfg = config(size=1)
    from mobykit.spi.types import Spec

    w.instance.provision("", Spec({"Image": "v1"}, {"infrakit.group": "workers", "infrakit.config_sha": cfg.hash}))
    w.clock.advance(5)
    st = run(controller(w, cfg), w)
    assert st.converged and [e.op for e in w.events].count("provision") == 1


def test_failing_provisions_back_off_exponentially_then_give_up():
    w = FakeWorld()
    w.always_fail = True
    ctl = controller(w, config(size=3), backoff_initial=1.0, max_failures=5)
    attempts = []
    orig = w.instance.provision

    def spy(type, spec):
        attempts.append(w.clock())
        return orig(type, spec)

    w.instance.provision = spy
    run(ctl, w, until=lambda: ctl.status().gave_up is not None, dt=0.25, steps=2000)
    # The first pass tries all 3, then one probe at a time with doubling gaps (1, 2 s).
    gaps = [b - a for a, b in zip(attempts[2:], attempts[3:], strict=False)]
    assert len(attempts) == 5
    assert gaps[0] >= 1 and gaps[1] >= 2
    assert "5 failures in a row" in ctl.status().gave_up
    for _ in range(40):
        ctl.reconcile()
        w.clock.advance(1)
    assert len(attempts) == 5  # it stopped trying
    w.always_fail = False
    ctl.set_size(3)  # the user acts: it tries again
    assert run(ctl, w).converged


def test_instance_lost_outside_is_replaced():
    w = FakeWorld()
    ctl = controller(w, config(size=3))
    run(ctl, w)
    w.instances.pop("i-000002")
    st = run(ctl, w)
    assert st.instances == 3 and "i-000004" in w.instances


@pytest.mark.parametrize("after", [False, True])
def test_crash_at_every_step_of_a_rolling_update_of_5(after):
    """Kill the controller at each plugin call of a rolling update and start a new one with the
    same commit: the update completes, capacity never drops below size - MaxUnavailable, and no
    instance is leaked or duplicated."""
    size = 5
    base = FakeWorld()
    v1, v2 = config(size=size), config(size=size, version="v2", updating={"MaxSurge": 1})
    run(controller(base, v1), base)
    # How many mutating calls does an uninterrupted update make?
    probe = FakeWorld()
    run(controller(probe, v1), probe)
    start = probe.calls
    c = controller(probe, v2)
    run(c, probe, steps=1000)
    steps = probe.calls - start
    assert steps >= 3 * size  # drain + destroy + provision per instance
    for k in range(steps):
        w = FakeWorld()
        run(controller(w, v1), w)
        bounds = Bounds(w, size, 1, 0)
        w.crash_at, w.crash_after = w.calls + k, after
        ctl = controller(w, v1)
        ctl.update(v2)
        crashed = False
        for _ in range(1000):
            try:
                st = ctl.reconcile()
            except Crash:
                crashed = True
                ctl = controller(w, v2)  # a new process, same commit, empty memory
                continue
            if st.converged:
                break
            w.clock.advance(0.5)
        assert crashed
        assert bounds.violations == [], f"crash at step {k}"
        assert hashes(w) == [v2.hash] * size, f"crash at step {k}"
        # Every instance ever made is either still there or was destroyed: nothing leaked.
        made = {e.id for e in w.events if e.op == "provision"}
        gone = {e.id for e in w.events if e.op == "destroy"}
        assert made - gone == set(w.instances)
        assert len(w.instances) == size


def test_rolling_update_resumes_after_restart_without_redoing_work():
    w = FakeWorld()
    v1, v2 = config(size=4), config(size=4, version="v2")
    run(controller(w, v1), w)
    ctl = controller(w, v2)
    run(ctl, w, until=lambda: hashes(w).count(v2.hash) == 2)
    ctl2 = controller(w, v2)  # restarted
    run(ctl2, w, steps=1000)
    assert hashes(w) == [v2.hash] * 4
    assert [e.op for e in w.events].count("provision") == 8


def test_scale_down_during_an_update_removes_old_config_first():
    w = FakeWorld()
    v1, v2 = config(size=4), config(size=4, version="v2")
    ctl = controller(w, v1)
    run(ctl, w)
    ctl.update(v2)
    run(ctl, w, until=lambda: hashes(w).count(v2.hash) == 2 and len(w.group("workers")) == 4)
    ctl.update(config(size=2, version="v2"))
    run(ctl, w)
    assert hashes(w) == [v2.hash] * 2
    late = [e for e in w.events if e.op == "destroy"][-2:]
    assert all(e.hash == v1.hash for e in late)  # the old ones went, not the new ones


def test_quorum_update_leaves_self_for_another_manager():
    w = FakeWorld()
    lids = ["m1", "m2", "m3"]
    ctl = controller(w, config(logical_ids=lids), self_logical_id="m2")
    run(ctl, w)
    new = config(logical_ids=lids, version="v2")
    ctl.update(new)
    for _ in range(400):
        st = ctl.reconcile()
        w.clock.advance(0.5)
    by_lid = {i.logical_id: i.tags["infrakit.config.hash"] for i in w.group("workers")}
    assert by_lid["m1"] == by_lid["m3"] == new.hash
    assert by_lid["m2"] != new.hash
    assert "self" in st.step and not st.converged


def test_quorum_duplicate_holder_is_removed():
    w = FakeWorld()
    cfg = config(logical_ids=["a"])
    from mobykit.spi.types import Spec

    for _ in range(2):
        w.instance.provision("", Spec({"Image": "v1"}, {"infrakit.group": "workers", "infrakit.config.hash": cfg.hash},
                                      logical_id="a"))
    w.clock.advance(5)
    run(controller(w, cfg), w)
    assert [i.id for i in w.group("workers")] == ["i-000001"]  # the oldest is kept


def test_destroyed_instance_still_listed_for_a_while_is_not_counted():
    """Clouds list a terminated machine for a while (shutting down): the controller must not
    count it, or it would scale down a second, live one."""
    w = FakeWorld()
    ctl = controller(w, config(size=3))
    run(ctl, w)
    ghosts = {}
    real_destroy, real_describe = w.instance.destroy, w.instance.describe_instances

    def destroy(type, instance, reason):
        ghosts[instance] = next(d for d in real_describe(type, {}, False) if d.id == instance)
        real_destroy(type, instance, reason)

    def describe(type, tags, properties):
        return sorted(real_describe(type, tags, properties) + list(ghosts.values()), key=lambda d: d.id)

    w.instance.destroy, w.instance.describe_instances = destroy, describe
    ctl.set_size(2)
    for _ in range(10):
        ctl.reconcile()
        w.clock.advance(1)
    assert len(w.group("workers")) == 2
    ctl.set_size(3)  # more events pass while the ghost is still listed
    for _ in range(10):
        assert ctl.reconcile().instances <= 3  # the ghost is never counted as a member
        w.clock.advance(1)
    assert len(w.group("workers")) == 3
    assert [e.op for e in w.events].count("destroy") == 1


def test_an_image_still_building_is_waited_for_not_counted_as_a_failure():
    """The moby flavor answers InProgress while a cold build runs (longer than Infrakit's client
    timeout); the controller asks again each poll and never gives up because of it."""
    from mobykit.errors import InProgress

    w = FakeWorld()
    ctl = controller(w, config(size=3), backoff_initial=1.0, max_failures=2)
    building = {"left": 30}
    prepare = w.flavor.prepare

    def slow_build(*args):
        if building["left"] > 0:
            building["left"] -= 1
            raise InProgress("Properties.Image: the image is still being built (since ..., 12s): assembling")
        return prepare(*args)

    w.flavor.prepare = slow_build
    st = run(ctl, w, steps=400)
    assert st.converged and st.instances == 3
    assert ctl.status().gave_up is None
    assert ctl.status().failures == 0
    assert building["left"] == 0  # it really was asked again and again
