"""Tags as GCE labels and metadata items: the escaping rules, in one place.

Why two places: labels are what the Compute API can filter on server side (``labels.k = "v"``), but
their rules are narrow (keys ``[a-z][a-z0-9_-]{0,62}``, values ``[a-z0-9_-]{0,63}``, at most 64), while
metadata items hold any value exactly (keys ``[a-zA-Z0-9_-]{1,128}``). So every tag is written both ways:

- label key and value: lower-case letters, digits and ``-`` stay; every other byte of the UTF-8 form
  becomes ``_`` + two hex digits (``infrakit.group`` -> ``infrakit_2egroup``). A key must start with
  a letter other than ``x``; otherwise its first character is escaped after a leading ``x``
  (``Name`` -> ``x_4eame``, ``xray`` -> ``x_78ray``), so decoding is unambiguous. A value whose escape is
  longer than 63 becomes a digest form ``_z`` + 24 hex of its sha256 (``_z`` is no escape, so it is
  recognised): still deterministic, so a filter on it works, and the exact value is read back from
  the metadata item. A key whose escape does not fit is refused (it could not be filtered on).
- metadata item key: Infrakit's GCE plugin rule, ``.`` -> ``--`` (``infrakit.group`` is the item
  ``infrakit--group``), other bytes outside ``[a-zA-Z0-9_-]`` as ``_`` + hex. Items are looked up by
  the key decoded from the label, so they never need decoding themselves.
"""

from __future__ import annotations

import hashlib
import re

from mobykit.errors import InvalidArgument

MAX_LABELS = 64
MAX_LABEL = 63
MANAGED_LABEL = "mobykit"  # on every instance mobykit makes; listings filter on it; not a tag
MANAGED_VALUE = "1"
IMAGE_LABEL = "mobykit-image"  # on published images: the first 63 hex digits of the image id
DIGEST_MARK = "_z"

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_META_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
METADATA_KEY = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


def _escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in _PLAIN:
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return "".join(out)


def _unescape(text: str) -> str:
    """Inverse of ``_escape``; a label someone else wrote (``my_label``) is read as it is."""
    raw = bytearray()
    i = 0
    try:
        while i < len(text):
            if text[i] == "_":
                hexpart = text[i + 1:i + 3]
                if len(hexpart) != 2 or hexpart != hexpart.lower():
                    raise ValueError(text)
                raw += bytes.fromhex(hexpart)
                i += 3
            else:
                raw += text[i].encode()
                i += 1
        return raw.decode()
    except ValueError:  # not our escape (UnicodeDecodeError is a ValueError too)
        return text


def label_key(key: str) -> str:
    """The label key of tag ``key``; InvalidArgument when it cannot be one (see the module docstring)."""
    if not key:
        raise InvalidArgument("Tags: an empty tag key cannot be a GCE label")
    first = key[0]
    if first in _PLAIN and first.isalpha() and first != "x":
        escaped = first + _escape(key[1:])
    else:
        escaped = "x" + "".join(f"_{b:02x}" for b in first.encode()) + _escape(key[1:])
    if len(escaped) > MAX_LABEL:
        raise InvalidArgument(f"Tags.{key}: too long for a GCE label key ({len(escaped)} > 63 once escaped)")
    return escaped


def label_value(value: str) -> str:
    """The label value of a tag value: its escape, or its digest form when that is too long."""
    escaped = _escape(value)
    if len(escaped) <= MAX_LABEL:
        return escaped
    return DIGEST_MARK + hashlib.sha256(value.encode()).hexdigest()[:24]


def decode_key(label: str) -> str:
    if label.startswith("x_"):
        return _unescape(label[1:])
    return _unescape(label)


def is_digest(value: str) -> bool:
    return value.startswith(DIGEST_MARK)


def metadata_key(key: str) -> str:
    """Infrakit's GCE metadata key of a tag: ``.`` -> ``--``; other bytes outside the rule -> ``_xx``."""
    out = []
    for ch in key:
        if ch == ".":
            out.append("--")
        elif ch in _META_PLAIN:
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return "".join(out)[:128]


def to_labels(tags: dict[str, str]) -> dict[str, str]:
    """The labels of ``tags``, plus the managed mark that listings filter on."""
    if len(tags) + 1 > MAX_LABELS:
        raise InvalidArgument(f"Tags: {len(tags)} tags, GCE allows {MAX_LABELS - 1} besides mobykit's own label")
    labels = {label_key(k): label_value(v) for k, v in tags.items()}
    if len(labels) != len(tags):
        raise InvalidArgument("Tags: two tag keys escape to the same GCE label key")
    if MANAGED_LABEL in labels:
        raise InvalidArgument(f"Tags.{MANAGED_LABEL}: reserved by mobykit")
    labels[MANAGED_LABEL] = MANAGED_VALUE
    return labels


def to_metadata_items(tags: dict[str, str]) -> dict[str, str]:
    """Metadata items with each tag's exact value (what the guest and Infrakit users read)."""
    return {metadata_key(k): v for k, v in tags.items()}


def from_labels(labels: dict[str, str], items: dict[str, str]) -> dict[str, str]:
    """Tags back from an instance's labels; digest forms are resolved from its metadata items (and
    checked against them: an item edited by hand is not believed)."""
    tags = {}
    for lk, lv in labels.items():
        if lk == MANAGED_LABEL:
            continue
        key = decode_key(lk)
        if is_digest(lv):
            exact = items.get(metadata_key(key))
            tags[key] = exact if exact is not None and label_value(exact) == lv else lv
        else:
            tags[key] = _unescape(lv)
    return tags


def filter_expression(tags: dict[str, str]) -> str:
    """GCE's list filter for instances carrying all ``tags`` (and the managed mark)."""
    labels = to_labels(tags)
    return " AND ".join(f'(labels.{k} = "{v}")' for k, v in sorted(labels.items()))
