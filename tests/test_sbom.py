"""The image's SBOM: NAME.spdx.json and /sbom.spdx.json (the same SPDX 2.3 document), with one
package per OCI image, the SPDX attestations of images merged as ``linuxkit build`` merges them,
and the Debian packages ``mobykit pkg build`` unpacked. Every document is checked with spdx-tools
(the SPDX project's own parser and validator), and must be byte-reproducible."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from harness.images import SPEC, Layer, busybox_layer, put_image, standard_images
from harness.registry import local_registry, unique_layer, write_image, write_index  # noqa: F401  (fixture)
from mobykit.errors import CacheMiss, ImageError
from mobykit.image import sbom_oci
from mobykit.image.build import build
from mobykit.image.cache import Cache
from mobykit.image.registry import Registry
from mobykit.image.sbom_merge import go_join, spdx_file_name
from mobykit.image.sbom_spdx import purl
from mobykit.pkg import apt
from mobykit.pkg import build as pkgbuild

ROOT = Path(__file__).resolve().parent.parent
DEBS = ROOT / ".cache" / "debs"
IN_TOTO = "application/vnd.in-toto+json"


# --- images with attestations, written the way BuildKit writes them ---------------------------

def _blob(cache: Cache, doc: object) -> tuple[str, int]:
    data = json.dumps(doc, sort_keys=True).encode()
    return cache.write_blob(data), len(data)


def put_attested(cache: Cache, ref: str, layers: list[Layer], sbom: dict, *, config: dict | None = None) -> str:
    """An image whose tag names an index of the image and a BuildKit attestation manifest with an
    SPDX statement and a SLSA provenance statement (whose blob is never written: nothing may need
    it). Returns the image manifest's digest."""
    manifest = put_image(cache, ref, layers, config=config)
    subject = [{"name": f"pkg:docker/{ref}?platform=linux%2Famd64", "digest": {"sha256": manifest[7:]}}]
    spdx, spdx_size = _blob(cache, {"_type": "https://in-toto.io/Statement/v0.1", "subject": subject,
                                    "predicateType": "https://spdx.dev/Document", "predicate": sbom})
    provenance = "sha256:" + hashlib.sha256(b"provenance not stored").hexdigest()
    att_config, att_config_size = _blob(cache, {"architecture": "unknown", "os": "unknown", "config": {},
                                                "rootfs": {"type": "layers", "diff_ids": [spdx, provenance]}})
    attestation, attestation_size = _blob(cache, {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": att_config,
                   "size": att_config_size},
        "layers": [
            {"mediaType": IN_TOTO, "digest": spdx, "size": spdx_size,
             "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}},
            {"mediaType": IN_TOTO, "digest": provenance, "size": 21,
             "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}},
        ],
    })
    index, _ = _blob(cache, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest,
         "size": cache.blob_path(manifest).stat().st_size, "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": attestation, "size": attestation_size,
         "platform": {"architecture": "unknown", "os": "unknown"},
         "annotations": {"vnd.docker.reference.digest": manifest, "vnd.docker.reference.type": "attestation-manifest"}},
    ]})
    cache.tag(ref, index)
    return manifest


def syft_like(pkg: str, version: str, license_text: str) -> dict:
    """An SPDX document shaped like the ones BuildKit's syft scanner attaches: a directory root
    that contains a package that contains a file, and a custom licence. Different images get the
    same ids for the root and the licence, as syft gives them."""
    sha1 = hashlib.sha1(pkg.encode()).hexdigest()
    pkg_id = f"SPDXRef-Package-apk-{pkg}"
    file_id = f"SPDXRef-File-lib-{pkg}.so"
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": "/run/src/core/sbom",
        "documentNamespace": f"https://anchore.com/syft/dir/run/src/core/sbom-{pkg}",
        "creationInfo": {"licenseListVersion": "3.20", "creators": ["Organization: Anchore, Inc", "Tool: syft-v0.85.0"],
                         "created": "2023-08-01T10:00:00Z"},
        "packages": [
            {"name": pkg, "SPDXID": pkg_id, "versionInfo": version, "supplier": "NOASSERTION",
             "downloadLocation": "NOASSERTION", "filesAnalyzed": True, "licenseConcluded": "NOASSERTION",
             "licenseDeclared": "MIT AND LicenseRef-custom", "copyrightText": "NOASSERTION",
             "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                               "referenceLocator": f"pkg:apk/alpine/{pkg}@{version}?arch=x86_64"}]},
            {"name": "/run/src/core/sbom", "SPDXID": "SPDXRef-DocumentRoot-Directory-", "downloadLocation": "NOASSERTION",
             "filesAnalyzed": False, "primaryPackagePurpose": "FILE"},
        ],
        "files": [{"fileName": f"/lib/{pkg}.so", "SPDXID": file_id, "licenseConcluded": "NOASSERTION",
                   "copyrightText": "", "checksums": [{"algorithm": "SHA1", "checksumValue": sha1}]}],
        "hasExtractedLicensingInfos": [{"licenseId": "LicenseRef-custom", "extractedText": license_text}],
        "relationships": [
            {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
             "relatedSpdxElement": "SPDXRef-DocumentRoot-Directory-"},
            {"spdxElementId": "SPDXRef-DocumentRoot-Directory-", "relationshipType": "CONTAINS",
             "relatedSpdxElement": pkg_id},
            {"spdxElementId": pkg_id, "relationshipType": "CONTAINS", "relatedSpdxElement": file_id},
        ],
    }


MERGE_SPEC = """\
init:
  - example.test/alpine:1
services:
  - name: again
    image: example.test/alpine:1
    command: ["/bin/sh"]
  - name: tool
    image: example.test/tool:1
    command: ["/bin/sh"]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    (d / "example.yml").write_text(SPEC)
    (d / "app.json").write_text('{"app": true}\n')
    (d / "merge.yml").write_text(MERGE_SPEC)
    return d


def attested_images(cache: Cache) -> dict[str, str]:
    return {
        "alpine": put_attested(cache, "example.test/alpine:1", [busybox_layer({"lib": None, "lib/musl.so": b"musl"})],
                               syft_like("musl", "1.2.4-r1", "the musl licence")),
        "tool": put_attested(cache, "example.test/tool:1", [busybox_layer({"lib": None, "lib/musl.so": b"tool's musl"})],
                             syft_like("musl", "1.2.4-r1", "another licence, same LicenseRef")),
    }


def valid(path: Path) -> dict:
    """The document at ``path``, after spdx-tools has parsed and validated it as SPDX 2.3."""
    messages = validate_full_spdx_document(parse_file(str(path)))
    assert messages == [], [m.validation_message for m in messages]
    return json.loads(path.read_bytes())


def in_image(tar: Path) -> bytes:
    with tarfile.open(tar) as tf:
        member = tf.getmember("sbom.spdx.json")
        assert (member.mode, member.uid, member.gid) == (0o644, 0, 0)
        return tf.extractfile(member).read()


def by_name(doc: dict, key: str = "packages") -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for item in doc.get(key, []):
        out.setdefault(item.get("name") or item.get("fileName"), []).append(item)
    return out


def relations(doc: dict) -> set[tuple[str, str, str]]:
    return {(r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"]) for r in doc["relationships"]}


# --- the document every build writes ----------------------------------------------------------

def test_every_build_writes_the_sbom_beside_and_inside_the_image(project, tmp_path):
    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    out = tmp_path / "out"
    result = build([project / "example.yml"], formats=["kernel+initrd"], outdir=out, cache=cache)
    path = out / "example.spdx.json"
    assert path in result.outputs
    assert "example.spdx.json" in json.loads((out / "example.json").read_text())["outputs"]
    doc = valid(path)
    assert (doc["spdxVersion"], doc["dataLicense"], doc["SPDXID"], doc["name"]) == ("SPDX-2.3", "CC0-1.0",
                                                                                    "SPDXRef-DOCUMENT", "sbom")
    assert doc["creationInfo"] == {"created": "1970-01-01T00:00:00Z", "creators": ["Tool: mobykit"]}
    images = by_name(doc)
    assert sorted(images) == ["example.test/init", "example.test/kernel", "example.test/svc"]
    for ref in ("example.test/kernel:1", "example.test/init:1", "example.test/svc:1"):
        digest = cache.resolve(ref, "amd64").digest
        (pkg,) = images[ref.split(":")[0]]
        assert pkg["versionInfo"] == digest and pkg["primaryPackagePurpose"] == "CONTAINER"
        assert pkg["checksums"] == [{"algorithm": "SHA256", "checksumValue": digest[7:]}]
        name = ref.split("/")[1].split(":")[0]
        assert pkg["externalRefs"][0]["referenceLocator"] == (
            f"pkg:oci/{name}@sha256%3A{digest[7:]}?arch=amd64&repository_url={ref.split(':')[0]}&tag=1")
        assert ("SPDXRef-DOCUMENT", "DESCRIBES", pkg["SPDXID"]) in relations(doc)
    # the tar format is not asked for, yet the SBOM is in the image: in the initrd built from it
    initrd = gzip.decompress((out / "example-initrd.img").read_bytes())
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=initrd, capture_output=True, check=True).stdout
    assert "sbom.spdx.json" in listing.decode().split()


def test_sbom_in_the_tar_is_the_file_beside_it_and_part_of_the_image_id(project, tmp_path):
    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    out = tmp_path / "out"
    result = build([project / "example.yml"], formats=["tar"], outdir=out, cache=cache)
    assert in_image(out / "example.tar") == (out / "example.spdx.json").read_bytes()
    assert result.image_id == "sha256:" + hashlib.sha256((out / "example.tar").read_bytes()).hexdigest()


def test_reproducible_and_a_function_of_the_inputs_only(project, tmp_path, monkeypatch):
    docs = []
    for i, order in enumerate((("kernel", "init", "svc"), ("svc", "init", "kernel"))):
        cache = Cache(tmp_path / f"cache{i}")
        attested_images(cache)
        standard_images(cache, order)
        docs.append((build([project / "example.yml"], formats=["tar"], outdir=tmp_path / f"out{i}", cache=cache),
                     (tmp_path / f"out{i}" / "example.spdx.json").read_bytes()))
    (a, sbom_a), (b, sbom_b) = docs
    assert sbom_a == sbom_b and a.image_id == b.image_id
    namespace = json.loads(sbom_a)["documentNamespace"]
    assert namespace.startswith("https://spdx.org/spdxdocs/sbom-")
    # --size shapes disk images, not the tree: same SBOM, same image id
    sized = build([project / "example.yml"], formats=["tar"], outdir=tmp_path / "sized", cache=Cache(tmp_path / "cache0"),
                  size=1 << 30)
    assert sized.image_id == a.image_id
    # another input: another namespace; SOURCE_DATE_EPOCH is the creation time
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    build([project / "example.yml"], formats=["tar"], outdir=tmp_path / "later", cache=Cache(tmp_path / "cache0"))
    later = valid(tmp_path / "later" / "example.spdx.json")
    assert later["creationInfo"]["created"] == "2023-11-14T22:13:20Z"
    assert later["documentNamespace"] != namespace


# --- attestations of images, merged as LinuxKit merges them ------------------------------------

def test_attested_sboms_are_merged_under_where_each_image_was_unpacked(project, tmp_path):
    cache = Cache(tmp_path / "cache")
    digests = attested_images(cache)
    out = tmp_path / "out"
    build([project / "merge.yml"], formats=["tar"], outdir=out, cache=cache)
    doc = valid(out / "merge.spdx.json")
    assert in_image(out / "merge.tar") == (out / "merge.spdx.json").read_bytes()
    with tarfile.open(out / "merge.tar") as tf:
        names = tf.getnames()
    tool_root = next(f"containers/services/tool/{d}" for d in ("rootfs", "lower")
                     if f"containers/services/tool/{d}/lib/musl.so" in names)
    alpine, tool = (f"SPDXRef-Image-example.test-{n}-{digests[n][7:19]}" for n in ("alpine", "tool"))
    tag = digests["tool"][7:19]

    # alpine is used twice (init, then a service): its document is merged once, at the root, with
    # its ids as they were. tool's document reuses those ids, so its own are renamed.
    ids = {p["SPDXID"]: p for p in by_name(doc)["musl"]}
    assert sorted(ids) == sorted(["SPDXRef-Package-apk-musl", f"SPDXRef-{tag}-Package-apk-musl"])
    musl = [ids["SPDXRef-Package-apk-musl"], ids[f"SPDXRef-{tag}-Package-apk-musl"]]
    assert "packageFileName" not in musl[0] and musl[1]["packageFileName"] == tool_root
    # file names are paths in the image ("./" as SPDX wants: the syft-style "/lib/musl.so" is not valid SPDX)
    files = by_name(doc, "files")
    assert sorted(files) == [f"./{tool_root}/lib/musl.so", "./lib/musl.so"]
    assert files[f"./{tool_root}/lib/musl.so"][0]["SPDXID"] == f"SPDXRef-{tag}-File-lib-musl.so"

    # the same LicenseRef with another text is renamed where that document uses it
    licenses = {lic["licenseId"]: lic["extractedText"] for lic in doc["hasExtractedLicensingInfos"]}
    assert licenses == {"LicenseRef-custom": "the musl licence",
                        f"LicenseRef-{tag}-custom": "another licence, same LicenseRef"}
    assert musl[0]["licenseDeclared"] == "MIT AND LicenseRef-custom"
    assert musl[1]["licenseDeclared"] == f"MIT AND LicenseRef-{tag}-custom"

    rels = relations(doc)
    for image, prefix in ((alpine, ""), (tool, f"{tag}-")):
        root = f"SPDXRef-{prefix}DocumentRoot-Directory-"
        assert ("SPDXRef-DOCUMENT", "DESCRIBES", image) in rels
        assert ("SPDXRef-DOCUMENT", "DESCRIBES", root) in rels  # as LinuxKit's merge says
        assert (image, "CONTAINS", root) in rels  # and which image it came from
        assert (root, "CONTAINS", f"SPDXRef-{prefix}Package-apk-musl") in rels
        assert (f"SPDXRef-{prefix}Package-apk-musl", "CONTAINS", f"SPDXRef-{prefix}File-lib-musl.so") in rels
    assert len(doc["relationships"]) == len(rels)  # each stated once
    assert [p["SPDXID"] for p in doc["packages"]] == sorted(p["SPDXID"] for p in doc["packages"])


def test_another_sbom_for_the_same_image_is_a_new_input(project, tmp_path):
    cache = Cache(tmp_path / "cache")
    attested_images(cache)
    out = tmp_path / "out"
    first = build([project / "merge.yml"], formats=["tar"], outdir=out, cache=cache)
    assert not build([project / "merge.yml"], formats=["tar"], outdir=out, cache=cache).rebuilt
    # the same image manifest re-pushed with a new SBOM: a new index, a new attestation
    put_attested(cache, "example.test/tool:1", [busybox_layer({"lib": None, "lib/musl.so": b"tool's musl"})],
                 syft_like("musl", "1.2.4-r2", "another licence, same LicenseRef"))
    again = build([project / "merge.yml"], formats=["tar"], outdir=out, cache=cache)
    assert again.rebuilt and again.image_id != first.image_id
    assert "1.2.4-r2" in {p.get("versionInfo") for p in valid(out / "merge.spdx.json")["packages"]}


def test_missing_attestations_are_fetched_or_the_build_stops(tmp_path):
    cache = Cache(tmp_path / "cache")
    manifest = put_attested(cache, "example.test/alpine:1", [busybox_layer()], syft_like("musl", "1", "t"))
    info = cache.resolve("example.test/alpine:1", "amd64")
    (attestation,) = sbom_oci.attestation_digests(cache, info)
    saved = cache.read_blob(attestation)
    cache.blob_path(attestation).unlink()
    with pytest.raises(CacheMiss, match="example.test/alpine:1: SBOM attestation"):
        sbom_oci.sboms(cache, info)
    fetched = []

    def fetch(digest: str) -> None:  # what Registry.fetch_attestation does, from the bytes kept above
        fetched.append(digest)
        cache.write_blob(saved, expected=digest)

    (found,) = sbom_oci.sboms(cache, info, fetch)
    assert fetched == [attestation] and found.attestation == attestation
    assert found.document["packages"][0]["name"] == "musl" and info.digest == manifest


def test_an_attestation_that_is_not_spdx_names_the_image(tmp_path):
    cache = Cache(tmp_path / "cache")
    put_attested(cache, "example.test/alpine:1", [busybox_layer()], {"bomFormat": "CycloneDX"})
    with pytest.raises(ImageError, match=r"example.test/alpine:1: SBOM attestation sha256:\w+: predicate is not"):
        sbom_oci.sboms(cache, cache.resolve("example.test/alpine:1", "amd64"))


@pytest.mark.slow
def test_pull_keeps_the_spdx_attestation_and_a_later_build_fetches_a_missing_one(local_registry, tmp_path,  # noqa: F811
                                                                                  monkeypatch):
    """Through a real registry: ``pull`` stores the SPDX attestation (not the provenance), and an
    image cached without it (pulled by an older mobykit) gets it fetched when the SBOM is made."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    layout = tmp_path / "layout"
    image = write_image(layout, [unique_layer("attested")])
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://spdx.dev/Document",
                            "subject": [], "predicate": syft_like("musl", "1.2.4-r1", "t")}).encode()
    provenance = json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                             "predicateType": "https://slsa.dev/provenance/v0.2", "predicate": {}}).encode()
    layers = {}
    for name, data in (("spdx", statement), ("provenance", provenance)):
        layers[name] = {"mediaType": IN_TOTO, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
        (layout / "blobs/sha256" / layers[name]["digest"][7:]).write_bytes(data)
    layers["spdx"]["annotations"] = {"in-toto.io/predicate-type": "https://spdx.dev/Document"}
    layers["provenance"]["annotations"] = {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}
    config = b'{"architecture":"unknown","os":"unknown","config":{},"rootfs":{"type":"layers","diff_ids":[]}}'
    (layout / "blobs/sha256" / hashlib.sha256(config).hexdigest()).write_bytes(config)
    attestation = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                         "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
                              "layers": [layers["spdx"], layers["provenance"]]}).encode()
    attestation_digest = "sha256:" + hashlib.sha256(attestation).hexdigest()
    (layout / "blobs/sha256" / attestation_digest[7:]).write_bytes(attestation)
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        image, {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": attestation_digest,
                "size": len(attestation), "platform": {"architecture": "unknown", "os": "unknown"},
                "annotations": {"vnd.docker.reference.digest": image["digest"],
                                "vnd.docker.reference.type": "attestation-manifest"}}]}).encode()
    (layout / "blobs/sha256" / hashlib.sha256(index).hexdigest()).write_bytes(index)
    write_index(layout, {"t": {"mediaType": "application/vnd.oci.image.index.v1+json",
                               "digest": "sha256:" + hashlib.sha256(index).hexdigest(), "size": len(index)}})
    local_registry.push(layout, "t", "public/attested:1", all_platforms=True)
    ref = f"{local_registry.host}/public/attested:1"

    cache = Cache(tmp_path / "cache")
    Registry(cache).pull(ref, "amd64")
    assert cache.has_blob(attestation_digest) and cache.has_blob(layers["spdx"]["digest"])
    assert not cache.has_blob(layers["provenance"]["digest"])
    (tmp_path / "pulled.yml").write_text(f"init:\n  - {ref}\n")
    build([tmp_path / "pulled.yml"], formats=["tar"], outdir=tmp_path / "out", cache=cache)
    first = (tmp_path / "out" / "pulled.spdx.json").read_bytes()
    assert "musl" in by_name(valid(tmp_path / "out" / "pulled.spdx.json"))

    for digest in (attestation_digest, layers["spdx"]["digest"]):
        cache.blob_path(digest).unlink()
    build([tmp_path / "pulled.yml"], formats=["tar"], outdir=tmp_path / "again", cache=cache)
    assert (tmp_path / "again" / "pulled.spdx.json").read_bytes() == first


# --- Debian packages a recipe unpacked ----------------------------------------------------------

def make_deb(tmp_path: Path, name: str, version: str) -> Path:
    root = tmp_path / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
                                             "Maintainer: nobody <nobody@example.test>\nDescription: test\n")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    deb = tmp_path / "tool.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def test_recipe_records_its_debian_packages_and_the_build_lists_them(tmp_path, monkeypatch):
    """A recipe built from a local .deb (apt is asked nothing): its image carries an attestation
    listing the package, and an image built from it lists name, exact version, purl and sha256."""
    debs = tmp_path / "debs"
    debs.mkdir()
    monkeypatch.setenv("MOBYKIT_DEB_CACHE", str(debs))
    deb = make_deb(tmp_path, "mobykit-test-tool", "1:1.0-1+b1")
    record = apt.Package("mobykit-test-tool", "1:1.0-1+b1", "amd64", apt.sha256_file(deb),
                         "pool/main/m/mobykit-test-tool/mobykit-test-tool_1.0-1+b1_amd64.deb")
    deb.rename(debs / record.deb_name)
    monkeypatch.setattr(pkgbuild, "resolve_packages", lambda r, memo: ([record], None))
    project = tmp_path / "project"
    (project / "tool").mkdir(parents=True)
    (project / "tool" / "build.yml").write_text("packages: [mobykit-test-tool]\nkeep: [usr/bin/tool]\n")
    (project / "tool.yml").write_text('init:\n  - "@pkg:./tool"\n')
    cache = Cache(tmp_path / "cache")

    res = pkgbuild.build(project / "tool", cache=cache)
    info = cache.resolve(res.ref, "amd64")
    assert info.digest == res.digest and info.index_digest == cache.lookup(res.ref)
    (attested,) = sbom_oci.sboms(cache, info)
    (pkg,) = attested.document["packages"]
    again = pkgbuild.build(project / "tool", cache=Cache(tmp_path / "other"), force=True)
    assert Cache(tmp_path / "other").lookup(res.ref) == cache.lookup(res.ref)  # the index is reproducible too

    build([project / "tool.yml"], formats=["tar"], outdir=tmp_path / "out", cache=cache)
    doc = valid(tmp_path / "out" / "tool.spdx.json")
    (listed,) = by_name(doc)["mobykit-test-tool"]
    assert listed["SPDXID"] == pkg["SPDXID"]
    assert listed["versionInfo"] == "1:1.0-1+b1"
    assert listed["externalRefs"] == [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                       "referenceLocator": "pkg:deb/debian/mobykit-test-tool@1%3A1.0-1%2Bb1?arch=amd64"}]
    assert listed["checksums"] == [{"algorithm": "SHA256", "checksumValue": record.sha256}]
    image = by_name(doc)["docker.io/mobykit/tool"][0]["SPDXID"]
    assert (image, "CONTAINS", listed["SPDXID"]) in relations(doc)
    assert again.digest == res.digest


@pytest.mark.slow
def test_shipped_style_recipe_lists_the_debian_package_apt_resolved(tmp_path, monkeypatch):
    """The real thing, through apt and Debian's mirror (the .deb is kept in .cache/debs)."""
    monkeypatch.setenv("MOBYKIT_DEB_CACHE", str(DEBS))
    recipe = tmp_path / "bb"
    recipe.mkdir()
    (recipe / "build.yml").write_text("packages: [busybox-static]\nkeep: [bin/busybox]\n")
    cache = Cache(tmp_path / "cache")
    res = pkgbuild.build(recipe, cache=cache)
    (record,) = apt.resolve_cached(["busybox-static"], DEBS / "resolved.json")
    (tmp_path / "bb.yml").write_text(f"init:\n  - {res.ref}\n")
    build([tmp_path / "bb.yml"], formats=["tar"], outdir=tmp_path / "out", cache=cache)
    (listed,) = by_name(valid(tmp_path / "out" / "bb.spdx.json"))["busybox-static"]
    assert listed["versionInfo"] == record.version
    assert listed["checksums"][0]["checksumValue"] == apt.sha256_file(DEBS / record.deb_name) == record.sha256
    assert listed["externalRefs"][0]["referenceLocator"] == record.purl


# --- small pieces ------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, name, joined", [
    ("", "", ""),
    ("", "/usr/bin/x", "/usr/bin/x"),
    ("containers/services/svc/rootfs/", "/usr/bin/x", "containers/services/svc/rootfs/usr/bin/x"),
    ("containers/services/svc/rootfs/", "", "containers/services/svc/rootfs"),
    ("containers/onboot/000-a/lower", "./lib/../lib//libc.so", "containers/onboot/000-a/lower/lib/libc.so"),
])
def test_file_names_are_joined_as_go_joins_them(prefix, name, joined):
    assert go_join(prefix, name) == joined
    assert spdx_file_name(prefix, name) == ("./" + joined.lstrip("/") if joined else ".")


def test_purls_are_percent_encoded_with_sorted_qualifiers():
    assert purl("deb", "debian", "libstdc++6", "12.2.0-14+deb12u1", {"arch": "amd64"}) == \
        "pkg:deb/debian/libstdc%2B%2B6@12.2.0-14%2Bdeb12u1?arch=amd64"
    assert purl("oci", None, "init", "sha256:ab", {"tag": "v1", "repository_url": "localhost:5000/x/init",
                                                   "arch": "arm64"}) == \
        "pkg:oci/init@sha256%3Aab?arch=arm64&repository_url=localhost%3A5000/x/init&tag=v1"
