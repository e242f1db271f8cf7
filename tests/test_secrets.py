"""User data (Init) may carry secrets: after provisions that carry a marker secret, through both
transports, both providers and the group controller, and after provisions that fail, the marker
is in none of the server's log (at -v), its metrics, any error message, or any Describe answer."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest

from harness.mobykit_server import call, serve_process
from mobykit import errors
from mobykit.rpc.client import connect
from mobykit.spi.group import GroupSpec
from mobykit.spi.types import Spec

pytestmark = pytest.mark.slow  # a real server process with a group controller

MARKER = "S3CRET-7f1c2e-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_secret_is_in_no_log_metric_error_or_describe(tmp_path):
    port = _free_port()
    config = {"default_provider": "memory", "group": {"PollInterval": 0.2},
              "providers": {"memory": {}, "libvirt": {"URI": "test:///default"}}}
    said: list[str] = []  # every answer a client got, error messages included
    with serve_process(["-v", "--listen", "unix:sock", "--metrics", f"127.0.0.1:{port}"], config=config,
                       expect=3) as sp:
        address = next(a for a in sp.addresses if a.startswith("unix:"))
        infrakit = next(a for a in sp.addresses if a.startswith("infrakit:"))[len("infrakit:"):]
        (sp.workdir / "vmlinuz").write_bytes(b"kernel")
        (sp.workdir / "initrd.img").write_bytes(b"initrd")
        init = f"#!/bin/sh\nexport TOKEN={MARKER}\n"
        with connect(address) as clients:
            inst = clients.instance
            ids = [inst.provision("memory", Spec(properties={}, tags={"t": "1"}, init=init)),
                   inst.provision("libvirt", Spec(properties={"Provider": "libvirt", "Kernel": "vmlinuz",
                                                              "Initrd": "initrd.img"}, tags={"t": "1"}, init=init))]
            answer = call(infrakit, "Instance.Provision", {"Type": "memory", "Spec": {"Tags": {"t": "1"}, "Init": init}})
            said.append(json.dumps(answer))
            ids.append(answer["result"]["ID"])
            # Provisions that fail after the Init was read, on both providers and both transports.
            for provider, props in (("memory", {"Provider": 5}), ("libvirt", {"Provider": "libvirt", "Memory": -1})):
                with pytest.raises(errors.InvalidArgument) as e:
                    inst.provision(provider, Spec(properties=props, tags={}, init=init))
                said.append(str(e.value))
            answer = call(infrakit, "Instance.Provision", {"Type": "memory", "Spec": {"Properties": {"Provider": 5},
                                                                                      "Init": init}})
            assert "error" in answer
            said.append(json.dumps(answer))
            # The group controller provisions with the flavor's Init lines.
            clients.group.commit_group(GroupSpec(id="web", properties={
                "Allocation": {"Size": 2},
                "Instance": {"Plugin": "mobykit/memory", "Properties": {}},
                "Flavor": {"Plugin": "mobykit/vanilla", "Properties": {"Init": [f"echo {MARKER}"]}},
            }), False)
            deadline = time.monotonic() + 30
            while len(clients.group.describe_group("web").instances) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            described = [inst.describe_instances(t, {}, True) for t in ("memory", "libvirt")]
            assert {d.id for ds in described for d in ds} >= set(ids)  # the provisions are there
            said += [repr(ds) for ds in described]
            said.append(repr(clients.group.describe_group("web")))
            for t in ("memory", "libvirt"):
                said.append(json.dumps(call(infrakit, "Instance.DescribeInstances",
                                            {"Type": t, "Tags": {}, "Properties": True})))
        said.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        log = sp.stderr()
    assert "provisioned" in log  # the log is the -v server log, and it saw the provisions
    assert MARKER not in log
    for text in said:
        assert MARKER not in text, text
