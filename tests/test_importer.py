"""Importing images from files: OCI layouts/archives and docker save tarballs (made by skopeo, a
real producer of both formats), treated as untrusted input."""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness.registry import layer_tar, write_image, write_index, write_multiarch
from mobykit.errors import ImageError
from mobykit.image.cache import OCI_LAYER_TAR, Cache
from mobykit.image.importer import import_path

MAIN = Path(__file__).resolve().parents[1]


def skopeo(*args, home):
    subprocess.run(["skopeo", "copy", "--quiet", *args], check=True, capture_output=True,
                   env=dict(os.environ, HOME=str(home)), timeout=120)


@pytest.fixture
def layout(tmp_path):
    lay = tmp_path / "layout"
    d = write_image(lay, [layer_tar({"bin/hello": b"#!/bin/sh\necho hi\n"}), layer_tar({"etc/motd": b"hi"})])
    write_index(lay, {"v1": d})
    return lay, d


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def test_oci_layout_dir_with_tag_only_needs_a_name(tmp_path, layout):
    lay, d = layout
    cache = Cache(tmp_path / "cache")
    with pytest.raises(ImageError) as e:
        import_path(cache, lay)
    assert "index.json: manifests[0]" in str(e.value) and "--name" in str(e.value) and str(lay) in str(e.value)
    assert cache.images() == []
    assert import_path(cache, lay, name="example.com/tools/hello") == [("example.com/tools/hello:v1", d["digest"])]
    info = cache.resolve("example.com/tools/hello:v1", "amd64")
    assert info.digest == d["digest"] and len(info.layers) == 2


def test_oci_archive_from_skopeo_with_full_ref_name(tmp_path, layout):
    lay, d = layout
    archive = tmp_path / "img.tar"
    skopeo(f"oci:{lay}:v1", f"oci-archive:{archive}:ghcr.io/acme/hello:2.0", home=tmp_path)
    cache = Cache(tmp_path / "cache")
    [(ref, digest)] = import_path(cache, archive)
    assert ref == "ghcr.io/acme/hello:2.0"
    info = cache.resolve(ref, "amd64")
    assert info.digest == digest == d["digest"]  # skopeo copied the manifest byte for byte


def test_multiarch_layout_imports_every_platform(tmp_path):
    lay = tmp_path / "multi"
    idx = write_multiarch(lay, {"amd64": [layer_tar({"a": b"x86"})], "arm64": [layer_tar({"a": b"arm"})]})
    write_index(lay, {"docker.io/me/multi:1": idx})
    cache = Cache(tmp_path / "cache")
    import_path(cache, lay)
    amd, arm = cache.resolve("me/multi:1", "amd64"), cache.resolve("me/multi:1", "arm64")
    assert amd.index_digest == arm.index_digest == idx["digest"] and amd.digest != arm.digest


def test_docker_save_tarball_is_converted_to_oci(tmp_path, layout):
    lay, _ = layout
    archive = tmp_path / "save.tar"
    skopeo(f"oci:{lay}:v1", f"docker-archive:{archive}:busybox:v1", home=tmp_path)
    with tarfile.open(archive) as tf:
        assert "manifest.json" in tf.getnames() and "oci-layout" not in tf.getnames()
    cache = Cache(tmp_path / "cache")
    [(ref, digest)] = import_path(cache, archive)
    assert ref == "docker.io/library/busybox:v1"
    info = cache.resolve("busybox:v1", "amd64")
    assert [layer.media_type for layer in info.layers] == [OCI_LAYER_TAR, OCI_LAYER_TAR]
    # layers kept as the uncompressed tars docker save holds: digest == the config's diff_id
    assert [layer.digest for layer in info.layers] == info.config["rootfs"]["diff_ids"]
    with tarfile.open(cache.blob_path(info.layers[0].digest)) as tf:
        assert tf.extractfile("bin/hello").read() == b"#!/bin/sh\necho hi\n"
    # the same tarball gives the same manifest digest (the conversion is deterministic)
    other = Cache(tmp_path / "other")
    assert import_path(other, archive) == [(ref, digest)]
    # gzip'd docker save (docker save | gzip) works too
    gz = tmp_path / "save.tar.gz"
    gz.write_bytes(gzip.compress(archive.read_bytes()))
    assert import_path(Cache(tmp_path / "third"), gz) == [(ref, digest)]


def test_docker_save_layer_not_matching_diff_id_is_refused(tmp_path, layout):
    lay, _ = layout
    archive = tmp_path / "save.tar"
    skopeo(f"oci:{lay}:v1", f"docker-archive:{archive}:busybox:v1", home=tmp_path)
    with tarfile.open(archive) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]
    manifest = json.loads(next(d for m, d in members if m.name == "manifest.json"))
    victim = manifest[0]["Layers"][0]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(tar_of([(m, layer_tar({"evil": b"x"}, gz=False) if m.name == victim else d) for m, d in members]))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(ImageError) as e:
        import_path(cache, bad)
    msg = str(e.value)
    assert str(bad) in msg and "Layers[0]" in msg and victim in msg and "digest mismatch" in msg
    assert cache.images() == []  # nothing tagged


def test_tampered_blob_in_oci_archive(tmp_path, layout):
    lay, d = layout
    manifest = json.loads((lay / "blobs/sha256" / d["digest"][7:]).read_bytes())
    layer = manifest["layers"][1]["digest"]
    p = lay / "blobs/sha256" / layer[7:]
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(ImageError) as e:
        import_path(cache, lay, name="x/y")
    assert layer in str(e.value) and f"blobs/sha256/{layer[7:]}" in str(e.value)
    assert not cache.has_blob(layer) and cache.images() == []


def _ti(name, **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def test_path_traversal_entry_is_refused(tmp_path):
    bad = tmp_path / "evil.tar"
    bad.write_bytes(tar_of([(_ti("oci-layout"), b'{"imageLayoutVersion":"1.0.0"}'), (_ti("../../etc/cron.d/x"), b"boom")]))
    with pytest.raises(ImageError) as e:
        import_path(Cache(tmp_path / "c"), bad)
    assert "../../etc/cron.d/x" in str(e.value) and str(bad) in str(e.value)


def test_symlink_out_of_the_archive_is_refused(tmp_path, layout):
    lay, d = layout
    entries = []
    for p in sorted(lay.rglob("*")):
        if p.is_file():
            entries.append((_ti(str(p.relative_to(lay))), p.read_bytes()))
    entries.append((_ti("blobs/sha256/" + "0" * 64, type=tarfile.SYMTYPE, linkname="../../../etc/passwd"), None))
    bad = tmp_path / "links.tar"
    bad.write_bytes(tar_of(entries))
    with pytest.raises(ImageError, match="escapes the archive"):
        import_path(Cache(tmp_path / "c"), bad, name="x/y")


def test_docker_save_manifest_pointing_outside_is_refused(tmp_path):
    cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}).encode()
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["../../etc/passwd"]}]).encode()
    bad = tmp_path / "save.tar"
    bad.write_bytes(tar_of([(_ti("manifest.json"), manifest), (_ti("c.json"), cfg)]))
    with pytest.raises(ImageError) as e:
        import_path(Cache(tmp_path / "c"), bad)
    assert "manifest.json[0]: Layers[0]" in str(e.value) and "escapes" in str(e.value)


def test_layout_dir_with_blob_symlinked_outside_is_refused(tmp_path, layout):
    lay, d = layout
    outside = tmp_path / "secret"
    outside.write_bytes(b"secret")
    blob = lay / "blobs/sha256" / d["digest"][7:]
    blob.unlink()
    blob.symlink_to(outside)
    with pytest.raises(ImageError, match="outside the directory"):
        import_path(Cache(tmp_path / "c"), lay, name="x/y")


def test_not_an_image_archive(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(ImageError, match="junk.bin"):
        import_path(Cache(tmp_path / "c"), junk)


def _cli(*args, cache):
    return subprocess.run([sys.executable, "-m", "mobykit.cli.main", "cache", *args, "--cache", str(cache)],
                          capture_output=True, text=True, cwd=MAIN, timeout=120)


def test_cli_import_and_ls(tmp_path, layout):
    lay, d = layout
    cache = tmp_path / "cache"
    r = _cli("import", str(lay), "--name", "acme/hello", cache=cache)
    assert r.returncode == 0, r.stderr
    r = _cli("ls", cache=cache)
    assert r.returncode == 0, r.stderr
    size = sum(p.stat().st_size for p in (lay / "blobs/sha256").iterdir())
    assert r.stdout == f"docker.io/acme/hello:v1\t{d['digest']}\t{size}\n"  # TSV off a terminal
    bad = _cli("import", str(tmp_path / "nope.tar"), cache=cache)
    assert bad.returncode != 0 and "nope.tar" in bad.stderr and "Traceback" not in bad.stderr



def test_docker_save_without_repotags_uses_repositories_file(tmp_path, layout):
    lay, _ = layout
    archive = tmp_path / "save.tar"
    skopeo(f"oci:{lay}:v1", f"docker-archive:{archive}:example.com/old/style:7", home=tmp_path)
    with tarfile.open(archive) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]
    manifest = json.loads(next(d for m, d in members if m.name == "manifest.json"))
    manifest[0]["RepoTags"] = None
    legacy = tmp_path / "legacy.tar"
    legacy.write_bytes(tar_of([(m, json.dumps(manifest).encode() if m.name == "manifest.json" else d) for m, d in members]))
    cache = Cache(tmp_path / "cache")
    [(ref, digest)] = import_path(cache, legacy)
    assert ref == "example.com/old/style:7"
    assert cache.resolve(ref, "amd64").digest == digest


def test_extracted_docker_save_directory(tmp_path, layout):
    lay, _ = layout
    archive = tmp_path / "save.tar"
    skopeo(f"oci:{lay}:v1", f"docker-archive:{archive}:busybox:v1", home=tmp_path)
    extracted = tmp_path / "extracted"
    with tarfile.open(archive) as tf:
        tf.extractall(extracted, filter="data")  # our own archive: trusted here
    from_tar = import_path(Cache(tmp_path / "a"), archive)
    assert import_path(Cache(tmp_path / "b"), extracted) == from_tar
