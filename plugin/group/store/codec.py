"""Records to bytes and back, with the format version checked on the way in.

JSON, one object per record, ``format`` first: a store written by a newer mobykit is refused by
name (never read half-understood and written back older); anything that does not parse is
reported naming where it came from, so a corrupt store is one clear error, not a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from mobykit.group.store.base import FORMAT_VERSION, GroupRecord, StoreError

_KEYS = {"format", "id", "spec", "commit", "previous", "halted", "gave_up", "rolled_back_from", "healthy_since"}


def encode(record: GroupRecord) -> bytes:
    doc = {
        "format": FORMAT_VERSION, "id": record.id, "spec": record.spec, "commit": record.commit,
        "previous": record.previous, "halted": record.halted, "gave_up": record.gave_up,
        "rolled_back_from": record.rolled_back_from, "healthy_since": record.healthy_since,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def check_format(found: Any, where: str) -> None:
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise StoreError(f"{where}: format: expected a version number, got {found!r} (corrupt store?)")
    if found > FORMAT_VERSION:
        raise StoreError(f"{where}: written by a newer mobykit (store format {found}, this one reads up to "
                         f"{FORMAT_VERSION}); upgrade mobykit, nothing was changed")


def decode(data: bytes, where: str, revision: int = 0) -> GroupRecord:
    """A record from ``data``; ``where`` (a file or etcd key) names it in every error."""
    try:
        doc = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{where}: corrupt store record (not JSON: {e}); nothing was changed") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{where}: corrupt store record (not an object); nothing was changed")
    check_format(doc.get("format"), where)
    missing = sorted({"id", "spec", "commit"} - set(doc))
    if missing:
        raise StoreError(f"{where}: corrupt store record (missing {', '.join(missing)}); nothing was changed")
    spec, prev, hs = doc["spec"], doc.get("previous"), doc.get("healthy_since") or {}
    if (not isinstance(doc["id"], str) or not isinstance(spec, dict) or not isinstance(doc["commit"], str)
            or not (prev is None or isinstance(prev, dict)) or not isinstance(hs, dict)
            or not all(isinstance(v, int | float) for v in hs.values())):
        raise StoreError(f"{where}: corrupt store record (a field has the wrong type); nothing was changed")
    for k in ("halted", "gave_up", "rolled_back_from"):
        if doc.get(k) is not None and not isinstance(doc[k], str):
            raise StoreError(f"{where}: {k}: corrupt store record (expected text); nothing was changed")
    return GroupRecord(id=doc["id"], spec=spec, commit=doc["commit"], previous=prev, halted=doc.get("halted"),
                       gave_up=doc.get("gave_up"), rolled_back_from=doc.get("rolled_back_from"),
                       healthy_since={str(k): float(v) for k, v in hs.items()}, revision=revision)
