"""Infrakit's JSON-RPC wire, replayed from golden request/response pairs over a real unix socket.

The goldens in tests/golden/jsonrpc/ were written from Infrakit's public protocol (pkg/rpc/*/types.go,
pkg/spi/...), not recorded from this server: each file is one call, replayed in file-name order
against one server (instance IDs come from the memory provider, so they are deterministic)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from harness.mobykit_server import (
    EchoFlavor,
    UnixHTTPConnection,
    call,
    jsonrpc_server,
    memory_plugins,
    post_raw,
)
from mobykit.rpc.jsonrpc import default_socket_path

GOLDEN = sorted((Path(__file__).parent / "golden" / "jsonrpc").glob("*.json"))


def golden_plugins():
    # Served as Infrakit users address it: mobykit/libvirt (here backed by the memory provider),
    # mobykit/moby and mobykit/vanilla, and the group plugin.
    return memory_plugins(name="libvirt", flavors={"moby": EchoFlavor(), "vanilla": EchoFlavor()})


def test_goldens_cover_every_method():
    methods = {json.loads(p.read_text())["request"]["method"] for p in GOLDEN}
    expected = {f"Instance.{m}" for m in ("Validate", "Provision", "Label", "Destroy", "DescribeInstances")}
    expected |= {f"Flavor.{m}" for m in ("Validate", "Prepare", "Healthy", "Drain")}
    expected |= {
        f"Group.{m}"
        for m in ("CommitGroup", "FreeGroup", "DescribeGroup", "DestroyGroup", "InspectGroups", "DestroyInstances", "Size", "SetSize")
    }
    expected |= {"Handshake.Hello", "Handshake.Implements", "Handshake.Types", "Plugin.Implements"}
    assert expected <= methods


def test_golden_exchanges_over_unix_socket():
    with jsonrpc_server(golden_plugins()) as server:
        conn = UnixHTTPConnection(server.path)  # one keep-alive connection, as Go's client reuses
        try:
            for path in GOLDEN:
                golden = json.loads(path.read_text())
                body = json.dumps(golden["request"]).encode()
                status, ctype, raw = post_raw(server.path, body, conn)
                assert status == 200, f"{path.name}: HTTP {status}"
                assert ctype.startswith("application/json"), path.name
                got = json.loads(raw)
                assert got == golden["response"], f"{path.name}: {golden['description']}\n got: {got}"
                if "error" not in got:
                    assert got["result"] is not None, path.name
                # ids travel as exact integers: the literal digits come back, never a float
                assert json.dumps(golden["request"]["id"]).encode() in raw, path.name
        finally:
            conn.close()


def test_protocol_errors_are_http_200_with_error_object():
    with jsonrpc_server(golden_plugins()) as server:
        status, _, raw = post_raw(server.path, b"{not json")
        assert status == 200
        resp = json.loads(raw)
        assert resp["error"]["code"] == -32700 and resp["error"]["data"] is None and "result" not in resp
        resp = call(server.path, "Instance.Provision", "a string", id=3)
        assert resp["error"]["code"] == -32602 and resp["id"] == 3
        # A one-element array holding the params object is accepted too.
        resp = call(server.path, "Instance.DescribeInstances", [{"Type": "libvirt", "Tags": {}}], id=4)
        assert resp["result"] == {"Type": "libvirt", "Descriptions": []}
        # The server keeps serving after every bad request.
        assert call(server.path, "Handshake.Implements", {})["result"]["APIs"]


def test_provision_then_describe_over_wire_uses_instance_tags_exactly():
    with jsonrpc_server(golden_plugins()) as server:
        tags = {"infrakit.group": "g", "Mixed.Case": "V"}
        r = call(server.path, "Instance.Provision", {"type": "libvirt", "spec": {"properties": {}, "tags": tags}})
        iid = r["result"]["ID"]
        d = call(server.path, "Instance.DescribeInstances", {"Type": "libvirt", "Tags": {"Mixed.Case": "V"}})
        assert d["result"]["Descriptions"] == [{"ID": iid, "LogicalID": None, "Tags": tags}]
        assert call(server.path, "Instance.DescribeInstances", {"Type": "libvirt", "Tags": {"mixed.case": "V"}})["result"][
            "Descriptions"
        ] == []


def test_socket_is_private_and_removed_on_stop():
    with jsonrpc_server(golden_plugins()) as server:
        path = server.path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
    assert not path.exists()


def test_default_socket_path_follows_infrakit_discovery(tmp_path):
    assert default_socket_path({"INFRAKIT_PLUGINS_DIR": "/p", "INFRAKIT_HOME": "/h"}) == Path("/p/mobykit")
    assert default_socket_path({"INFRAKIT_HOME": "/h"}) == Path("/h/plugins/mobykit")
    assert default_socket_path({}) == Path.home() / ".infrakit" / "plugins" / "mobykit"


def test_a_live_socket_is_not_stolen():
    from mobykit.errors import InvalidArgument
    from mobykit.rpc.jsonrpc import JsonRpcServer

    with jsonrpc_server(golden_plugins()) as server:
        with pytest.raises(InvalidArgument, match="another server"):
            JsonRpcServer(golden_plugins(), server.path)


def test_many_clients_connecting_at_once_are_all_served():
    """A polling controller per group, Prometheus and the CLI connect together: none is refused
    (the listen backlog was 5, and the 7th simultaneous connect failed at once with EAGAIN)."""
    import threading

    from harness.mobykit_server import jsonrpc_server, memory_plugins, post_raw

    body = json.dumps({"jsonrpc": "2.0", "method": "Handshake.Implements", "params": {}, "id": 1}).encode()
    with jsonrpc_server(memory_plugins()) as js:
        start = threading.Barrier(64)
        results: list[object] = []

        def client():
            start.wait()
            try:
                results.append(post_raw(js.path, body)[0])
            except OSError as e:
                results.append(e)

        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == [200] * 64
