"""The build pipeline, in LinuxKit's moby/build shape:

    spec files -> Spec -> resolved images (cache, then registry) -> input key
      -> [skip when NAME.json already records that key and its outputs]
      -> one canonical Tree (with its SBOM at /sbom.spdx.json) -> NAME.tar (image id = its sha256)
      -> one function per output format, and NAME.spdx.json (the same SBOM) whatever the formats

The input key is known before any layer is read (spec + resolved digests + local file hashes), so an
unchanged spec costs a few stats. Outputs are made in a staging directory inside the output
directory and renamed into place only when every format has succeeded: a failed or interrupted
build leaves no partial files behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mobykit import __version__
from mobykit.core import paths
from mobykit.errors import BuildError, InvalidArgument
from mobykit.image.assemble import assemble, local_inputs
from mobykit.image.cache import Cache, ImageInfo, default_root, host_arch
from mobykit.image.sbom import ImageSbom, output_name
from mobykit.image.sbom_oci import attestation_digests
from mobykit.spec.load import SpecSource

# Bump when the canonical tar or any output format changes, so old input keys stop matching.
# 4: the SBOM (/sbom.spdx.json in the tree, NAME.spdx.json beside it)
BUILD_FORMAT = 4
DEFAULT_FORMATS = ("kernel+initrd",)


@dataclass
class BuildResult:
    image_id: str
    name: str
    outdir: Path
    outputs: list[Path] = field(default_factory=list)
    rebuilt: bool = True
    inputs: dict[str, str] = field(default_factory=dict)

    def path(self, suffix: str) -> Path:
        """The output file ``NAME<suffix>`` (e.g. ``-kernel``, ``-initrd.img``, ``.tar``)."""
        return self.outdir / f"{self.name}{suffix}"


def source_date_epoch() -> int:
    """Every timestamp in the outputs: ``SOURCE_DATE_EPOCH`` when set, else 0 (1970-01-01)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise InvalidArgument(f"SOURCE_DATE_EPOCH must be a whole number of seconds, got {value!r}")
    return int(value)


def default_name(specs: list[Path | str | SpecSource]) -> str:
    first = Path(SpecSource.of(specs[0]).name)
    return first.name.split(".")[0] if first.suffix else first.name


def resolve_template(ref: str, specs: list[Path | str | SpecSource], cache: Cache) -> str:
    """LinuxKit's ``@pkg:DIR`` names a package recipe instead of an image: the reference is the tag
    that recipe builds to (content-hashed), built into the cache first if it is not there yet.
    DIR is relative to the spec file, as in LinuxKit; with several files, the first that has it.
    On a server the recipe directory must be under the allowed roots (``mobykit.core.paths``)."""
    from mobykit.spec.refs import TEMPLATE_PREFIX, is_template

    if not is_template(ref):
        return ref
    rel = ref[len(TEMPLATE_PREFIX):].strip()
    # Each candidate is checked before it is looked at, so a refusal cannot be used to probe
    # which directories exist outside the roots.
    candidates = [paths.resolve(SpecSource.of(s).directory() / rel, f"{ref}: package recipe") for s in specs]
    recipe = next((c for c in candidates if (c / "build.yml").is_file()), None)
    if recipe is None:
        raise InvalidArgument(f"{ref}: no package recipe (build.yml) at {candidates[0]}")
    from mobykit.pkg.build import build as build_pkg

    return build_pkg(recipe, cache=cache).ref


def parse_size(text: str | int | None) -> int | None:
    """``--size``: bytes from ``1024``, ``512M``, ``2G`` (binary units, as LinuxKit's ``--size``)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        value = text
    else:
        t = text.strip().upper().removesuffix("B").removesuffix("I")
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        mult = units.get(t[-1:], 1) if t else 1
        digits = t[:-1] if t[-1:] in units else t
        if not digits.isdigit():
            raise InvalidArgument(f"--size {text!r}: expected a size such as 1G, 512M or a number of bytes")
        value = int(digits) * mult
    if value <= 0:
        raise InvalidArgument(f"--size {text!r}: must be positive")
    return value


def oci_platforms(vol, arch: str) -> list[str]:
    """The architectures (``amd64``, ``arm/v7``) a ``format: oci`` volume holds: its
    ``platforms`` (``linux/ARCH[/VARIANT]``), each once, or the build's."""
    return list(dict.fromkeys(p.split("/", 1)[1] for p in vol.platforms)) if vol.platforms else [arch]


def arch_refs(spec, arch: str) -> list[str]:
    """The references the build resolves for ``arch``: all but those only an OCI volume uses
    for other platforms (an image need not exist for the build's architecture to be carried)."""
    others = {v.image for v in spec.volumes if v.image and v.is_oci and arch not in oci_platforms(v, arch)}
    needed = {e.image for e in spec.entries()} | set(spec.init) | {v.image for v in spec.volumes
                                                                      if v.image and not v.is_oci}
    if spec.kernel is not None and spec.kernel.image:
        needed.add(spec.kernel.image)
    return [r for r in spec.refs() if r in needed or r not in others]


def input_key(spec, images: dict[str, ImageInfo], locals_: dict[str, str], arch: str, mtime: int,
              size: int | None = None, attestations: dict[str, list[str]] | None = None,
              oci_volumes: dict[str, list[ImageInfo]] | None = None) -> str:
    """sha256 over everything the outputs are a function of; computed before any layer is read.
    ``attestations``: the SBOM attestation manifests each image's index lists (what the SBOM
    merges), since an index can be re-pushed with another SBOM for the same image manifest.
    ``oci_volumes``: the manifests each ``format: oci`` volume carries, one per platform."""
    doc = {
        "build-format": BUILD_FORMAT,
        "arch": arch,
        "mtime": mtime,
        "spec": spec.canonical(),
        "images": {ref: info.digest for ref, info in sorted(images.items())},
        "attestations": {ref: digests for ref, digests in sorted((attestations or {}).items()) if digests},
        "local-files": dict(sorted(locals_.items())),
        **({"size": size} if size is not None else {}),  # disk formats only; absent keeps old keys
        **({"oci-volumes": {name: [i.digest for i in infos] for name, infos in sorted(oci_volumes.items())}}
           if oci_volumes else {}),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _up_to_date(meta_path: Path, key: str, formats: list[str]) -> dict | None:
    """The recorded build when NAME.json says this key was built in these formats and its files are there."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("input-key") != key or not set(formats) <= set(meta.get("formats", [])):
        return None
    outputs = [meta_path.parent / name for name in meta.get("outputs", [])]
    if not all(p.is_file() for p in outputs):
        return None
    return meta


def build(
    specs: list[Path | str | SpecSource],
    *,
    formats: list[str] | None = None,
    outdir: Path | str,
    name: str | None = None,
    cache: Cache | None = None,
    pull: bool = False,
    arch: str | None = None,
    insecure: Iterable[str] = (),
    progress=None,
    size: int | None = None,
) -> BuildResult:
    """Build the image the spec files describe into ``outdir``; see the module docstring."""
    from mobykit.image.outputs import FORMATS
    from mobykit.image.registry import Registry, ensure
    from mobykit.spec import load

    if not specs:
        raise InvalidArgument("no spec file given")
    spec = load([s if isinstance(s, SpecSource) else str(s) for s in specs])
    formats = list(formats or spec.outputs or DEFAULT_FORMATS)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise InvalidArgument(f"unknown output format {unknown[0]!r} (known: {', '.join(sorted(FORMATS))})")
    name = name or default_name(specs)
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(f"--name {name!r}: must be a plain file name")
    cache = cache or Cache(default_root())
    arch = arch or host_arch()
    mtime = source_date_epoch()
    outdir = Path(outdir)

    registry = Registry(cache, insecure=insecure, progress=progress)
    concrete = {ref: resolve_template(ref, specs, cache) for ref in spec.refs()}
    images = {ref: ensure(cache, concrete[ref], arch, pull=pull, registry=registry) for ref in arch_refs(spec, arch)}
    oci_volumes = {v.name: [images[v.image] if a == arch else ensure(cache, concrete[v.image], a, pull=pull, registry=registry)
                            for a in oci_platforms(v, arch)]
                   for v in spec.volumes if v.image and v.is_oci}
    locals_ = local_inputs(spec)
    attestations = {ref: attestation_digests(cache, info) for ref, info in images.items()}
    key = input_key(spec, images, locals_, arch, mtime, size, attestations, oci_volumes)
    inputs = {ref: info.digest for ref, info in images.items()}

    meta_path = outdir / f"{name}.json"
    meta = _up_to_date(meta_path, key, formats)
    if meta is not None:
        return BuildResult(meta["image-id"], name, outdir, [outdir / n for n in meta["outputs"]], False, inputs)

    outdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=outdir))
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache.tmpdir()))
    try:
        from mobykit.image.outputs import OutputContext
        from mobykit.image.tree import write_tar

        # The SBOM's namespace comes from the key without --size (the tree does not depend on it)
        # and with local files by content only: their absolute paths must not make the same spec
        # built from another directory a different image.
        by_content = {str(i): digest for i, digest in enumerate(locals_.values())}
        sbom = ImageSbom(cache, images, arch,
                         seed=input_key(spec, images, by_content, arch, mtime, None, attestations, oci_volumes),
                         mtime=mtime, fetch=registry.fetch_attestation)
        tree = assemble(spec, images, cache, work, progress=progress, sbom=sbom, oci_volumes=oci_volumes)
        tar_path = staging / ".canonical.tar"  # the tar format links it as NAME.tar
        task = progress.task(f"write {name}.tar ({len(tree)} entries)") if progress else None
        with open(tar_path, "wb") as out:
            digest = write_tar(tree, out, mtime)
        if task:
            task.done()
        image_id = f"sha256:{digest}"
        ctx = OutputContext(name=name, outdir=staging, tar_path=tar_path, image_id=image_id, mtime=mtime, tree=tree,
                            size=size, workdir=work)
        sbom_path = staging / output_name(name)
        assert sbom.data is not None, "assemble makes the SBOM"
        sbom_path.write_bytes(sbom.data)
        produced: list[Path] = [sbom_path]
        for fmt in formats:
            task = progress.task(f"format {fmt}") if progress else None
            outputs_of_format = FORMATS[fmt](ctx)
            if task:
                task.done()
            for path in outputs_of_format:
                if path not in produced:
                    produced.append(path)
        meta = {
            "name": name,
            "image-id": image_id,
            "input-key": key,
            "mobykit": __version__,
            "arch": arch,
            "formats": formats,
            "inputs": [{"ref": ref, **({"resolved": concrete[ref]} if concrete[ref] != ref else {}), "digest": d}
                       for ref, d in sorted(inputs.items())],
            "local-files": dict(sorted(locals_.items())),
            "outputs": sorted(p.name for p in produced),
        }
        _commit(staging, outdir, produced, meta_path, meta)
        return BuildResult(image_id, name, outdir, [outdir / p.name for p in produced], True, inputs)
    except OSError as e:
        raise BuildError(f"writing {outdir}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _commit(staging: Path, outdir: Path, produced: list[Path], meta_path: Path, meta: dict) -> None:
    """Move finished outputs into place. NAME.json goes first-out and last-in, so no listing of
    outputs ever refers to files that are half replaced."""
    meta_path.unlink(missing_ok=True)
    for path in produced:
        os.replace(path, outdir / path.name)
    tmp = staging / meta_path.name
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta_path)
