"""Built images kept in the cache by image id, so providers can boot them by id alone.

    <cache>/images/<hex>/kernel, initrd.img, cmdline, image.json
    <cache>/builds/<spec key>/      the build directory of one spec (NAME.json makes rebuilds free)

The moby flavor builds through ``build_and_store`` and writes the id into instance properties;
the instance core calls ``get(id)`` and hands the BootImage to the provider's ``publish_image``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from mobykit.errors import InvalidArgument, NotFound
from mobykit.image.cache import Cache, default_root
from mobykit.providers.base import BootImage


def _cache(cache: Cache | None) -> Cache:
    return cache or Cache(default_root())


def _hex(image_id: str) -> str:
    hexpart = image_id.removeprefix("sha256:")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(f"image id {image_id!r} is not sha256:<64 hex digits>")
    return hexpart


def spec_paths(spec: str | Path | dict[str, Any] | list, cache: Cache) -> list[Path]:
    """Spec files for a flavor's ``Image`` property: a path, a list of paths, or an inline spec
    (written content-addressed under the cache, so the same inline spec is the same file)."""
    if isinstance(spec, dict):
        text = yaml.safe_dump(spec, sort_keys=True).encode()
        path = cache.root / "specs" / f"{hashlib.sha256(text).hexdigest()[:32]}.yml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(text)
            os.replace(tmp, path)
        return [path]
    if isinstance(spec, (str, Path)):
        return [Path(spec)]
    if isinstance(spec, list) and spec and all(isinstance(s, (str, Path)) for s in spec):
        return [Path(s) for s in spec]
    raise InvalidArgument("Image: expected a spec path, a list of paths, or an inline spec object")


def build_and_store(spec, *, cache: Cache | None = None, pull: bool = False, progress=None) -> BootImage:
    """Build ``spec`` as kernel+initrd (a no-op when its inputs are unchanged) and keep it by id."""
    from mobykit.image.build import build

    cache = _cache(cache)
    paths = [p.resolve() for p in spec_paths(spec, cache)]
    key = hashlib.sha256("\0".join(map(str, paths)).encode()).hexdigest()[:32]
    result = build(paths, formats=["kernel+initrd"], outdir=cache.root / "builds" / key, name="image",
                   cache=cache, pull=pull, progress=progress)
    where = cache.root / "images" / _hex(result.image_id)
    if not (where / "image.json").exists():
        where.mkdir(parents=True, exist_ok=True)
        for src, dst in (("-kernel", "kernel"), ("-initrd.img", "initrd.img"), ("-cmdline", "cmdline")):
            target = where / dst
            target.unlink(missing_ok=True)
            try:
                os.link(result.path(src), target)
            except OSError:
                target.write_bytes(result.path(src).read_bytes())
        meta = {"id": result.image_id, "name": Path(paths[0]).stem, "inputs": result.inputs}
        (where / "image.json.tmp").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(where / "image.json.tmp", where / "image.json")
    return get(result.image_id, cache)


def get(image_id: str, cache: Cache | None = None) -> BootImage:
    where = _cache(cache).root / "images" / _hex(image_id)
    try:
        meta = json.loads((where / "image.json").read_text())
        cmdline = (where / "cmdline").read_text().strip()
    except FileNotFoundError:
        raise NotFound(f"image {image_id} is not built here (build it with `mobykit build` or the moby flavor)") from None
    return BootImage(id=meta["id"], name=meta.get("name", "image"), kernel=where / "kernel",
                     initrd=where / "initrd.img", cmdline=cmdline)


def list_images(cache: Cache | None = None) -> list[BootImage]:
    root = _cache(cache).root / "images"
    if not root.is_dir():
        return []
    return [get("sha256:" + d.name, cache) for d in sorted(root.iterdir()) if (d / "image.json").exists()]
