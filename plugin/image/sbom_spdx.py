"""SPDX 2.3 JSON building blocks: the packages mobykit describes itself, package URLs, identifiers,
and one canonical serialisation.

Every document mobykit writes is a function of its inputs only (an image is byte-reproducible and
its SBOM is inside it): the namespace is derived from a seed the caller takes from the inputs (never
a random UUID, as LinuxKit's is), ``created`` is the build's one timestamp, and lists are sorted
before writing, so the same inputs always give the same bytes.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

SPDX_VERSION = "SPDX-2.3"
DATA_LICENSE = "CC0-1.0"  # the only data licence SPDX 2.x allows
DOCUMENT_ID = "SPDXRef-DOCUMENT"
CREATORS = ("Tool: mobykit",)  # no version: the image must not change when only mobykit's version does
NOASSERTION = "NOASSERTION"
# SPDX's own recommendation for documents whose creator has no web site of its own:
# http://spdx.org/spdxdocs/[DocumentName]-[UUID]
_NAMESPACE_BASE = "https://spdx.org/spdxdocs/"
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9.-]+")


def spdx_time(epoch: int) -> str:
    """SPDX's timestamp form (UTC, seconds, ``Z``) of a build's SOURCE_DATE_EPOCH."""
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def namespace(name: str, seed: str) -> str:
    """A documentNamespace unique to the inputs ``seed`` stands for: a name-based UUID (v5), so the
    same inputs give the same namespace and any other input gives another."""
    return f"{_NAMESPACE_BASE}{id_part(name)}-{uuid.uuid5(uuid.NAMESPACE_URL, 'mobykit:' + seed)}"


def id_part(text: str) -> str:
    """``text`` made fit for an SPDXID (letters, digits, ``.`` and ``-`` only)."""
    return _NOT_IN_ID.sub("-", text).strip("-") or "x"


def purl(type_: str, namespace_: str | None, name: str, version: str | None,
         qualifiers: dict[str, str] | None = None) -> str:
    """A package URL (github.com/package-url/purl-spec): components percent-encoded, qualifiers
    sorted by key and empty ones left out, as the spec's canonical form requires."""
    out = f"pkg:{type_}/"
    if namespace_:
        out += "/".join(quote(seg, safe="") for seg in namespace_.split("/")) + "/"
    out += quote(name, safe="")
    if version:
        out += "@" + quote(version, safe="")
    quals = sorted((k.lower(), v) for k, v in (qualifiers or {}).items() if v)
    if quals:
        out += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in quals)
    return out


@dataclass(frozen=True)
class Package:
    """One SPDX package that mobykit itself states (an OCI image, a Debian package).

    Licences are not stated: mobykit reads no licence files, and SPDX 2.3 makes the fields
    optional rather than have tools write NOASSERTION everywhere."""

    spdx_id: str
    name: str
    version: str
    purl: str
    sha256: str  # hex, the checksum of what was fetched: the .deb, the image manifest
    purpose: str | None = None  # primaryPackagePurpose, e.g. CONTAINER
    source_info: str | None = None  # sourceInfo: where the package came from

    def to_json(self) -> dict:
        doc: dict = {
            "SPDXID": self.spdx_id,
            "name": self.name,
            "versionInfo": self.version,
            "downloadLocation": NOASSERTION,
            "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": self.sha256}],
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": self.purl}],
        }
        if self.purpose:
            doc["primaryPackagePurpose"] = self.purpose
        if self.source_info:
            doc["sourceInfo"] = self.source_info
        return doc


@dataclass
class Document:
    """An SPDX 2.3 document being put together; ``to_json`` gives its canonical form.

    ``packages``, ``files`` and the rest hold SPDX JSON objects as read or made, so documents
    merged in from images keep every field they had."""

    name: str
    namespace: str
    created: str
    packages: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    snippets: list[dict] = field(default_factory=list)
    relationships: list[dict] = field(default_factory=list)
    licenses: list[dict] = field(default_factory=list)  # hasExtractedLicensingInfos
    external_refs: list[dict] = field(default_factory=list)  # externalDocumentRefs
    annotations: list[dict] = field(default_factory=list)

    def relate(self, element: str, kind: str, related: str) -> None:
        self.relationships.append({"spdxElementId": element, "relationshipType": kind, "relatedSpdxElement": related})

    def to_json(self) -> dict:
        """The document with every list in a fixed order (elements by SPDXID, the rest by content),
        so neither the order images were read in nor the order of their documents shows."""
        doc: dict = {
            "spdxVersion": SPDX_VERSION,
            "dataLicense": DATA_LICENSE,
            "SPDXID": DOCUMENT_ID,
            "name": self.name,
            "documentNamespace": self.namespace,
            "creationInfo": {"created": self.created, "creators": list(CREATORS)},
        }
        for key, items, sort_key in (
            ("packages", self.packages, _by_id),
            ("files", self.files, _by_id),
            ("snippets", self.snippets, _by_id),
            ("hasExtractedLicensingInfos", self.licenses, lambda d: (str(d.get("licenseId")), _canonical(d))),
            ("externalDocumentRefs", self.external_refs, lambda d: (str(d.get("externalDocumentId")), _canonical(d))),
            ("annotations", self.annotations, _canonical),
            ("relationships", _unique(self.relationships), _relationship_key),
        ):
            if items:
                doc[key] = sorted(items, key=sort_key)
        return doc


def _canonical(doc: object) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _by_id(doc: dict) -> tuple[str, str]:
    return str(doc.get("SPDXID")), _canonical(doc)


def _relationship_key(rel: dict) -> tuple[str, str, str, str]:
    return (str(rel.get("spdxElementId")), str(rel.get("relationshipType")), str(rel.get("relatedSpdxElement")),
            _canonical(rel))


def _unique(items: list[dict]) -> list[dict]:
    """Equal relationships stated twice (an image's document and ours both saying it) once."""
    seen: dict[str, dict] = {}
    for item in items:
        seen.setdefault(_canonical(item), item)
    return list(seen.values())


def dumps(doc: dict) -> bytes:
    """The one serialisation: keys sorted, two-space indent, UTF-8, a final newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"


__all__ = ["DOCUMENT_ID", "Document", "Package", "dumps", "id_part", "namespace", "purl", "spdx_time"]
