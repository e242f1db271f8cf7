"""The gRPC server over real sockets: SPI semantics, error statuses, TLS, socket mode, SIGTERM."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.mobykit_server import grpc_server, make_tls, memory_plugins, run_cli, serve_process
from mobykit import errors
from mobykit.providers.base import BootImage
from mobykit.providers.memory import MemoryProvider
from mobykit.rpc import server as rpc_server
from mobykit.rpc.client import ClientTLS, connect
from mobykit.rpc.gen import mobykit_pb2 as pb
from mobykit.rpc.gen import mobykit_pb2_grpc as pbg
from mobykit.spi.types import Allocation, Description, Health, Index, Spec


@pytest.fixture
def served():
    provider = MemoryProvider()
    plugins = memory_plugins(provider)
    with grpc_server(plugins) as (server, bound, tmp):
        with connect(bound[0]) as clients:
            yield clients, provider, bound[0]


def status_of(fn, *args):
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code(), e.value.details()


def stubs(address: str):
    channel = grpc.insecure_channel(address)
    return channel, pbg.InstanceStub(channel)


def test_provision_is_described_with_tags_and_label_merges(served):
    clients, provider, _ = served
    inst = clients.instance
    a = inst.provision("", Spec(properties={"Image": "x"}, tags={"group": "web", "role": "a"}, init="echo hi"))
    b = inst.provision("", Spec(properties={}, tags={"group": "web", "role": "b"}, logical_id="node-1"))
    c = inst.provision("", Spec(properties={}, tags={"group": "db"}))
    web = inst.describe_instances("", {"group": "web"})
    assert [d.id for d in web] == sorted([a, b])
    assert web[0].tags == {"group": "web", "role": "a"}
    assert [d.logical_id for d in web] == [None, "node-1"]
    assert [d.id for d in inst.describe_instances("", {"group": "web", "role": "b"})] == [b]
    assert [d.id for d in inst.describe_instances("", {})] == sorted([a, b, c])
    assert inst.describe_instances("", {"group": "nope"}) == []
    inst.label("", a, {"infrakit.config.hash": "abc", "role": "z"})
    assert inst.describe_instances("", {"infrakit.config.hash": "abc"})[0].tags == {
        "group": "web",
        "role": "z",
        "infrakit.config.hash": "abc",
    }
    # Properties are returned only when asked for, with integers kept integers.
    inst.provision("", Spec(properties={"Memory": 512, "Nested": {"k": [1, "two", None]}}, tags={"p": "1"}))
    (d,) = inst.describe_instances("", {"p": "1"}, properties=True)
    assert d.properties["Memory"] == 512 and isinstance(d.properties["Memory"], int)
    assert d.properties["Nested"] == {"k": [1, "two", None]}
    assert inst.describe_instances("", {"p": "1"})[0].properties is None
    assert provider.ids() == sorted(provider.ids())


def test_destroy_unknown_succeeds_and_destroy_removes(served):
    clients, provider, _ = served
    a = clients.instance.provision("", Spec(properties={}, tags={"t": "1"}))
    clients.instance.destroy("", "no-such-instance")
    clients.instance.destroy("", a)
    clients.instance.destroy("", a)  # gone twice is still success
    assert clients.instance.describe_instances("", {"t": "1"}) == []
    assert provider.ids() == []


def test_errors_map_to_status_codes_naming_the_field(served):
    clients, _, address = served
    channel, stub = stubs(address)
    with channel:
        code, msg = status_of(stub.Label, pb.LabelRequest(instance="mem-404", labels={"a": "b"}))
        assert code == grpc.StatusCode.NOT_FOUND and "mem-404" in msg
        code, msg = status_of(stub.Label, pb.LabelRequest(labels={"a": "b"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "instance" in msg
        code, msg = status_of(stub.Provision, pb.ProvisionRequest())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec" in msg
        code, msg = status_of(stub.Destroy, pb.DestroyRequest(instance="x", reason="explode"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "reason" in msg and "explode" in msg
        req = pb.ProvisionRequest()
        req.spec.properties.struct_value.update({"Provider": "nosuchcloud"})
        code, msg = status_of(stub.Provision, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "nosuchcloud" in msg
        req = pb.ProvisionRequest()
        req.spec.properties.struct_value.update({"Image": 42})  # wrong type, reported by the provider
        code, msg = status_of(stub.Provision, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Image" in msg
        req = pb.ValidateInstanceRequest()
        req.properties.string_value = "not an object"
        code, msg = status_of(stub.Validate, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Properties" in msg
        code, msg = status_of(stub.Provision, pb.ProvisionRequest(type="nosuchtype", spec=pb.Spec()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "nosuchtype" in msg
        # ...and the server keeps serving.
        assert stub.DescribeInstances(pb.DescribeInstancesRequest()).descriptions == []
    # The client turns statuses back into mobykit's errors.
    with pytest.raises(errors.NotFound, match="mem-404"):
        clients.instance.label("", "mem-404", {})


class Exploding(MemoryProvider):
    def list(self, tags):
        raise RuntimeError("provider bug")


def test_unexpected_error_is_internal_logged_and_server_survives(caplog):
    plugins = memory_plugins(Exploding())
    with grpc_server(plugins) as (_, bound, _tmp):
        channel, stub = stubs(bound[0])
        with channel:
            code, msg = status_of(stub.DescribeInstances, pb.DescribeInstancesRequest())
            assert code == grpc.StatusCode.INTERNAL and "DescribeInstances" in msg and "provider bug" in msg
            assert any("provider bug" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
            assert stub.Provision(pb.ProvisionRequest(spec=pb.Spec())).id.startswith("mem-")


def test_flavor_service_round_trips_spec_and_health(served):
    clients, _, _ = served
    f = clients.flavor
    spec = Spec(properties={"Memory": 256}, tags={"a": "1"}, init="first", logical_id="n1")
    out = f.prepare("vanilla", {"Init": ["second"], "Tags": {"b": "2"}}, spec, Allocation(size=3), Index("web", 3))
    assert out.init == "first\nsecond"
    assert out.tags == {"a": "1", "b": "2", "sequence": "3"}
    assert out.logical_id == "n1" and out.properties == {"Memory": 256}
    assert f.healthy("vanilla", {}, Description(id="i", tags={"health": "1"})) == Health.HEALTHY
    assert f.healthy("", {}, Description(id="i", tags={"health": "2"})) == Health.UNHEALTHY
    assert f.healthy("vanilla", {}, Description(id="i")) == Health.UNKNOWN
    with pytest.raises(errors.InvalidArgument, match="Bogus"):
        f.validate("vanilla", {"Bogus": 1}, Allocation(size=1))
    with pytest.raises(errors.InvalidArgument, match="unknown flavor 'nope'"):
        f.validate("nope", {}, Allocation(size=1))
    with pytest.raises(errors.InvalidArgument, match="instance.id"):
        f.drain("vanilla", {}, Description(id=""))


def test_group_service_and_missing_plugins_are_unimplemented(served):
    from mobykit.spi.group import GroupSpec

    clients, _, _ = served
    g = clients.group
    assert "managing" in g.commit_group(GroupSpec("web", {"Allocation": {"Size": 2}}), False)
    assert [s.id for s in g.inspect_groups()] == ["web"]
    assert g.inspect_groups()[0].properties == {"Allocation": {"Size": 2}}
    assert g.size("web") == 2
    g.set_size("web", 5)
    assert g.size("web") == 5
    assert g.describe_group("web").converged is True
    with pytest.raises(errors.NotFound, match="nope"):
        g.size("nope")
    bare = memory_plugins(group=None, flavors={})
    with grpc_server(bare) as (_, bound, _tmp):
        with connect(bound[0]) as c:
            for fn, args in ((c.group.size, ("web",)), (c.flavor.validate, ("", {}, Allocation()))):
                with pytest.raises(errors.MobykitError) as e:
                    fn(*args)
                assert "no " in str(e.value) and "configured" in str(e.value)


def test_images_service_reads_the_configured_store(tmp_path):
    plugins = memory_plugins(config={"cache": str(tmp_path / "cache")})
    with grpc_server(plugins) as (_, bound, _tmp), grpc.insecure_channel(bound[0]) as channel:
        images = pbg.ImagesStub(channel)
        try:
            import mobykit.image.store  # noqa: F401
        except ModuleNotFoundError:
            code, msg = status_of(images.Get, pb.GetImageRequest(id="sha256:" + "0" * 64))
            assert code == grpc.StatusCode.UNIMPLEMENTED and "store" in msg
            return
        code, msg = status_of(images.Get, pb.GetImageRequest(id="sha256:" + "0" * 64))
        assert code == grpc.StatusCode.NOT_FOUND and "0" * 64 in msg
        code, msg = status_of(images.Get, pb.GetImageRequest(id="latest"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "latest" in msg
        code, msg = status_of(images.Build, pb.BuildRequest())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec" in msg
        code, msg = status_of(images.Build, pb.BuildRequest(spec_yaml=["kernel: [not, closed"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec_yaml[0]" in msg
        assert list(images.List(pb.ListImagesRequest()).images) == []


class FakeStore:
    """Stands in for mobykit.image.store (a real build needs kernels and registries): records the
    ids asked for and returns a BootImage for the one id it holds."""

    def __init__(self, image_id: str):
        self.asked: list[str] = []
        self.image = BootImage(id=image_id, name="t", kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0")

    def get(self, image_id, cache=None):
        self.asked.append(image_id)
        if image_id != self.image.id:
            raise errors.NotFound(f"image {image_id} is not built here")
        return self.image


def test_provision_publishes_a_built_image_before_create(monkeypatch):
    import mobykit.image as image_pkg

    image_id = "sha256:" + "ab" * 32
    store = FakeStore(image_id)
    monkeypatch.setattr(image_pkg, "store", store, raising=False)
    monkeypatch.setitem(sys.modules, "mobykit.image.store", store)
    provider = MemoryProvider()
    with grpc_server(memory_plugins(provider)) as (_, bound, _tmp), connect(bound[0]) as c:
        iid = c.instance.provision("", Spec(properties={"Image": image_id}, tags={"img": "1"}))
        assert provider.images == {image_id: store.image}
        assert c.instance.describe_instances("", {"img": "1"}, True)[0].properties["Image"] == image_id
        assert iid in provider.ids()
        missing = "sha256:" + "cd" * 32
        with pytest.raises(errors.NotFound, match=missing):
            c.instance.provision("", Spec(properties={"Image": missing}, tags={"img": "2"}))
        assert c.instance.describe_instances("", {"img": "2"}) == []  # nothing created for it
        c.instance.provision("", Spec(properties={"Image": "not-an-id"}))  # not a built image id: untouched
        assert store.asked == [image_id, missing]


def test_health_and_unix_socket_mode(served):
    _, _, address = served
    path = Path(address.removeprefix("unix:"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with grpc.insecure_channel(address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert h.Check(health_pb2.HealthCheckRequest(service="mobykit.v1.Instance")).status == health_pb2.HealthCheckResponse.SERVING


def test_listen_addresses_are_checked():
    assert rpc_server.Listen.parse("tcp://127.0.0.1:7000").target == "127.0.0.1:7000"
    assert rpc_server.Listen.parse("unix:/tmp/x.sock").kind == "unix"
    for bad in ("127.0.0.1:7000", "tcp://127.0.0.1", "tcp://:80", "unix:", "http://x"):
        with pytest.raises(errors.InvalidArgument, match="--listen"):
            rpc_server.Listen.parse(bad)
    with pytest.raises(errors.InvalidArgument, match="--tls-cert"):
        rpc_server.make_server(memory_plugins(), [rpc_server.Listen.parse("tcp://127.0.0.1:0")])


def test_tls_accepts_good_client_and_refuses_others(tmp_path):
    tls = make_tls(tmp_path / "pki")
    files = rpc_server.TLSFiles(cert=tls.server_cert, key=tls.server_key, client_ca=tls.ca)
    with grpc_server(memory_plugins(), tcp=True, tls=files) as (_, bound, _tmp):
        address = bound[1]
        with connect(address, tls=ClientTLS(tls.ca, tls.client_cert, tls.client_key), timeout=10) as good:
            iid = good.instance.provision("", Spec(properties={}, tags={"tls": "yes"}))
            assert [d.id for d in good.instance.describe_instances("", {"tls": "yes"})] == [iid]
        for bad in (ClientTLS(tls.ca), ClientTLS(tls.ca, tls.other_cert, tls.other_key)):
            with connect(address, tls=bad, timeout=10) as c:
                with pytest.raises(errors.Unavailable):
                    c.instance.describe_instances("", {})
        with connect(address, timeout=10) as plain:  # no TLS at all
            with pytest.raises(errors.Unavailable):
                plain.instance.describe_instances("", {})


def test_serve_refuses_plain_tcp_without_insecure(tmp_path):
    r = run_cli(["serve", "--listen", "tcp://127.0.0.1:0", "--no-infrakit"], env=dict(os.environ, HOME=str(tmp_path)))
    assert r.returncode == 2
    assert "--insecure" in r.stderr and "--tls-cert" in r.stderr
    r = run_cli(["serve", "--listen", "tcp://127.0.0.1:0", "--tls-cert", "x.pem"], env=dict(os.environ, HOME=str(tmp_path)))
    assert r.returncode == 2 and "together" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.slow
def test_sigterm_lets_an_in_flight_call_finish():
    config = {"default_provider": "memory", "providers": {"memory": {"provision_latency": 2.0}}}
    from harness.mobykit_server import call

    with serve_process(["-v", "--listen", "unix:grpc.sock"], config=config) as sp:
        address, infrakit = sp.addresses
        assert stat.S_IMODE(Path(infrakit.removeprefix("infrakit:")).stat().st_mode) == 0o600
        result: dict = {}

        def provision():
            with connect(address, timeout=30) as c:
                try:
                    result["id"] = c.instance.provision("", Spec(properties={}, tags={"slow": "1"}))
                except Exception as e:  # reported below
                    result["error"] = e

        def provision_jsonrpc():
            params = {"Type": "", "Spec": {"Properties": {}, "Tags": {"slow": "2"}}}
            result["jsonrpc"] = call(infrakit.removeprefix("infrakit:"), "Instance.Provision", params)

        t = threading.Thread(target=provision)
        t.start()
        sp.wait_for_log("call InstanceService.Provision")
        t2 = threading.Thread(target=provision_jsonrpc)
        t2.start()
        sp.wait_for_log("jsonrpc call Instance.Provision")
        assert sp.terminate() == 0
        t.join(30)
        t2.join(30)
        assert "error" not in result, result
        assert result["id"].startswith("mem-")
        assert result["jsonrpc"]["result"]["ID"].startswith("mem-"), result
        assert "stopping" in sp.stderr()
        assert not Path(address.removeprefix("unix:")).exists()


@pytest.mark.slow
def test_serve_composes_group_vanilla_and_core_across_both_transports():
    """A group committed through Infrakit's socket is converged by the real group plugin over the
    core and the vanilla flavor, and seen through gRPC."""
    import time

    from harness.mobykit_server import call

    with serve_process(["--listen", "unix:grpc.sock"]) as sp:
        grpc_addr, infrakit = sp.addresses[0], sp.addresses[1].removeprefix("infrakit:")
        hello = call(infrakit, "Handshake.Hello", {})["result"]["Objects"]
        assert {"Name": "memory", "ProxyFor": ""} in hello["Instance/0.6.1"]
        assert [o["Name"] for o in hello["Flavor/0.1.1"]] == ["moby", "vanilla"]
        spec = {
            "ID": "web",
            "Properties": {
                "Allocation": {"Size": 2},
                "Instance": {"Plugin": "mobykit/memory", "Properties": {}},
                "Flavor": {"Plugin": "mobykit/vanilla", "Properties": {"Init": ["echo hi"]}},
            },
        }
        r = call(infrakit, "Group.CommitGroup", {"Spec": spec, "Pretend": False})
        assert r["result"]["ID"] == "web", r
        bad = dict(spec, ID="x", Properties=dict(spec["Properties"], Instance={"Plugin": "elsewhere/aws", "Properties": {}}))
        r = call(infrakit, "Group.CommitGroup", {"Spec": bad, "Pretend": True})
        assert r["error"]["code"] == -32000 and "elsewhere/aws" in r["error"]["message"]
        with connect(grpc_addr) as c:
            for _ in range(300):  # the controller converges in the background
                members = c.instance.describe_instances("memory", {"infrakit.group": "web"})
                if len(members) == 2:
                    break
                time.sleep(0.1)
            assert len(members) == 2
            assert c.group.size("web") == 2
            assert [s.id for s in c.group.inspect_groups()] == ["web"]
        assert sp.terminate() == 0


def test_config_file_is_loaded_and_checked(tmp_path, monkeypatch):
    from mobykit.core import config as configuration
    from mobykit.core.instance import InstanceCore

    good = tmp_path / "mobykit.yml"
    good.write_text("default_provider: memory\nproviders:\n  memory:\n    id_prefix: cfg-\n")
    monkeypatch.setenv("MOBYKIT_CONFIG", str(good))
    cfg = configuration.load()
    assert cfg["providers"]["memory"] == {"id_prefix": "cfg-"}
    core = InstanceCore(cfg)  # loads the memory provider with its section
    assert core.provision("", Spec(properties={}, tags={})).startswith("cfg-")
    assert [d.id for d in core.describe_instances("", {})] == ["cfg-00000001"]

    bad = tmp_path / "bad.yml"
    bad.write_text("providers:\n  memory: {\n")
    with pytest.raises(errors.InvalidArgument, match=r"bad\.yml:\d+: invalid YAML"):
        configuration.load(bad)
    bad.write_text("provider: {}\n")
    with pytest.raises(errors.InvalidArgument, match="unknown key.*provider"):
        configuration.load(bad)
    bad.write_text("providers:\n  memory: 3\n")
    with pytest.raises(errors.InvalidArgument, match="providers.memory"):
        configuration.load(bad)
    bad.write_text("providers:\n  memory:\n    provision_latency: -1\n")
    with pytest.raises(errors.InvalidArgument, match="provision_latency"):
        InstanceCore(configuration.load(bad)).describe_instances("memory", {})
    r = run_cli(["serve", "--config", str(tmp_path / "missing.yml"), "--no-infrakit"], env=dict(os.environ, HOME=str(tmp_path)))
    assert r.returncode == 2 and "missing.yml" in r.stderr


def test_client_reports_an_unreachable_server_by_address(tmp_path):
    address = f"unix:{tmp_path}/nobody.sock"
    with connect(address, timeout=5) as c:
        with pytest.raises(errors.Unavailable, match="nobody.sock"):
            c.instance.describe_instances("", {})
    with pytest.raises(errors.InvalidArgument, match="MOBYKIT_SERVER"):
        connect("")


def test_libvirt_test_driver_behind_the_server():
    """The real libvirt provider (libvirt's in-process test:///default driver) behind gRPC:
    Type selects it, unknown property keys are named, tags and labels round-trip, destroy is idempotent."""
    pytest.importorskip("libvirt")
    from mobykit.core.instance import InstanceCore
    from mobykit.rpc.plugins import Plugins

    core = InstanceCore({"providers": {"libvirt": {"URI": "test:///default", "Pool": "mobykit-rpc-test"}}})
    with grpc_server(Plugins(instance=core)) as (_, bound, _tmp), connect(bound[0]) as c:
        with pytest.raises(errors.InvalidArgument, match="Bogus"):
            c.instance.validate("libvirt", {"Bogus": 1})
        props = {"Kernel": "/boot/k", "Initrd": "/boot/i", "Memory": 128}
        iid = c.instance.provision("libvirt", Spec(properties=props, tags={"rpc-test": "1"}))
        try:
            (d,) = c.instance.describe_instances("libvirt", {"rpc-test": "1"}, True)
            assert d.id == iid and d.properties["State"] in ("pending", "running")
            c.instance.label("libvirt", iid, {"extra": "x"})
            assert c.instance.describe_instances("libvirt", {"extra": "x"})[0].tags == {"rpc-test": "1", "extra": "x"}
        finally:
            c.instance.destroy("libvirt", iid)
        c.instance.destroy("libvirt", iid)
        assert c.instance.describe_instances("libvirt", {"rpc-test": "1"}) == []


def test_a_refused_listen_leaves_no_socket_behind(tmp_path):
    import socket as socketlib

    busy = socketlib.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        listens = [rpc_server.Listen.parse(f"unix:{tmp_path}/a.sock"), rpc_server.Listen.parse(f"tcp://127.0.0.1:{port}")]
        with pytest.raises(errors.InvalidArgument, match=f"127.0.0.1:{port}"):
            rpc_server.make_server(memory_plugins(), listens, insecure=True)
        assert list(tmp_path.iterdir()) == []
        with pytest.raises(errors.InvalidArgument, match="not a socket"):
            (tmp_path / "file").write_text("x")
            rpc_server.make_server(memory_plugins(), [rpc_server.Listen.parse(f"unix:{tmp_path}/file")])
        assert (tmp_path / "file").read_text() == "x"
    finally:
        busy.close()
