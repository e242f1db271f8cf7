"""Property-based fuzzing (Hypothesis) of everything that reads input a user or a client controls.

The property is the same everywhere: any input gives a result or one of our clean errors
(a MobykitError subclass; an INVALID_ARGUMENT-class gRPC status; a JSON-RPC error object), never an
unexpected exception, an INTERNAL status or a traceback in the log, and a server answers a good
call afterwards. Covered: the spec loader (text, bytes and structured documents), group specs,
instance and flavor properties (in process, as protobuf Structs through the gRPC servicers and as
JSON through the JSON-RPC dispatcher) and raw transport bodies (random bytes to every gRPC method,
hostile HTTP bodies to the JSON-RPC socket).

Bounded and deterministic: ``derandomize=True`` and no example database; Hypothesis's other caches
go to a temp dir of the run's own (tests/conftest.py), so nothing is left in ``.hypothesis/``. The file runs in 20-50 s.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import string
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.mobykit_server import UnixHTTPConnection, post_raw
from mobykit.cli.serve import compose
from mobykit.core import paths
from mobykit.errors import FailedPrecondition, MobykitError
from mobykit.flavor.moby import MobyFlavor
from mobykit.group import spec as group_spec
from mobykit.rpc import convert, logthrottle
from mobykit.rpc import server as rpc_server
from mobykit.rpc.gen import mobykit_pb2 as pb
from mobykit.rpc.gen import mobykit_pb2_grpc as pbg
from mobykit.rpc.jsonrpc import Dispatcher, JsonRpcServer
from mobykit.rpc.plugins import Plugins
from mobykit.spec import yamlfile
from mobykit.spec.load import loads
from mobykit.spi.group import GroupSpec
from mobykit.spi.types import Allocation

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
FEW = settings(FUZZ, max_examples=40)

CLEAN_STATUSES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
}


@pytest.fixture(autouse=True)
def clean_log(caplog) -> Iterator[None]:
    """Every test: no traceback and nothing at ERROR in the log (the throttle starts empty, so the
    first of any kind would be there)."""
    logthrottle.THROTTLE.reset()
    caplog.set_level(logging.INFO)
    yield
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, "\n".join(r.getMessage() for r in bad)
    assert "Traceback" not in caplog.text


def clean(fn, *args) -> Any:
    """``fn(*args)``, or the MobykitError it raised; anything else propagates and fails the example."""
    try:
        return fn(*args)
    except MobykitError as e:
        return e


def assert_clean(validate, *args) -> None:
    """A validator returns None or raises a MobykitError, nothing else."""
    result = clean(validate, *args)
    assert result is None or isinstance(result, MobykitError), result


# -- strategies ------------------------------------------------------------------------------------
#
# Random data fails the first check it meets ("unknown field"), so most of what is generated here
# is near-valid: objects with the fields a parser knows, each value plausible three times in four,
# and now and then a stray key or a value of any JSON type. That reaches the checks behind the first.

# Strings that mean something to some parser: durations, percentages, ports, image ids, paths, plugins.
WORDS = st.sampled_from([
    "", "0", "-1", "1m30s", "90s", "500ms", "1.5h", "h", "25%", "101%", "x%", "auto", "none", "console",
    "running", "tcp", "http", "/", "/health", "8080:80", "udp/53:53", "0:22", "99999:1", "a:b",
    "sha256:" + "0" * 64, "sha256:xyz", "mobykit/libvirt", "mobykit/moby", "mobykit/vanilla",
    "mobykit/memory",
    "other/x", "libvirt", "memory", "aws", "test:///default", "spec.yml", "../etc/passwd", "a\x00b", "~/x",
    "\udc80", "é" * 3,
]) | st.text(max_size=20)  # fmt: skip
KNOWN_KEYS = [
    "ID", "Properties", "Allocation", "Size", "LogicalIDs", "Instance", "Flavor", "Plugin", "Updating",
    "Image", "Init", "Tags", "Health", "Mode", "Port", "Path", "Deadline", "Drain", "Command", "Grace",
    "Provider", "Memory", "Kernel", "kind", "metadata", "name", "properties", "image", "services", "files",
]  # fmt: skip
KEYS = st.sampled_from(KNOWN_KEYS + [k.lower() for k in KNOWN_KEYS]) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | WORDS
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)
COUNTS = st.integers(-2, 10) | st.sampled_from([2**31, 2**53 + 1, 1.5, 3.0])
DURATIONS = st.sampled_from(["0", "90s", "1m30s", "500ms", "1.5h", "-1s", "5x", "", "1m1"]) | st.integers(
    -5, 600
)
LISTS_OF_WORDS = st.lists(WORDS, max_size=3)
MAPS_OF_WORDS = st.dictionaries(WORDS, WORDS, max_size=3)


def mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` three times in four, else any JSON value."""
    return st.one_of(good, good, good, JSON)


def shaped(
    fields: dict[str, st.SearchStrategy], required: tuple[str, ...] = ()
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects holding the ``required`` fields and some of the others (values ``mostly`` plausible),
    with a stray key one time in four."""
    known = st.fixed_dictionaries(
        {k: mostly(v) for k, v in fields.items() if k in required},
        optional={k: mostly(v) for k, v in fields.items() if k not in required},
    )
    stray = st.one_of(
        st.just({}), st.just({}), st.just({}), st.dictionaries(KEYS, JSON, min_size=1, max_size=1)
    )
    return st.builds(lambda k, extra: {**extra, **k}, known, stray)


INSTANCE_PROPS = shaped(
    {
        "CPUs": COUNTS,
        "Memory": st.integers(-1, 4096) | COUNTS,
        "Image": st.sampled_from(["sha256:" + "ab" * 32, "sha256:xyz"]) | WORDS,
        "Kernel": st.sampled_from(["/boot/k", "spec.yml", ""]) | WORDS,
        "Initrd": st.sampled_from(["/boot/i", ""]) | WORDS,
        "Cmdline": WORDS,
        "URI": st.sampled_from(["test:///default", "qemu:///system", "test:///x.xml"]) | WORDS,
        "Pool": WORDS,
        "Publish": st.lists(st.sampled_from(["8080:80", "udp/53:53", "0:22", "1:1"]) | WORDS | COUNTS),
    }
)
ATTACHMENTS = st.lists(shaped({"ID": WORDS, "Type": WORDS}), max_size=2)
VANILLA_PROPS = shaped({"Init": LISTS_OF_WORDS, "Tags": MAPS_OF_WORDS, "Attachments": ATTACHMENTS})
IMAGE_REFS = (
    st.sampled_from(["linuxkit/kernel:6.6", "linuxkit/init:v1", "alpine@sha256:" + "0" * 64, "Bad Ref"])
    | WORDS
)
SERVICE = shaped(
    {
        "name": st.sampled_from(["getty", "sshd", "-x", "a" * 200]) | WORDS,
        "image": IMAGE_REFS,
        "capabilities": st.lists(
            st.sampled_from(["CAP_ALL", "CAP_NET_ADMIN", "NET_ADMIN", "CAP_BOGUS"]) | WORDS
        ),
        "binds": st.lists(st.sampled_from(["/etc:/etc", "/var:/var:ro", "x", "/a:/b:bogus"]) | WORDS),
        "command": LISTS_OF_WORDS,
        "env": LISTS_OF_WORDS,
        "net": st.sampled_from(["host", "none", "/proc/1/ns/net"]) | WORDS,
        "rlimits": st.lists(st.sampled_from(["nofile,1024,2048", "RLIMIT_BOGUS,1,1"]) | WORDS),
        "uid": COUNTS | WORDS,
        "readonly": st.booleans(),
        "sysctl": MAPS_OF_WORDS,
    }
)
FILE = shaped(
    {
        "path": st.sampled_from(["etc/hosts", "/etc/x", "../escape", "a/../../b"]) | WORDS,
        "contents": WORDS,
        "directory": st.booleans(),
        "symlink": WORDS,
        "source": st.sampled_from(["spec.yml", "../x", "~/x", "/etc/hosts"]),
        "metadata": st.sampled_from(["yaml", "json"]) | WORDS,
        "optional": st.booleans(),
        "mode": st.sampled_from(["0644", "0755", "0o7", "999", "12345"]) | COUNTS,
        "uid": COUNTS | WORDS,
        "gid": WORDS,
    }
)
SPEC_DOCS = shaped(
    {
        "kernel": shaped(
            {"image": IMAGE_REFS, "cmdline": WORDS, "binary": WORDS, "tar": WORDS, "ucode": WORDS}
        ),
        "init": st.lists(IMAGE_REFS, max_size=3),
        "onboot": st.lists(SERVICE, max_size=2),
        "services": st.lists(SERVICE, max_size=2),
        "onshutdown": st.lists(SERVICE, max_size=1),
        "system": st.lists(SERVICE, max_size=1),
        "files": st.lists(FILE, max_size=3),
        "trust": shaped({"org": LISTS_OF_WORDS, "image": LISTS_OF_WORDS}),
        "outputs": st.lists(
            shaped({"format": st.sampled_from(["kernel+initrd", "iso-bios", "raw-bios"]) | WORDS})
        ),
    }
)
MOBY_PROPS = shaped(
    {
        "Image": st.sampled_from(["spec.yml", "missing.yml", "/etc/passwd"])
        | st.lists(WORDS, max_size=2)
        | SPEC_DOCS,
        "Init": LISTS_OF_WORDS,
        "Tags": MAPS_OF_WORDS,
        "Health": shaped(
            {
                "Mode": st.sampled_from(["console", "running", "tcp", "http"]) | WORDS,
                "Port": st.integers(-1, 70000),
                "Path": WORDS,
                "Deadline": DURATIONS,
            }
        ),
        "Drain": shaped({"Command": WORDS | LISTS_OF_WORDS, "Grace": DURATIONS}),
    },
    required=("Image",),
)
PLUGINS = st.sampled_from(
    ["mobykit/libvirt", "mobykit/memory", "mobykit/vanilla", "mobykit/moby", "other/x", ""]
)
GROUP_PROPS = shaped(
    {
        "Allocation": shaped(
            {"Size": COUNTS, "LogicalIDs": st.lists(st.sampled_from(["a", "b", ""]) | WORDS, max_size=3)}
        ),
        "Instance": shaped(
            {"Plugin": PLUGINS, "Properties": INSTANCE_PROPS}, required=("Plugin", "Properties")
        ),
        "Flavor": shaped(
            {"Plugin": PLUGINS, "Properties": VANILLA_PROPS | MOBY_PROPS}, required=("Plugin", "Properties")
        ),
        "Updating": shaped(
            {
                "MaxSurge": COUNTS | st.sampled_from(["25%", "0", "101%"]),
                "MaxUnavailable": COUNTS | WORDS,
                "MinReadySeconds": DURATIONS,
                "Count": COUNTS,
                "Duration": DURATIONS,
                "Rollback": st.sampled_from(["auto", "none"]) | st.booleans(),
            }
        ),
    },
    required=("Allocation", "Instance", "Flavor"),
)
GROUP_DOCS = shaped({"ID": WORDS, "Properties": GROUP_PROPS}, required=("ID", "Properties")) | shaped(
    {
        "kind": st.sampled_from(["group", "group-controller", "x"]),
        "metadata": shaped({"name": WORDS}),
        "properties": GROUP_PROPS,
    }
)

# Text that is YAML-shaped often enough to get past the scanner into every later check.
YAML_PIECES = st.sampled_from([
    "kernel:\n", "  image: linuxkit/kernel:6.6\n", "  cmdline: console=ttyS0\n", "init:\n",
    "  - linuxkit/init:v1\n", "onboot:\n", "services:\n", "  - name: getty\n",
    "    image: linuxkit/getty:v1\n", "    capabilities: [CAP_ALL]\n", "    binds: [/etc:/etc]\n",
    "files:\n", "  - path: etc/hosts\n", "    contents: x\n", "    mode: 0644\n", "    source: ../x\n",
    "    uid: getty\n", "trust:\n", "outputs:\n", "  - format: kernel+initrd\n", "- ", ": ",
    "{", "}", "[", "]", ",", "&a ", "*a ", "<<: *a\n", "!!python/object:os.system ", "!!binary ", "---\n",
    "...\n", "'", '"', "\\", "#", "\t", "? ", "|\n", ">-\n", "%YAML 1.1\n", "\x00", "\x85", "\ufeff", "é",
    "0x1F", "1e9", ".nan", "~", "null", "yes", "2001-12-14", "\n", "  ",
]) | st.text(max_size=6)  # fmt: skip
YAMLISH = st.lists(YAML_PIECES, max_size=30).map("".join)


# -- the spec loader and group specs, in process ---------------------------------------------------


@pytest.fixture(scope="module")
def roots() -> Iterator[Path]:
    """A server's path policy: requests may name files under one temp directory only, which holds
    one valid spec (so the moby flavor's ``Image: spec.yml`` is found)."""
    root = Path(tempfile.mkdtemp(prefix="mobykit-fuzz-"))
    (root / "spec.yml").write_text("kernel:\n  image: linuxkit/kernel:6.6\n  cmdline: console=ttyS0\n")
    try:
        with paths.using(paths.PathPolicy.under([root])):
            yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(text=st.text(max_size=300) | YAMLISH)
def test_spec_loader_takes_any_text(text, roots):
    result = clean(loads, text, "fuzz.yml", roots)
    assert isinstance(result, MobykitError) or result.sources == ["fuzz.yml"]


@FUZZ
@given(data=st.binary(max_size=300) | YAMLISH.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_yaml_parser_takes_any_bytes(data):
    result = clean(yamlfile.parse, data, "fuzz.yml")
    assert isinstance(result, MobykitError | yamlfile.Document)


@FUZZ
@given(doc=mostly(SPEC_DOCS))
def test_spec_loader_takes_any_structured_document(doc, roots):
    text = yaml.safe_dump(doc, allow_unicode=True)
    result = clean(loads, text, "fuzz.yml", roots)
    assert isinstance(result, MobykitError) or result.sources == ["fuzz.yml"]


@FUZZ
@given(gid=WORDS, props=mostly(GROUP_PROPS))
def test_group_spec_parse_takes_any_properties(gid, props):
    result = clean(group_spec.parse, GroupSpec(id=gid, properties=props))
    assert isinstance(result, MobykitError) or result.id == gid


@FUZZ
@given(doc=GROUP_DOCS | JSON)
def test_group_spec_documents_and_files(doc, roots):
    assert isinstance(clean(group_spec.from_document, doc, "fuzz.yml"), MobykitError | GroupSpec)
    path = roots / "group.yml"
    path.write_text(json.dumps(doc))
    result = clean(group_spec.load, path)
    assert isinstance(result, MobykitError | group_spec.GroupConfig)


@FUZZ
@given(data=st.binary(max_size=200) | YAMLISH.map(str.encode))
def test_group_spec_files_of_any_bytes(data, roots):
    path = roots / "group.yml"
    path.write_bytes(data)
    assert isinstance(clean(group_spec.load, path), MobykitError | group_spec.GroupConfig)


# -- instance and flavor properties, behind both transports ----------------------------------------


def _no_build(*_args: Any) -> Any:
    raise FailedPrecondition("fuzz: images are not built here")


@dataclass
class Served:
    plugins: Plugins
    dispatcher: Dispatcher
    grpc_channel: grpc.Channel
    jsonrpc_path: Path


@pytest.fixture(scope="module")
def served(roots) -> Iterator[Served]:
    """The plugins ``mobykit serve`` composes (libvirt through its in-process test:///default driver,
    moby, vanilla, the group plugin), behind a gRPC server and a JSON-RPC socket."""
    config = {
        "default_provider": "libvirt",
        "providers": {"libvirt": {"URI": "test:///default", "Pool": "mobykit-fuzz"}},
        "cache": str(roots / "cache"),
        "allow_paths": [str(roots)],
    }
    plugins = compose(config)
    # Validate never builds; a Prepare reached by random bytes must not either.
    plugins.flavors["moby"] = MobyFlavor(config, instances=plugins.instance, build=_no_build)
    tmp = Path(tempfile.mkdtemp(prefix="mobykit-fuzz-sockets-"))
    server, bound = rpc_server.make_server(
        plugins, [rpc_server.Listen.parse(f"unix:{tmp}/grpc.sock")], max_workers=4
    )
    jsonrpc = JsonRpcServer(plugins, tmp / "plugins" / "mobykit").start()
    channel = grpc.insecure_channel(bound[0])
    try:
        yield Served(plugins, Dispatcher(plugins), channel, jsonrpc.path)
    finally:
        channel.close()
        jsonrpc.stop(grace=5)
        rpc_server.stop(server, grace=5)
        for component in (plugins.group, *plugins.flavors.values()):  # as serve does on shutdown
            close = getattr(component, "close", None)
            if callable(close):
                close()
        shutil.rmtree(tmp, ignore_errors=True)


def grpc_status(fn, request) -> grpc.StatusCode:
    try:
        fn(request, timeout=30)
    except grpc.RpcError as e:
        assert not e.details().startswith("internal error"), e.details()
        return e.code()
    return grpc.StatusCode.OK


def carried(data: Any, out) -> bool:
    """Fill the Struct ``out`` from ``data``; False when protobuf cannot carry it (a lone surrogate
    is JSON, but not UTF-8: a gRPC client cannot send it, the JSON-RPC part of a test still does)."""
    try:
        convert.to_value(data, out)
    except UnicodeEncodeError:
        return False
    return True


def assert_serves(s: Served) -> None:
    stub = pbg.InstanceStub(s.grpc_channel)
    assert (
        stub.DescribeInstances(pb.DescribeInstancesRequest(type="libvirt", tags={"fuzz": "none"})).type
        == "libvirt"
    )
    reply = json.loads(post_raw(s.jsonrpc_path, b'{"method": "Handshake.Implements", "id": 1}')[2])
    assert reply["result"]["APIs"]


def dispatch(s: Served, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One JSON-RPC call through the dispatcher (in process: the socket is fuzzed on its own below)."""
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode(
        "utf-8", "surrogatepass"
    )
    reply = json.loads(s.dispatcher.respond(body))
    if "error" in reply:
        assert reply["error"]["code"] in (-32700, -32600, -32602, -32000), reply
        assert not reply["error"]["message"].startswith("internal error"), reply
    return reply


def test_instance_properties_in_process_and_over_both_transports(served):
    validate = pbg.InstanceStub(served.grpc_channel).Validate

    @FUZZ
    @given(props=mostly(INSTANCE_PROPS))
    def examples(props):
        assert_clean(served.plugins.instance.validate, "libvirt", props)
        request = pb.ValidateInstanceRequest(type="libvirt")
        if carried(props, request.properties):
            assert grpc_status(validate, request) in CLEAN_STATUSES
        dispatch(served, "Instance.Validate", {"Type": "libvirt", "Properties": props})

    examples()
    assert_serves(served)


def test_flavor_properties_in_process_and_over_both_transports(served):
    validate = pbg.FlavorStub(served.grpc_channel).Validate

    @FUZZ
    @given(
        flavor=st.sampled_from(["moby", "vanilla"]),
        props=mostly(MOBY_PROPS | VANILLA_PROPS),
        size=st.integers(0, 5),
    )
    def examples(flavor, props, size):
        assert_clean(served.plugins.flavor(flavor).validate, flavor, props, Allocation(size=size))
        request = pb.ValidateFlavorRequest(type=flavor, allocation=pb.Allocation(size=size))
        if carried(props, request.properties):
            assert grpc_status(validate, request) in CLEAN_STATUSES
        dispatch(
            served, "Flavor.Validate", {"Type": flavor, "Properties": props, "Allocation": {"Size": size}}
        )

    examples()
    assert_serves(served)


def test_group_commit_pretend_over_both_transports(served):
    commit = pbg.GroupStub(served.grpc_channel).CommitGroup

    @FUZZ
    @given(gid=WORDS, props=mostly(GROUP_PROPS))
    def examples(gid, props):
        if carried(gid, struct_pb2.Value()):
            request = pb.CommitGroupRequest(spec=pb.GroupSpec(id=gid), pretend=True)
            if carried(props, request.spec.properties):
                assert grpc_status(commit, request) in CLEAN_STATUSES
        dispatch(served, "Group.CommitGroup", {"Spec": {"ID": gid, "Properties": props}, "Pretend": True})

    examples()
    assert_serves(served)


# -- raw transport bodies --------------------------------------------------------------------------


def _methods() -> list[tuple[str, type]]:
    out = []
    for service in ("Instance", "Flavor", "Group", "Images"):
        for m in pb.DESCRIPTOR.services_by_name[service].methods:
            out.append((f"/{m.containing_service.full_name}/{m.name}", getattr(pb, m.input_type.name)))
    return out


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def _field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field of wire type ``wire`` (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)."""
    body = {
        0: _varint(int.from_bytes(payload[:8], "little")),
        1: payload[:8].ljust(8, b"\0"),
        2: _varint(len(payload)) + payload,
        5: payload[:4].ljust(4, b"\0"),
    }[wire]
    return _varint(number << 3 | wire) + body


# Protobuf-shaped bytes: well-formed fields with random numbers, wire types and payloads. Many decode,
# so the servicers see random field values, not only the decoder's refusals.
WIRE = st.lists(
    st.builds(_field, st.integers(1, 12), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=24)), max_size=8
).map(b"".join)


@pytest.mark.parametrize("method, message", _methods(), ids=lambda v: v if isinstance(v, str) else "")
def test_random_bytes_to_every_grpc_method(method, message, served):
    call = served.grpc_channel.unary_unary(method)  # no serializer: the bytes go out as they are

    @FEW
    @given(payload=st.binary(max_size=200) | WIRE)
    def examples(payload):
        status = grpc_status(call, payload)
        assert status in CLEAN_STATUSES, (method, payload)
        try:
            message.FromString(payload)
        except Exception:
            assert status == grpc.StatusCode.INVALID_ARGUMENT, (method, payload)

    examples()
    assert_serves(served)


# Every method the dispatcher serves (tests/test_jsonrpc.py checks the goldens cover the same list).
METHOD_NAMES = st.sampled_from(
    ["Handshake.Hello", "Handshake.Implements", "Handshake.Types", "Plugin.Implements"]
    + [f"Instance.{m}" for m in ("Validate", "Provision", "Label", "Destroy", "DescribeInstances")]
    + [f"Flavor.{m}" for m in ("Validate", "Prepare", "Healthy", "Drain")]
    + [f"Group.{m}" for m in ("CommitGroup", "FreeGroup", "DescribeGroup", "DestroyGroup", "InspectGroups",
                              "DestroyInstances", "Size", "SetSize")]
)  # fmt: skip
JSON_PIECES = st.sampled_from(
    list('{}[],:"\\') + ["true", "null", "NaN", "-Infinity", "1e999", "0", "-1.5e3", "\\u0000", "\\ud800",
                         '"method"', '"params"', '"id"', '"jsonrpc":"2.0"', " ", "\n"]
) | st.text(alphabet=string.printable, max_size=4)  # fmt: skip
ENVELOPES = st.builds(
    lambda method, params, rid: json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rid}),
    METHOD_NAMES | WORDS,
    JSON | st.lists(JSON, max_size=1),
    JSON,
).map(lambda t: t.encode("utf-8", "surrogatepass"))
BODIES = (
    st.binary(max_size=300)
    | st.lists(JSON_PIECES, max_size=40).map(lambda p: "".join(p).encode())
    | ENVELOPES
)


def exchange(path: Path, request: bytes) -> bytes:
    """Send a raw HTTP request, end our side (so a short body ends too) and read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


CONTENT_LENGTHS = (
    st.integers(0, 80).map(str)
    | st.sampled_from(["", " 5", "5 ", "-1", "+5", "0x10", "1e3", "\u00b2", "\u0665", "9" * 30, "16777217"])
    | st.text(max_size=6)
)


def test_hostile_content_lengths_to_the_jsonrpc_socket(served):
    """Content-Length decides how much the server reads: any value, true or not, gets an HTTP answer."""

    @FEW
    @given(length=CONTENT_LENGTHS, body=st.binary(max_size=60))
    def examples(length, body):
        header = f"Content-Length: {length}\r\n".encode("latin-1", "replace")
        reply = exchange(
            served.jsonrpc_path, b"POST / HTTP/1.1\r\nConnection: close\r\n" + header + b"\r\n" + body
        )
        head, _, payload = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        assert status in (200, 400, 411, 413), head
        if status != 400:  # http.server's own refusal of a malformed head is HTML
            json.loads(payload)

    examples()
    assert_serves(served)


def test_hostile_http_bodies_to_the_jsonrpc_socket(served):
    conn = UnixHTTPConnection(served.jsonrpc_path)  # one keep-alive connection, as Infrakit's client reuses

    @FUZZ
    @given(body=BODIES)
    def examples(body):
        status, ctype, raw = post_raw(served.jsonrpc_path, body, conn)
        assert status == 200 and ctype.startswith("application/json")
        reply = json.loads(raw)
        assert ("result" in reply) != ("error" in reply), reply
        if "error" in reply:
            assert not reply["error"]["message"].startswith("internal error"), reply

    try:
        examples()
    finally:
        conn.close()
    assert_serves(served)
