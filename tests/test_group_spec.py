"""Group specs: both Infrakit shapes, YAML or JSON, errors that name the field (and line)."""

from __future__ import annotations

import json

import pytest
from fakes import group_spec

from mobykit.errors import InvalidArgument, SpecError
from mobykit.group.spec import FixedOrPercent, load, parse, parse_duration
from mobykit.spi.group import GroupSpec


def test_json_and_yaml_files_give_the_same_config(tmp_path):
    doc = group_spec(size=3, updating={"MaxSurge": "50%", "MinReadySeconds": "1m30s", "Rollback": "auto"})
    (tmp_path / "g.json").write_text(json.dumps(doc))
    import yaml

    (tmp_path / "g.yml").write_text(yaml.safe_dump(doc))
    a, b = load(tmp_path / "g.json"), load(tmp_path / "g.yml")
    assert a.hash == b.hash and a.size == b.size == 3
    assert a.updating.max_surge == FixedOrPercent(50, percent=True)
    assert a.updating.min_ready_seconds == 90
    assert a.updating.rollback is True


def test_yaml_error_names_file_line_and_field(tmp_path):
    p = tmp_path / "g.yml"
    p.write_text("ID: workers\nProperties:\n  Allocation:\n    Size: -3\n  Instance: {Plugin: a, Properties: {}}\n"
                 "  Flavor: {Plugin: b, Properties: {}}\n")
    with pytest.raises(SpecError) as e:
        load(p)
    assert str(e.value).startswith(f"{p}:4: Properties.Allocation.Size:")


def test_unknown_field_is_named():
    doc = group_spec()
    doc["Properties"]["Updating"] = {"MaxSurges": 1}
    with pytest.raises(InvalidArgument, match=r"Properties\.Updating\.MaxSurges: unknown field"):
        parse(GroupSpec(doc["ID"], doc["Properties"]))


@pytest.mark.parametrize("mutate,field", [
    (lambda p: p.pop("Instance"), "Properties.Instance"),
    (lambda p: p["Flavor"].pop("Properties"), "Properties.Flavor.Properties"),
    (lambda p: p["Instance"].update(Plugin=""), "Properties.Instance.Plugin"),
    (lambda p: p.update(Allocation={"Size": 2, "LogicalIDs": ["a"]}), "Properties.Allocation"),
    (lambda p: p.update(Allocation={"LogicalIDs": ["a", "a"]}), "Properties.Allocation.LogicalIDs"),
    (lambda p: p.update(Updating={"MaxSurge": 0, "MaxUnavailable": 0}), "Properties.Updating"),
    (lambda p: p.update(Updating={"MaxSurge": "150%"}), "Properties.Updating.MaxSurge"),
    (lambda p: p.update(Updating={"Duration": "soon"}), "Properties.Updating.Duration"),
])
def test_bad_specs_name_the_field(mutate, field):
    doc = group_spec()
    mutate(doc["Properties"])
    with pytest.raises(InvalidArgument) as e:
        parse(GroupSpec(doc["ID"], doc["Properties"]))
    assert str(e.value).startswith(field + ":")


def test_percent_rounds_up_as_gce_does():
    assert FixedOrPercent(25, True).resolve(10) == 3
    assert FixedOrPercent(10, True).resolve(10) == 1
    assert FixedOrPercent(10, True).resolve(5) == 1
    assert FixedOrPercent(0, True).resolve(10) == 0
    assert FixedOrPercent(2).resolve(100) == 2


def test_defaults_are_surge_1_unavailable_0():
    cfg = parse(GroupSpec(**{k.lower(): v for k, v in group_spec().items()}))
    assert cfg.updating.max_surge.resolve(3) == 1 and cfg.updating.max_unavailable.resolve(3) == 0


def test_infrakit_count_paces_like_min_ready():
    doc = group_spec(updating={"Count": 3})
    cfg = parse(GroupSpec(doc["ID"], doc["Properties"]))
    assert cfg.updating.min_ready(poll_interval=10) == 30


def test_go_durations():
    assert parse_duration("1h2m3.5s", "f") == 3723.5
    assert parse_duration("500ms", "f") == 0.5
    assert parse_duration(7, "f") == 7
    with pytest.raises(InvalidArgument, match="^f:"):
        parse_duration("5 minutes", "f")


def test_volumes_need_logical_ids_at_commit():
    """A persistent volume is owned by a logical id; a Size group is refused when committed, naming
    the field, instead of failing at its first provision."""
    doc = group_spec(size=2)
    doc["Properties"]["Instance"]["Properties"]["Volumes"] = [{"Name": "data", "SizeGb": 1}]
    with pytest.raises(InvalidArgument, match=r"Properties\.Instance\.Properties\.Volumes: .*Allocation\.LogicalIDs"):
        parse(GroupSpec(doc["ID"], doc["Properties"]))
    doc = group_spec(logical_ids=["a", "b"])
    doc["Properties"]["Instance"]["Properties"]["Volumes"] = [{"Name": "data", "SizeGb": 1}]
    assert parse(GroupSpec(doc["ID"], doc["Properties"])).logical_ids == ["a", "b"]
