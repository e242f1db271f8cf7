"""A user's view with grpcurl (no proto files: everything through server reflection) against a
real ``mobykit serve`` process backed by the memory provider."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from harness.mobykit_server import make_tls, serve_process

GRPCURL = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "grpcurl")


def grpcurl(sock: str, *args: str, data: dict | None = None, tls_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [GRPCURL, *tls_args]
    if not tls_args:
        cmd += ["-plaintext", "-unix"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run([*cmd, sock, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def server():
    with serve_process(["--listen", "unix:grpc.sock"]) as sp:
        yield sp.addresses[0].removeprefix("unix:")


@pytest.mark.slow
def test_reflection_lists_services_and_health_is_serving(server):
    r = grpcurl(server, "list")
    assert r.returncode == 0, r.stderr
    services = r.stdout.split()
    for s in ("mobykit.v1.Instance", "mobykit.v1.Flavor", "mobykit.v1.Group", "mobykit.v1.Images", "grpc.health.v1.Health"):
        assert s in services
    r = grpcurl(server, "describe", "mobykit.v1.Instance")
    assert r.returncode == 0 and "rpc DescribeInstances" in r.stdout
    r = grpcurl(server, "grpc.health.v1.Health/Check")
    assert r.returncode == 0 and json.loads(r.stdout) == {"status": "SERVING"}


@pytest.mark.slow
def test_provision_describe_label_destroy(server):
    r = grpcurl(server, "mobykit.v1.Instance/Provision", data={"spec": {"properties": {"Memory": 512}, "tags": {"app": "curl", "n": "1"}}})
    assert r.returncode == 0, r.stderr
    iid = json.loads(r.stdout)["id"]
    r = grpcurl(server, "mobykit.v1.Instance/Label", data={"instance": iid, "labels": {"n": "2", "extra": "x"}})
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = grpcurl(server, "mobykit.v1.Instance/DescribeInstances", data={"tags": {"app": "curl"}, "properties": True})
    (desc,) = json.loads(r.stdout)["descriptions"]
    assert desc["id"] == iid and desc["tags"] == {"app": "curl", "n": "2", "extra": "x"}
    assert desc["properties"]["Memory"] == 512
    r = grpcurl(server, "mobykit.v1.Instance/Destroy", data={"instance": iid, "reason": "rolling_update"})
    assert r.returncode == 0, r.stderr
    r = grpcurl(server, "mobykit.v1.Instance/DescribeInstances", data={"tags": {"app": "curl"}})
    assert json.loads(r.stdout).get("descriptions", []) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,data,code,needle",
    [
        ("mobykit.v1.Instance/Label", {"instance": "mem-gone", "labels": {"a": "b"}}, "NotFound", "mem-gone"),
        ("mobykit.v1.Instance/Label", {"labels": {"a": "b"}}, "InvalidArgument", "instance"),
        ("mobykit.v1.Instance/Provision", {}, "InvalidArgument", "spec"),
        ("mobykit.v1.Instance/Provision", {"spec": {"properties": {"Provider": "mars"}}}, "InvalidArgument", "mars"),
        ("mobykit.v1.Instance/Provision", {"spec": {"properties": {"Image": 7}}}, "InvalidArgument", "Image"),
        ("mobykit.v1.Instance/Destroy", {"instance": "x", "reason": "because"}, "InvalidArgument", "reason"),
        ("mobykit.v1.Flavor/Validate", {"type": "nope"}, "InvalidArgument", "unknown flavor 'nope'"),
        ("mobykit.v1.Flavor/Validate", {"type": "vanilla", "properties": {"Init": 5}}, "InvalidArgument", "Init"),
        ("mobykit.v1.Group/Size", {"id": "no-such-group"}, "NotFound", "no-such-group"),
        ("mobykit.v1.Images/Build", {"spec_yaml": ["kernel: [unclosed"]}, "InvalidArgument", "spec_yaml[0]:1:"),
        ("mobykit.v1.Images/Build", {"spec_paths": ["/nonexistent/spec.yml"]}, "InvalidArgument", "/nonexistent/spec.yml"),
        ("mobykit.v1.Images/Get", {"id": "sha256:" + "e" * 64}, "NotFound", "e" * 64),
    ],
)
def test_bad_requests_get_status_and_server_keeps_serving(server, method, data, code, needle):
    r = grpcurl(server, method, data=data)
    assert r.returncode != 0
    assert f"Code: {code}" in r.stderr, r.stderr
    assert needle in r.stderr, r.stderr
    # No temp path of the server's leaks, except its allowed root (refusals name the roots).
    root = os.path.realpath(os.path.dirname(server))
    assert "/tmp/" not in r.stderr.replace("/nonexistent", "").replace(root, "")
    assert grpcurl(server, "grpc.health.v1.Health/Check").returncode == 0


@pytest.mark.slow
def test_wrong_json_type_is_refused_by_the_schema(server):
    r = grpcurl(server, "mobykit.v1.Instance/Provision", data={"spec": {"tags": {"a": 1}}})
    assert r.returncode != 0 and "expecting string" in r.stderr


@pytest.mark.slow
def test_tls_with_client_certificates(tmp_path):
    tls = make_tls(tmp_path / "pki")
    args = ["--listen", "tcp://127.0.0.1:0", "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
    args += ["--tls-client-ca", str(tls.ca), "--no-infrakit"]
    with serve_process(args, expect=1) as sp:
        addr = sp.addresses[0].removeprefix("tcp://")
        good = ("-cacert", str(tls.ca), "-cert", str(tls.client_cert), "-key", str(tls.client_key))
        r = grpcurl(addr, "grpc.health.v1.Health/Check", tls_args=good)
        assert r.returncode == 0, r.stderr
        r = grpcurl(addr, "grpc.health.v1.Health/Check", tls_args=("-cacert", str(tls.ca)))
        assert r.returncode != 0
        r = grpcurl(addr, "grpc.health.v1.Health/Check", tls_args=("-plaintext",))
        assert r.returncode != 0
