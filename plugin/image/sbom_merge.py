"""Merging the SPDX documents images carry into one, the way ``linuxkit build`` merges them
(src/cmd/linuxkit/moby/build/sbom.go, ``SbomGenerator.Add`` and ``Close``):

- every file's ``fileName`` and every package's ``packageFileName`` is joined (Go's
  ``filepath.Join``) onto the place the image was unpacked in the image: ``""`` for the kernel and
  init images, ``containers/<kind>/<name>/rootfs/`` (or ``lower/``) for a bundle;
- packages, files, extracted licences, relationships, annotations and external document
  references are concatenated into the one document; a document's ``SPDXRef-DOCUMENT DESCRIBES``
  relationships then say the merged document describes that image's root (``documentDescribes``
  is read as those relationships, as LinuxKit's SPDX library reads it).

Where LinuxKit's merge can produce an invalid document, this one does not. File names are written
as SPDX 2.3 asks, relative with ``./`` (``./lib/libc.so``, ``./containers/services/x/rootfs/...``):
LinuxKit keeps the absolute ``/lib/libc.so`` that scanners write for an init image, which SPDX
forbids. An identifier that an
earlier document already used (two images both carrying busybox under the same SPDXID, or the
same recipe's Debian package in two images) is renamed, deterministically, by putting the
image's tag in front (``SPDXRef-<tag>-...``), and every reference to it in that document follows.
Licence refs and external document ids that collide are renamed the same way unless they are the
same definition, which is kept once. Snippets, which LinuxKit drops while keeping relationships
that name them, are merged like files.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mobykit.image.sbom_spdx import DOCUMENT_ID, Document

_LICENSE_REF = re.compile(r"(?<![A-Za-z0-9.:+-])(DocumentRef-[A-Za-z0-9.+-]+:)?(LicenseRef-[A-Za-z0-9.+-]+)"
                          r"(?![A-Za-z0-9.+-])")
_LICENSE_FIELDS = ("licenseConcluded", "licenseDeclared")
_LICENSE_LISTS = ("licenseInfoFromFiles", "licenseInfoInFiles", "licenseInfoInSnippets")


def go_join(prefix: str, name: str) -> str:
    """Go's ``filepath.Join(prefix, name)`` on Linux: the non-empty parts joined and cleaned, ""
    when both are empty (LinuxKit's writer then leaves the field out)."""
    parts = [p for p in (prefix, name) if p]
    if not parts:
        return ""
    return posixpath.normpath("/".join(parts)).replace("//", "/")


def spdx_file_name(prefix: str, name: str) -> str:
    """A file's path in the image as an SPDX ``fileName``: from the image's root, with ``./``."""
    path = go_join(prefix, name).lstrip("/")
    return f"./{path}" if path and path != "." else "."


@dataclass
class _Renames:
    """Old -> new names within one merged document, for SPDXIDs, DocumentRefs and LicenseRefs."""

    ids: dict[str, str] = field(default_factory=dict)
    doc_refs: dict[str, str] = field(default_factory=dict)
    licenses: dict[str, str] = field(default_factory=dict)

    def element(self, ref: object) -> object:
        """An element reference: ``SPDXRef-x``, ``DocumentRef-d:SPDXRef-x``, NONE or NOASSERTION."""
        if not isinstance(ref, str):
            return ref
        doc, sep, local = ref.rpartition(":")
        if sep:
            return f"{self.doc_refs.get(doc, doc)}:{local}"
        return self.ids.get(ref, ref)

    def expression(self, text: object) -> object:
        """A licence expression with its renamed ``LicenseRef-``s and ``DocumentRef-``s."""
        if not isinstance(text, str) or not (self.licenses or self.doc_refs):
            return text

        def one(m: re.Match) -> str:
            if m.group(1):  # a licence of another document: only the document id can change here
                doc = m.group(1)[:-1]
                return f"{self.doc_refs.get(doc, doc)}:{m.group(2)}"
            return self.licenses.get(m.group(2), m.group(2))

        return _LICENSE_REF.sub(one, text)


class Merger:
    """Collects documents into ``doc`` (a Document whose own packages come first: their ids are
    never renamed). ``add`` returns the ids the added document described, as renamed."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.ids: set[str] = {DOCUMENT_ID, *(p["SPDXID"] for p in doc.packages)}
        self.licenses: dict[str, dict] = {}
        self.doc_refs: dict[str, dict] = {}

    def add(self, source: dict, prefix: str, tag: str) -> list[str]:
        renames = self._renames(source, tag)
        listed = source.get("documentDescribes")
        described = [renames.element(i) for i in listed if isinstance(i, str)] if isinstance(listed, list) else []
        for i in described:
            self.doc.relate(DOCUMENT_ID, "DESCRIBES", i)
        for rel in _objects(source.get("relationships")):
            if rel.get("spdxElementId") == DOCUMENT_ID and rel.get("relationshipType") == "DESCRIBES":
                described.append(renames.element(rel.get("relatedSpdxElement")))
        for pkg in _objects(source.get("packages")):
            self.doc.packages.append(self._package(pkg, prefix, renames))
        for f in _objects(source.get("files")):
            self.doc.files.append(self._file(f, prefix, renames))
        for snippet in _objects(source.get("snippets")):
            self.doc.snippets.append(self._snippet(snippet, renames))
        for rel in _objects(source.get("relationships")):
            self.doc.relationships.append({**rel, "spdxElementId": renames.element(rel.get("spdxElementId")),
                                           "relatedSpdxElement": renames.element(rel.get("relatedSpdxElement"))})
        self.doc.annotations.extend(_objects(source.get("annotations")))
        return list(dict.fromkeys(i for i in described if isinstance(i, str)))

    # --- naming --------------------------------------------------------------------------
    def _renames(self, source: dict, tag: str) -> _Renames:
        renames = _Renames()
        for kind in ("packages", "files", "snippets"):
            for element in _objects(source.get(kind)):
                old = element.get("SPDXID")
                if isinstance(old, str) and old != DOCUMENT_ID:
                    new = self._fresh(old, tag, self.ids) if old in self.ids or old in renames.ids else old
                    renames.ids[old] = new
                    self.ids.add(new)
        self._definitions(source.get("externalDocumentRefs"), "externalDocumentId", "DocumentRef-", tag,
                          self.doc_refs, renames.doc_refs, self.doc.external_refs.append)
        self._definitions(source.get("hasExtractedLicensingInfos"), "licenseId", "LicenseRef-", tag,
                          self.licenses, renames.licenses, self.doc.licenses.append)
        return renames

    @staticmethod
    def _definitions(items: object, key: str, kind: str, tag: str, known: dict[str, dict],
                     renamed: dict[str, str], emit: Callable[[dict], None]) -> None:
        """Licence refs and external document refs: the same definition twice is one; a different
        one under a taken name gets a new name."""
        for item in _objects(items):
            old = item.get(key)
            if not isinstance(old, str):
                emit(item)
                continue
            if old in known and known[old] == {**item, key: old}:
                continue
            new = old if old not in known else Merger._fresh(old, tag, set(known), prefix=kind)
            renamed[old] = new
            known[new] = {**item, key: old}
            emit({**item, key: new})

    @staticmethod
    def _fresh(old: str, tag: str, taken: set[str], prefix: str = "SPDXRef-") -> str:
        rest = old.removeprefix(prefix)
        candidate = f"{prefix}{tag}-{rest}"
        n = 2
        while candidate in taken:
            candidate = f"{prefix}{tag}-{n}-{rest}"
            n += 1
        return candidate

    # --- elements -----------------------------------------------------------------------
    def _package(self, pkg: dict, prefix: str, renames: _Renames) -> dict:
        out = _licensed(pkg, renames)
        out["SPDXID"] = renames.element(pkg.get("SPDXID"))
        given = pkg.get("packageFileName")
        name = go_join(prefix, given if isinstance(given, str) else "")
        if name:
            out["packageFileName"] = name
        if isinstance(pkg.get("hasFiles"), list):
            out["hasFiles"] = [renames.element(i) for i in pkg["hasFiles"]]
        return out

    def _file(self, f: dict, prefix: str, renames: _Renames) -> dict:
        out = _licensed(f, renames)
        out["SPDXID"] = renames.element(f.get("SPDXID"))
        if isinstance(f.get("fileName"), str):
            out["fileName"] = spdx_file_name(prefix, f["fileName"])
        return out

    def _snippet(self, snippet: dict, renames: _Renames) -> dict:
        out = _licensed(snippet, renames)
        out["SPDXID"] = renames.element(snippet.get("SPDXID"))
        out["snippetFromFile"] = renames.element(snippet.get("snippetFromFile"))
        if isinstance(snippet.get("ranges"), list):
            out["ranges"] = [_range(r, renames) for r in snippet["ranges"]]
        return out


def _licensed(element: dict, renames: _Renames) -> dict:
    out = dict(element)
    for key in _LICENSE_FIELDS:
        if key in out:
            out[key] = renames.expression(out[key])
    for key in _LICENSE_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [renames.expression(v) for v in out[key]]
    return out


def _range(r: object, renames: _Renames) -> object:
    if not isinstance(r, dict):
        return r
    out = dict(r)
    for end in ("startPointer", "endPointer"):
        if isinstance(out.get(end), dict) and "reference" in out[end]:
            out[end] = {**out[end], "reference": renames.element(out[end]["reference"])}
    return out


def _objects(items: object) -> list[dict]:
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


__all__ = ["Merger", "go_join", "spdx_file_name"]
