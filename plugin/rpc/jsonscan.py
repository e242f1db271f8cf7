"""Refuse a JSON body that is too deep or too big before ``json`` parses it.

Why a scan before parsing: ``json.loads`` recurses once per nesting level, so ``[[[[...`` 10,000
deep raises RecursionError from inside the parser, and ``[{},{},...]`` in 16 MiB becomes several
hundred MB of dicts. Parsing first and checking afterwards is too late for both. The scan is one
regular-expression pass over the bytes that skips string contents (a ``[`` inside a string does not
count) and stops at the first limit exceeded, so a hostile body costs at most a few milliseconds.

The body must be UTF-8 (RFC 8259 requires it between systems); in UTF-8 a multi-byte character
never contains an ASCII byte, so counting ASCII brackets in the bytes is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mobykit.rpc import limits

_STRUCTURE = re.compile(rb'[\[\]{},"]')
# The rest of a string after its opening quote; possessive, so a failed match costs linear time.
_STRING_REST = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_QUOTE, _OPEN, _CLOSE = ord('"'), frozenset(b"[{"), frozenset(b"]}")


class ShapeError(ValueError):
    """The body is over a limit (``parse`` is False) or cannot be JSON at all (``parse`` is True)."""

    def __init__(self, message: str, parse: bool = False):
        super().__init__(message)
        self.parse = parse


@dataclass(frozen=True)
class Limits:
    depth: int = limits.MAX_DEPTH
    values: int = limits.MAX_VALUES
    string: int = limits.MAX_STRING


DEFAULT = Limits()


def check(body: bytes, limit: Limits = DEFAULT) -> str:
    """The body as text when it is UTF-8 within ``limit``; ShapeError naming the first problem."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShapeError(f"not UTF-8 (byte {e.start})", parse=True) from None
    depth = values = 0
    pos = 0
    while (m := _STRUCTURE.search(body, pos)) is not None:
        at, pos = m.start(), m.end()
        c = body[at]
        if c == _QUOTE:
            window = min(len(body), pos + limit.string + 1)
            rest = _STRING_REST.match(body, pos, window)
            if rest is None:
                if window < len(body):
                    raise ShapeError(f"a string at byte {at} is longer than {limit.string} bytes")
                raise ShapeError(f"unterminated string at byte {at}", parse=True)
            pos = rest.end()
            continue
        if c in _OPEN:
            depth += 1
            if depth > limit.depth:
                raise ShapeError(f"nested deeper than {limit.depth} levels (at byte {at})")
        elif c in _CLOSE:
            depth -= 1  # an unbalanced bracket is the parser's to report
            continue
        values += 1  # an opening bracket or a comma: one more value
        if values > limit.values:
            raise ShapeError(f"more than {limit.values} values")
    return text
