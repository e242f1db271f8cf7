"""Infrakit's config hash (``InstanceHash``), reproduced bit for bit.

Why by hand: the hash is SHA-1 over what Go's ``encoding/json`` prints, and no Python library
prints exactly that (``json.MarshalIndent`` puts the prefix on every line but the first, escapes
``<``, ``>``, ``&``, U+2028/U+2029 and control characters its own way, and formats every number as
a float64 the way ``strconv`` does). Groups created by Infrakit carry this hash in their
``infrakit.config.hash`` tag, so matching it exactly is what lets us adopt them without a
needless rolling update.

Procedure (docker/infrakit pkg/plugin/group/types: Spec.InstanceHash / stableFormat): for the
Instance section and then the Flavor section, take ``{"Plugin": ..., "Properties": ...}``, let
every number become a float64 and every object a map (keys sorted), print it with
``MarshalIndent(v, "  ", "  ")``, and feed both texts to one SHA-1; then base32 (RFC 4648
alphabet), lowercase, ``=`` padding removed. Allocation and Updating are not part of it.
"""

from __future__ import annotations

import base64
import hashlib
import math
from decimal import Decimal
from typing import Any

_PREFIX = "  "
_INDENT = "  "

# Go's encoding/json (before 1.22, i.e. what Infrakit was built with) writes \n \r \t short,
# every other control character as \u00XX, and escapes HTML-significant characters.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
            "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_string(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate is invalid UTF-8: Go writes U+FFFD
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_float(value: float) -> str:
    """strconv.FormatFloat(f, 'f' or 'e', -1, 64) as encoding/json chooses between them."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"unsupported value: {value!r} (JSON has no NaN or Infinity)")
    a = abs(value)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        # Shortest round-trip digits in exponent form, exponent without leading zeros ("1e-07" -> "1e-7").
        text = repr(value)
        if "e" not in text:
            text = f"{value:e}"
        mant, _, exp = text.partition("e")
        if mant.endswith(".0"):
            mant = mant[:-2]
        sign = "-" if exp.startswith("-") else "+"
        return f"{mant}e{sign}{exp.lstrip('+-').lstrip('0') or '0'}"
    # repr gives the shortest digits that round-trip, as Go's -1 precision does; print them fixed.
    return format(Decimal(repr(value)).normalize(), "f")


def normalise(value: Any) -> Any:
    """What Go's json.Unmarshal into interface{} gives back: numbers become float64."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    raise TypeError(f"cannot hash a {type(value).__name__} (only JSON values)")


def _write(value: Any, depth: int, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(go_string(value))
    elif isinstance(value, float):
        out.append(go_float(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        out.append("{")
        # Go sorts map keys by their UTF-8 bytes.
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-8", "surrogatepass"))):
            out.append("," if i else "")
            out.append("\n" + _PREFIX + _INDENT * (depth + 1))
            out.append(go_string(key) + ": ")
            _write(value[key], depth + 1, out)
        out.append("\n" + _PREFIX + _INDENT * depth + "}")
    elif isinstance(value, list):
        if not value:
            out.append("[]")
            return
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            out.append("\n" + _PREFIX + _INDENT * (depth + 1))
            _write(item, depth + 1, out)
        out.append("\n" + _PREFIX + _INDENT * depth + "]")
    else:  # pragma: no cover - normalise() let something through
        raise TypeError(type(value).__name__)


def stable_format(value: Any) -> bytes:
    """Go's ``json.MarshalIndent(normalised value, "  ", "  ")`` as bytes."""
    out: list[str] = []
    _write(normalise(value), 0, out)
    return "".join(out).encode("utf-8")


def _section(properties: dict[str, Any], name: str) -> dict[str, Any]:
    section = properties.get(name) or {}
    return {"Plugin": section.get("Plugin", ""), "Properties": section.get("Properties")}


def instance_hash(properties: dict[str, Any]) -> str:
    """The ``infrakit.config.hash`` of a group's properties (``{Instance, Flavor, ...}``)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(stable_format(_section(properties, "Instance")))
    h.update(stable_format(_section(properties, "Flavor")))
    return base64.b32encode(h.digest()).decode("ascii").lower().rstrip("=")
