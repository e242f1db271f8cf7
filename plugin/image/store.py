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
import shutil
from pathlib import Path
from typing import Any

import yaml

from mobykit.core import paths
from mobykit.errors import InvalidArgument, NotFound
from mobykit.image.cache import Cache, default_root
from mobykit.providers.base import BootImage
from mobykit.spec.load import SpecSource


def _cache(cache: Cache | None) -> Cache:
    return cache or Cache(default_root())


def _hex(image_id: str) -> str:
    hexpart = image_id.removeprefix("sha256:")
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(f"image id {image_id!r} is not sha256:<64 hex digits>")
    return hexpart


def spec_sources(spec: str | Path | dict[str, Any] | list, field: str = "Image") -> list[SpecSource]:
    """The spec documents a flavor's ``Image`` property (or an Images.Build request) names: a path, a
    list of paths, or an inline spec. Paths are checked against the server's allowed roots here,
    naming ``field``, and opened through the same check when read; an inline spec is parsed from
    its text, and its relative ``source:`` and ``@pkg:`` paths are taken from the first root."""
    if isinstance(spec, dict):
        text = yaml.safe_dump(spec, sort_keys=True)
        return [SpecSource(name=field, text=text, base=paths.current().base(), field=field)]
    if isinstance(spec, (str, Path)):
        spec = [spec]
    if isinstance(spec, list) and spec and all(isinstance(s, (str, Path)) and str(s) for s in spec):
        many = len(spec) > 1
        out = []
        for i, s in enumerate(spec):
            name = f"{field}[{i}]" if many else field
            out.append(SpecSource(name=str(s), path=paths.resolve(s, name), field=name))
        return out
    if isinstance(spec, list) and spec and all(isinstance(s, SpecSource) for s in spec):
        return list(spec)
    raise InvalidArgument(f"{field}: expected a spec path, a list of paths, or an inline spec object")


def build_key(sources: list[SpecSource]) -> str:
    """What identifies a set of spec documents: by real path, or by text and base when inline. It
    names the build directory (so an unchanged spec is found built) and, in the moby flavor, the build
    in flight that identical requests share (``mobykit.image.inflight``)."""
    parts = [str(Path(s.path).resolve()) if s.path is not None else f"inline:{s.base}:{s.text}" for s in sources]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def build_and_store(spec, *, cache: Cache | None = None, pull: bool = False, progress=None,
                    field: str = "Image") -> BootImage:
    """Build ``spec`` as kernel+initrd (a no-op when its inputs are unchanged) and keep it by id."""
    from mobykit.image.build import build

    cache = _cache(cache)
    sources = spec_sources(spec, field)
    from mobykit.image.build import source_date_epoch

    result = build(sources, formats=["kernel+initrd", "tar"], outdir=cache.root / "builds" / build_key(sources),
                   name="image", cache=cache, pull=pull, progress=progress)
    where = cache.root / "images" / _hex(result.image_id)
    where.mkdir(parents=True, exist_ok=True)
    if not (where / "image.tar").exists():
        _link(result.path(".tar"), where / "image.tar")  # every other format is made from it, on demand
    if not (where / "image.json").exists():
        for src, dst in (("-kernel", "kernel"), ("-initrd.img", "initrd.img"), ("-cmdline", "cmdline")):
            _link(result.path(src), where / dst)
        first = sources[0]
        meta = {"id": result.image_id, "name": Path(first.path).stem if first.path else "inline",
                "inputs": result.inputs, "mtime": source_date_epoch()}
        (where / "image.json.tmp").write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(where / "image.json.tmp", where / "image.json")
    return get(result.image_id, cache)


def _link(src: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, target)


def format_files(image_id: str, fmt: str, cache: Cache | None = None, *, size: int | None = None) -> list[Path]:
    """The files of output format ``fmt`` (e.g. ``qcow2-bios``, ``aws``, ``gcp``) of a stored image,
    made from its canonical tar the first time a provider asks and kept beside it.

    Why on demand: which disk format an image needs depends on where it boots (a libvirt disk boot,
    an AMI, a GCE image), known only when an instance is provisioned; every format is a function of
    the canonical tar alone (LinuxKit's pipeline), so it is made then, once per image, format and
    size, with the build's own timestamp so it is the same bytes ``mobykit build -f`` writes."""
    import fcntl
    import tempfile

    from mobykit.image.outputs import FORMATS, OutputContext

    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown output format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    root = _cache(cache).root / "images" / _hex(image_id)
    tar = root / "image.tar"
    if not tar.exists():
        raise NotFound(f"image {image_id} has no canonical tar here (built by an older mobykit): build it again")
    final = root / "formats" / (fmt if size is None else f"{fmt}-{size}")
    listing = final / "files.json"
    if listing.exists():
        return [final / n for n in json.loads(listing.read_text())]
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(root / "formats" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker per image: other servers and threads wait for it
        if listing.exists():
            return [final / n for n in json.loads(listing.read_text())]
        meta = json.loads((root / "image.json").read_text())
        staging = Path(tempfile.mkdtemp(prefix=f".{fmt}-", dir=final.parent))
        work = Path(tempfile.mkdtemp(prefix=f".{fmt}-work-", dir=final.parent))
        try:
            ctx = OutputContext(name="image", outdir=staging, tar_path=tar, image_id=image_id,
                                mtime=int(meta.get("mtime", 0)), size=size, workdir=work)
            made = FORMATS[fmt](ctx)
            (staging / "files.json").write_text(json.dumps(sorted(p.name for p in made)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return [final / n for n in json.loads(listing.read_text())]


def get(image_id: str, cache: Cache | None = None) -> BootImage:
    where = _cache(cache).root / "images" / _hex(image_id)
    try:
        meta = json.loads((where / "image.json").read_text())
        cmdline = (where / "cmdline").read_text().strip()
    except FileNotFoundError:
        raise NotFound(f"image {image_id} is not built here (build it with `mobykit build` or the moby flavor)") from None
    import functools

    return BootImage(id=meta["id"], name=meta.get("name", "image"), kernel=where / "kernel",
                     initrd=where / "initrd.img", cmdline=cmdline,
                     files=functools.partial(format_files, meta["id"], cache=cache))


def list_images(cache: Cache | None = None) -> list[BootImage]:
    root = _cache(cache).root / "images"
    if not root.is_dir():
        return []
    return [get("sha256:" + d.name, cache) for d in sorted(root.iterdir()) if (d / "image.json").exists()]
