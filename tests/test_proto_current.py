"""The committed generated code (plugin/rpc/gen/) matches proto/: regenerate and compare bytes."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from mobykit.rpc import generate


def test_generated_code_is_current(tmp_path):
    written = generate.generate(tmp_path / "gen")
    committed = generate.DEFAULT_OUT
    fresh = {p.name: p.read_bytes() for p in written}
    current = {p.name: p.read_bytes() for p in committed.glob("*.py")}
    assert set(current) == set(fresh), "plugin/rpc/gen has files protoc no longer writes (or misses some)"
    stale = [name for name in sorted(fresh) if fresh[name] != current[name]]
    hint = ""
    if stale:
        # protoc stamps its own version into the output: a different grpcio-tools differs too.
        from importlib.metadata import version

        committed_by = re.search(rb"GRPC_GENERATED_VERSION = '([^']+)'", current["mobykit_pb2_grpc.py"])
        installed = version("grpcio-tools")
        if committed_by and committed_by.group(1).decode() != installed:
            hint = f" (committed by grpcio-tools {committed_by.group(1).decode()}, installed {installed})"
    assert not stale, f"plugin/rpc/gen is stale ({', '.join(stale)}){hint}: run .venv/bin/python -m mobykit.rpc.generate"


def test_generated_modules_import_as_mobykit_rpc_gen():
    grpc_mod = importlib.import_module("mobykit.rpc.gen.mobykit_pb2_grpc")
    pb = importlib.import_module("mobykit.rpc.gen.mobykit_pb2")
    assert grpc_mod.mobykit_dot_v1_dot_mobykit__pb2 is pb
    assert pb.DESCRIPTOR.name == "mobykit/v1/mobykit.proto"
    services = set(pb.DESCRIPTOR.services_by_name)
    assert services == {"Instance", "Flavor", "Group", "Images"}
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Group"].methods}
    assert methods == {"CommitGroup", "FreeGroup", "DescribeGroup", "DestroyGroup", "InspectGroups", "DestroyInstances", "Size", "SetSize"}


def test_every_request_carries_type():
    pb = importlib.import_module("mobykit.rpc.gen.mobykit_pb2")
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            assert "type" in method.input_type.fields_by_name, f"{service.name}.{method.name} request has no type"
    assert Path(generate.PROTO_DIR, generate.PROTOS[0]).is_file()
