"""SBOMs attached to OCI images as attestations, the way BuildKit attaches them and LinuxKit reads
them (src/cmd/linuxkit/cache/source.go, ``ImageSource.SBoMs``):

    index.json of the image
      manifests: linux/amd64 image manifest  <- the image
                 attestation manifest, annotations
                   vnd.docker.reference.type: attestation-manifest
                   vnd.docker.reference.digest: <the image manifest's digest>
                     layers: application/vnd.in-toto+json,
                             annotation in-toto.io/predicate-type: https://spdx.dev/Document
                               -> an in-toto statement whose ``predicate`` is the SPDX document

An image that is not reached through an index has no attestations (LinuxKit: "if it is not an
index, we actually do not care much"). ``mobykit pkg build`` writes its recipe images in this
same shape (``attach``), so an image pulled from a registry and one built from Debian packages
are read by one code path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from mobykit.errors import CacheMiss, ImageError
from mobykit.image.cache import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Cache, ImageInfo, check_digest

REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"
ATTESTATION_MANIFEST = "attestation-manifest"
IN_TOTO = "application/vnd.in-toto+json"
PREDICATE_TYPE = "in-toto.io/predicate-type"
SPDX_PREDICATE = "https://spdx.dev/Document"
STATEMENT_TYPE = "https://in-toto.io/Statement/v0.1"  # what BuildKit writes
MAX_SBOM = 128 << 20  # a statement is parsed whole; refuse absurd ones rather than exhaust memory

# Fetches one attestation manifest (by digest) and its SPDX layers into the cache: a registry's
# ``fetch_attestation`` for pulled images; None where nothing may be fetched.
Fetch = Callable[[str], None]


@dataclass(frozen=True)
class AttestedSbom:
    """One SPDX document an image carries, and where it was found (for errors and ids)."""

    attestation: str  # the attestation manifest's digest
    layer: str  # the in-toto statement's digest
    document: dict


def attestation_digests(cache: Cache, info: ImageInfo) -> list[str]:
    """The attestation manifests about ``info``'s platform manifest, in index order. Read from the
    index alone (already in the cache), so the build's input key can name them without fetching."""
    if info.index_digest is None:
        return []
    return attestations_in(cache.read_json(info.index_digest), info.digest, info.ref)


def attestations_in(index: dict, manifest_digest: str, ref: str) -> list[str]:
    """The attestation manifests an index lists for ``manifest_digest``, in index order."""
    out = []
    for desc in index.get("manifests") or []:
        annotations = (desc.get("annotations") or {}) if isinstance(desc, dict) else {}
        if (isinstance(annotations, dict) and annotations.get(REFERENCE_TYPE) == ATTESTATION_MANIFEST
                and annotations.get(REFERENCE_DIGEST) == manifest_digest):
            out.append(check_digest(desc.get("digest"), ref))
    return out


def spdx_layers(manifest: dict) -> list[dict]:
    """The layers of an attestation manifest that hold SPDX statements (others, e.g. SLSA
    provenance, are neither fetched nor read)."""
    return [layer for layer in manifest.get("layers") or [] if isinstance(layer, dict)
            and layer.get("mediaType") == IN_TOTO
            and (layer.get("annotations") or {}).get(PREDICATE_TYPE) == SPDX_PREDICATE]


def sboms(cache: Cache, info: ImageInfo, fetch: Fetch | None = None) -> list[AttestedSbom]:
    """Every SPDX document attested for ``info``, in index then layer order. Attestations missing
    from the cache (an image pulled before attestations were kept) are fetched with ``fetch``;
    without it, or if that fails, the build stops: an SBOM silently missing an image's
    packages would be a wrong SBOM, and one that depends on what the cache happens to hold would
    make the image id depend on it too."""
    out = []
    for digest in attestation_digests(cache, info):
        manifest = _manifest(cache, info, digest, fetch)
        for layer in spdx_layers(manifest):
            blob = check_digest(layer.get("digest"), info.ref)
            size = cache.blob_path(blob).stat().st_size
            if size > MAX_SBOM:
                raise ImageError(f"SBOM attestation {blob} is {size} bytes, more than {MAX_SBOM}", image=info.ref)
            out.append(AttestedSbom(digest, blob, _predicate(cache.read_blob(blob), info.ref, blob)))
    return out


def _manifest(cache: Cache, info: ImageInfo, digest: str, fetch: Fetch | None) -> dict:
    def complete() -> bool:
        if not cache.has_blob(digest):
            return False
        return all(cache.has_blob(str(layer.get("digest"))) for layer in spdx_layers(cache.read_json(digest)))

    if not complete() and fetch is not None:
        fetch(digest)
    if not complete():
        raise CacheMiss(f"{info.ref}: SBOM attestation {digest} is not in the cache and could not be fetched "
                        f"(pull the image again, or import it with its attestations)")
    return cache.read_json(digest)


def _predicate(raw: bytes, ref: str, digest: str) -> dict:
    """The SPDX document inside an in-toto statement, checked to be one LinuxKit would read."""
    try:
        statement = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ImageError(f"SBOM attestation {digest} is not JSON: {e}", image=ref) from None
    if not isinstance(statement, dict) or statement.get("predicateType") != SPDX_PREDICATE:
        kind = statement.get("predicateType") if isinstance(statement, dict) else None
        raise ImageError(f"SBOM attestation {digest}: unexpected predicate type {kind!r}", image=ref)
    doc = statement.get("predicate")
    version = doc.get("spdxVersion") if isinstance(doc, dict) else None
    if not isinstance(version, str) or not version.startswith("SPDX-2."):
        raise ImageError(f"SBOM attestation {digest}: predicate is not an SPDX 2 document (spdxVersion "
                         f"{version!r})", image=ref)
    return doc


def _json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes, digest: str, **extra: object) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def attach(cache: Cache, manifest_digest: str, subject: str, document: dict, arch: str) -> str:
    """Store ``document`` as the SPDX attestation of the image manifest ``manifest_digest`` and
    return the digest of a new index holding both, BuildKit's shape, for the caller to tag. Every
    blob is canonical JSON, so the same image and document always give the same index digest."""
    manifest = cache.read_blob(manifest_digest)
    statement = _json({
        "_type": STATEMENT_TYPE,
        "predicateType": SPDX_PREDICATE,
        "subject": [{"name": subject, "digest": {"sha256": manifest_digest.split(":", 1)[1]}}],
        "predicate": document,
    })
    statement_digest = cache.write_blob(statement)
    config = _json({"architecture": "unknown", "os": "unknown", "config": {},
                    "rootfs": {"type": "layers", "diff_ids": [statement_digest]}})
    config_digest = cache.write_blob(config)
    attestation = _json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config, config_digest),
        "layers": [_descriptor(IN_TOTO, statement, statement_digest, annotations={PREDICATE_TYPE: SPDX_PREDICATE})],
    })
    attestation_digest = cache.write_blob(attestation)
    index = _json({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            _descriptor(OCI_MANIFEST, manifest, manifest_digest, platform={"architecture": arch, "os": "linux"}),
            _descriptor(OCI_MANIFEST, attestation, attestation_digest,
                        platform={"architecture": "unknown", "os": "unknown"},
                        annotations={REFERENCE_DIGEST: manifest_digest, REFERENCE_TYPE: ATTESTATION_MANIFEST}),
        ],
    })
    return cache.write_blob(index)


__all__ = ["AttestedSbom", "attach", "attestation_digests", "attestations_in", "sboms", "spdx_layers"]
