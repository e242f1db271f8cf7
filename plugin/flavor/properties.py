"""Reading flavor Properties the way Infrakit's Go plugins read them.

Why by hand: the shapes are tiny and the errors must name the exact field (``Properties.Health.Port``),
which a schema library reports less directly. Go's ``encoding/json`` matches field names
case-insensitively, so existing Infrakit group specs that write ``init`` or ``tags`` keep working;
a key that matches no field is an error here (Go would silently drop it, which hides typos).
"""

from __future__ import annotations

import re
from typing import Any

from mobykit.errors import InvalidArgument

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def fields(value: Any, known: tuple[str, ...], where: str) -> dict[str, Any]:
    """``value`` (an object or null) with its keys renamed to the canonical spelling in ``known``;
    InvalidArgument naming ``where.key`` for any other key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: must be an object, got {_json_type(value)}")
    canon = {k.lower(): k for k in known}
    out: dict[str, Any] = {}
    unknown = []
    for key, v in value.items():
        name = canon.get(str(key).lower())
        if name is None:
            unknown.append(str(key))
            continue
        if name in out:
            raise InvalidArgument(f"{where}.{name}: given twice (keys match case-insensitively)")
        out[name] = v
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})"
        )
    return out


def string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidArgument(f"{where}: must be a list of strings")
    return list(value)


def string_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: must be an object of strings, got {_json_type(value)}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise InvalidArgument(f"{where}.{k}: must be a string, got {_json_type(v)}")
    return dict(value)


def join_init(existing: str, lines: list[str]) -> str:
    """Infrakit's rule: the instance spec's own Init first, then the flavor's lines, joined by newlines."""
    parts = ([existing] if existing else []) + lines
    return "\n".join(parts)


def duration(value: Any, where: str, default: float) -> float:
    """A Go duration string (``"300s"``, ``"1m30s"``, ``"500ms"``) or a number of seconds -> seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgument(f"{where}: must not be negative")
        return float(value)
    if isinstance(value, str) and value:
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(value):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos == len(value):
            return total
        if value == "0":
            return 0.0
    raise InvalidArgument(f"{where}: {value!r} is not a duration like \"300s\", \"5m\" or \"1m30s\"")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
