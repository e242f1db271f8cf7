"""The two documents every Infrakit plugin serves by HTTP GET on its socket.

``GET /info/api.json`` is Infrakit's ``plugin.Info`` (docker/infrakit pkg/plugin/plugin.go, served by
pkg/rpc/server/info.go): ``{Vendor, Implements: [{Name, Version}], Interfaces: [{Name, Version,
Methods: [{Request, Response}]}]}``, where each method is shown as an example JSON-RPC request (the
zero value of its params) and response (the zero value of its result). ``infrakit <plugin> info api``
prints it. ``GET /info/functions.json`` is a map of category to the template functions the plugin
exports (``{"base": [{Name, Description: [...], Function, Usage}]}``); ``info template`` decodes it
into ``map[string][]template.Function``, so "none" must be ``{}``: a list, or the old 405 body,
does not decode.

Why generated from the dispatcher's method table: the documents then list exactly the methods the
socket answers, so a method added to the dispatcher shows up here without anyone remembering to.
Only the example payloads live in this module (Infrakit derives them by reflection on its Go
types, which Python does not have); a test checks that every dispatched method has one.

What differs from Go's server, on purpose: Go describes only the first object registered on a
socket, we describe every interface this socket serves (Instance, Flavor and Group share one
socket here); the example ``id`` is a fixed string rather than the current Unix time, so the
documents are reproducible; and the replies carry ``Content-Type: application/json`` (Go lets
net/http sniff ``text/plain``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from mobykit import __version__

API_PATH = "/info/api.json"  # Infrakit's rpc.URLAPI
FUNCTIONS_PATH = "/info/functions.json"  # Infrakit's rpc.URLFunctions
PATHS = (API_PATH, FUNCTIONS_PATH)

EXAMPLE_ID = "1"  # Infrakit writes a string (the Unix time) here, the same in request and response
VENDOR = {"Name": "mobykit", "Version": __version__, "URL": ""}  # spi.VendorInfo: {InterfaceSpec, URL}

# -- Go zero values of Infrakit's request/response types (pkg/rpc/{instance,flavor,group}/types.go) --
# A nil pointer, map or slice is null; a string "", a number 0, a bool false. Field order is the
# Go struct's, as encoding/json writes it.

_SPEC = {"Properties": None, "Tags": None, "Init": "", "LogicalID": None, "Attachments": None}  # instance.Spec
_DESCRIPTION = {"ID": "", "LogicalID": None, "Tags": None}  # instance.Description (Properties omitempty)
_ALLOCATION = {"Size": 0, "LogicalIDs": None}  # group.AllocationMethod
_INDEX = {"Group": "", "Sequence": 0}  # group.Index
_GROUP_SPEC = {"ID": "", "Properties": None}  # group.Spec
_TYPED_OK = {"Type": "", "OK": False}

# method -> (params, result)
EXAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "Instance.Validate": ({"Type": "", "Properties": None}, _TYPED_OK),
    "Instance.Provision": ({"Type": "", "Spec": _SPEC}, {"Type": "", "ID": None}),
    "Instance.Label": ({"Type": "", "Instance": "", "Labels": None}, _TYPED_OK),
    "Instance.Destroy": ({"Type": "", "Instance": "", "Context": {"Reason": ""}}, _TYPED_OK),
    "Instance.DescribeInstances": ({"Type": "", "Tags": None, "Properties": False}, {"Type": "", "Descriptions": None}),
    "Flavor.Validate": ({"Type": "", "Properties": None, "Allocation": _ALLOCATION}, _TYPED_OK),
    "Flavor.Prepare": (
        {"Type": "", "Properties": None, "Spec": _SPEC, "Allocation": _ALLOCATION, "Index": _INDEX},
        {"Type": "", "Spec": _SPEC},
    ),
    "Flavor.Healthy": ({"Type": "", "Properties": None, "Instance": _DESCRIPTION}, {"Type": "", "Health": 0}),
    "Flavor.Drain": ({"Type": "", "Properties": None, "Instance": _DESCRIPTION}, _TYPED_OK),
    "Group.CommitGroup": ({"Spec": _GROUP_SPEC, "Pretend": False}, {"ID": "", "Details": ""}),
    "Group.FreeGroup": ({"ID": ""}, {"ID": ""}),
    "Group.DescribeGroup": ({"ID": ""}, {"ID": "", "Description": {"Instances": None, "Converged": False}}),
    "Group.DestroyGroup": ({"ID": ""}, {"ID": ""}),
    "Group.InspectGroups": ({"ID": ""}, {"ID": "", "Groups": None}),
    "Group.DestroyInstances": ({"ID": "", "Instances": None}, {"ID": ""}),
    "Group.Size": ({"ID": ""}, {"ID": "", "Size": 0}),
    "Group.SetSize": ({"ID": "", "Size": 0}, {"ID": ""}),
}


def method_description(method: str) -> dict[str, Any]:
    """Infrakit's ``plugin.MethodDescription`` for one method: an example request and response.
    A method without an example (a test keeps that from happening) is still listed, with ``{}``."""
    params, result = EXAMPLES.get(method, ({}, {}))
    return {
        "Request": {"jsonrpc": "2.0", "method": method, "params": copy.deepcopy(params), "id": EXAMPLE_ID},
        "Response": {"result": copy.deepcopy(result), "id": EXAMPLE_ID},
    }


def api_document(interfaces: Iterable[str], methods: Iterable[str]) -> dict[str, Any]:
    """``plugin.Info`` for a socket serving ``interfaces`` ("Instance/0.6.1"...) with the
    dispatcher's ``methods`` ("Instance.Validate"...). Methods are listed per interface in name
    order, which is the order Go's reflection gives Infrakit's server."""
    implements, described = [], []
    names = sorted(methods)
    for spec in interfaces:
        name, _, version = spec.partition("/")
        implements.append({"Name": name, "Version": version})
        own = [m for m in names if m.partition(".")[0] == name]
        described.append({"Name": name, "Version": version, "Methods": [method_description(m) for m in own]})
    return {"Vendor": dict(VENDOR), "Implements": implements, "Interfaces": described}


def functions_document() -> dict[str, list[dict[str, Any]]]:
    """The template functions by category: mobykit's plugins configure nothing through Infrakit's
    template engine, so there are none (Go leaves empty categories out, giving ``{}``)."""
    return {}


def document(path: str, interfaces: Iterable[str], methods: Iterable[str]) -> dict[str, Any] | None:
    """The document served at ``path``, or None when ``path`` is not an info path."""
    if path == API_PATH:
        return api_document(interfaces, methods)
    if path == FUNCTIONS_PATH:
        return functions_document()
    return None
