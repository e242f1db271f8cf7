"""``mobykit group`` against a real in-process gRPC server running GroupPluginImpl."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from fakes import ConsoleFlavor, group_spec

from harness.mobykit_server import grpc_server, memory_plugins
from mobykit.cli.main import main
from mobykit.core.instance import InstanceCore
from mobykit.group.controller import Options
from mobykit.group.plugin import GroupPluginImpl
from mobykit.providers.memory import MemoryProvider

TUTORIAL_HASH = "oskdoyfaewtrrmwlychnja3ejwz574ue"


def write_spec(path, size=2, version="v1"):
    doc = group_spec(size=size, version=version)
    props = doc["Properties"]["Instance"]["Properties"]
    props["Version"] = props.pop("Image")
    doc["Properties"]["Instance"]["Plugin"] = "mobykit/memory"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def server():
    provider = MemoryProvider({})
    core = InstanceCore({"default_provider": "memory"}, providers={"memory": provider})
    flavor = ConsoleFlavor(provider)
    group = GroupPluginImpl(lambda name: core, lambda name: flavor, options=Options(poll_interval=0.02))
    with grpc_server(memory_plugins(provider, group=group)) as (_, bound, _tmp):
        yield bound[0], provider, group
    group.close()


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_hash_is_offline_and_matches_infrakit(tmp_path, capsys):
    p = tmp_path / "group.yml"
    p.write_text(
        "kind: group\nmetadata:\n  name: workers\nproperties:\n  Allocation:\n    Size: 5\n"
        "  Flavor:\n    Plugin: vanilla\n    Properties:\n      Init:\n        - sudo apt-get update -y\n"
        "        - sudo apt-get install wget curl\n        - wget -qO- https://get.docker.com | sh\n"
        "      Tags:\n        custom.tag1 : tutorial\n        custom.tag2 : single-instance\n"
        "        custom.tag3 : by-group\n  Instance:\n    Plugin: simulator/compute\n    Properties:\n"
        "      apiProperty1 : value1\n      apiProperty2 : value2\n")
    assert main(["group", "--server", "unix:/nonexistent", "hash", str(p)]) == 0
    assert capsys.readouterr().out.strip() == TUTORIAL_HASH


def test_bad_spec_exits_2_naming_file_line_field(tmp_path, capsys):
    p = tmp_path / "g.yml"
    p.write_text("ID: w\nProperties:\n  Allocation: {Size: 1}\n  Instance: {Plugin: a}\n  Flavor: {Plugin: b, Properties: {}}\n")
    assert main(["group", "hash", str(p)]) == 2
    assert f"{p}:4: Properties.Instance.Properties:" in capsys.readouterr().err


def test_commit_describe_size_inspect_destroy(server, tmp_path, capsys):
    address, provider, group = server
    spec = write_spec(tmp_path / "g.yml", size=2)
    assert main(["group", "--server", address, "commit", "--pretend", str(spec)]) == 0
    assert "Would commit group workers" in capsys.readouterr().out
    assert provider.list({}) == []
    assert main(["group", "--server", address, "commit", "--no-watch", str(spec)]) == 0
    assert "create 2 instances" in capsys.readouterr().out
    wait_for(lambda: group.describe_group("workers").converged)
    assert main(["group", "--server", address, "describe", "workers"]) == 0
    out = capsys.readouterr().out
    assert "target 2, 2 instances, converged" in out
    assert out.count("mem-") == 2
    assert main(["group", "--server", address, "set-size", "workers", "3"]) == 0
    assert main(["group", "--server", address, "size", "workers"]) == 0
    assert capsys.readouterr().out.strip().endswith("3")
    wait_for(lambda: len(provider.list({})) == 3)
    assert main(["group", "--server", address, "inspect"]) == 0
    specs = json.loads(capsys.readouterr().out)
    assert specs[0]["ID"] == "workers" and specs[0]["Properties"]["Allocation"]["Size"] == 3
    victim = provider.ids()[0]
    assert main(["group", "--server", address, "destroy-instances", "workers", victim]) == 0
    assert victim not in provider.ids()
    assert main(["group", "--server", address, "destroy", "workers"]) == 0
    assert provider.list({}) == []
    capsys.readouterr()
    assert main(["group", "--server", address, "size", "workers"]) == 1
    assert "not managed here" in capsys.readouterr().err


def test_commit_watch_follows_until_converged(server, tmp_path, capsys):
    address, provider, group = server
    spec = write_spec(tmp_path / "g.yml", size=2)
    assert main(["group", "--server", address, "commit", "--watch", "--timeout", "60", str(spec)]) == 0
    assert "converged" in capsys.readouterr().out
    assert len(provider.list({})) == 2
