"""Hostile bytes at both transports, the cases measured in the issue tracker.

JSON-RPC: a body nested 10,000 deep used to raise RecursionError in the handler and drop the
connection with a traceback; now it, invalid JSON, invalid UTF-8, huge strings and arrays get
JSON-RPC's own -32700/-32600 with HTTP 200 and at most one log line. gRPC: 300 random-byte
requests used to give 298 INTERNAL answers and 299 tracebacks; now INVALID_ARGUMENT and one line.
Every test ends by showing the server still serves."""

from __future__ import annotations

import json
import logging
import random
import socket
from pathlib import Path

import grpc
import pytest
from fakes import VirtualClock
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from harness.mobykit_server import (
    UnixHTTPConnection,
    call,
    grpc_server,
    jsonrpc_server,
    memory_plugins,
    post_raw,
)
from mobykit.errors import SpecError
from mobykit.providers.memory import MemoryProvider
from mobykit.rpc import limits, logthrottle
from mobykit.rpc.gen import mobykit_pb2 as pb
from mobykit.rpc.gen import mobykit_pb2_grpc as pbg
from mobykit.rpc.jsonrpc import MAX_BODY
from mobykit.rpc.plugins import Plugins
from mobykit.spi.types import Description

PARSE, INVALID = -32700, -32600


@pytest.fixture(autouse=True)
def fresh_throttle():
    """Each test sees the first log line of each kind (the throttle is per process)."""
    logthrottle.THROTTLE.reset()
    yield
    logthrottle.THROTTLE.reset()


def lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.INFO]


def assert_no_traceback(caplog, capfd) -> None:
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text
    assert "Traceback" not in capfd.readouterr().err


def assert_jsonrpc_serves(path: Path) -> None:
    assert call(path, "Handshake.Implements", {})["result"]["APIs"]


# -- JSON-RPC --------------------------------------------------------------------------------------


def jsonrpc_error(path: Path, body: bytes, conn: UnixHTTPConnection | None = None) -> dict:
    status, ctype, raw = post_raw(path, body, conn)
    assert status == 200 and ctype.startswith("application/json"), (status, raw[:200])
    resp = json.loads(raw)
    assert "result" not in resp and resp["error"]["data"] is None, resp
    return resp["error"]


def test_jsonrpc_body_nested_10000_deep_is_refused_with_one_line(caplog, capfd):
    caplog.set_level(logging.INFO)
    with jsonrpc_server(memory_plugins()) as server:
        error = jsonrpc_error(server.path, b"[" * 10_000 + b"]" * 10_000)
        assert error["code"] in (PARSE, INVALID) and "deeper than" in error["message"]
        assert len(lines(caplog)) <= 1
        # Inside a well-formed envelope, as params: refused the same way, before any handler runs.
        envelope = b'{"jsonrpc":"2.0","method":"Instance.Validate","id":7,"params":%s}'
        error = jsonrpc_error(server.path, envelope % (b'{"a":' * 10_000 + b"1" + b"}" * 10_000))
        assert error["code"] == INVALID
        assert_jsonrpc_serves(server.path)
    assert len(lines(caplog)) <= 2
    assert_no_traceback(caplog, capfd)


HELLO = b'{"method": "Handshake.Hello", '


@pytest.mark.parametrize(
    "body, code, words",
    [
        pytest.param(b"{not json", PARSE, "parse error", id="invalid-json"),
        pytest.param(b"", PARSE, "parse error", id="empty"),
        pytest.param(HELLO + b'"params": [1,', PARSE, "parse error", id="truncated"),
        pytest.param(HELLO + b'"id": "unterminated', PARSE, "unterminated string", id="unterminated"),
        pytest.param(b'{"method": "\xff\xfe", "id": 1}', PARSE, "not UTF-8", id="invalid-utf8"),
        pytest.param(b"\xef\xbb\xbf" + HELLO + b'"id": 1}', PARSE, "BOM", id="utf8-bom"),
        pytest.param('{"method": "Handshake.Hello"}'.encode("utf-16"), PARSE, "not UTF-8", id="utf16"),
        pytest.param(HELLO + b'"id": NaN}', PARSE, "NaN", id="nan"),
        pytest.param(HELLO + b'"id": -Infinity}', PARSE, "Infinity", id="infinity"),
        pytest.param(HELLO + b'"id": 1e999}', PARSE, "too large", id="float-overflow"),
        pytest.param(HELLO + b'"id": ' + b"9" * 5000 + b"}", PARSE, "parse error", id="5000-digit-int"),
        pytest.param(b"[" * 33 + b"]" * 33, INVALID, "deeper than 32", id="33-deep"),
        pytest.param(
            b'["' + b"x" * (limits.MAX_STRING + 1) + b'"]', INVALID, "longer than", id="huge-string"
        ),
        pytest.param(b"[" + b"0," * limits.MAX_VALUES + b"0]", INVALID, "more than 100000", id="huge-array"),
        pytest.param(
            b"[" + b"{}," * (MAX_BODY // 3 - 1) + b"{}]", INVALID, "more than 100000", id="16MiB-of-dicts"
        ),
        pytest.param(b"[]", INVALID, "expected a JSON object", id="not-an-object"),
    ],
)
def test_jsonrpc_hostile_bodies_get_error_objects(body, code, words, shared_jsonrpc, caplog, capfd):
    assert len(body) <= MAX_BODY
    caplog.set_level(logging.INFO)
    path = shared_jsonrpc.path
    conn = UnixHTTPConnection(path)
    try:
        error = jsonrpc_error(path, body, conn)
        assert error["code"] == code and words in error["message"], error
        assert len(error["message"].encode()) <= limits.MAX_MESSAGE_BYTES
        # The same keep-alive connection carries the next call.
        _, _, raw = post_raw(path, b'{"method": "Handshake.Implements", "id": 2}', conn)
        assert json.loads(raw)["result"]["APIs"]
    finally:
        conn.close()
    assert len(lines(caplog)) <= 1
    assert_no_traceback(caplog, capfd)


@pytest.fixture(scope="module")
def shared_jsonrpc():
    """One server for the many small cases (starting and stopping one takes half a second)."""
    with jsonrpc_server(memory_plugins()) as server:
        yield server


def test_jsonrpc_limits_leave_room_for_real_calls():
    """Big legitimate requests still pass: a 512 KiB Init script, 50,000 tags, 28 levels of properties."""
    with jsonrpc_server(memory_plugins(name="libvirt")) as server:
        deep: object = "leaf"
        for _ in range(limits.MAX_DEPTH - 4):  # the envelope, params and Spec take the other levels
            deep = {"k": deep}
        spec = {
            "Properties": {"Nested": deep},
            "Tags": {f"t{i}": "v" for i in range(50_000)},
            "Init": "x" * (512 << 10),
        }
        resp = call(server.path, "Instance.Provision", {"Type": "libvirt", "Spec": spec})
        assert resp["result"]["ID"], resp
        (d,) = call(server.path, "Instance.DescribeInstances", {"Type": "libvirt", "Properties": True})[
            "result"
        ]["Descriptions"]
        assert d["Properties"]["Nested"] == deep


def test_jsonrpc_lone_surrogates_become_replacement_characters_readable_over_grpc():
    """JSON can escape a lone surrogate ("\\udc80"), UTF-8 cannot carry one: stored as it is, it would
    break every gRPC reply carrying it. Go's encoding/json reads it as U+FFFD, and so do we."""
    plugins = memory_plugins(name="libvirt")
    with jsonrpc_server(plugins) as server, grpc_server(plugins) as (_, bound, _tmp):
        spec = b'{"Tags": {"t\\udc80": "v\\ud800"}, "Properties": {"k": "\\udfffx"}}'
        params = b'{"Type": "libvirt", "Spec": %s}' % spec
        _, _, raw = post_raw(server.path, b'{"method": "Instance.Provision", "id": 1, "params": %s}' % params)
        iid = json.loads(raw)["result"]["ID"]
        with grpc.insecure_channel(bound[0]) as channel:
            request = pb.DescribeInstancesRequest(type="libvirt", properties=True)
            (d,) = pbg.InstanceStub(channel).DescribeInstances(request, timeout=10).descriptions
        assert d.id == iid and d.tags["t\ufffd"] == "v\ufffd"
        assert d.properties.struct_value.fields["k"].string_value == "\ufffdx"


def raw_http(path: Path, data: bytes) -> bytes:
    """Send ``data`` as it is and read until the server closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "length, status",
    [(str(MAX_BODY + 1), b"413"), ("9" * 5000, b"413"), ("\u00b2", b"413"), ("-1", b"413"), (None, b"411")],
    ids=["over-max-body", "5000-digits", "superscript-two", "negative", "missing"],
)
def test_jsonrpc_refuses_unreadable_content_length_and_closes(length, status, caplog, capfd):
    caplog.set_level(logging.INFO)
    header = b"" if length is None else f"Content-Length: {length}\r\n".encode("latin-1")
    with jsonrpc_server(memory_plugins()) as server:
        # No body follows: the server must answer from the headers alone, then close the connection
        # (the unread body would otherwise be parsed as the next request).
        reply = raw_http(server.path, b"POST / HTTP/1.1\r\nHost: localhost\r\n" + header + b"\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == status and b"Connection: close" in head, head
        assert json.loads(body)["error"]["code"] == INVALID
        assert_jsonrpc_serves(server.path)
    assert len(lines(caplog)) <= 1
    assert_no_traceback(caplog, capfd)


class NaNInstances:
    """An instance plugin with a bug: it describes a property JSON cannot carry."""

    def describe_instances(self, type, tags, properties):
        return [Description(id="i-1", tags={}, properties={"load": float("nan")})]


def test_jsonrpc_reply_that_is_not_json_is_an_error_object_not_a_dropped_connection(caplog):
    with jsonrpc_server(Plugins(instance=NaNInstances())) as server:
        status, _, raw = post_raw(
            server.path, b'{"method": "Instance.DescribeInstances", "params": {"Properties": true}, "id": 1}'
        )
        assert status == 200
        resp = json.loads(raw)  # strict JSON: no NaN in the reply
        assert resp["error"]["code"] == -32000 and "not JSON" in resp["error"]["message"]
        assert_jsonrpc_serves(server.path)
    # A plugin bug: logged once, with its traceback.
    assert len([r for r in caplog.records if r.exc_info]) == 1


# -- gRPC ------------------------------------------------------------------------------------------

INVALID_ARGUMENT, OK = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK


def raw_call(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with ``payload`` as the request bytes (no serializer: nothing is checked)."""
    try:
        channel.unary_unary(method)(payload, timeout=10)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return OK, ""


def decodes(message: type, payload: bytes) -> bool:
    try:
        message.FromString(payload)
    except Exception:
        return False
    return True


def assert_grpc_serves(channel: grpc.Channel) -> None:
    assert (
        pbg.InstanceStub(channel).DescribeInstances(pb.DescribeInstancesRequest(), timeout=10).descriptions
        == []
    )


def test_grpc_300_random_byte_requests_are_invalid_argument_with_few_log_lines(caplog, capfd):
    caplog.set_level(logging.INFO)
    rng = random.Random(300)
    payloads = [rng.randbytes(rng.randint(1, 256)) for _ in range(300)]
    with grpc_server(memory_plugins()) as (_, bound, _tmp), grpc.insecure_channel(bound[0]) as channel:
        answers = [raw_call(channel, "/mobykit.v1.Instance/DescribeInstances", p) for p in payloads]
        assert_grpc_serves(channel)
    undecodable = [
        a for p, a in zip(payloads, answers, strict=True) if not decodes(pb.DescribeInstancesRequest, p)
    ]
    assert len(undecodable) >= 250  # random bytes are rarely a valid message; the rest may be served
    assert all(
        code == INVALID_ARGUMENT and "not a valid protobuf message" in msg for code, msg in undecodable
    )
    assert {code for code, _ in answers} <= {INVALID_ARGUMENT, OK}
    assert 1 <= len(lines(caplog)) <= 5, caplog.text
    assert_no_traceback(caplog, capfd)


def nested_struct_value(depth: int) -> bytes:
    """A google.protobuf.Value holding ``depth`` nested Structs, written as wire bytes (building the
    message object that deep would hit Python's recursion limit before protobuf's)."""

    def field(number: int, data: bytes) -> bytes:  # a length-delimited field
        return bytes([number << 3 | 2]) + _varint(len(data)) + data

    value = field(3, b"leaf")  # Value.string_value
    for _ in range(depth):
        entry = field(1, b"k") + field(2, value)  # Struct.FieldsEntry {key, value}
        value = field(5, field(1, entry))  # Value.struct_value {fields}
    return value


def test_grpc_struct_nested_past_protobufs_limit_is_invalid_argument(caplog, capfd):
    with grpc_server(memory_plugins()) as (_, bound, _tmp), grpc.insecure_channel(bound[0]) as channel:
        for depth in (40, 200, 5_000):
            request = b"\x12" + _varint(len(v := nested_struct_value(depth))) + v  # properties = field 2
            code, msg = raw_call(channel, "/mobykit.v1.Instance/Validate", request)
            assert code == INVALID_ARGUMENT and "Error parsing" in msg, (depth, code, msg)
        # Just inside protobuf's limit it decodes and is validated as usual.
        request = pb.ValidateInstanceRequest.FromString(
            b"\x12" + _varint(len(v := nested_struct_value(30))) + v
        )
        pbg.InstanceStub(channel).Validate(request, timeout=10)
        assert_grpc_serves(channel)
    assert_no_traceback(caplog, capfd)


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


def test_grpc_huge_fields_get_their_real_status(caplog, capfd):
    with grpc_server(memory_plugins()) as (_, bound, _tmp), grpc.insecure_channel(bound[0]) as channel:
        stub = pbg.InstanceStub(channel)
        # The message quotes the 3 MB type; before clipping it overflowed the trailer (RESOURCE_EXHAUSTED).
        with pytest.raises(grpc.RpcError) as e:
            stub.Validate(pb.ValidateInstanceRequest(type="x" * 3_000_000), timeout=10)
        assert (
            e.value.code() == INVALID_ARGUMENT and len(e.value.details().encode()) <= limits.MAX_MESSAGE_BYTES
        )
        # Over gRPC's 4 MiB receive limit: grpc itself refuses it.
        code, _ = raw_call(
            channel, "/mobykit.v1.Instance/Validate", b"\x0a\x84\x80\x80\x03" + b"x" * (6 << 20)
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # NaN is not JSON: refused at the door rather than stored to break a JSON-RPC reply later.
        request = pb.ProvisionRequest(spec=pb.Spec())
        request.spec.properties.struct_value.update({"Load": float("nan")})
        with pytest.raises(grpc.RpcError) as e:
            stub.Provision(request, timeout=10)
        assert e.value.code() == INVALID_ARGUMENT and "NaN" in e.value.details()
        assert_grpc_serves(channel)
    assert_no_traceback(caplog, capfd)


def test_grpc_garbage_to_health_and_streaming_reflection_is_invalid_argument(caplog, capfd):
    with grpc_server(memory_plugins()) as (_, bound, _tmp), grpc.insecure_channel(bound[0]) as channel:
        assert raw_call(channel, "/grpc.health.v1.Health/Check", b"\xff\xff\xff")[0] == INVALID_ARGUMENT
        stream = channel.stream_stream(f"/{reflection.SERVICE_NAME}/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as e:
            list(stream(iter([b"\xff\xff\xff"]), timeout=10))
        assert e.value.code() == INVALID_ARGUMENT
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        assert (
            check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    assert_no_traceback(caplog, capfd)


class Exploding(MemoryProvider):
    def list(self, tags):
        raise RuntimeError("provider bug")


def test_grpc_repeated_internal_errors_log_one_traceback_then_a_count(caplog):
    with (
        grpc_server(memory_plugins(Exploding())) as (_, bound, _tmp),
        grpc.insecure_channel(bound[0]) as channel,
    ):
        stub = pbg.InstanceStub(channel)
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as e:
                stub.DescribeInstances(pb.DescribeInstancesRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.INTERNAL and "provider bug" in e.value.details()
    bugs = [r for r in caplog.records if "provider bug" in r.getMessage()]
    assert len(bugs) == 2, caplog.text  # the first, with its traceback; the count, when the server stops
    assert bugs[0].exc_info and not bugs[1].exc_info
    assert "[the last of 49 like this that were not logged]" in bugs[1].getMessage()


# -- the log throttle itself -----------------------------------------------------------------------


@pytest.fixture
def throttled(caplog):
    clock = VirtualClock()
    throttle = logthrottle.LogThrottle(interval=60, clock=clock)
    logger = logging.getLogger("mobykit.test.throttle")
    logger.addFilter(throttle)
    caplog.set_level(logging.INFO, logger=logger.name)
    yield logger, throttle, clock
    logger.removeFilter(throttle)


def test_throttle_logs_the_first_then_one_line_per_interval_with_a_count(throttled, caplog):
    logger, throttle, clock = throttled
    for i in range(10):
        logger.warning("bad request %d", i)
        logger.info("info always passes %d", i)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == ["bad request 0"]
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 10
    logger.warning("another kind")
    clock.advance(60)
    logger.warning("bad request %d", 10)
    logger.warning("bad request %d", 11)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "bad request 0",
        "another kind",
        "bad request 10 [9 more like this in the last 60 s were not logged]",
    ]
    throttle.flush()
    assert caplog.records[-1].getMessage() == "bad request 11 [the last of 1 like this that were not logged]"
    throttle.flush()  # nothing is held back any more
    assert caplog.records[-1].getMessage() == "bad request 11 [the last of 1 like this that were not logged]"


def test_throttle_keeps_the_first_traceback_of_each_distinct_bug(throttled, caplog):
    logger, _, _ = throttled

    def bug_a():
        raise KeyError("a")

    def bug_b():
        raise KeyError("b")

    for bug in (bug_a, bug_b, bug_a, bug_b, bug_a):
        try:
            bug()
        except KeyError:
            logger.exception("internal error")
    assert [str(r.exc_info[1]) for r in caplog.records] == ["'a'", "'b'"]


def test_throttle_forgets_the_oldest_kind_beyond_max_kinds():
    throttle = logthrottle.LogThrottle(max_kinds=3, clock=VirtualClock())

    def record(kind: int) -> logging.LogRecord:
        return logging.LogRecord("x", logging.WARNING, __file__, 1, f"kind {kind}", None, None)

    assert all(throttle.filter(record(i)) for i in range(10))  # each kind's first record passes
    assert not throttle.filter(record(9))  # a kind it remembers is held back...
    assert throttle.filter(record(0))  # ...one it had to forget is not (memory stays bounded)


# -- files on the CLI side -------------------------------------------------------------------------


def test_group_spec_file_nested_10000_deep_is_a_spec_error(tmp_path):
    from mobykit.group import spec as group_spec

    path = tmp_path / "group.yml"
    path.write_text("[" * 10_000 + "]" * 10_000)
    with pytest.raises(SpecError, match="nested too deep"):
        group_spec.load(path)
