"""Validation of one parsed spec file: JSON schema first (shape and types), then the checks a
schema expresses badly (capability names, octal modes, image references, bind syntax, one
content source per file), each reported as ``file:line: field: message``.

All of it runs before anything is fetched, so a typo costs nothing. When a file has several
problems the one written first (lowest line) is reported, so the message is stable.
"""

from __future__ import annotations

import functools
import json
import posixpath
import re
from importlib import resources
from typing import Any

from mobykit.errors import SpecError
from mobykit.spec import capabilities
from mobykit.spec.yamlfile import Document, Path_, field_name

IMAGE_FIELDS = ("onboot", "services", "onshutdown", "system", "daemon")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
MODE_RE = re.compile(r"0*[0-7]{1,4}\Z")
RLIMITS = frozenset(
    "RLIMIT_" + n
    for n in (
        "CPU FSIZE DATA STACK CORE RSS NPROC NOFILE MEMLOCK AS LOCKS SIGPENDING MSGQUEUE NICE RTPRIO RTTIME".split()
    )
)
_TYPE_WORDS = {
    "string": "a string",
    "integer": "a whole number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "nothing",
}


@functools.cache
def schema() -> dict:
    return json.loads(resources.files("mobykit.spec").joinpath("schema.json").read_text())


@functools.cache
def _validator(ref: str | None):
    from jsonschema import Draft202012Validator

    s = schema()
    if ref is not None:  # validate against one definition, keeping $defs resolvable
        s = {"$schema": s["$schema"], "$defs": s["$defs"], "$ref": f"#/$defs/{ref}"}
    return Draft202012Validator(s)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _explain(err, lines: dict[Path_, int] | None) -> tuple[Path_, str]:
    """A jsonschema error -> (path of the offending field, message in the user's words)."""
    path: Path_ = tuple(err.absolute_path)
    v = err.validator
    if v == "additionalProperties":
        allowed = set(err.schema.get("properties", {}))
        extra = [k for k in err.instance if k not in allowed]
        extra.sort(key=lambda k: ((lines or {}).get(path + (k,), 0), k))
        key = extra[0]
        import difflib

        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return path + (key,), f"unknown field {key!r}{hint}"
    if v == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        return path, f"missing required field {missing[0]!r}"
    if v == "type":
        want = err.validator_value
        want = " or ".join(_TYPE_WORDS.get(w, w) for w in (want if isinstance(want, list) else [want]))
        hint = ""
        if err.validator_value == "string" and isinstance(err.instance, (int, float, bool)):
            # YAML reads 0644 as the number 420 and yes as true; quoting keeps the text.
            hint = " (put it in quotes)"
        return path, f"expected {want}, got {_kind(err.instance)}{hint}"
    if v == "anyOf":
        if path == ("init",):
            if isinstance(err.instance, list):
                i = next(i for i, x in enumerate(err.instance) if not isinstance(x, str))
                return path + (i,), f"expected an image reference (a string), got {_kind(err.instance[i])}"
            return path, f"expected a list of image references, got {_kind(err.instance)}"
        if isinstance(err.instance, int) and not isinstance(err.instance, bool):
            return path, f"ids are not negative, got {err.instance}"
        return path, f"expected a number or a name, got {_kind(err.instance)}"
    if v in ("minimum", "maximum"):
        word = "at least" if v == "minimum" else "at most"
        return path, f"must be {word} {err.validator_value}, got {err.instance}"
    return path, err.message


def schema_error(data: Any, lines: dict[Path_, int] | None = None, ref: str | None = None) -> tuple[Path_, str] | None:
    """The first schema violation in ``data`` (by line, then field), or None."""
    found = []
    for err in _validator(ref).iter_errors(data):
        path, msg = _explain(err, lines)
        found.append((_line_of(lines, path), field_name(path), path, msg))
    if not found:
        return None
    found.sort(key=lambda t: (t[0], t[1], t[3]))
    return found[0][2], found[0][3]


def _line_of(lines: dict[Path_, int] | None, path: Path_) -> int:
    if not lines:
        return 0
    p = path
    while p:
        if p in lines:
            return lines[p]
        p = p[:-1]
    return 0


# ---- checks the schema cannot express well ------------------------------------------------------


def check_capabilities(p, path: Path_, caps: list[str]) -> None:
    """Reported on the field (``services[1].capabilities``) at the line of the bad item."""
    if capabilities.is_shorthand(caps):
        return
    for i, c in enumerate(caps):
        if c.lower() in ("all", "none"):
            p.add(path + (i,), f"{c!r} must be the only item of the list", field_path=path)
        elif c not in capabilities.ALL_CAPS:
            hint = ""
            if "CAP_" + c.upper() in capabilities.ALL_CAPS:
                hint = f" (did you mean CAP_{c.upper()}?)"
            p.add(path + (i,), f"unknown capability {c}{hint}", field_path=path)


class Problems:
    """Collects problems so the one written first (by line) is reported. ``field_path`` lets a
    bad list item be reported on its field (``capabilities``) at the item's own line."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.items: list[tuple[int, str, Path_, str, Path_]] = []

    def add(self, path: Path_, message: str, field_path: Path_ | None = None) -> None:
        shown = field_path if field_path is not None else path
        self.items.append((self.doc.line(path) or 0, field_name(shown), shown, message, path))

    def raise_first(self) -> None:
        if self.items:
            self.items.sort(key=lambda t: (t[0], t[1], t[3]))
            line, _, shown, msg, _ = self.items[0]
            raise SpecError(msg, file=self.doc.file, line=line or self.doc.line(shown), field=field_name(shown))


def check_ref(p, path: Path_, ref: str) -> None:
    from mobykit.spec.refs import check

    why = check(ref)
    if why:
        p.add(path, why)


def _check_namespace(p, path: Path_, value: str, allowed: tuple[str, ...]) -> None:
    if value in allowed or value == "" or value.startswith("/"):
        return
    p.add(path, f"{value!r} is not valid: use {', '.join(allowed)} or the path of a namespace to join")


def check_bind(p, path: Path_, text: str) -> None:
    parts = text.split(":")
    if len(parts) < 2:
        p.add(path, f"bind {text!r} has no ':' (expected /source:/destination[:options])")
    elif len(parts) > 3:
        p.add(path, f"bind {text!r} has too many ':' (expected /source:/destination[:options])")
    elif not parts[1].startswith("/"):
        p.add(path, f"bind {text!r}: destination must be an absolute path")
    elif not parts[0]:
        p.add(path, f"bind {text!r}: empty source")


def check_tmpfs(p, path: Path_, text: str) -> None:
    parts = text.split(":")
    if len(parts) > 2:
        p.add(path, f"tmpfs {text!r} has too many ':' (expected /destination[:options])")
    elif not parts[0].startswith("/"):
        p.add(path, f"tmpfs {text!r}: destination must be an absolute path")


def parse_rlimit(text: str) -> tuple[str, int, int]:
    """``nofile,100,200`` -> (RLIMIT_NOFILE, 100, 200); ``unlimited`` is 2**64-1. ValueError if bad."""
    parts = text.split(",", 2)
    if len(parts) != 3:
        raise ValueError(f"rlimit {text!r} is not name,soft,hard")
    name = parts[0].strip().upper()
    if not name.startswith("RLIMIT_"):
        name = "RLIMIT_" + name
    if name not in RLIMITS:
        raise ValueError(f"unknown rlimit {parts[0].strip()!r}")
    values = []
    for s in parts[1:]:
        s = s.strip()
        if s.lower() == "unlimited":
            values.append(2**64 - 1)
        elif s.isdigit() and int(s) < 2**64:
            values.append(int(s))
        else:
            raise ValueError(f"rlimit {text!r}: {s!r} is not a number or 'unlimited'")
    return name, values[0], values[1]


def mount_defaults(m: dict) -> tuple[str, str, str]:
    """(type, source, destination) with LinuxKit's fill-ins; ValueError when one cannot be guessed."""
    tp, src, dest = m.get("type", ""), m.get("source", ""), m.get("destination", "")
    if not tp and src in ("mqueue", "devpts", "proc", "sysfs", "cgroup"):
        tp = src
    if not tp and dest == "/dev":
        tp = "tmpfs"
    if not tp:
        raise ValueError(f"mount for destination {dest or '?'} has no type")
    src = src or tp
    if not dest:
        dest = {"proc": "/proc", "devpts": "/dev/pts", "sysfs": "/sys", "cgroup": "/sys/fs/cgroup", "mqueue": "/dev/mqueue"}.get(tp, "")
    if not dest:
        raise ValueError(f"mount of type {tp} has no destination")
    return tp, src, dest


def check_image_config(p, base: Path_, cfg: dict) -> None:
    """Checks shared by spec entries and image labels (everything but name/image)."""
    for key in ("capabilities", "capabilities.add", "ambient"):
        if key in cfg:
            check_capabilities(p, base + (key,), cfg[key])
    for key in ("binds", "binds.add"):
        for i, b in enumerate(cfg.get(key, [])):
            check_bind(p, base + (key, i), b)
    for i, t in enumerate(cfg.get("tmpfs", [])):
        check_tmpfs(p, base + ("tmpfs", i), t)
    for i, r in enumerate(cfg.get("rlimits", [])):
        try:
            parse_rlimit(r)
        except ValueError as e:
            p.add(base + ("rlimits", i), str(e))
    for i, m in enumerate(cfg.get("mounts", [])):
        try:
            mount_defaults(m)
        except ValueError as e:
            p.add(base + ("mounts", i), str(e))
    for i, d in enumerate(cfg.get("devices", [])):
        if d.get("path") != "all":
            if not str(d.get("path", "")).startswith("/"):
                p.add(base + ("devices", i, "path"), f"device path {d.get('path')!r} must be absolute or 'all'")
            if "mode" in d and not MODE_RE.match(d["mode"]):
                p.add(base + ("devices", i, "mode"), f"bad mode {d['mode']!r}: expected an octal string like \"0666\"")
        if d.get("type") not in ("c", "b", "u", "p", "a"):
            p.add(base + ("devices", i, "type"), f"device type {d.get('type')!r} is not one of c, b, u, p")
    ns = {"net": ("host", "new", "none"), "ipc": ("host", "new"), "uts": ("host", "new"), "pid": ("host", "new"),
          "userns": ("host", "new")}
    for key, allowed in ns.items():
        if key in cfg:
            _check_namespace(p, base + (key,), cfg[key], (*allowed, "root"))
    if "cwd" in cfg and cfg["cwd"] and not cfg["cwd"].startswith("/"):
        p.add(base + ("cwd",), f"cwd {cfg['cwd']!r} must be an absolute path")
    rp = cfg.get("rootfsPropagation")
    if rp not in (None, "", "private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable"):
        p.add(base + ("rootfsPropagation",), f"{rp!r} is not a mount propagation (shared, slave, private, ...)")
    for i, d in enumerate(cfg.get("runtime", {}).get("mkdir", [])):
        if not d.startswith("/"):
            p.add(base + ("runtime", "mkdir", i), f"{d!r} must be an absolute path")
    for i, m in enumerate(cfg.get("runtime", {}).get("mounts", [])):
        try:
            mount_defaults(m)
        except ValueError as e:
            p.add(base + ("runtime", "mounts", i), str(e))


def safe_file_path(text: str) -> str | None:
    """``/etc/x`` or ``etc/x`` -> ``etc/x``; None if it is empty or climbs out with ``..``."""
    stripped = text.lstrip("/")
    if not stripped or "\0" in stripped:
        return None
    parts = stripped.split("/")
    if any(part == ".." for part in parts):
        return None
    norm = posixpath.normpath(stripped)
    return None if norm in (".", "") else norm


def check_document(doc: Document) -> None:
    """Schema, then semantics, of one spec file. Raises the first SpecError."""
    data = doc.data
    if not isinstance(data, dict):
        raise SpecError(f"top level must be a mapping of sections (kernel, init, ...), got {_kind(data)}",
                        file=doc.file, line=doc.line(()))
    # An empty section ("services:" with nothing under it) means no entries, as in LinuxKit.
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    found = schema_error(data, doc.lines)
    if found:
        raise doc.error(found[1], found[0])
    for new, old in (("onboot", "system"), ("services", "daemon")):
        if new in data and old in data:
            raise doc.error(f"both {new!r} and {old!r} given; {old!r} is the 2017 name of {new!r}", (old,))
    p = Problems(doc)
    kernel = data.get("kernel")
    if kernel and kernel.get("image"):
        check_ref(p, ("kernel", "image"), kernel["image"])
    init = data.get("init", [])
    for i, ref in enumerate(init if isinstance(init, list) else [init]):
        check_ref(p, ("init", i) if isinstance(init, list) else ("init",), ref)
    for section in IMAGE_FIELDS:
        for i, entry in enumerate(data.get(section, [])):
            base = (section, i)
            if not NAME_RE.match(entry["name"]):
                p.add(base + ("name",), f"name {entry['name']!r} must be letters, digits, '.', '_' or '-' "
                      "(it names a directory in the image)")
            check_ref(p, base + ("image",), entry["image"])
            check_image_config(p, base, entry)
    for i, f in enumerate(data.get("files", [])):
        base = ("files", i)
        if safe_file_path(f["path"]) is None:
            p.add(base + ("path",), f"path {f['path']!r} must name a file inside the image (no '..', not empty)")
        given = [k for k in ("contents", "source", "metadata", "symlink") if k in f]
        if f.get("directory"):
            given.insert(0, "directory")
        if len(given) > 1:
            p.add(base + (given[1],), f"give only one of directory, symlink, contents, source, metadata (got {', '.join(given)})")
        elif not given:
            p.add(base, "give one of directory, symlink, contents, source or metadata")
        if "mode" in f and not MODE_RE.match(f["mode"]):
            p.add(base + ("mode",), f"bad mode {f['mode']!r}: expected an octal string like \"0644\"")
        if "metadata" in f and f["metadata"] not in ("yaml", "json"):
            p.add(base + ("metadata",), f"metadata {f['metadata']!r} is not 'yaml' or 'json'")
        if f.get("source") == "":
            p.add(base + ("source",), "empty source path")
    from mobykit.spec import volumes

    volumes.check_document(p, data)
    p.raise_first()
