"""The vanilla flavor behaves as Infrakit's reference flavor, so existing group specs run unchanged."""

from __future__ import annotations

import pytest

from mobykit.errors import InvalidArgument
from mobykit.flavor.vanilla import VanillaFlavor
from mobykit.spi.types import Allocation, Attachment, Description, Health, Index, Spec

ALLOC = Allocation(size=2)


def test_prepare_appends_init_after_the_spec_init_and_merges_tags():
    spec = Spec(properties={"Memory": 256}, tags={"infrakit.group": "g", "role": "old"}, init="echo first")
    props = {"Init": ["echo second", "echo third"], "Tags": {"role": "web", "tier": "front"}}
    out = VanillaFlavor().prepare("", props, spec, ALLOC, Index("g", 1))
    assert out.init == "echo first\necho second\necho third"
    assert out.tags == {"infrakit.group": "g", "role": "web", "tier": "front"}
    assert out.properties == {"Memory": 256}
    # the request's spec is not changed behind the caller's back
    assert spec.init == "echo first" and spec.tags["role"] == "old"


def test_prepare_with_empty_spec_init_has_no_leading_newline():
    out = VanillaFlavor().prepare("", {"Init": ["a", "b"]}, Spec(), ALLOC, Index())
    assert out.init == "a\nb"
    assert VanillaFlavor().prepare("", {}, Spec(init="x"), ALLOC, Index()).init == "x"


def test_attachments_are_appended():
    spec = Spec(attachments=[Attachment(id="vol-1", type="disk")])
    out = VanillaFlavor().prepare("", {"Attachments": [{"ID": "eth1", "Type": "nic"}]}, spec, ALLOC, Index())
    assert out.attachments == [Attachment("vol-1", "disk"), Attachment("eth1", "nic")]


def test_field_names_match_case_insensitively_like_go():
    out = VanillaFlavor().prepare("", {"init": ["x"], "tags": {"a": "b"}}, Spec(), ALLOC, Index())
    assert out.init == "x" and out.tags == {"a": "b"}


@pytest.mark.parametrize(
    "props, needle",
    [
        ({"Inits": ["x"]}, "Inits"),
        ({"Init": "echo hi"}, "Properties.Init"),
        ({"Tags": {"a": 1}}, "Properties.Tags.a"),
        ({"Attachments": [{"Type": "nic"}]}, r"Attachments\[0\].ID"),
        ({"Attachments": [{"ID": "x", "Kind": "nic"}]}, "Kind"),
        ([1, 2], "Properties"),
    ],
)
def test_bad_properties_are_named(props, needle):
    with pytest.raises(InvalidArgument, match=needle):
        VanillaFlavor().validate("", props, ALLOC)
    with pytest.raises(InvalidArgument, match=needle):
        VanillaFlavor().prepare("", props, Spec(), ALLOC, Index())


def test_always_healthy_and_drain_does_nothing():
    f = VanillaFlavor()
    f.validate("", None, ALLOC)
    inst = Description(id="i-1", tags={})
    assert f.healthy("", {}, inst) == Health.HEALTHY
    assert f.drain("", {}, inst) is None
