"""Infrakit's group spec as its Go types serialise it (pkg/controller/group/types.Spec): every field
present, absent pointers as null, numbers as zero. Infrakit's manager re-sends stored specs this way
when it scales a group, so they must commit, hash and read back exactly as the hand-written spec,
and ``SkipBeforeInstanceDestroy: "drain"`` must mean what it means in Infrakit."""

from __future__ import annotations

import copy

import pytest
from fakes import FakeWorld, group_spec
from test_group_controller import controller, run

from harness.mobykit_server import call, jsonrpc_server, memory_plugins
from mobykit.errors import InvalidArgument
from mobykit.group.plugin import GroupPluginImpl
from mobykit.group.spec import parse
from mobykit.spi.group import GroupSpec


def as_infrakit_serialises(doc: dict) -> dict:
    """What ``json.Marshal(group_types.Spec{...})`` writes for ``doc``: every Infrakit field, with
    Go's zero values (null pointers and slices, 0, and types.Duration's "0s")."""
    out = copy.deepcopy(doc)
    props = out["Properties"]
    alloc = props.setdefault("Allocation", {})
    alloc.setdefault("Size", 0)
    alloc.setdefault("LogicalIDs", None)
    upd = props.get("Updating") or {}
    props["Updating"] = {"Duration": "0s", "Count": 0, "SkipBeforeInstanceDestroy": None, **upd}
    return out


def by_hand() -> dict:
    return group_spec(size=3)


def test_the_manager_resent_spec_hashes_parses_and_reads_back_as_the_hand_written_one():
    hand = by_hand()
    sent = as_infrakit_serialises(hand)
    assert sent["Properties"]["Updating"]["SkipBeforeInstanceDestroy"] is None
    a = parse(GroupSpec(id=hand["ID"], properties=hand["Properties"]))
    b = parse(GroupSpec(id=sent["ID"], properties=sent["Properties"]))
    assert a.hash == b.hash
    assert a.updating == b.updating and a.size == b.size and a.logical_ids == b.logical_ids
    assert a.spec() == b.spec()  # InspectGroups answers the same document


def test_logical_ids_spec_with_infrakit_zero_size():
    hand = group_spec(logical_ids=["a", "b"])
    sent = as_infrakit_serialises(hand)
    assert sent["Properties"]["Allocation"] == {"LogicalIDs": ["a", "b"], "Size": 0}
    a, b = (parse(GroupSpec(id=d["ID"], properties=d["Properties"])) for d in (hand, sent))
    assert b.logical_ids == ["a", "b"] and b.target == 2 and a.spec() == b.spec()


def test_skip_before_instance_destroy_values():
    ok = as_infrakit_serialises(group_spec(updating={"SkipBeforeInstanceDestroy": "drain"}))
    assert parse(GroupSpec(id="g", properties=ok["Properties"])).updating.skip_drain
    for bad in ("Drain", "health", 1):
        doc = group_spec(updating={"SkipBeforeInstanceDestroy": bad})
        with pytest.raises(InvalidArgument, match=r"^Properties\.Updating\.SkipBeforeInstanceDestroy: must be \"drain\""):
            parse(GroupSpec(id="g", properties=doc["Properties"]))
    doc = group_spec(updating={"SkipBeforeDestroy": "drain"})  # a key Infrakit does not know
    with pytest.raises(InvalidArgument, match=r"Properties\.Updating\.SkipBeforeDestroy: unknown field"):
        parse(GroupSpec(id="g", properties=doc["Properties"]))


@pytest.mark.parametrize("skip", [None, "drain"])
def test_drain_is_skipped_on_rolling_destroys_only_when_asked(skip):
    w = FakeWorld()
    updating = {"MaxSurge": 1, "MaxUnavailable": 0, "SkipBeforeInstanceDestroy": skip}
    ctl = controller(w, parse(GroupSpec(id="workers", properties=group_spec(size=2, updating=updating)["Properties"])))
    run(ctl, w)
    ctl.update(parse(GroupSpec(id="workers", properties=group_spec(size=2, version="v2", updating=updating)["Properties"])))
    run(ctl, w, steps=1000)
    rolled = [e.id for e in w.events if e.op == "destroy" and e.reason == "rolling_update"]
    drained = [e.id for e in w.events if e.op == "drain"]
    assert len(rolled) == 2
    assert drained == ([] if skip else rolled)
    # A termination (scale down) still drains, as in Infrakit.
    ctl.update(parse(GroupSpec(id="workers", properties=group_spec(size=1, version="v2", updating=updating)["Properties"])))
    run(ctl, w, steps=1000)
    terminated = [e.id for e in w.events if e.op == "destroy" and e.reason == "terminate"]
    assert len(terminated) == 1
    assert terminated[0] in [e.id for e in w.events if e.op == "drain"]


def _group_plugin():
    w = FakeWorld()
    return GroupPluginImpl(lambda name: w.instance, lambda name: w.flavor, run=False), w


def test_commit_answers_are_identical_for_manager_and_hand_specs():
    hand = by_hand()
    sent = as_infrakit_serialises(hand)
    g, _ = _group_plugin()
    answer_hand = g.commit_group(GroupSpec(id=hand["ID"], properties=hand["Properties"]), True)
    answer_sent = g.commit_group(GroupSpec(id=sent["ID"], properties=sent["Properties"]), True)
    assert answer_hand == answer_sent
    g.commit_group(GroupSpec(id=sent["ID"], properties=sent["Properties"]), False)
    assert [s.properties for s in g.inspect_groups()] == [parse(GroupSpec(id="workers", properties=hand["Properties"])).properties]
    g.close()


def test_commit_over_jsonrpc_with_every_null_and_zero():
    """Shaped as Infrakit's Go client sends it (params {Spec, Pretend}, a large integer id)."""
    sent = as_infrakit_serialises(by_hand())
    g, _ = _group_plugin()
    plugins = memory_plugins(group=g)
    with jsonrpc_server(plugins) as js:
        answer = call(js.path, "Group.CommitGroup", {"Spec": sent, "Pretend": False}, id=5577006791947779410)
        assert answer["id"] == 5577006791947779410
        assert "error" not in answer or answer["error"] is None, answer
        assert answer["result"]["Details"].startswith("Committed group workers (config ")
        inspected = call(js.path, "Group.InspectGroups", {"ID": ""}, id=2)["result"]
    g.close()
    # Read back as the hand-written spec: Infrakit's nulls and zeros are not stored.
    assert inspected["Groups"] == [{"ID": "workers", "Properties": by_hand()["Properties"]}]
