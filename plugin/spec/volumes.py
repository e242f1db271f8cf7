"""LinuxKit's build-time ``volumes:``: named directories made at build time and mounted into
onboot / services / onshutdown containers by name.

A container names a volume as the source of a bind (``binds``, ``binds.add``: ``vola:/vola[:ro]``)
or of a ``mounts`` entry of type ``bind`` (``source: vola``): any such source that does not start
with ``/`` is a volume name. The bundle's config.json gets the volume's ``merged`` directory
(``/containers/volumes/NAME/merged``) instead, as LinuxKit rewrites it; the spec itself keeps
what was written (its canonical form, and ``metadata:`` files, show the names).

Errors, as LinuxKit makes them at build time, but before anything is fetched and with the
file:line of the offending item: a name that is not lower-case letters, digits, ``-`` and ``_``;
the same name declared twice (in any of the merged files); a bind of an undeclared name; a
read-write mount of a ``readonly`` volume (a bind without ``ro`` as its option, a mount without
``ro`` before any ``rw`` in its options); a ``persistent: true`` volume (backed at run time by
the provider's disk named like it, see the guest's ``mobykit-volumes``) with ``image``,
``format`` or ``platforms``.
"""

from __future__ import annotations

import re

from mobykit.errors import SpecError
from mobykit.spec.model import KINDS, ImageEntry, Spec

VOLUME_NAME_RE = re.compile(r"[a-z0-9_-]{1,255}\Z")
FORMATS = ("filesystem", "oci")
PLATFORM_RE = re.compile(r"linux/[a-z0-9_]+(/[a-z0-9]+)?\Z")


def check_document(p, data: dict) -> None:
    """Per-file checks of the ``volumes:`` entries (``p`` is validate.Problems)."""
    for i, v in enumerate(data.get("volumes", [])):
        base = ("volumes", i)
        if not VOLUME_NAME_RE.match(v["name"]):
            p.add(base + ("name",), f"volume name {v['name']!r} must be lower-case letters, digits, '-' or '_'")
        if "image" in v:
            from mobykit.spec.validate import check_ref

            check_ref(p, base + ("image",), v["image"])
        fmt = v.get("format")
        if fmt is not None and fmt not in FORMATS:
            p.add(base + ("format",), f"format {fmt!r} is not 'filesystem' or 'oci'")
        elif fmt is not None and "image" not in v:
            p.add(base + ("format",), "format is only for a volume made from an image (give 'image')")
        if "platforms" in v:
            if fmt != "oci":
                p.add(base + ("platforms",), "platforms are only for a volume with format: oci")
            for j, plat in enumerate(v["platforms"]):
                if not PLATFORM_RE.match(plat):
                    p.add(base + ("platforms", j), f"platform {plat!r} is not linux/ARCH or linux/ARCH/VARIANT")
        if v.get("persistent"):
            # the provider's disk is the content: nothing of the build's may go in it
            for key in ("image", "format", "platforms"):
                if key in v:
                    p.add(base + (key,), f"a persistent volume is blank (backed by the machine's disk "
                                         f"{v['name']!r}): remove {key!r}")


def check_unique(spec: Spec) -> None:
    """One volume per name across all the merged files (LinuxKit looks volumes up by name)."""
    seen = {}
    for v in spec.volumes:
        if v.name in seen:
            first = seen[v.name]
            where = f"{first.file}:{first.line}" if first.file != v.file else f"line {first.line}"
            raise SpecError(f"duplicate volume name {v.name!r} (first declared at {where})",
                            file=v.file, line=v.line, field=f"{v.field}.name")
        seen[v.name] = v


def _bind_is_readonly(options: str | None) -> bool:
    if not options:
        return False
    return _options_readonly(options.split(","))


def _options_readonly(options: list[str]) -> bool:
    """The first of ``ro`` / ``rw`` in the options decides; neither means read-write."""
    for opt in options:
        if opt in ("ro", "rw"):
            return opt == "ro"
    return False


def volume_sources(entry: ImageEntry) -> list[tuple[str, str]]:
    """(item, volume name) of every volume ``entry`` mounts; the item (``binds[1]``,
    ``mounts[0].source``) is the key ``entry.where`` knows the line of."""
    out = []
    for key in ("binds", "binds.add"):
        for i, b in enumerate(entry.config.get(key) or []):
            src = b.split(":", 1)[0]
            if src and not src.startswith("/"):
                out.append((f"{key}[{i}]", src))
    for i, m in enumerate(entry.config.get("mounts") or []):
        src = m.get("source", "")
        if m.get("type") == "bind" and src and not src.startswith("/"):
            out.append((f"mounts[{i}].source", src))
    return out


def check_references(spec: Spec) -> None:
    """Every volume a container names exists, and a read-only one is mounted read-only."""
    for kind in KINDS:
        for entry in getattr(spec, kind):
            for item, name in volume_sources(entry):
                file, line, field = entry.where(item)
                vol = spec.volume(name)
                if vol is None:
                    known = ", ".join(v.name for v in spec.volumes) or "none are declared"
                    raise SpecError(f"no volume named {name!r} (a bind source without a leading '/' names a "
                                    f"volume; volumes: {known})", file=file, line=line, field=field)
                if vol.readonly and not _readonly_use(entry, item):
                    raise SpecError(f"volume {name!r} is read-only (volumes[].readonly) but is mounted read-write "
                                    "here; add the 'ro' option", file=file, line=line, field=field)


def _readonly_use(entry: ImageEntry, item: str) -> bool:
    key, _, rest = item.partition("[")
    index = int(rest.split("]", 1)[0])
    if key in ("binds", "binds.add"):
        parts = entry.config[key][index].split(":")
        return _bind_is_readonly(parts[2] if len(parts) > 2 else None)
    return _options_readonly(list(entry.config["mounts"][index].get("options") or []))


def rewrite(cfg: dict, spec: Spec | None) -> dict:
    """``cfg`` (an entry's YAML config) with volume names in bind sources replaced by the
    volume's merged directory; ``cfg`` is not modified. Names were checked at load time."""
    if spec is None or not spec.volumes:
        return cfg
    out = dict(cfg)
    for key in ("binds", "binds.add"):
        if key in cfg and cfg[key]:
            out[key] = [_rewrite_bind(b, spec) for b in cfg[key]]
    if cfg.get("mounts"):
        mounts = []
        for m in cfg["mounts"]:
            src = m.get("source", "")
            vol = spec.volume(src) if m.get("type") == "bind" and src and not src.startswith("/") else None
            mounts.append({**m, "source": vol.merged} if vol is not None else m)
        out["mounts"] = mounts
    return out


def _rewrite_bind(bind: str, spec: Spec) -> str:
    src, sep, rest = bind.partition(":")
    vol = spec.volume(src) if src and not src.startswith("/") else None
    return f"{vol.merged}{sep}{rest}" if vol is not None else bind
