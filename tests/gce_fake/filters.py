"""GCE's list filter grammar, the subset mobykit and Infrakit users write.

    expr   := or
    or     := and ("OR" and)*
    and    := term (["AND"] term)*          (juxtaposed terms are ANDed, as GCE does)
    term   := "(" expr ")" | "NOT" term | FIELD OP VALUE
    OP     := "=" | "!=" | ":"               (":" with "*" tests presence)
    VALUE  := "quoted string" | bare-word
    FIELD  := name("." name)*               (labels.k, name, status, zone)

Anything else is a 400 ``Invalid list filter expression``, as the real API answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_TOKEN = re.compile(r'\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<op>!=|=|:)|"(?P<str>(?:[^"\\]|\\.)*)"|(?P<word>[^\s()=!:"]+))')


class FilterError(ValueError):
    pass


Predicate = Callable[[dict[str, Any]], bool]


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"Invalid list filter expression: unexpected text at {pos}: {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", value)
        out.append((kind, value))
        pos = m.end()
    return out


def _field(resource: dict[str, Any], path: str) -> Any:
    value: Any = resource
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse(text: str) -> Predicate:
    """A predicate over a resource's JSON for ``text`` (empty: everything)."""
    tokens = _tokens(text or "")
    if not tokens:
        return lambda r: True
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(tokens):
            raise FilterError("Invalid list filter expression: unexpected end")
        pos += 1
        return tokens[pos - 1]

    def term() -> Predicate:
        kind, value = take()
        if kind == "lp":
            inner = expr()
            if take()[0] != "rp":
                raise FilterError("Invalid list filter expression: missing )")
            return inner
        if kind == "word" and value == "NOT":
            neg = term()
            return lambda r: not neg(r)
        if kind != "word":
            raise FilterError(f"Invalid list filter expression: expected a field, got {value!r}")
        field = value
        op_kind, op = take()
        if op_kind != "op":
            raise FilterError(f"Invalid list filter expression: expected an operator after {field}")
        v_kind, literal = take()
        if v_kind not in ("str", "word"):
            raise FilterError(f"Invalid list filter expression: expected a value after {field} {op}")
        if op == ":" and literal == "*":
            return lambda r: _field(r, field) is not None
        if op == "!=":
            return lambda r: str(_field(r, field)) != literal
        return lambda r: _field(r, field) is not None and str(_field(r, field)) == literal

    def conj() -> Predicate:
        parts = [term()]
        while (nxt := peek()) is not None and nxt[0] != "rp" and nxt != ("word", "OR"):
            if nxt == ("word", "AND"):
                take()
            parts.append(term())
        return lambda r: all(p(r) for p in parts)

    def expr() -> Predicate:
        parts = [conj()]
        while peek() == ("word", "OR"):
            take()
            parts.append(conj())
        return lambda r: any(p(r) for p in parts)

    result = expr()
    if pos != len(tokens):
        raise FilterError(f"Invalid list filter expression: unexpected {tokens[pos][1]!r}")
    return result
