"""The config hash is Infrakit's InstanceHash, bit for bit."""

from __future__ import annotations

import hashlib

import yaml

from mobykit.group.hash import go_float, go_string, instance_hash, stable_format
from mobykit.group.spec import from_document, parse

# docs/tutorial/group.yml of docker/infrakit (deploykit), as Infrakit users have it on disk.
TUTORIAL = """\
kind: group
metadata:
    name: workers
properties:
    Allocation:
      Size: 5
    Flavor:
      Plugin: vanilla
      Properties:
        Init:
          - sudo apt-get update -y
          - sudo apt-get install wget curl
          - wget -qO- https://get.docker.com | sh
        Tags:
          custom.tag1 : tutorial
          custom.tag2 : single-instance
          custom.tag3 : by-group

    Instance:
      Plugin: simulator/compute
      Properties:
        apiProperty1 : value1
        apiProperty2 : value2
"""


def test_infrakit_tutorial_group_hash():
    cfg = parse(from_document(yaml.safe_load(TUTORIAL)))
    assert cfg.id == "workers"
    assert cfg.hash == "oskdoyfaewtrrmwlychnja3ejwz574ue"


def test_allocation_and_updating_are_not_hashed_but_properties_are():
    props = yaml.safe_load(TUTORIAL)["properties"]
    h = instance_hash(props)
    assert instance_hash({**props, "Allocation": {"Size": 50}, "Updating": {"MaxSurge": 3}}) == h
    changed = {**props, "Instance": {**props["Instance"], "Properties": {"apiProperty1": "value2"}}}
    assert instance_hash(changed) != h


def test_key_order_and_int_vs_float_do_not_change_the_hash():
    a = {"Instance": {"Plugin": "p", "Properties": {"b": 1, "a": [2.0]}}, "Flavor": {"Plugin": "f", "Properties": {}}}
    b = {"Flavor": {"Properties": {}, "Plugin": "f"}, "Instance": {"Properties": {"a": [2], "b": 1.0}, "Plugin": "p"}}
    assert instance_hash(a) == instance_hash(b)


def test_marshal_indent_layout_matches_go():
    text = stable_format({"Plugin": "x", "Properties": {"b": [], "a": {"k": None}, "c": {}}}).decode()
    assert text == ('{\n    "Plugin": "x",\n    "Properties": {\n      "a": {\n        "k": null\n      },\n'
                    '      "b": [],\n      "c": {}\n    }\n  }')


def test_go_string_escaping():
    assert go_string("<a&b>") == '"\\u003ca\\u0026b\\u003e"'
    assert go_string("\u2028\u2029") == '"\\u2028\\u2029"'
    assert go_string('q"\\\n\t\x01') == '"q\\"\\\\\\n\\t\\u0001"'
    assert go_string("é") == '"é"'


def test_go_float_formatting():
    assert go_float(5.0) == "5"
    assert go_float(0.1) == "0.1"
    assert go_float(1e20) == "100000000000000000000"
    assert go_float(1e21) == "1e+21"
    assert go_float(1.5e-7) == "1.5e-7"
    assert go_float(0.000001) == "0.000001"
    assert go_float(-2.5) == "-2.5"
    assert go_float(123456789.0) == "123456789"


def test_hash_is_lowercase_base32_of_sha1_without_padding():
    props = {"Instance": {"Plugin": "a", "Properties": {}}, "Flavor": {"Plugin": "b", "Properties": {}}}
    import base64

    digest = hashlib.sha1(stable_format({"Plugin": "a", "Properties": {}}) + stable_format({"Plugin": "b", "Properties": {}})).digest()
    assert instance_hash(props) == base64.b32encode(digest).decode().lower().rstrip("=")
    assert len(instance_hash(props)) == 32
