"""Infrakit's reference ``vanilla`` flavor, under the same name, so existing group specs run unchanged.

Properties ``{"Init": [lines], "Tags": {...}, "Attachments": [{"ID", "Type"}]}``. Prepare appends the
Init lines after the instance spec's own Init (joined with newlines), merges Tags (the flavor's win)
and appends Attachments. Every instance is healthy; draining does nothing. Like Infrakit, field
names match case-insensitively; unlike Infrakit, an unknown key is an error naming it.
"""

from __future__ import annotations

import copy
from typing import Any

from mobykit.errors import InvalidArgument
from mobykit.flavor.properties import fields, join_init, string_list, string_map
from mobykit.spi.types import Allocation, Attachment, Description, Health, Index, Spec

KEYS = ("Init", "Tags", "Attachments")


def parse(properties: Any) -> tuple[list[str], dict[str, str], list[Attachment]]:
    props = fields(properties, KEYS, "Properties")
    init = string_list(props.get("Init"), "Properties.Init")
    tags = string_map(props.get("Tags"), "Properties.Tags")
    attachments = []
    raw = props.get("Attachments")
    if raw is not None and not isinstance(raw, list):
        raise InvalidArgument("Properties.Attachments: must be a list of {ID, Type}")
    for i, a in enumerate(raw or []):
        att = fields(a, ("ID", "Type"), f"Properties.Attachments[{i}]")
        if not isinstance(att.get("ID"), str) or not att["ID"]:
            raise InvalidArgument(f"Properties.Attachments[{i}].ID: must be a non-empty string")
        if not isinstance(att.get("Type", ""), str):
            raise InvalidArgument(f"Properties.Attachments[{i}].Type: must be a string")
        attachments.append(Attachment(id=att["ID"], type=att.get("Type", "")))
    return init, tags, attachments


class VanillaFlavor:
    """Implements ``mobykit.spi.flavor.FlavorPlugin``."""

    def validate(self, type: str, properties: Any, allocation: Allocation) -> None:
        parse(properties)

    def prepare(self, type: str, properties: Any, spec: Spec, allocation: Allocation, index: Index) -> Spec:
        init, tags, attachments = parse(properties)
        out = copy.deepcopy(spec)
        out.tags = {**(spec.tags or {}), **tags}
        out.init = join_init(spec.init or "", init)
        out.attachments = list(spec.attachments or []) + attachments
        return out

    def healthy(self, type: str, properties: Any, instance: Description) -> Health:
        return Health.HEALTHY

    def drain(self, type: str, properties: Any, instance: Description) -> None:
        return None
