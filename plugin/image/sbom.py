"""The image's software bill of materials: one SPDX 2.3 JSON document, at ``/sbom.spdx.json`` in
the image (LinuxKit's ``--sbom-output`` default, ``defaultSbomFilename`` in
src/cmd/linuxkit/build.go) and beside the outputs as ``NAME.spdx.json``.

What it holds:

- one package per OCI image the spec uses (per manifest digest): ``pkg:oci`` purl with the
  digest, arch, repository and tag, the manifest's sha256 as checksum, described by the document;
- every SPDX document those images carry as attestations (``mobykit.image.sbom_oci``), merged as
  ``linuxkit build`` merges them (``mobykit.image.sbom_merge``) with file names under the place the
  image was unpacked; each image ``CONTAINS`` what its documents describe. Images built by
  ``mobykit pkg build`` carry one listing every Debian package the recipe unpacked, so those
  appear here with name, exact version, ``pkg:deb`` purl and the .deb's sha256.

Each image's documents are merged once, at the first place the image is unpacked (kernel, init,
onboot, services, onshutdown order): LinuxKit does the same for bundles of one image, and doing it
for every image keeps one image's packages from being listed twice.

The document is a function of the build's inputs (``seed``: the input key without ``--size``,
which changes disk images, not the tree) and of SOURCE_DATE_EPOCH, so it is byte-reproducible, and
being in the tree it is part of the image id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mobykit.image import reference as refmod
from mobykit.image.cache import Cache, ImageInfo
from mobykit.image.sbom_merge import Merger
from mobykit.image.sbom_oci import sboms
from mobykit.image.sbom_spdx import DOCUMENT_ID, Document, Package, dumps, id_part, namespace, purl, spdx_time

SBOM_PATH = "sbom.spdx.json"
DOCUMENT_NAME = "sbom"  # LinuxKit's


def output_name(name: str) -> str:
    """The SBOM's file beside the build's other outputs."""
    return f"{name}.spdx.json"


@dataclass(frozen=True)
class Placement:
    """Where one image's root filesystem went in the tree: ``""`` for the root (kernel, init),
    ``containers/services/NAME/rootfs`` (or ``lower``) for a bundle. ``ref`` is as the spec writes it."""

    ref: str
    root: str


def oci_package(info: ImageInfo, arch: str) -> Package:
    """The SPDX package of one image, named by its manifest digest (a tag can move)."""
    r = refmod.parse(info.ref)
    hexdigest = info.digest.split(":", 1)[1]
    return Package(
        spdx_id=f"SPDXRef-Image-{id_part(r.name)}-{hexdigest[:12]}",
        name=r.name,
        version=info.digest,
        purl=purl("oci", None, r.repository.rsplit("/", 1)[-1], info.digest,
                  {"arch": arch, "repository_url": r.name, "tag": r.tag or ""}),
        sha256=hexdigest,
        purpose="CONTAINER",
    )


# (image ref, attestation manifest digest) -> fetch it into the cache (``Registry.fetch_attestation``)
FetchAttestation = Callable[[str, str], None]


@dataclass
class ImageSbom:
    """Makes the document once the build knows where each image went; ``assemble`` calls it and
    puts the result in the tree, the build writes ``data`` out as NAME.spdx.json."""

    cache: Cache
    images: dict[str, ImageInfo]  # spec reference -> resolved image
    arch: str
    seed: str
    mtime: int
    fetch: FetchAttestation | None = None
    data: bytes | None = None

    def __call__(self, placements: list[Placement]) -> bytes:
        self.data = dumps(self.document(placements).to_json())
        return self.data

    def document(self, placements: list[Placement]) -> Document:
        doc = Document(name=DOCUMENT_NAME, namespace=namespace(DOCUMENT_NAME, self.seed), created=spdx_time(self.mtime))
        roots: dict[str, str] = {}  # manifest digest -> where it was first unpacked
        for p in placements:
            roots.setdefault(self.images[p.ref].digest, p.root)
        first: dict[str, ImageInfo] = {}  # manifest digest -> the image, by first use
        for ref in [p.ref for p in placements] + sorted(self.images):
            first.setdefault(self.images[ref].digest, self.images[ref])
        ids = {}
        for digest, info in first.items():
            pkg = oci_package(info, self.arch)
            ids[digest] = pkg.spdx_id
            doc.packages.append(pkg.to_json())
            doc.relate(DOCUMENT_ID, "DESCRIBES", pkg.spdx_id)
        merger = Merger(doc)
        for digest, info in first.items():
            fetch = None if self.fetch is None else (lambda d, ref=info.ref: self.fetch(ref, d))
            for n, attested in enumerate(sboms(self.cache, info, fetch)):
                tag = digest.split(":", 1)[1][:12] + (f"-{n}" if n else "")
                for root in merger.add(attested.document, roots.get(digest, ""), tag):
                    if root not in ("NONE", "NOASSERTION"):
                        doc.relate(ids[digest], "CONTAINS", root)
        return doc


__all__ = ["SBOM_PATH", "ImageSbom", "Placement", "oci_package", "output_name"]
