"""Several spec files on one command line combine as LinuxKit's AppendConfig combines them.

- kernel: each field a later file sets replaces the earlier value (``image``, ``cmdline``,
  ``binary`` when non-empty; ``tar`` and ``ucode`` whenever present, so ``tar: none`` can switch
  the modules tarball off);
- init, onboot, onshutdown, services, files, volumes, trust.image, trust.org: appended in file
  order (volume names must stay unique across all files, checked once all are merged);
- service names must stay unique across all files (they run side by side in containerd);
- outputs (2017 form): appended, first occurrence of each format kept.
"""

from __future__ import annotations

import dataclasses

from mobykit.errors import SpecError
from mobykit.spec.model import KINDS, Kernel, Spec


def append(a: Spec, b: Spec) -> Spec:
    """``a`` then ``b``; neither input is modified."""
    kernel = _merge_kernel(a.kernel, b.kernel)
    trust: dict[str, list[str]] = {}
    for key in ("image", "org"):
        items = [*a.trust.get(key, []), *b.trust.get(key, [])]
        if items:
            trust[key] = items
    outputs = list(a.outputs)
    outputs += [o for o in b.outputs if o not in outputs]
    merged = Spec(
        kernel=kernel,
        init=[*a.init, *b.init],
        onboot=[*a.onboot, *b.onboot],
        services=[*a.services, *b.services],
        onshutdown=[*a.onshutdown, *b.onshutdown],
        files=[*a.files, *b.files],
        volumes=[*a.volumes, *b.volumes],
        trust=trust,
        outputs=outputs,
        sources=[*a.sources, *b.sources],
        notes=[*a.notes, *[n for n in b.notes if n not in a.notes]],
    )
    check_unique_services(merged)
    return merged


def _merge_kernel(a: Kernel | None, b: Kernel | None) -> Kernel | None:
    if a is None:
        return dataclasses.replace(b) if b is not None else None
    if b is None:
        return dataclasses.replace(a)
    k = dataclasses.replace(a)
    for key in ("image", "cmdline", "binary"):
        if getattr(b, key):
            setattr(k, key, getattr(b, key))
    for key in ("tar", "ucode"):
        if getattr(b, key) is not None:
            setattr(k, key, getattr(b, key))
    if b.image:
        k.file, k.line = b.file, b.line
    return k


def check_unique_services(spec: Spec) -> None:
    seen = {}
    for e in spec.services:
        if e.name in seen:
            first = seen[e.name]
            where = f"{first.file}:{first.line}" if first.file != e.file else f"line {first.line}"
            raise SpecError(f"duplicate service name {e.name!r} (first used at {where})",
                            file=e.file, line=e.lines.get("name", e.line), field=f"{e.field}.name")
        seen[e.name] = e


def reindex(spec: Spec) -> None:
    """Number entries within their section of the merged spec (onboot bundle prefixes use it)."""
    for kind in KINDS:
        for i, e in enumerate(getattr(spec, kind)):
            e.kind, e.index = kind, i
