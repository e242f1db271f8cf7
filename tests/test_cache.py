"""The image cache is a standard OCI image layout, content-addressed, written atomically."""

import hashlib
import io
import json
import multiprocessing
import os
import subprocess

import pytest

from harness.registry import layer_tar
from mobykit.errors import CacheMiss, ImageError
from mobykit.image.cache import REF_NAME, Cache, default_root
from mobykit.image.progress import Progress


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def put_image(cache: Cache, arch: str = "amd64", content: bytes = b"hello") -> str:
    layer = layer_tar({"etc/motd": content})
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cache.write_blob(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": cache.write_blob(layer), "size": len(layer)}],
    }).encode()
    return cache.write_blob(manifest)


def put_index(cache: Cache, per_arch: dict[str, str]) -> str:
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": cache.blob_path(d).stat().st_size,
         "platform": {"os": "linux", "architecture": a}} for a, d in per_arch.items()]}).encode()
    return cache.write_blob(index)


def test_write_blob_is_content_addressed_and_verified(tmp_path):
    cache = Cache(tmp_path / "c")
    d = cache.write_blob(b"data")
    assert d == sha(b"data") and cache.has_blob(d)
    assert cache.blob_path(d) == tmp_path / "c/blobs/sha256" / d[7:]
    assert cache.write_blob(io.BytesIO(b"stream" * 100000), expected=sha(b"stream" * 100000)) == sha(b"stream" * 100000)
    with pytest.raises(ImageError) as e:
        cache.write_blob(io.BytesIO(b"tampered"), expected=sha(b"original"))
    assert sha(b"original") in str(e.value)
    assert not cache.has_blob(sha(b"original")) and not cache.has_blob(sha(b"tampered"))
    assert os.listdir(cache.tmpdir()) == []  # nothing half-written left behind
    with pytest.raises(ImageError):
        cache.write_blob(b"abc", expected=sha(b"abc"), size=2)
    with pytest.raises(CacheMiss):
        cache.blob_path(sha(b"absent"))


def test_reading_an_absent_cache_creates_nothing(tmp_path):
    cache = Cache(tmp_path / "never")
    with pytest.raises(CacheMiss):
        cache.resolve("alpine", "amd64")
    assert cache.images() == []
    assert not (tmp_path / "never").exists()


def test_tag_resolve_roundtrip_and_layout_files(tmp_path):
    cache = Cache(tmp_path)
    m = put_image(cache)
    cache.tag("linuxkit/init:v1", m)
    info = cache.resolve("docker.io/linuxkit/init:v1", "amd64")
    assert info.ref == "docker.io/linuxkit/init:v1" and info.digest == m and info.index_digest is None
    assert info.config["config"]["Cmd"] == ["/bin/sh"]
    assert [layer.media_type for layer in info.layers] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    assert json.loads((tmp_path / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["manifests"][0]["annotations"] == {REF_NAME: "docker.io/linuxkit/init:v1"}
    # re-tagging moves the tag instead of adding a second entry
    m2 = put_image(cache, content=b"other")
    cache.tag("linuxkit/init:v1", m2)
    assert cache.resolve("linuxkit/init:v1", "amd64").digest == m2
    assert len(json.loads((tmp_path / "index.json").read_text())["manifests"]) == 1


def test_index_json_is_stable_whatever_the_tag_order(tmp_path):
    a, b = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    tags = [f"img{i}:t" for i in range(5)]
    for cache, order in ((a, tags), (b, list(reversed(tags)))):
        m = put_image(cache)
        for t in order:
            cache.tag(t, m)
    assert (tmp_path / "a/index.json").read_bytes() == (tmp_path / "b/index.json").read_bytes()


def test_digest_reference_resolves_offline_and_index_picks_arch(tmp_path):
    cache = Cache(tmp_path)
    amd, arm = put_image(cache, "amd64", b"x86"), put_image(cache, "arm64", b"arm")
    idx = put_index(cache, {"amd64": amd, "arm64": arm})
    cache.tag("multi:1", idx)
    assert cache.resolve("multi:1", "arm64").digest == arm
    info = cache.resolve("multi:1", "amd64")
    assert (info.digest, info.index_digest) == (amd, idx)
    assert cache.resolve(f"anything/else@{idx}", "arm64").digest == arm  # untagged: by digest alone
    with pytest.raises(ImageError, match="no linux/s390x"):
        cache.resolve("multi:1", "s390x")


def test_single_arch_image_for_another_arch_is_refused(tmp_path):
    cache = Cache(tmp_path)
    cache.tag("x:1", put_image(cache, "arm64"))
    with pytest.raises(ImageError, match="linux/arm64, not linux/amd64"):
        cache.resolve("x:1", "amd64")


def test_partial_image_is_a_cache_miss(tmp_path):
    cache = Cache(tmp_path)
    m = put_image(cache)
    cache.tag("x:1", m)
    layer = json.loads(cache.read_blob(m))["layers"][0]["digest"]
    cache.blob_path(layer).unlink()
    with pytest.raises(CacheMiss, match=layer):
        cache.resolve("x:1", "amd64")


def test_images_lists_ref_digest_size(tmp_path):
    cache = Cache(tmp_path)
    m = put_image(cache)
    cache.tag("b:1", m)
    cache.tag("a:1", m)
    rows = cache.images()
    doc = json.loads(cache.read_blob(m))
    size = cache.blob_path(m).stat().st_size + doc["config"]["size"] + doc["layers"][0]["size"]
    assert rows == [("docker.io/library/a:1", m, size), ("docker.io/library/b:1", m, size)]


def _tag_many(root, prefix, digest):
    c = Cache(root)
    for i in range(15):
        c.tag(f"{prefix}{i}:t", digest)


def test_concurrent_taggers_lose_nothing(tmp_path):
    cache = Cache(tmp_path)
    m = put_image(cache)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_tag_many, args=(tmp_path, p, m)) for p in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(cache.images()) == 30


def test_cache_is_readable_by_skopeo(tmp_path):
    """Interop: a standard tool sees our cache as a valid OCI layout."""
    cache = Cache(tmp_path / "c")
    m = put_image(cache)
    cache.tag("example.com/a/b:v1", m)
    out = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{tmp_path / 'c'}:example.com/a/b:v1"],
                         capture_output=True, check=True, env=dict(os.environ, HOME=str(tmp_path)))
    assert sha(out.stdout) == m


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBYKIT_CACHE", str(tmp_path / "mc"))
    assert default_root() == tmp_path / "mc"
    monkeypatch.delenv("MOBYKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg/mobykit"


def test_progress_is_silent_off_a_terminal_and_renders_on_one():
    out = io.StringIO()
    with Progress(stream=out) as p:  # StringIO is not a TTY
        t = p.task("pull x", 10)
        t.advance(10)
        t.done()
    assert out.getvalue() == ""
    forced = io.StringIO()
    with Progress(stream=forced, enabled=True) as p:
        t = p.task("pull x", 10)
        t.advance(5)
        t.done()
    assert "pull x" in forced.getvalue()
