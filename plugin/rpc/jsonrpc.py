"""Infrakit's plugin wire: JSON-RPC 2.0 over HTTP/1.1 on a unix socket.

An unmodified Infrakit (``infrakit group``, ``infrakit instance describe``...) finds a plugin by
its socket file in the plugins directory and speaks this protocol to it, so mobykit's instance,
flavor and group plugins are reachable by Infrakit users as ``mobykit/libvirt``, ``mobykit/moby``
and ``mobykit``. Shapes follow Infrakit's Go types (pkg/rpc/{instance,flavor,group}/types.go,
pkg/spi/...): field names in Infrakit's exact case on output, matched case-insensitively on input
as Go's encoding/json does. Map keys (Tags, Labels) and opaque Properties are never re-cased.

Why hand-written on the standard library: no maintained Python package speaks this dialect (HTTP
over AF_UNIX, Go's case-insensitive fields, gorilla/rpc's error object), and the whole transport is
one small dispatcher; ``json`` keeps large integer ids exact (Python ints never become floats).

Hostile input: a body is checked by ``mobykit.rpc.jsonscan`` before it is parsed (UTF-8, nesting
depth, number of values, string length; the limits and their reasons are in ``mobykit.rpc.limits``),
so nothing downstream ever recurses over a value deeper than ``MAX_DEPTH``. Every refusal is a
JSON-RPC error object with HTTP 200 (-32700 when the body cannot be JSON, -32600 when it is over a
limit or not a request) and at most one log line, throttled by ``mobykit.rpc.logthrottle``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socketserver
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mobykit.core.errors import classify
from mobykit.errors import InvalidArgument
from mobykit.rpc import infrakit_info, jsonscan, logthrottle
from mobykit.rpc.limits import clip
from mobykit.spi import flavor as flavor_spi
from mobykit.spi import group as group_spi
from mobykit.spi import instance as instance_spi
from mobykit.spi.group import GroupDescription, GroupSpec
from mobykit.spi.types import Allocation, Attachment, Description, DestroyReason, Health, Index, Spec

log = logging.getLogger("mobykit.jsonrpc")

# gorilla/rpc json2's error codes, which Infrakit's client and server use.
E_PARSE, E_INVALID_REQ, E_NO_METHOD, E_BAD_PARAMS, E_SERVER = -32700, -32600, -32601, -32602, -32000
MAX_BODY = 16 << 20  # a request larger than this is not an Infrakit call
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() also accepts "²"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate can get into a JSON string
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs: what is left is lone


class RPCError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _spec_name(spi: tuple[str, str]) -> str:
    return f"{spi[0]}/{spi[1]}"


INSTANCE, FLAVOR, GROUP = (_spec_name(m.INTERFACE) for m in (instance_spi, flavor_spi, group_spi))


# -- reading Go-style objects ------------------------------------------------------------------------


def field(obj: dict[str, Any], name: str, default: Any = None) -> Any:
    """``obj[name]`` matched as Go's encoding/json matches struct fields: exact, else case-insensitive."""
    if name in obj:
        return obj[name]
    folded = name.casefold()
    for key, value in obj.items():
        if isinstance(key, str) and key.casefold() == folded:
            return value
    return default


def _obj(value: Any, where: str, required: bool = False) -> dict[str, Any]:
    if value is None:
        if required:
            raise InvalidArgument(f"{where}: required")
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: must be an object, got {_json_type(value)}")
    return value


def _str(value: Any, where: str, required: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: must be a string, got {_json_type(value)}")
    if required and not value:
        raise InvalidArgument(f"{where}: required")
    return value


def _int(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InvalidArgument(f"{where}: must be an integer, got {_json_type(value)}")
    return int(value)


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: must be true or false, got {_json_type(value)}")
    return value


def _str_map(value: Any, where: str) -> dict[str, str]:
    m = _obj(value, where)
    for k, v in m.items():
        if not isinstance(v, str):
            raise InvalidArgument(f"{where}.{k}: must be a string, got {_json_type(v)}")
    return dict(m)


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{where}: must be an array, got {_json_type(value)}")
    return [_str(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


def spec_in(value: Any, where: str = "Spec") -> Spec:
    o = _obj(value, where)
    logical = field(o, "LogicalID")
    raw = field(o, "Attachments") or []
    if not isinstance(raw, list):
        raise InvalidArgument(f"{where}.Attachments: must be an array, got {_json_type(raw)}")
    attachments = []
    for i, item in enumerate(raw):
        a = _obj(item, f"{where}.Attachments[{i}]")
        attachments.append(
            Attachment(id=_str(field(a, "ID"), f"{where}.Attachments[{i}].ID"), type=_str(field(a, "Type"), f"{where}.Attachments[{i}].Type"))
        )
    return Spec(
        properties=field(o, "Properties"),
        tags=_str_map(field(o, "Tags"), f"{where}.Tags"),
        init=_str(field(o, "Init"), f"{where}.Init"),
        logical_id=None if logical is None else _str(logical, f"{where}.LogicalID"),
        attachments=attachments,
    )


def spec_out(s: Spec) -> dict[str, Any]:
    return {
        "Properties": s.properties,
        "Tags": dict(s.tags or {}),
        "Init": s.init or "",
        "LogicalID": s.logical_id,
        "Attachments": [{"ID": a.id, "Type": a.type} for a in s.attachments] if s.attachments else None,
    }


def description_in(value: Any, where: str = "Instance") -> Description:
    o = _obj(value, where, required=True)
    logical = field(o, "LogicalID")
    return Description(
        id=_str(field(o, "ID"), f"{where}.ID", required=True),
        tags=_str_map(field(o, "Tags"), f"{where}.Tags"),
        logical_id=None if logical is None else _str(logical, f"{where}.LogicalID"),
        properties=field(o, "Properties"),
    )


def description_out(d: Description) -> dict[str, Any]:
    out: dict[str, Any] = {"ID": d.id, "LogicalID": d.logical_id, "Tags": dict(d.tags or {})}
    if d.properties is not None:  # `json:",omitempty"` in Infrakit
        out["Properties"] = d.properties
    return out


def allocation_in(value: Any, where: str = "Allocation") -> Allocation:
    o = _obj(value, where)
    return Allocation(
        size=_int(field(o, "Size"), f"{where}.Size"),
        logical_ids=_str_list(field(o, "LogicalIDs"), f"{where}.LogicalIDs"),
    )


def index_in(value: Any, where: str = "Index") -> Index:
    o = _obj(value, where)
    return Index(group=_str(field(o, "Group"), f"{where}.Group"), sequence=_int(field(o, "Sequence"), f"{where}.Sequence"))


def group_spec_in(value: Any, where: str = "Spec") -> GroupSpec:
    o = _obj(value, where, required=True)
    props = field(o, "Properties")
    return GroupSpec(id=_str(field(o, "ID"), f"{where}.ID", required=True), properties=props if props is not None else {})


def group_spec_out(s: GroupSpec) -> dict[str, Any]:
    return {"ID": s.id, "Properties": s.properties}


def group_description_out(d: GroupDescription) -> dict[str, Any]:
    return {"Instances": [description_out(i) for i in d.instances], "Converged": bool(d.converged)}


# -- the methods -----------------------------------------------------------------------------------


class Dispatcher:
    """Maps ``Service.Method`` to the SPI objects; independent of the transport so it can be
    tested and benchmarked without a socket."""

    def __init__(self, plugins):
        self.plugins = plugins
        self.methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "Handshake.Hello": self.hello,
            "Handshake.Implements": self.implements,
            "Handshake.Types": self.types,
            "Plugin.Implements": self.implements,
        }
        if plugins.instance is not None:
            self.methods.update(
                {
                    "Instance.Validate": self.instance_validate,
                    "Instance.Provision": self.instance_provision,
                    "Instance.Label": self.instance_label,
                    "Instance.Destroy": self.instance_destroy,
                    "Instance.DescribeInstances": self.instance_describe,
                }
            )
        if plugins.flavors:
            self.methods.update(
                {
                    "Flavor.Validate": self.flavor_validate,
                    "Flavor.Prepare": self.flavor_prepare,
                    "Flavor.Healthy": self.flavor_healthy,
                    "Flavor.Drain": self.flavor_drain,
                }
            )
        if plugins.group is not None:
            self.methods.update(
                {
                    "Group.CommitGroup": self.group_commit,
                    "Group.FreeGroup": self.group_free,
                    "Group.DescribeGroup": self.group_describe,
                    "Group.DestroyGroup": self.group_destroy,
                    "Group.InspectGroups": self.group_inspect,
                    "Group.DestroyInstances": self.group_destroy_instances,
                    "Group.Size": self.group_size,
                    "Group.SetSize": self.group_set_size,
                }
            )

    # handshake
    def _objects(self, older: bool = False) -> dict[str, list[str]]:
        """"Interface/version" -> the object names served under it. ``older`` adds the older
        versions each SPI still accepts (``OLDER_INTERFACES``): Infrakit's client needs an exact
        version match, so Infrakit v0.5 (which asks Handshake.Implements for Instance/0.5.0...)
        refuses a plugin that lists only the newest. Handshake.Hello, which only newer Infrakits
        call, lists the newest alone, as their plugins do."""
        served: list[tuple[Any, list[str]]] = []
        if self.plugins.instance is not None:
            served.append((instance_spi, list(self.plugins.instance_types)))
        if self.plugins.flavors:
            served.append((flavor_spi, list(self.plugins.flavors)))
        if self.plugins.group is not None:
            served.append((group_spi, ["."]))  # a single group plugin, as Infrakit's ServeSingle names it
        objects: dict[str, list[str]] = {}
        for spi, names in served:
            for iface in (spi.INTERFACE, *(spi.OLDER_INTERFACES if older else ())):
                objects[_spec_name(iface)] = list(names)
        return objects

    def hello(self, params):
        return {"Objects": {k: [{"Name": n, "ProxyFor": ""} for n in v] for k, v in self._objects().items()}}

    def implements(self, params):
        return {"APIs": [{"Name": k.split("/")[0], "Version": k.split("/")[1]} for k in self._objects(older=True)]}

    def types(self, params):
        return {"Types": self._objects(older=True)}

    def info(self, path: str) -> dict[str, Any] | None:
        """The Infrakit info document at ``path`` (GET /info/api.json, /info/functions.json), built
        from this dispatcher's method table; None for any other path."""
        return infrakit_info.document(path, self._objects(), self.methods)

    # Instance/0.6.1
    def _type(self, params) -> str:
        return _str(field(params, "Type"), "Type")

    def instance_validate(self, params):
        t = self._type(params)
        self.plugins.instance.validate(t, field(params, "Properties"))
        return {"Type": t, "OK": True}

    def instance_provision(self, params):
        t = self._type(params)
        spec = spec_in(field(params, "Spec"))
        return {"Type": t, "ID": self.plugins.instance.provision(t, spec)}

    def instance_label(self, params):
        t = self._type(params)
        iid = _str(field(params, "Instance"), "Instance", required=True)
        self.plugins.instance.label(t, iid, _str_map(field(params, "Labels"), "Labels"))
        return {"Type": t, "OK": True}

    def instance_destroy(self, params):
        t = self._type(params)
        iid = _str(field(params, "Instance"), "Instance", required=True)
        reason = _str(field(_obj(field(params, "Context"), "Context"), "Reason"), "Context.Reason") or "terminate"
        try:
            r = DestroyReason(reason)
        except ValueError:
            raise InvalidArgument(f"Context.Reason: must be 'terminate' or 'rolling_update', got {reason!r}") from None
        self.plugins.instance.destroy(t, iid, r)
        return {"Type": t, "OK": True}

    def instance_describe(self, params):
        t = self._type(params)
        tags = _str_map(field(params, "Tags"), "Tags")
        props = _bool(field(params, "Properties"), "Properties")
        descriptions = self.plugins.instance.describe_instances(t, tags, props)
        return {"Type": t, "Descriptions": [description_out(d) for d in descriptions]}

    # Flavor/0.1.1
    def flavor_validate(self, params):
        t = self._type(params)
        self.plugins.flavor(t).validate(t, field(params, "Properties"), allocation_in(field(params, "Allocation")))
        return {"Type": t, "OK": True}

    def flavor_prepare(self, params):
        t = self._type(params)
        spec = self.plugins.flavor(t).prepare(
            t,
            field(params, "Properties"),
            spec_in(field(params, "Spec")),
            allocation_in(field(params, "Allocation")),
            index_in(field(params, "Index")),
        )
        return {"Type": t, "Spec": spec_out(spec)}

    def flavor_healthy(self, params):
        t = self._type(params)
        h = self.plugins.flavor(t).healthy(t, field(params, "Properties"), description_in(field(params, "Instance")))
        return {"Type": t, "Health": int(Health(h))}

    def flavor_drain(self, params):
        t = self._type(params)
        self.plugins.flavor(t).drain(t, field(params, "Properties"), description_in(field(params, "Instance")))
        return {"Type": t, "OK": True}

    # Group/0.1.1
    def _gid(self, params) -> str:
        return _str(field(params, "ID"), "ID", required=True)

    def group_commit(self, params):
        spec = group_spec_in(field(params, "Spec"))
        details = self.plugins.group.commit_group(spec, _bool(field(params, "Pretend"), "Pretend"))
        return {"ID": spec.id, "Details": details or ""}

    def group_free(self, params):
        gid = self._gid(params)
        self.plugins.group.free_group(gid)
        return {"ID": gid}

    def group_describe(self, params):
        gid = self._gid(params)
        return {"ID": gid, "Description": group_description_out(self.plugins.group.describe_group(gid))}

    def group_destroy(self, params):
        gid = self._gid(params)
        self.plugins.group.destroy_group(gid)
        return {"ID": gid}

    def group_inspect(self, params):
        gid = _str(field(params, "ID"), "ID")
        return {"ID": gid, "Groups": [group_spec_out(s) for s in self.plugins.group.inspect_groups()]}

    def group_destroy_instances(self, params):
        gid = self._gid(params)
        self.plugins.group.destroy_instances(gid, _str_list(field(params, "Instances"), "Instances"))
        return {"ID": gid}

    def group_size(self, params):
        gid = self._gid(params)
        return {"ID": gid, "Size": int(self.plugins.group.size(gid))}

    def group_set_size(self, params):
        gid = self._gid(params)
        size = _int(field(params, "Size"), "Size")
        if size < 0:
            raise InvalidArgument(f"Size: must be >= 0, got {size}")
        self.plugins.group.set_size(gid, size)
        return {"ID": gid}

    # the envelope
    def handle(self, body: bytes) -> dict[str, Any]:
        """One JSON-RPC request body -> the response object (never raises)."""
        rid: Any = None
        try:
            req = parse_body(body)
            if not isinstance(req, dict):
                raise RPCError(E_INVALID_REQ, "invalid request: expected a JSON object")
            rid = req.get("id")
            method = req.get("method")
            if not isinstance(method, str):
                raise RPCError(E_INVALID_REQ, "invalid request: method must be a string")
            params = req.get("params")
            if isinstance(params, list) and len(params) == 1:
                params = params[0]  # Go's net/rpc style: a one-element array holding the struct
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise RPCError(E_BAD_PARAMS, clip(f"{method}: params must be an object"))
            handler = self.methods.get(method)
            if handler is None:
                raise RPCError(E_NO_METHOD, clip(f"method not found: {method}"))
            log.debug("jsonrpc call %s", method)
            try:
                result = handler(params)
            except Exception as e:
                code, message = classify(e, method)
                raise RPCError(E_SERVER, clip(message)) from None
            return {"jsonrpc": "2.0", "result": result, "id": rid}
        except RPCError as e:
            return error_object(e.code, str(e), rid)

    def respond(self, body: bytes) -> bytes:
        """One request body -> the encoded response (never raises, always valid JSON)."""
        response = self.handle(body)
        try:
            return encode(response)
        except (TypeError, ValueError, RecursionError) as e:
            # A plugin returned something JSON cannot carry (NaN, a set, a cycle): a bug on our side.
            log.error("jsonrpc: cannot encode the reply: %s", e, exc_info=e)
            message = clip(f"internal error: the reply is not JSON: {e}")
            return encode(error_object(E_SERVER, message, response.get("id")))


def parse_body(body: bytes) -> Any:
    """The request as JSON data; RPCError (-32700 / -32600) for anything else.

    The shape is checked before ``json`` parses (``jsonscan``), so the parser cannot recurse past
    ``MAX_DEPTH``. NaN, Infinity and numbers too large for a double are refused: they are not JSON,
    and a Go client could not read them back. An escaped lone surrogate (``"\\udc80"``) becomes
    U+FFFD, as Go's encoding/json reads it: left in, it could not be encoded as UTF-8 later (a gRPC
    reply carrying it would fail)."""
    try:
        text = jsonscan.check(body)
    except jsonscan.ShapeError as e:
        log.warning("jsonrpc: refused a request: %s", e)
        if e.parse:
            raise RPCError(E_PARSE, f"parse error: {e}") from None
        raise RPCError(E_INVALID_REQ, f"invalid request: {e}") from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # RecursionError: cannot happen after the scan; kept as a net
        raise RPCError(E_PARSE, clip(f"parse error: {e}")) from None
    return _without_lone_surrogates(value) if _SURROGATE_ESCAPE.search(text) else value


def _without_lone_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings and keys replaced by U+FFFD (the scan
    bounds the recursion at ``MAX_DEPTH``)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {clip(text, 40)} is too large for a double")
    return value


def error_object(code: int, message: str, rid: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": None}, "id": rid}


def encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, separators=(",", ":"), allow_nan=False).encode() + b"\n"


# -- the transport -----------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Go's http.Client expects
    server_version = "mobykit"

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = self.headers.get("Content-Length")
        if length is None or not _CONTENT_LENGTH.fullmatch(length.strip()) or int(length) > MAX_BODY:
            # The body is not read, so the connection cannot carry another request: it is closed.
            # The status is HTTP's (411/413) and the body a JSON-RPC error, for clients that read only one.
            log.warning("jsonrpc: refused a request with Content-Length %s", clip(repr(length), 40))
            message = "invalid request: a Content-Length of at most 16 MiB is required"
            self.close_connection = True
            self._reply(411 if length is None else 413, encode(error_object(E_INVALID_REQ, message, None)))
            return
        body = self.rfile.read(int(length))
        server: JsonRpcServer = self.server.owner  # type: ignore[attr-defined]
        with server.inflight():  # until the reply is written: a graceful stop waits for it
            self._reply(200, server.dispatcher.respond(body))

    def do_GET(self):  # noqa: N802
        """Infrakit's info documents (``mobykit.rpc.infrakit_info``); ``/`` answers 405 (JSON-RPC
        is POSTed there), any other path 404, each with a JSON body saying what is served."""
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() not in ("", "0"):
            self.close_connection = True  # a GET's body is not read: the connection cannot carry another request
        path = _request_path(self.path)
        server: JsonRpcServer = self.server.owner  # type: ignore[attr-defined]
        document = server.dispatcher.info(path)
        if document is not None:
            self._reply(200, encode(document))
        elif path == "/":
            self._reply(405, encode({"error": "POST JSON-RPC 2.0 to /"}), allow="POST")
        else:
            served = ", ".join(infrakit_info.PATHS)
            self._reply(404, encode({"error": clip(f"not found: GET {path} (GET serves {served}; POST JSON-RPC 2.0 to /)")}))

    def _reply(self, status: int, data: bytes, allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if allow is not None:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"  # AF_UNIX peers have no address; the default would index an empty string

    def log_message(self, format: str, *args) -> None:
        log.debug("jsonrpc: " + format, *args)


def _request_path(target: str) -> str:
    """The path of a request target, without query or fragment: ``/info/api.json?x`` and the
    absolute form ``http://h/info/api.json`` (which HTTP/1.1 servers must accept) both give
    ``/info/api.json``."""
    if "://" in target.partition("?")[0]:
        return urlsplit(target).path or "/"
    return target.partition("?")[0].partition("#")[0]


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # idle keep-alive connections must not hold the process open
    allow_reuse_address = False
    # listen(2)'s backlog: socketserver's default of 5 made the 7th client connecting at the same
    # moment fail at once with EAGAIN (a polling controller per group, Prometheus and the CLI).
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        """A connection's thread failed outside a call (socketserver would print a traceback to
        stderr): a client that went away is one debug line, anything else a throttled traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("jsonrpc: connection ended: %s", exc)
        else:
            log.error("jsonrpc: error on a connection: %s", exc, exc_info=exc)


class JsonRpcServer:
    """Serves the Dispatcher on a unix socket (mode 0600) in a background thread."""

    def __init__(self, plugins, path: str | Path):
        from mobykit.rpc.server import clear_stale_socket, private_umask

        logthrottle.install()
        self.path = Path(path).absolute()
        self.dispatcher = Dispatcher(plugins)
        self._count = 0
        self._cond = threading.Condition()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_socket(self.path)
        with private_umask():
            self._http = _UnixHTTPServer(str(self.path), _Handler)
        os.chmod(self.path, 0o600)
        self._http.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._http.serve_forever, name="jsonrpc", daemon=True)

    def start(self) -> JsonRpcServer:
        self._thread.start()
        return self

    def inflight(self):
        server = self

        class _Ctx:
            def __enter__(self):
                with server._cond:
                    server._count += 1

            def __exit__(self, *exc):
                with server._cond:
                    server._count -= 1
                    server._cond.notify_all()

        return _Ctx()

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let calls in progress finish (up to ``grace`` s), remove the socket."""
        self._http.shutdown()
        with self._cond:
            self._cond.wait_for(lambda: self._count == 0, timeout=grace)
        self._http.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        logthrottle.THROTTLE.flush()


def default_socket_path(env: dict[str, str] | None = None) -> Path:
    """Where Infrakit looks for plugins: $INFRAKIT_PLUGINS_DIR, else $INFRAKIT_HOME/plugins,
    else ~/.infrakit/plugins; the file name is the plugin's lookup name."""
    env = os.environ if env is None else env
    if env.get("INFRAKIT_PLUGINS_DIR"):
        return Path(env["INFRAKIT_PLUGINS_DIR"]) / "mobykit"
    if env.get("INFRAKIT_HOME"):
        return Path(env["INFRAKIT_HOME"]) / "plugins" / "mobykit"
    return Path.home() / ".infrakit" / "plugins" / "mobykit"
