"""Infrakit's wire as two Infrakit releases speak it, replayed over a real unix socket.

tests/golden/infrakit/v0.5/ holds requests shaped as Infrakit v0.5 (2017-05) sends them: its rpc
client's ``Handshake.Implements`` and exact version check (Instance/0.5.0, Flavor/0.1.0,
Group/0.1.0), its CLI's ``Handshake.Types``, Instance/0.5.0 calls (a Destroy without Context, a
DescribeInstances with and without the Properties flag), Flavor/0.1.0 and Group/0.1.0 calls, and
instances tagged with v0.5's ``infrakit.config_sha``. tests/golden/infrakit/head/ is Infrakit HEAD
(2018-11, docker-archive/deploykit): ``Handshake.Hello``. Both were written from Infrakit's source
(pkg/rpc/client/handshake.go, pkg/rpc/{instance,flavor,group}/types.go, pkg/cli), not recorded
from this server. A golden may say ``reconcile_before``: the test runs one pass of that group's
controller first (the plugin runs no threads here, so every reply is deterministic).

tests/golden/infrakit/info/ holds the documents served by GET: they are generated from the
dispatcher's method table (``mobykit.rpc.infrakit_info``); after a deliberate change, rewrite them
with ``MOBYKIT_REGEN_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from harness.mobykit_server import UnixHTTPConnection, call, jsonrpc_server, post_raw
from mobykit.cli.serve import resolve_flavor, resolve_instance
from mobykit.core.instance import InstanceCore
from mobykit.flavor.vanilla import VanillaFlavor
from mobykit.group.hash import instance_hash
from mobykit.group.plugin import GroupPluginImpl
from mobykit.providers.memory import MemoryProvider
from mobykit.rpc import infrakit_info
from mobykit.rpc.jsonrpc import Dispatcher
from mobykit.rpc.plugins import Plugins
from mobykit.spi.types import DestroyReason

GOLDEN = Path(__file__).parent / "golden" / "infrakit"
V05 = sorted((GOLDEN / "v0.5").glob("*.json"))
HEAD = sorted((GOLDEN / "head").glob("*.json"))
REGEN = os.environ.get("MOBYKIT_REGEN_GOLDEN") == "1"


class World:
    """Plugins as ``mobykit serve`` composes them (instance core, vanilla flavor, the real group
    plugin resolving ``mobykit/<type>``), over the memory provider, with every destroy's reason kept."""

    def __init__(self, group: bool = True, flavors: bool = True):
        self.provider = MemoryProvider()
        self.core = InstanceCore({"default_provider": "memory"}, providers={"memory": self.provider})
        self.reasons: list[tuple[str, DestroyReason]] = []
        destroy = self.core.destroy

        def recording_destroy(type: str, instance: str, reason: DestroyReason) -> None:
            self.reasons.append((instance, reason))
            destroy(type, instance, reason)

        self.core.destroy = recording_destroy  # type: ignore[method-assign]
        self.plugins = Plugins(instance=self.core, flavors={"vanilla": VanillaFlavor()} if flavors else {},
                               instance_types=("memory",))
        if group:
            self.plugins.group = GroupPluginImpl(lambda n: resolve_instance(self.plugins, n),
                                                 lambda n: resolve_flavor(self.plugins, n), run=False)

    def ops(self, op: str) -> list[str]:
        return [e.id for e in self.provider.events if e.op == op]


def replay(world: World, files: list[Path]) -> None:
    """POST each golden's request on one keep-alive connection (as Go's http.Client reuses one)
    and compare the reply with the golden's, whole."""
    with jsonrpc_server(world.plugins) as server:
        conn = UnixHTTPConnection(server.path)
        try:
            for path in files:
                golden = json.loads(path.read_text())
                if "reconcile_before" in golden:
                    world.plugins.group.controller(golden["reconcile_before"]).reconcile()
                status, ctype, raw = post_raw(server.path, json.dumps(golden["request"]).encode(), conn)
                assert status == 200, f"{path.name}: HTTP {status}"
                assert ctype.startswith("application/json"), path.name
                got = json.loads(raw)
                assert got == golden["response"], f"{path.name}: {golden['description']}\n got: {got}"
                # Go's json2 client takes a missing or null result as an error.
                assert got.get("result") is not None, path.name
                # ids (Go's rand.Int63) come back as the digits sent, never as a float
                assert json.dumps(golden["request"]["id"]).encode() in raw, path.name
        finally:
            conn.close()


def requests(files: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text())["request"] for p in files]


# -- Infrakit v0.5 ---------------------------------------------------------------------------------


def test_v05_goldens_cover_what_v05_calls():
    methods = {r["method"] for r in requests(V05)}
    assert {"Handshake.Implements", "Handshake.Types", "Group.CommitGroup", "Group.DescribeGroup"} <= methods
    assert {f"Instance.{m}" for m in ("Validate", "Provision", "Label", "Destroy", "DescribeInstances")} <= methods
    # the shapes that make them v0.5's, so a later edit of a golden cannot quietly drop them
    destroy = [r["params"] for r in requests(V05) if r["method"] == "Instance.Destroy"]
    assert destroy and all("Context" not in p for p in destroy)
    provisions = [r["params"]["Spec"]["Tags"] for r in requests(V05) if r["method"] == "Instance.Provision"]
    assert provisions and all("infrakit.config_sha" in t and "infrakit.config.hash" not in t for t in provisions)
    describes = [r["params"] for r in requests(V05) if r["method"] == "Instance.DescribeInstances"]
    assert any("Properties" not in p for p in describes) and any(p.get("Properties") is False for p in describes)


def test_v05_exchanges_over_unix_socket():
    world = World()
    replay(world, V05)
    # The two instances v0.5 made (tagged infrakit.config_sha only) were the group's config: the
    # controller created and replaced nothing; the only destroy is the v0.5 Instance.Destroy.
    assert world.ops("create") == ["mem-00000001", "mem-00000002"]
    assert world.ops("destroy") == ["mem-00000002"]
    # ... and that Destroy, having no Context, was a termination, not a rolling update.
    assert world.reasons == [("mem-00000002", DestroyReason.TERMINATE)]


def accepts(apis: list[dict[str, str]], name: str, version: str) -> bool:
    """Infrakit's handshakingClient.handshake(): the first entry with this Name and Version ends
    the search successfully; an entry with this Name and another Version only records a mismatch."""
    ok = False
    for api in apis:
        if api["Name"] == name:
            if api["Version"] == version:
                ok = True
                break
            ok = False
    return ok


def test_each_infrakit_release_finds_the_versions_it_requires():
    world = World()
    with jsonrpc_server(world.plugins) as server:
        apis = call(server.path, "Handshake.Implements", {})["result"]["APIs"]
        hello = call(server.path, "Handshake.Hello", {})["result"]["Objects"]
    for name, version in (("Instance", "0.5.0"), ("Flavor", "0.1.0"), ("Group", "0.1.0")):  # v0.5
        assert accepts(apis, name, version), (name, version)
    hello_apis = [dict(zip(("Name", "Version"), key.split("/"), strict=True)) for key in hello]
    for name, version in (("Instance", "0.6.1"), ("Flavor", "0.1.1"), ("Group", "0.1.1")):  # HEAD
        assert accepts(hello_apis, name, version), (name, version)
    assert not accepts(apis, "Instance", "0.4.0")  # an exact match, not any version


def test_v05_config_sha_values_are_our_instance_hash():
    """Infrakit v0.5's tutorial (docs/tutorial.md, 2017-05) shows the infrakit.config_sha its group
    plugin wrote for cattle.json and cattle2.json: our hash gives the same strings, so instances
    made by v0.5 are recognised as the config they were made for."""
    cattle = {
        "Allocation": {"Size": 5},
        "Instance": {"Plugin": "instance-file", "Properties": {"Note": "Instance properties version 1.0"}},
        "Flavor": {"Plugin": "flavor-vanilla", "Properties": {
            "Init": ["docker pull nginx:alpine", "docker run -d -p 80:80 nginx-alpine"],
            "Tags": {"tier": "web", "project": "infrakit"},
            "Attachments": [{"ID": "attachid", "Type": "attachtype"}]}},
    }
    assert instance_hash(cattle) == "x4nrsdaibscmj7awpkxzx5vvpt6pilw2"
    cattle["Allocation"]["Size"] = 10
    cattle["Instance"]["Properties"]["Note"] = "Instance properties version 2.0"
    assert instance_hash(cattle) == "jpfedp4sefvncwye5b6yre5qoz2odtnd"
    # and the hash the v0.5 goldens tag their instances with is this spec's
    commit = next(r for r in requests(V05) if r["method"] == "Group.CommitGroup")
    tags = next(r for r in requests(V05) if r["method"] == "Instance.Provision")["params"]["Spec"]["Tags"]
    assert tags["infrakit.config_sha"] == instance_hash(commit["params"]["Spec"]["Properties"])


# -- Infrakit HEAD ---------------------------------------------------------------------------------


def test_head_exchanges_over_unix_socket():
    replay(World(), HEAD)


def test_hello_lists_only_the_newest_versions():
    """Hello is what newer Infrakits call: the older versions stay out of it (they would only add
    objects no command is registered for)."""
    world = World()
    with jsonrpc_server(world.plugins) as server:
        objects = call(server.path, "Handshake.Hello", {})["result"]["Objects"]
    assert sorted(objects) == ["Flavor/0.1.1", "Group/0.1.1", "Instance/0.6.1"]


# -- GET /info/api.json and /info/functions.json ------------------------------------------------------


def get(conn: UnixHTTPConnection, path: str) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


@pytest.mark.parametrize("path,golden", [(infrakit_info.API_PATH, "api.json"), (infrakit_info.FUNCTIONS_PATH, "functions.json")])
def test_info_documents_over_unix_socket(path, golden):
    world = World()
    golden_path = GOLDEN / "info" / golden
    with jsonrpc_server(world.plugins) as server:
        conn = UnixHTTPConnection(server.path)
        try:
            status, headers, raw = get(conn, path)
        finally:
            conn.close()
    assert status == 200
    assert headers["content-type"].split(";")[0] == "application/json"
    got = json.loads(raw)
    if REGEN:
        golden_path.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(golden_path.read_text())


def test_api_document_decodes_as_infrakit_plugin_info():
    """What Go's json.Decode into plugin.Info needs: every Request/Response id a string (a number
    would fail: their ``ID string``), Implements and Interfaces parallel, each method under its
    interface, and the template functions a map of lists (``info template`` decodes a map)."""
    doc = json.loads((GOLDEN / "info" / "api.json").read_text())
    assert set(doc) == {"Vendor", "Implements", "Interfaces"}
    assert set(doc["Vendor"]) == {"Name", "Version", "URL"}
    assert [{"Name": i["Name"], "Version": i["Version"]} for i in doc["Interfaces"]] == doc["Implements"]
    for iface in doc["Interfaces"]:
        assert iface["Methods"], iface["Name"]
        for m in iface["Methods"]:
            req, resp = m["Request"], m["Response"]
            assert set(req) == {"jsonrpc", "method", "params", "id"} and set(resp) == {"result", "id"}
            assert req["jsonrpc"] == "2.0" and req["method"].startswith(iface["Name"] + ".")
            assert isinstance(req["id"], str) and req["id"] == resp["id"]
            assert isinstance(req["params"], dict) and isinstance(resp["result"], dict)
    functions = json.loads((GOLDEN / "info" / "functions.json").read_text())
    assert isinstance(functions, dict) and all(isinstance(v, list) for v in functions.values())


def test_api_document_lists_exactly_the_dispatched_methods():
    """Generated from the dispatcher's table: a method added there is described (and needs an
    example here), and a socket without a plugin does not claim its interface."""
    full = Dispatcher(World().plugins)
    rpc = {m for m in full.methods if m.split(".")[0] in ("Instance", "Flavor", "Group")}
    doc = full.info(infrakit_info.API_PATH)
    listed = {m["Request"]["method"] for i in doc["Interfaces"] for m in i["Methods"]}
    assert listed == rpc
    assert set(infrakit_info.EXAMPLES) == rpc  # every dispatched method has its example payloads
    assert [i["Name"] for i in doc["Implements"]] == ["Instance", "Flavor", "Group"]

    only_instances = Dispatcher(World(group=False, flavors=False).plugins).info(infrakit_info.API_PATH)
    assert only_instances["Implements"] == [{"Name": "Instance", "Version": "0.6.1"}]
    assert {m["Request"]["method"].split(".")[0] for m in only_instances["Interfaces"][0]["Methods"]} == {"Instance"}


def test_other_gets_are_refused_clearly_and_the_connection_keeps_serving():
    world = World()
    with jsonrpc_server(world.plugins) as server:
        conn = UnixHTTPConnection(server.path)
        try:
            status, headers, raw = get(conn, "/")
            assert status == 405 and headers["allow"] == "POST" and "POST JSON-RPC" in json.loads(raw)["error"]
            status, headers, raw = get(conn, "/info/nothing.json")
            assert status == 404 and "/info/api.json" in json.loads(raw)["error"]
            assert headers["content-type"].startswith("application/json")
            status, _, raw = get(conn, infrakit_info.API_PATH + "?raw=1")  # a query does not change the path
            assert status == 200 and json.loads(raw)["Implements"]
            status, _, raw = get(conn, "http://h" + infrakit_info.FUNCTIONS_PATH)  # absolute form
            assert status == 200 and json.loads(raw) == {}
            # the same keep-alive connection still takes JSON-RPC
            status, _, raw = post_raw(server.path, b'{"jsonrpc":"2.0","method":"Handshake.Hello","params":{},"id":3}', conn)
            assert status == 200 and json.loads(raw)["result"]["Objects"]
        finally:
            conn.close()
