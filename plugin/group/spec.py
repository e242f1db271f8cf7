"""Group specs in Infrakit's format, read from YAML or JSON and checked field by field.

Two shapes are accepted because Infrakit users have both on disk: the Group SPI's own
``{ID, Properties}`` and the newer ``{kind: group, metadata: {name}, properties}`` that
``infrakit group controller commit`` reads (docs/tutorial/group.yml). Errors name the field (and
the file and line when the spec came from a file), so a typo is fixed without reading our code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobykit.errors import InvalidArgument, SpecError
from mobykit.group.hash import instance_hash
from mobykit.spi.group import GroupSpec
from mobykit.spi.types import Allocation

# Infrakit's group types (pkg/controller/group/types: Updating{Duration, Count,
# SkipBeforeInstanceDestroy}) plus GCE-style surge/unavailable bounds and rollback.
_UPDATING_KEYS = {"MaxSurge", "MaxUnavailable", "MinReadySeconds", "Count", "Duration", "Rollback",
                  "SkipBeforeInstanceDestroy"}
SKIP_DRAIN = "drain"  # SkipBeforeInstanceDestroy's one value: no Flavor.Drain before a rolling destroy
_TOP_KEYS = {"Allocation", "Instance", "Flavor", "Updating"}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class FixedOrPercent:
    """A count or a percentage of the group size, as GCE's FixedOrPercent."""

    value: float
    percent: bool = False

    def resolve(self, size: int) -> int:
        # GCE managed instance groups round a percentage UP ("the number of instances will be
        # rounded up if necessary"), for both maxSurge and maxUnavailable.
        return math.ceil(size * self.value / 100 - 1e-9) if self.percent else int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


@dataclass(frozen=True)
class Updating:
    max_surge: FixedOrPercent = FixedOrPercent(1)
    max_unavailable: FixedOrPercent = FixedOrPercent(0)
    min_ready_seconds: float = 0.0
    count: int | None = None  # Infrakit: consecutive healthy polls before the next one goes
    rollback: bool = False
    skip_drain: bool = False  # Infrakit's SkipBeforeInstanceDestroy: "drain" (rolling updates only)

    def min_ready(self, poll_interval: float) -> float:
        """Infrakit's Count means "healthy for this many polls": the same gate as MinReadySeconds."""
        by_count = (self.count or 0) * poll_interval
        return max(self.min_ready_seconds, by_count)


@dataclass
class GroupConfig:
    """A committed group spec, parsed. ``hash`` is Infrakit's InstanceHash of it."""

    id: str
    properties: dict[str, Any]
    size: int
    logical_ids: list[str]
    instance_plugin: str
    instance_properties: Any
    flavor_plugin: str
    flavor_properties: Any
    updating: Updating
    hash: str = field(default="")

    @property
    def quorum(self) -> bool:
        return bool(self.logical_ids)

    @property
    def target(self) -> int:
        return len(self.logical_ids) if self.logical_ids else self.size

    @property
    def allocation(self) -> Allocation:
        return Allocation(size=self.size, logical_ids=list(self.logical_ids))

    def spec(self) -> GroupSpec:
        return GroupSpec(id=self.id, properties=json.loads(json.dumps(self.properties)))


def plugin_type(name: str) -> str:
    """``mobykit/libvirt`` -> ``libvirt``: the Type every instance and flavor call carries."""
    return name.partition("/")[2]


def _fail(field_path: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field_path}: {message}")


def parse_duration(value: Any, field_path: str) -> float:
    """Seconds from a number or a Go duration string ("90s", "1m30s", "500ms")."""
    if isinstance(value, bool):
        raise _fail(field_path, f"must be a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise _fail(field_path, "must not be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        pos, total = 0, 0.0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos == len(text) and text:
            return total
    raise _fail(field_path, f"must be seconds or a duration like \"1m30s\", got {value!r}")


def _fixed_or_percent(value: Any, field_path: str) -> FixedOrPercent:
    if isinstance(value, bool):
        raise _fail(field_path, f"must be a count or a percentage, got {value!r}")
    if isinstance(value, int) and value >= 0:
        return FixedOrPercent(value)
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return FixedOrPercent(int(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if 0 <= pct <= 100:
                    return FixedOrPercent(pct, percent=True)
            elif int(text) >= 0:
                return FixedOrPercent(int(text))
        except ValueError:
            pass
    raise _fail(field_path, f"must be a count >= 0 or a percentage like \"25%\", got {value!r}")


def _section(props: dict[str, Any], name: str) -> tuple[str, Any]:
    sec = props.get(name)
    if not isinstance(sec, dict):
        raise _fail(f"Properties.{name}", "is required: {Plugin, Properties}")
    unknown = sorted(set(sec) - {"Plugin", "Properties", "Options"})
    if unknown:
        raise _fail(f"Properties.{name}.{unknown[0]}", "unknown field (known: Plugin, Properties)")
    plugin = sec.get("Plugin")
    if not isinstance(plugin, str) or not plugin.strip():
        raise _fail(f"Properties.{name}.Plugin", "is required: a plugin name such as mobykit/libvirt")
    if "Properties" not in sec:
        raise _fail(f"Properties.{name}.Properties", "is required (at least {})")
    return plugin, sec["Properties"]


def _updating(raw: Any) -> Updating:
    if raw is None:
        return Updating()
    if not isinstance(raw, dict):
        raise _fail("Properties.Updating", "must be an object")
    unknown = sorted(set(raw) - _UPDATING_KEYS)
    if unknown:
        raise _fail(f"Properties.Updating.{unknown[0]}", f"unknown field (known: {', '.join(sorted(_UPDATING_KEYS))})")
    raw = {k: v for k, v in raw.items() if v is not None}  # Go writes absent pointers as null
    skip = raw.get("SkipBeforeInstanceDestroy")
    if skip is not None and skip not in (SKIP_DRAIN, ""):
        # Infrakit's UnmarshalJSON silently ignores other values; a typo here should not be silent.
        raise _fail("Properties.Updating.SkipBeforeInstanceDestroy", f"must be \"{SKIP_DRAIN}\" or null, got {skip!r}")
    surge = _fixed_or_percent(raw.get("MaxSurge", 1), "Properties.Updating.MaxSurge")
    unavailable = _fixed_or_percent(raw.get("MaxUnavailable", 0), "Properties.Updating.MaxUnavailable")
    if surge.value == 0 and unavailable.value == 0:
        raise _fail("Properties.Updating", "MaxSurge and MaxUnavailable cannot both be 0 (the update could never proceed)")
    min_ready = parse_duration(raw.get("MinReadySeconds", 0), "Properties.Updating.MinReadySeconds")
    if "Duration" in raw:  # Infrakit's pacing: healthy for this long before the next one goes
        min_ready = max(min_ready, parse_duration(raw["Duration"], "Properties.Updating.Duration"))
    count = raw.get("Count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise _fail("Properties.Updating.Count", f"must be a count >= 0, got {count!r}")
    rollback = raw.get("Rollback", "none")
    if rollback not in ("auto", "none", None, False, True):
        raise _fail("Properties.Updating.Rollback", f"must be \"auto\" or \"none\", got {rollback!r}")
    return Updating(surge, unavailable, min_ready, count, rollback in ("auto", True), skip == SKIP_DRAIN)


# Infrakit's zero values, which its Go types write for every field a user left out (the manager
# re-sends stored specs this way): the same as absent.
_ZEROS: dict[str, dict[str, tuple[Any, ...]]] = {
    "Allocation": {"Size": (0,), "LogicalIDs": ([],)},
    "Updating": {"Count": (0,), "Duration": ("0s", 0, "0"), "SkipBeforeInstanceDestroy": ("",)},
}


def canonical(props: dict[str, Any]) -> dict[str, Any]:
    """The group properties with Infrakit's nulls and zero values dropped from Allocation and
    Updating, so a spec as Infrakit's types serialise it commits and reads back exactly as the
    same spec written by hand. Instance and Flavor are opaque (and hashed) and are kept as sent."""
    out = dict(props)
    for section, zeros in _ZEROS.items():
        raw = out.get(section)
        if raw is None and section in out:
            del out[section]
            continue
        if not isinstance(raw, dict):
            continue
        kept = {k: v for k, v in raw.items()
                if v is not None and not any(v == z and type(v) is type(z) for z in zeros.get(k, ()))}
        if section == "Allocation" and not kept:
            kept = {"Size": 0}
        if kept or section == "Allocation":
            out[section] = kept
        else:
            del out[section]
    return out


def parse(spec: GroupSpec) -> GroupConfig:
    """Check a GroupSpec and return its parsed form; InvalidArgument names the bad field."""
    if not isinstance(spec.id, str) or not spec.id.strip():
        raise _fail("ID", "is required: the group's name")
    props = spec.properties
    if not isinstance(props, dict):
        raise _fail("Properties", "must be an object {Allocation, Instance, Flavor}")
    unknown = sorted(set(props) - _TOP_KEYS)
    if unknown:
        raise _fail(f"Properties.{unknown[0]}", f"unknown field (known: {', '.join(sorted(_TOP_KEYS))})")
    props = canonical(props)
    alloc = props.get("Allocation")
    if not isinstance(alloc, dict):
        raise _fail("Properties.Allocation", "is required: {Size: N} or {LogicalIDs: [...]}")
    unknown = sorted(set(alloc) - {"Size", "LogicalIDs"})
    if unknown:
        raise _fail(f"Properties.Allocation.{unknown[0]}", "unknown field (known: Size, LogicalIDs)")
    size = alloc.get("Size", 0)
    if isinstance(size, float) and size.is_integer():
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _fail("Properties.Allocation.Size", f"must be a count >= 0, got {size!r}")
    ids = alloc.get("LogicalIDs") or []
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise _fail("Properties.Allocation.LogicalIDs", "must be a list of non-empty strings")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise _fail("Properties.Allocation.LogicalIDs", f"{dup!r} is listed twice")
    if ids and size:
        raise _fail("Properties.Allocation", "give Size or LogicalIDs, not both")
    iplugin, iprops = _section(props, "Instance")
    fplugin, fprops = _section(props, "Flavor")
    # Persistent volumes belong to a logical id (<group>-<lid>-<name>, kept across replacements), so
    # a group without logical ids has nobody to own them: refuse at commit, not at the first provision.
    if isinstance(iprops, dict) and iprops.get("Volumes") and not ids:
        raise _fail("Properties.Instance.Properties.Volumes",
                    "persistent volumes belong to a logical id: give the group Allocation.LogicalIDs "
                    "(each id owns <group>-<id>-<name>), or remove Volumes")
    try:
        json.dumps(props, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _fail("Properties", f"must be plain JSON values: {e}") from None
    cfg = GroupConfig(
        id=spec.id,
        properties=props,
        size=size,
        logical_ids=list(ids),
        instance_plugin=iplugin,
        instance_properties=iprops,
        flavor_plugin=fplugin,
        flavor_properties=fprops,
        updating=_updating(props.get("Updating")),
    )
    cfg.hash = instance_hash(props)
    return cfg


def from_document(doc: Any, source: str = "<spec>") -> GroupSpec:
    """A GroupSpec from a parsed YAML/JSON document of either accepted shape."""
    if not isinstance(doc, dict):
        raise SpecError("a group spec must be a mapping {ID, Properties}", file=source)
    if "ID" in doc or "Properties" in doc:
        unknown = sorted(set(doc) - {"ID", "Properties"})
        if unknown:
            raise SpecError("unknown field (known: ID, Properties)", file=source, field=unknown[0])
        return GroupSpec(id=doc.get("ID", ""), properties=doc.get("Properties"))
    if "properties" in doc or "metadata" in doc or "kind" in doc:
        kind = doc.get("kind", "group")
        if kind not in ("group", "group-controller"):
            raise SpecError(f"kind is {kind!r}, expected group", file=source, field="kind")
        meta = doc.get("metadata") or {}
        name = meta.get("name") if isinstance(meta, dict) else None
        return GroupSpec(id=name or "", properties=doc.get("properties"))
    raise SpecError("a group spec needs ID and Properties (or kind/metadata/properties)", file=source)


def _line_of(text: str, field_path: str) -> int | None:
    """Where a dotted field (``Properties.Allocation.Size``) is in a YAML/JSON text, for errors."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    parts = field_path.split(".")
    line = None
    for i, part in enumerate(parts):
        if not isinstance(node, yaml.MappingNode):
            break
        keys = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        if i == 0 and part == "Properties" and "Properties" not in keys and "properties" in keys:
            part = "properties"
        if i == 0 and part == "ID" and "ID" not in keys and "metadata" in keys:
            return keys["metadata"][0].start_mark.line + 1
        if part not in keys:
            break
        key, node = keys[part]
        line = key.start_mark.line + 1
    return line


def load(path: str | Path) -> GroupConfig:
    """Read, parse and check a group spec file (YAML or JSON)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", file=str(p)) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text (byte {e.start})", file=str(p)) from None
    try:
        doc = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SpecError(f"not valid YAML/JSON: {getattr(e, 'problem', e)}", file=str(p),
                        line=mark.line + 1 if mark else None) from None
    except RecursionError:  # PyYAML composes recursively: "[[[[..." thousands deep
        raise SpecError("not a group spec: nested too deep", file=str(p)) from None
    spec = from_document(doc, str(p))
    try:
        return parse(spec)
    except InvalidArgument as e:
        field_path, _, message = str(e).partition(": ")
        raise SpecError(message, file=str(p), line=_line_of(text, field_path), field=field_path) from None
