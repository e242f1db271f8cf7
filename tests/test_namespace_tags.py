"""``NamespaceTags`` in a provider's config: two deployments sharing one account (one provider
backend here) never see, label or destroy each other's instances."""

from __future__ import annotations

import pytest

from mobykit.core.instance import InstanceCore
from mobykit.errors import InvalidArgument, NotFound
from mobykit.providers.memory import MemoryProvider
from mobykit.spi.types import Spec


def deployments():
    shared = MemoryProvider()

    def core(ns):
        config = {"default_provider": "memory", "providers": {"memory": {"NamespaceTags": ns}}}
        return InstanceCore(config, providers={"memory": shared})

    return core({"deployment": "blue"}), core({"deployment": "green"}), shared


def test_each_deployment_sees_labels_and_destroys_only_its_own():
    blue, green, shared = deployments()
    b = blue.provision("memory", Spec(properties={}, tags={"infrakit.group": "web"}))
    g = green.provision("memory", Spec(properties={}, tags={"infrakit.group": "web"}))
    assert [d.id for d in blue.describe_instances("memory", {"infrakit.group": "web"})] == [b]
    assert [d.id for d in green.describe_instances("memory", {})] == [g]
    assert blue.describe_instances("memory", {})[0].tags["deployment"] == "blue"
    with pytest.raises(NotFound):
        blue.label("memory", g, {"x": "1"})
    blue.label("memory", b, {"deployment": "green"})  # cannot be moved out of its namespace
    assert blue.describe_instances("memory", {})[0].tags["deployment"] == "blue"
    blue.destroy("memory", g)  # not ours: succeeds and touches nothing
    assert [m.id for m in shared.list({}) if m.state != "terminated"] == sorted([b, g])
    green.destroy("memory", g)
    assert green.describe_instances("memory", {}) == []


def test_a_bad_namespace_setting_is_named():
    core = InstanceCore({"default_provider": "memory", "providers": {"memory": {"NamespaceTags": ["x"]}}},
                        providers={"memory": MemoryProvider()})
    with pytest.raises(InvalidArgument, match="providers.memory.NamespaceTags"):
        core.describe_instances("memory", {})
