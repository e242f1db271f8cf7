"""Read one YAML spec file into plain Python values plus a map from field path to line number.

PyYAML's constructors throw away positions, but every error a user sees must name the line, so we
compose the node tree (which keeps marks) and convert it ourselves. Doing the conversion by hand
also lets us refuse what a build spec never needs and an attacker might send: aliases (the
"billion laughs" expansion), duplicate keys (PyYAML silently keeps the last one), non-string keys,
merge keys, explicit tags other than the core schema's, and files or nesting too big to be a spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from mobykit.errors import SpecError

MAX_BYTES = 1 << 20  # 1 MiB: LinuxKit specs are a few KiB; anything larger is a mistake or an attack.
MAX_DEPTH = 64
MAX_NODES = 100_000

Path_ = tuple[str | int, ...]

_CORE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}


def field_name(path: Path_) -> str:
    """``("services", 1, "capabilities")`` -> ``services[1].capabilities`` (indices are 0-based)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


@dataclass
class Document:
    """A parsed spec file: its values and where each field was written."""

    file: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """Line of ``path`` or of its nearest written ancestor (a missing field has no line)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)

    def error(self, message: str, path: Path_) -> SpecError:
        return SpecError(message, file=self.file, line=self.line(path), field=field_name(path) or None)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases while composing, before anything can be expanded."""

    def __init__(self, stream: str, file: str):
        super().__init__(stream)
        self._file = file

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError(
                f"YAML aliases (*{event.anchor}) are not allowed in a spec",
                file=self._file,
                line=event.start_mark.line + 1,
            )
        return super().compose_node(parent, index)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Converter:
    def __init__(self, loader: _Loader, file: str):
        self.loader, self.file = loader, file
        self.lines: dict[Path_, int] = {}
        self.count = 0

    def fail(self, message: str, node: yaml.Node, path: Path_) -> SpecError:
        return SpecError(message, file=self.file, line=_line(node), field=field_name(path) or None)

    def convert(self, node: yaml.Node, path: Path_, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(f"too many YAML nodes (more than {MAX_NODES})", node, path)
        if depth > MAX_DEPTH:
            raise self.fail(f"nesting deeper than {MAX_DEPTH} levels", node, path)
        if node.tag not in _CORE_TAGS:
            raise self.fail(f"YAML tag {node.tag!r} is not allowed", node, path)
        self.lines.setdefault(path, _line(node))
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self.fail("YAML merge keys (<<) are not allowed", key_node, path)
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                    raise self.fail(f"key {shown!r} must be a string", key_node, path)
                key = key_node.value
                if key in out:
                    first = self.lines.get(path + (key,))
                    raise self.fail(f"duplicate key {key!r} (first set on line {first})", key_node, path + (key,))
                # The key's line is what a reader looks for ("capabilities:"), not the value's.
                self.lines[path + (key,)] = _line(key_node)
                out[key] = self.convert(value_node, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise self.fail(f"bad value: {getattr(e, 'problem', None) or e}", node, path) from None
        if isinstance(value, float) and value != value:  # .nan has no JSON form
            raise self.fail("NaN is not allowed", node, path)
        return value


def _reader_error(e: yaml.reader.ReaderError, text: str, file: str) -> SpecError:
    code = e.character if isinstance(e.character, int) else ord(e.character)
    line = text.count("\n", 0, e.position) + 1
    return SpecError(f"control character U+{code:04X} is not allowed in YAML", file=file, line=line)


def _syntax_error(e: yaml.MarkedYAMLError, file: str) -> SpecError:
    """PyYAML's two marks -> one line: where the construct began when that is known (an unclosed
    quote is reported where it opens, not at the end of the file)."""
    problem = e.problem or "invalid YAML"
    if problem.startswith("but found another document"):
        mark = e.problem_mark
        return SpecError("a spec file holds one YAML document; found a second '---'", file=file,
                         line=mark.line + 1 if mark else None)
    if e.context and e.context_mark is not None:
        where = e.problem_mark.line + 1 if e.problem_mark else None
        at = f" at line {where}" if where and where != e.context_mark.line + 1 else ""
        return SpecError(f"YAML syntax error {e.context}: {problem}{at}", file=file, line=e.context_mark.line + 1)
    mark = e.problem_mark or e.context_mark
    return SpecError(f"YAML syntax error: {problem}", file=file, line=mark.line + 1 if mark else None)


def parse(text: str | bytes, file: str) -> Document:
    """Parse one spec's text. ``file`` is how errors name it (the path as the user gave it)."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError(f"file is {len(text)} bytes; a spec may be at most {MAX_BYTES}", file=file)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"not UTF-8 text (byte {e.start})", file=file) from None
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise SpecError(f"file is larger than {MAX_BYTES} bytes", file=file)
    try:
        loader = _Loader(text, file)
    except yaml.reader.ReaderError as e:
        raise _reader_error(e, text, file) from None
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            raise _syntax_error(e, file) from None
        except yaml.reader.ReaderError as e:
            raise _reader_error(e, text, file) from None
        except yaml.YAMLError as e:
            raise SpecError(f"YAML syntax error: {e}", file=file) from None
        except RecursionError:
            raise SpecError(f"YAML nesting too deep (more than {MAX_DEPTH} levels)", file=file) from None
        if node is None:
            raise SpecError("empty spec (no YAML document)", file=file)
        conv = _Converter(loader, file)
        try:
            data = conv.convert(node, ())
        except RecursionError:
            raise SpecError(f"YAML nesting too deep (more than {MAX_DEPTH} levels)", file=file) from None
    finally:
        loader.dispose()
    return Document(file=file, data=data, lines=conv.lines)
