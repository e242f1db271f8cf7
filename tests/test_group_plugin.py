"""GroupPluginImpl with running controllers (real threads) over the real InstanceCore and the
memory provider: commit, pretend, describe, free, destroy, inspect, sizes, metrics."""

from __future__ import annotations

import time

import pytest
from fakes import ConsoleFlavor, group_spec

from mobykit.core.instance import InstanceCore
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound
from mobykit.group.controller import Options
from mobykit.group.metrics import GroupMetrics
from mobykit.group.plugin import GroupPluginImpl
from mobykit.providers.memory import MemoryProvider
from mobykit.spi.group import GroupSpec


def wait_for(cond, timeout=30.0):
    """Wait for a condition (a liveness bound, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def spec(**kw) -> GroupSpec:
    doc = group_spec(**kw)
    doc["Properties"]["Instance"]["Plugin"] = "mobykit/memory"
    # "Image" would name a built image to the core: use a plain property for the config version.
    props = doc["Properties"]["Instance"]["Properties"]
    props["Version"] = props.pop("Image")
    return GroupSpec(doc["ID"], doc["Properties"])


@pytest.fixture
def setup():
    provider = MemoryProvider({"provision_latency": 0.05, "boot_latency": 0.05})
    core = InstanceCore({"default_provider": "memory"}, providers={"memory": provider})
    flavor = ConsoleFlavor(provider)
    metrics = GroupMetrics()

    def instances(name):
        if name != "mobykit/memory":
            raise KeyError(name)
        return core

    plugin = GroupPluginImpl(instances, lambda name: flavor,
                             options=Options(poll_interval=0.02, backoff_initial=0.01), metrics=metrics)
    yield plugin, provider, metrics
    plugin.close()


def hashes(provider, group="workers"):
    return sorted(m.tags["infrakit.config.hash"] for m in provider.list({"infrakit.group": group}))


def test_commit_converges_without_double_provisioning(setup):
    plugin, provider, _ = setup
    reply = plugin.commit_group(spec(size=5), False)
    assert "create 5 instances" in reply
    wait_for(lambda: plugin.describe_group("workers").converged)
    # Many passes ran while Provisions (50 ms each) were in flight: still exactly 5 made.
    assert [e.op for e in provider.events].count("create") == 5
    assert len(plugin.describe_group("workers").instances) == 5


def test_pretend_explains_and_changes_nothing(setup):
    plugin, provider, _ = setup
    assert plugin.commit_group(spec(size=3), True).startswith("Would commit group workers")
    assert provider.list({}) == []
    with pytest.raises(NotFound):
        plugin.describe_group("workers")
    plugin.commit_group(spec(size=3), False)
    wait_for(lambda: plugin.describe_group("workers").converged)
    reply = plugin.commit_group(spec(size=3, version="v2"), True)
    assert "rolling update of 3 instances, surge 1, max unavailable 0" in reply
    assert len(set(hashes(provider))) == 1


def test_rolling_update_through_the_plugin(setup):
    plugin, provider, _ = setup
    plugin.commit_group(spec(size=3), False)
    wait_for(lambda: plugin.describe_group("workers").converged)
    new = spec(size=3, version="v2", updating={"MaxSurge": 2})
    reply = plugin.commit_group(new, False)
    assert "rolling update of 3 instances, surge 2" in reply
    from mobykit.group.spec import parse

    h = parse(new).hash
    wait_for(lambda: plugin.describe_group("workers").converged and hashes(provider) == [h] * 3)
    assert plugin.inspect_groups()[0].properties["Instance"]["Properties"]["Version"] == "v2"


def test_sizes_destroy_instances_free_and_destroy(setup):
    plugin, provider, _ = setup
    plugin.commit_group(spec(size=4), False)
    wait_for(lambda: plugin.describe_group("workers").converged)
    assert plugin.size("workers") == 4
    plugin.set_size("workers", 2)
    wait_for(lambda: plugin.describe_group("workers").converged)
    assert len(provider.list({})) == 2 and plugin.size("workers") == 2
    assert plugin.inspect_groups()[0].properties["Allocation"]["Size"] == 2
    victim = plugin.describe_group("workers").instances[1].id
    plugin.destroy_instances("workers", [victim])
    assert plugin.size("workers") == 1
    wait_for(lambda: plugin.describe_group("workers").converged)
    assert victim not in {m.id for m in provider.list({})} and len(provider.list({})) == 1
    with pytest.raises(NotFound):
        plugin.destroy_instances("workers", ["nope"])
    with pytest.raises(InvalidArgument):
        plugin.set_size("workers", -1)
    plugin.free_group("workers")
    assert plugin.inspect_groups() == [] and len(provider.list({})) == 1  # freed, not destroyed
    plugin.commit_group(spec(size=1), False)
    plugin.destroy_group("workers")
    assert provider.list({}) == []
    with pytest.raises(NotFound):
        plugin.size("workers")


def test_logical_id_groups_cannot_be_resized(setup):
    plugin, provider, _ = setup
    plugin.commit_group(spec(logical_ids=["a", "b"]), False)
    wait_for(lambda: plugin.describe_group("workers").converged)
    assert sorted(m.logical_id for m in provider.list({})) == ["a", "b"]
    assert plugin.size("workers") == 2
    with pytest.raises(FailedPrecondition):
        plugin.set_size("workers", 3)


def test_unknown_plugin_and_bad_spec_name_the_field(setup):
    plugin, _, _ = setup
    bad = spec()
    bad.properties["Instance"]["Plugin"] = "nope/x"
    with pytest.raises(InvalidArgument, match=r"^Properties\.Instance\.Plugin"):
        plugin.commit_group(bad, False)
    bad = spec()
    bad.properties["Allocation"] = {"Size": "many"}
    with pytest.raises(InvalidArgument, match=r"^Properties\.Allocation\.Size"):
        plugin.commit_group(bad, False)


def test_failing_provider_gives_up_and_says_why(setup):
    plugin, provider, _ = setup
    provider.create_failure_rate = 1.0
    plugin.commit_group(spec(size=2), False)
    wait_for(lambda: plugin.status("workers").gave_up is not None)
    assert "failures in a row" in plugin.status("workers").step
    provider.create_failure_rate = 0.0
    plugin.commit_group(spec(size=2), False)  # committing again retries
    wait_for(lambda: plugin.describe_group("workers").converged)


def test_metrics_reflect_the_group(setup):
    plugin, _, metrics = setup
    plugin.commit_group(spec(size=3), False)
    wait_for(lambda: plugin.describe_group("workers").converged)
    wait_for(lambda: metrics.registry.get_sample_value(
        "mobykit_group_instances", {"group": "workers", "config": plugin.status("workers").hash, "health": "healthy"}) == 3)
    assert metrics.registry.get_sample_value("mobykit_group_provisions_total", {"group": "workers", "result": "ok"}) == 3
    assert metrics.registry.get_sample_value("mobykit_group_update_progress", {"group": "workers"}) == 1.0
