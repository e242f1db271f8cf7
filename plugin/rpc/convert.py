"""Protobuf messages <-> the SPI's dataclasses (mobykit.spi.types, mobykit.spi.group).

Why by hand: the SPI types are plain dataclasses shared by both transports, and protobuf's
json_format would turn every number into a float (Value holds doubles). Integral numbers come back
as ints here, since properties such as ``Memory: 512`` are checked as integers by providers.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

from mobykit.errors import InvalidArgument
from mobykit.rpc.gen import mobykit_pb2 as pb
from mobykit.spi.group import GroupDescription, GroupSpec
from mobykit.spi.types import Allocation, Attachment, Description, Health, Index, Spec


def from_value(value: struct_pb2.Value | None, present: bool = True) -> Any:
    """A google.protobuf.Value as plain JSON data (None when unset)."""
    if value is None or not present:
        return None
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "number_value":
        n = value.number_value
        if not math.isfinite(n):
            # struct.proto: NaN and Infinity cannot be serialized as JSON. Refused at the door, since a
            # stored NaN would later break every JSON-RPC reply that carries it.
            raise InvalidArgument(f"properties: {n} is not a JSON number (NaN and Infinity are not allowed)")
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: from_value(v) for k, v in value.struct_value.fields.items()}
    return [from_value(v) for v in value.list_value.values]


def to_value(data: Any, out: struct_pb2.Value | None = None) -> struct_pb2.Value:
    """Plain JSON data as a google.protobuf.Value (fills ``out`` when given)."""
    v = out if out is not None else struct_pb2.Value()
    if data is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        v.bool_value = data
    elif isinstance(data, int | float):
        v.number_value = float(data)
    elif isinstance(data, str):
        v.string_value = data
    elif isinstance(data, dict):
        v.struct_value.SetInParent()
        for k, item in data.items():
            to_value(item, v.struct_value.fields[str(k)])
    elif isinstance(data, list | tuple):
        v.list_value.SetInParent()
        for item in data:
            to_value(item, v.list_value.values.add())
    else:
        raise InvalidArgument(f"cannot send a {type(data).__name__} as JSON")
    return v


def _props(msg, field: str = "properties") -> Any:
    return from_value(getattr(msg, field), msg.HasField(field))


def _set_props(msg, data: Any, field: str = "properties") -> None:
    if data is not None:
        to_value(data, getattr(msg, field))


def spec_from_pb(m: pb.Spec) -> Spec:
    return Spec(
        properties=_props(m),
        tags=dict(m.tags),
        init=m.init,
        logical_id=m.logical_id if m.HasField("logical_id") else None,
        attachments=[Attachment(id=a.id, type=a.type) for a in m.attachments],
    )


def spec_to_pb(s: Spec, out: pb.Spec | None = None) -> pb.Spec:
    m = out if out is not None else pb.Spec()
    m.SetInParent()
    _set_props(m, s.properties)
    m.tags.update(s.tags or {})
    m.init = s.init or ""
    if s.logical_id is not None:
        m.logical_id = s.logical_id
    for a in s.attachments or []:
        m.attachments.add(id=a.id, type=a.type)
    return m


def description_from_pb(m: pb.Description) -> Description:
    return Description(
        id=m.id,
        tags=dict(m.tags),
        logical_id=m.logical_id if m.HasField("logical_id") else None,
        properties=_props(m),
    )


def description_to_pb(d: Description, out: pb.Description | None = None) -> pb.Description:
    m = out if out is not None else pb.Description()
    m.SetInParent()
    m.id = d.id
    m.tags.update(d.tags or {})
    if d.logical_id is not None:
        m.logical_id = d.logical_id
    _set_props(m, d.properties)
    return m


def allocation_from_pb(m: pb.Allocation) -> Allocation:
    return Allocation(size=m.size, logical_ids=list(m.logical_ids))


def allocation_to_pb(a: Allocation, out: pb.Allocation) -> pb.Allocation:
    out.SetInParent()
    out.size = a.size
    out.logical_ids.extend(a.logical_ids or [])
    return out


def index_from_pb(m: pb.Index) -> Index:
    return Index(group=m.group, sequence=m.sequence)


def index_to_pb(i: Index, out: pb.Index) -> pb.Index:
    out.SetInParent()
    out.group, out.sequence = i.group, i.sequence
    return out


def health_to_pb(h: Health | int) -> int:
    return int(Health(h))


def group_spec_from_pb(m: pb.GroupSpec) -> GroupSpec:
    props = _props(m)
    return GroupSpec(id=m.id, properties=props if props is not None else {})


def group_spec_to_pb(s: GroupSpec, out: pb.GroupSpec | None = None) -> pb.GroupSpec:
    m = out if out is not None else pb.GroupSpec()
    m.SetInParent()
    m.id = s.id
    _set_props(m, s.properties)
    return m


def group_description_to_pb(d: GroupDescription, out: pb.GroupDescription) -> pb.GroupDescription:
    out.SetInParent()
    for inst in d.instances:
        description_to_pb(inst, out.instances.add())
    out.converged = d.converged
    return out


def group_description_from_pb(m: pb.GroupDescription) -> GroupDescription:
    return GroupDescription(instances=[description_from_pb(i) for i in m.instances], converged=m.converged)


def image_to_pb(image: Any) -> pb.Image:
    """A mobykit.providers.base.BootImage as the Images service returns it."""
    return pb.Image(
        id=image.id,
        name=image.name,
        kernel=str(image.kernel),
        initrd=str(image.initrd),
        cmdline=image.cmdline,
        disk=str(image.disk) if image.disk else "",
    )
