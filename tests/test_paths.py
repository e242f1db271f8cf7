"""A server reads only files under the roots its operator allows (``mobykit.core.paths``).

Every door a client has to a file on the server is tried, over gRPC and Infrakit's JSON-RPC: an
inline spec's ``files: source:``, a flavor ``Image`` path, Images.Build ``spec_paths`` and
``spec_yaml``, a spec's relative ``source:`` that climbs with ``..`` or through a symlink, an
``@pkg:`` recipe outside, libvirt ``Kernel``/``Initrd`` and a ``test:///FILE`` URI, and a symlink
swapped in after the check. Each must be refused naming its field, and an audit hook proves that
no file outside the roots was ever opened.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import json_format, struct_pb2

from harness.images import SPEC, standard_images
from harness.mobykit_server import call, grpc_server, jsonrpc_server, serve_process
from mobykit.cli.serve import compose
from mobykit.core import paths
from mobykit.errors import InvalidArgument, SpecError
from mobykit.image.cache import Cache
from mobykit.rpc.gen import mobykit_pb2 as pb
from mobykit.rpc.gen import mobykit_pb2_grpc as pbg

SECRET = b"root:$6$never-leaves-the-server:20228:0:99999:7:::\n"

# -- proof that nothing outside the roots is opened ------------------------------------------------

_watch: dict[str, list[str]] = {}
_watch_lock = threading.Lock()


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _watch:
        return
    target = args[0]
    if isinstance(target, bytes):
        target = os.fsdecode(target)
    if not isinstance(target, str):
        return
    real = os.path.realpath(target)
    with _watch_lock:
        for outside, seen in _watch.items():
            if real == outside or real.startswith(outside + os.sep):
                seen.append(real)


sys.addaudithook(_audit)  # hooks cannot be removed; it only records while a test watches


@pytest.fixture
def opened_outside():
    """The list of files opened under the test's ``outside`` directory while the test runs."""
    seen: list[str] = []
    holder: dict[str, list[str]] = {}
    yield holder, seen
    with _watch_lock:
        for k in holder:
            _watch.pop(k, None)


# -- the layout ------------------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path, opened_outside):
    """``root`` (allowed: specs, app.json, a recipe) and ``outside`` (a secret, a spec, a recipe,
    a kernel), the policy installed for the test, and a cache with the harness's small images."""
    holder, seen = opened_outside
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    (outside / "spec.yml").write_text(SPEC)
    (outside / "app.json").write_bytes(SECRET)
    (outside / "recipe").mkdir()
    (outside / "recipe" / "build.yml").write_text("name: stolen\nfiles:\n  - source: x\n    dest: /x\n")
    (outside / "recipe" / "x").write_bytes(SECRET)
    (root / "example.yml").write_text(SPEC)
    (root / "app.json").write_text('{"app": true}\n')
    (root / "link-out").symlink_to(outside / "shadow")
    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    with _watch_lock:
        holder[str(outside.resolve())] = seen
        _watch.update(holder)
    with paths.using(paths.PathPolicy.under([root])):
        yield {"root": root, "outside": outside, "cache": cache, "seen": seen}
    assert seen == [], f"files outside the allowed roots were opened: {seen}"


def inline(files: list[dict], extra: dict | None = None) -> dict:
    spec = yaml.safe_load(SPEC)
    spec["files"] = files
    spec.update(extra or {})
    return spec


# -- the policy itself -----------------------------------------------------------------------------


def test_policy_refuses_absolute_dotdot_and_symlinks_out_naming_the_field(world):
    root, outside = world["root"], world["outside"]
    for bad in (outside / "shadow", root / ".." / "outside" / "shadow", "../outside/shadow", root / "link-out"):
        with pytest.raises(InvalidArgument) as e:
            paths.open_file(bad, "Properties.Image")
        assert str(e.value).startswith("Properties.Image: ")
        assert str(root) in str(e.value)  # the roots are named
    assert paths.read_bytes("app.json", "x") == b'{"app": true}\n'  # relative: from the first root


def test_a_symlink_swapped_in_between_check_and_open_is_caught(world, monkeypatch):
    """The race a checker that only looks at the path loses: the link points inside when it is
    resolved and outside when it is opened. The opened file is what is checked."""
    root, outside = world["root"], world["outside"]
    link = root / "spec-link.yml"
    link.symlink_to(root / "example.yml")
    real_open = os.open

    def swap_then_open(path, *args, **kwargs):
        if os.fspath(path) == str(root / "example.yml"):
            link.unlink()
            link.symlink_to(outside / "spec.yml")
            (root / "example.yml").unlink()
            (root / "example.yml").symlink_to(outside / "spec.yml")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(paths.os, "open", swap_then_open)
    with pytest.raises(InvalidArgument, match=r"^Properties\.Image: .*changed to point outside"):
        paths.open_file(link, "Properties.Image")
    # The hook recorded the open of the swapped-in target: that one is the kernel's, refused before
    # any byte was read. Nothing was read from it.
    world["seen"].clear()


def test_a_fifo_is_refused_not_waited_on(world):
    fifo = world["root"] / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        paths.open_file(fifo, "files[0].source")


def test_without_a_policy_the_cli_reads_its_users_files(tmp_path):
    f = tmp_path / "anywhere.txt"
    f.write_text("mine")
    assert paths.current().roots is None
    assert paths.read_bytes(f, "spec") == b"mine"


# -- every door, through both transports ----------------------------------------------------------


@pytest.fixture
def servers(world):
    config = {"cache": str(world["cache"].root), "default_provider": "memory",
              "providers": {"memory": {}, "libvirt": {"URI": "test:///default"}}}
    plugins = compose(config)
    with grpc_server(plugins) as (_server, bound, _tmp), jsonrpc_server(plugins) as js:
        channel = grpc.insecure_channel(bound[0])
        try:
            yield {"grpc": channel, "jsonrpc": js.path, **world}
        finally:
            channel.close()


def _value(obj) -> struct_pb2.Value:
    return json_format.ParseDict(obj, struct_pb2.Value())


def grpc_refusal(fn, request) -> str:
    with pytest.raises(grpc.RpcError) as e:
        fn(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    return e.value.details()


def jsonrpc_refusal(sock, method: str, params: dict) -> str:
    answer = call(sock, method, params)
    assert "result" not in answer or answer.get("result") is None, answer
    assert answer["error"]["code"] == -32000, answer
    return answer["error"]["message"]


def prepare_both(s, properties: dict) -> list[str]:
    flavor = pbg.FlavorStub(s["grpc"])
    req = pb.PrepareRequest(type="moby", properties=_value(properties), spec=pb.Spec(),
                            allocation=pb.Allocation(size=1), index=pb.Index(group="g", sequence=1))
    return [grpc_refusal(flavor.Prepare, req),
            jsonrpc_refusal(s["jsonrpc"], "Flavor.Prepare", {"Type": "moby", "Properties": properties,
                                                             "Spec": {}, "Allocation": {"Size": 1},
                                                             "Index": {"Group": "g", "Sequence": 1}})]


def test_inline_spec_source_absolute_is_refused(servers):
    """The reported attack: an inline spec copying the server's /etc/shadow into the image."""
    for src in ("/etc/shadow", str(servers["outside"] / "shadow")):
        for msg in prepare_both(servers, {"Image": inline([{"path": "etc/stolen", "source": src}])}):
            assert "files[0].source" in msg and src in msg
    assert not any(b"never-leaves" in p.read_bytes() for p in Path(servers["cache"].root).rglob("*") if p.is_file())


def test_inline_spec_source_climbing_or_through_a_symlink_is_refused(servers):
    for src in ("../outside/shadow", "link-out"):
        for msg in prepare_both(servers, {"Image": inline([{"path": "etc/stolen", "source": src}])}):
            assert "files[0].source" in msg and src in msg


def test_inline_spec_relative_source_is_taken_from_the_first_root(servers):
    """Before, an inline spec resolved relative paths against a cache copy, so they never worked."""
    flavor = pbg.FlavorStub(servers["grpc"])
    spec = inline([{"path": "etc/app.json", "source": "app.json", "mode": "0644"}])
    out = flavor.Prepare(pb.PrepareRequest(type="moby", properties=_value({"Image": spec}), spec=pb.Spec(),
                                           allocation=pb.Allocation(size=1), index=pb.Index(group="g", sequence=1)))
    image_id = json_format.MessageToDict(out.spec.properties)["Image"]
    assert image_id.startswith("sha256:")
    import gzip

    initrd = gzip.decompress((servers["cache"].root / "images" / image_id[7:] / "initrd.img").read_bytes())
    assert b'{"app": true}\n' in initrd


def test_image_path_outside_is_refused_by_validate_and_prepare(servers):
    flavor = pbg.FlavorStub(servers["grpc"])
    bad = str(servers["outside"] / "spec.yml")
    msg = grpc_refusal(flavor.Validate, pb.ValidateFlavorRequest(type="moby", properties=_value({"Image": bad}),
                                                                 allocation=pb.Allocation(size=1)))
    assert msg.startswith("Properties.Image: ") and bad in msg
    for msg in prepare_both(servers, {"Image": bad}):
        assert msg.startswith("Properties.Image: ")
    for msg in prepare_both(servers, {"Image": [str(servers["root"] / "example.yml"), bad]}):
        assert msg.startswith("Properties.Image[1]: ")
    for msg in prepare_both(servers, {"Image": "../outside/spec.yml"}):
        assert "Properties.Image" in msg


def test_spec_in_root_whose_source_climbs_out_is_refused_with_file_and_line(servers):
    root = servers["root"]
    (root / "climb.yml").write_text(SPEC.replace("source: app.json", "source: ../outside/app.json"))
    for msg in prepare_both(servers, {"Image": str(root / "climb.yml")}):
        assert "climb.yml:" in msg and "files[1].source" in msg


def test_pkg_recipe_outside_is_refused(servers):
    spec = inline([], {"onboot": [{"name": "x", "image": "@pkg:../outside/recipe"}]})
    for msg in prepare_both(servers, {"Image": spec}):
        assert "package recipe" in msg and "outside" in msg


def test_images_build_paths_and_inline_yaml(servers):
    images = pbg.ImagesStub(servers["grpc"])
    bad = str(servers["outside"] / "spec.yml")
    msg = grpc_refusal(images.Build, pb.BuildRequest(spec_paths=[bad]))
    assert msg.startswith("spec_paths[0]: ") and bad in msg
    text = yaml.safe_dump(inline([{"path": "etc/x", "source": str(servers["outside"] / "shadow")}]))
    msg = grpc_refusal(images.Build, pb.BuildRequest(spec_yaml=[text]))
    assert msg.startswith("spec_yaml[0]:") and "files[0].source" in msg
    good = images.Build(pb.BuildRequest(spec_paths=["example.yml"]))  # relative: from the first root
    assert good.id.startswith("sha256:")


def test_libvirt_kernel_initrd_and_test_uri_outside_are_refused(servers):
    inst = pbg.InstanceStub(servers["grpc"])
    kernel = str(servers["outside"] / "shadow")
    for key in ("Kernel", "Initrd"):
        props = {"Provider": "libvirt", "Kernel": str(servers["root"] / "app.json"),
                 "Initrd": str(servers["root"] / "app.json"), key: kernel}
        msg = grpc_refusal(inst.Validate, pb.ValidateInstanceRequest(type="libvirt", properties=_value(props)))
        assert msg.startswith(f"Properties.{key}: ") and kernel in msg
        msg = grpc_refusal(inst.Provision, pb.ProvisionRequest(type="libvirt", spec=pb.Spec(properties=_value(props))))
        assert msg.startswith(f"Properties.{key}: ")
        msg = jsonrpc_refusal(servers["jsonrpc"], "Instance.Validate", {"Type": "libvirt", "Properties": props})
        assert msg.startswith(f"Properties.{key}: ")
    props = {"Provider": "libvirt", "URI": f"test://{servers['outside'] / 'shadow'}"}
    msg = grpc_refusal(inst.Validate, pb.ValidateInstanceRequest(type="libvirt", properties=_value(props)))
    assert msg.startswith("Properties.URI: ")


def test_a_link_swapped_between_validate_and_prepare_is_refused(servers):
    """Validate sees a good spec; the client then points the link outside and asks Prepare."""
    root = servers["root"]
    link = root / "current.yml"
    link.symlink_to(root / "example.yml")
    flavor = pbg.FlavorStub(servers["grpc"])
    flavor.Validate(pb.ValidateFlavorRequest(type="moby", properties=_value({"Image": str(link)}),
                                             allocation=pb.Allocation(size=1)))
    link.unlink()
    link.symlink_to(servers["outside"] / "spec.yml")
    for msg in prepare_both(servers, {"Image": str(link)}):
        assert msg.startswith("Properties.Image: ")


# -- the operator's side: mobykit serve --allow-path ------------------------------------------------


def test_serve_defaults_to_the_config_directory_and_allow_path_adds_roots(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "spec.yml").write_text(SPEC)
    config = {"default_provider": "memory", "providers": {"memory": {}}}

    def validate(address: str, image: str) -> grpc.StatusCode | None:
        with grpc.insecure_channel(address) as ch:
            try:
                pbg.FlavorStub(ch).Validate(pb.ValidateFlavorRequest(
                    type="moby", properties=_value({"Image": image}), allocation=pb.Allocation(size=1)), timeout=30)
                return None
            except grpc.RpcError as e:
                assert str(outside) in e.details() or "no such" in e.details()
                return e.code()

    with serve_process(["--listen", f"unix:{tmp_path / 'a.sock'}", "--no-infrakit"], config, expect=1) as sp:
        (sp.workdir / "mine.yml").write_text(SPEC)
        assert validate(sp.addresses[0], "mine.yml") is None  # relative, in the config's directory
        assert validate(sp.addresses[0], str(outside / "spec.yml")) == grpc.StatusCode.INVALID_ARGUMENT
    with serve_process(["--listen", f"unix:{tmp_path / 'b.sock'}", "--no-infrakit", "--allow-path", str(outside)],
                       config, expect=1) as sp:
        assert validate(sp.addresses[0], str(outside / "spec.yml")) is None
        assert "requests may name files under" in sp.stderr()


def test_config_allow_paths_are_relative_to_the_config_file(tmp_path):
    from mobykit.core import config as configuration

    (tmp_path / "specs").mkdir()
    cfg = tmp_path / "config.yml"
    cfg.write_text(json.dumps({"allow_paths": ["specs"]}))
    loaded = configuration.load(cfg)
    policy = configuration.path_policy(loaded, [], cfg)
    assert policy.roots == ((tmp_path / "specs").resolve(),)
    cfg.write_text(json.dumps({"allow_paths": "specs"}))
    with pytest.raises(InvalidArgument, match="allow_paths: must be a list"):
        configuration.load(cfg)
    with pytest.raises(InvalidArgument, match="not a directory"):
        paths.PathPolicy.under([tmp_path / "missing"])


def test_spec_file_refusal_is_a_spec_error_naming_file_and_line(world):
    from mobykit.spec import load

    root = world["root"]
    (root / "bad.yml").write_text(SPEC.replace("source: app.json", "source: /etc/shadow"))
    with pytest.raises(SpecError) as e:
        load([root / "bad.yml"])
    assert e.value.field == "files[1].source" and e.value.line and e.value.file.endswith("bad.yml")


def test_a_server_started_from_slash_without_allow_path_refuses_to_start(monkeypatch):
    from mobykit.core import config as configuration

    monkeypatch.chdir("/")
    with pytest.raises(InvalidArgument, match="--allow-path"):
        configuration.path_policy({}, [], None)
    assert configuration.path_policy({}, ["/"], None).roots == (Path("/"),)  # said explicitly: allowed
