"""Flattening untrusted layers: OCI whiteout semantics, every compression, and hostile layers."""

from __future__ import annotations

import gzip
import tarfile

import pytest

from harness.tarlayers import (
    GZIP_TYPE,
    PLAIN_TYPE,
    ZSTD_TYPE,
    add_image,
    compress,
    contents,
    d,
    dev,
    f,
    fifo,
    hl,
    image_of,
    listing,
    opaque,
    sym,
    tar_bytes,
    whiteout,
)
from mobykit.errors import ImageError
from mobykit.image.cache import Cache
from mobykit.image.layers import Limits, unpack_image, unpack_tar_entry


@pytest.fixture
def cache(tmp_path):
    return Cache(tmp_path / "cache")


@pytest.fixture
def work(tmp_path):
    w = tmp_path / "work"
    w.mkdir()
    return w


def test_whiteouts_and_opaque_dirs_across_three_layers(cache, work):
    lower = tar_bytes(
        d("etc"), f("etc/a", b"A"), f("etc/b", b"B"), d("var/lib/x"), f("var/lib/x/old1", b"1"),
        d("var/lib/x/sub"), f("var/lib/x/sub/old2", b"2"), d("opt/dir"), f("opt/dir/inner", b"i"), f("keep", b"k"),
    )
    middle = tar_bytes(
        whiteout("etc/a"),  # a file removed
        opaque("var/lib/x"),  # every lower child of x hidden ...
        d("var/lib/x", mode=0o700),
        f("var/lib/x/new", b"N"),  # ... but this layer's own entries stay
        whiteout("opt/dir"),  # a whole directory removed
        f("etc/c", b"C"),
        f("etc/b", b"B2", mode=0o600),  # replaced
    )
    upper = tar_bytes(
        f("etc/c", b"C3"),  # a whiteout hides lower layers only:
        whiteout("etc/c"),  # the same layer's etc/c survives it
        whiteout("etc/never-existed"),
        f("opt/dir", b"now a file"),
        f(".wh..wh.plnk/123", b"aufs bookkeeping"),
    )
    tree = unpack_image(cache, image_of(cache, lower, middle, upper), work)
    assert listing(tree) == [
        ("etc", "dir"), ("etc/b", "file"), ("etc/c", "file"), ("keep", "file"), ("opt", "dir"),
        ("opt/dir", "file"), ("var", "dir"), ("var/lib", "dir"), ("var/lib/x", "dir"), ("var/lib/x/new", "file"),
    ]
    assert contents(tree, "etc/b") == b"B2" and tree.get("etc/b").mode == 0o600
    assert contents(tree, "etc/c") == b"C3"
    assert contents(tree, "opt/dir") == b"now a file"
    assert tree.get("var/lib/x").mode == 0o700
    assert tree.get("var").mode == 0o755  # made parent
    # contents are referenced in work/, one uncompressed tar per layer, nothing else
    assert sorted(p.suffix for p in work.iterdir()) == [".tar"] * 3


def test_opaque_root_and_dir_replaced_by_symlink(cache, work):
    lower = tar_bytes(f("a/x", b"x"), f("b", b"b"))
    upper = tar_bytes(f(".wh..wh..opq"), sym("a", "/elsewhere"), f("c", b"c"))
    tree = unpack_image(cache, image_of(cache, lower, upper), work)
    assert listing(tree) == [("a", "symlink"), ("c", "file")]
    assert tree.get("a").linkname == "/elsewhere"


@pytest.mark.parametrize("kind", ["gzip", "zstd", "plain"])
def test_every_compression(cache, work, kind):
    data = bytes(range(256)) * 5000
    layer = tar_bytes(d("usr/bin"), f("usr/bin/tool", data, mode=0o4755, uid=7, gid=8), sym("bin", "usr/bin"),
                      fifo("run/pipe"), dev("dev/null"), f("cap", b"", **{"SCHILY.xattr.security.capability": "\x01\x02"}))
    tree = unpack_image(cache, image_of(cache, layer, kind=kind), work)
    tool = tree.get("usr/bin/tool")
    assert (tool.mode, tool.uid, tool.gid, tool.size) == (0o4755, 7, 8, len(data))  # setuid kept
    assert contents(tree, "usr/bin/tool") == data
    assert tree.get("dev/null").type == "char" and (tree.get("dev/null").devmajor, tree.get("dev/null").devminor) == (1, 3)
    assert tree.get("cap").xattrs == {"security.capability": b"\x01\x02"}
    assert tree.get("run/pipe").type == "fifo"


def test_multi_member_gzip_and_mislabelled_media_type(cache, work):
    raw = tar_bytes(f("a", b"a" * 3000), f("b", b"b" * 7000))
    # split at a block boundary: two gzip members make one stream, as `cat x.gz y.gz` does
    blob = gzip.compress(raw[:1024], mtime=0) + gzip.compress(raw[1024:], mtime=0)
    tree = unpack_image(cache, add_image(cache, [(blob, PLAIN_TYPE)]), work)  # says plain, is gzip
    assert contents(tree, "b") == b"b" * 7000
    zst = compress(tar_bytes(f("z", b"zz")), "zstd")
    tree = unpack_image(cache, add_image(cache, [(zst, GZIP_TYPE)], ref="x/y:2"), work)
    assert contents(tree, "z") == b"zz"


def test_hard_links_follow_their_holder(cache, work):
    lower = tar_bytes(f("bin/busybox", b"BB", mode=0o755), hl("bin/sh", "bin/busybox"), hl("/bin/ls", "./bin/busybox"))
    upper = tar_bytes(whiteout("bin/busybox"))  # the links keep the content, as on a disk
    tree = unpack_image(cache, image_of(cache, lower, upper), work)
    assert listing(tree) == [("bin", "dir"), ("bin/ls", "file"), ("bin/sh", "hardlink")]
    assert contents(tree, "bin/ls") == b"BB"
    assert tree.get("bin/sh").linkname == "bin/ls"


def test_absolute_and_dot_paths_are_normalised(cache, work):
    tree = unpack_image(cache, image_of(cache, tar_bytes(f("/etc/hosts", b"h"), f("./etc//x/./y", b"y"), d("./"))), work)
    assert listing(tree) == [("etc", "dir"), ("etc/hosts", "file"), ("etc/x", "dir"), ("etc/x/y", "file")]


def test_unpack_tar_entry_reads_a_nested_tar_in_place(cache, work):
    modules = tar_bytes(f("lib/modules/6.1/kernel/virtio.ko", b"KO"), f("lib/modules/6.1/modules.dep", b""))
    kernel = tar_bytes(f("kernel", b"bzImage"), f("kernel.tar", modules))
    tree = unpack_image(cache, image_of(cache, kernel), work)
    inner = unpack_tar_entry(tree.get("kernel.tar"), work / "kernel-tar", image="kern")
    assert contents(inner, "lib/modules/6.1/kernel/virtio.ko") == b"KO"
    assert not (work / "kernel-tar").exists()  # read where it lies, not copied
    gz = tree.get("kernel")  # not a tar at all
    with pytest.raises(ImageError, match="not a valid tar|corrupt tar header"):
        unpack_tar_entry(gz, work / "kernel-tar", image="kern")


# -- hostile layers: (layer members or raw tar, limits, message, path named in the error)

def _raw_with_name(name: str) -> bytes:
    """A tar whose member name is written verbatim (tarfile would not stop us either, but be explicit)."""
    return tar_bytes(f(name, b"evil"))


def _sparse_member() -> bytes:
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    return tar_bytes((info, None), fmt=tarfile.GNU_FORMAT)


HOSTILE = {
    "dotdot": (lambda: _raw_with_name("../../escape"), None, "escapes the root", "../../escape"),
    "inner-dotdot": (lambda: _raw_with_name("usr/../../escape"), None, "escapes the root", "usr/../../escape"),
    "symlink-parent-same-layer": (
        lambda: tar_bytes(sym("lib", "/tmp"), f("lib/evil.so", b"x")), None, "is a symlink", "lib/evil.so"),
    "symlink-parent-dotdot-target": (
        lambda: tar_bytes(sym("up", "../../.."), f("up/etc/passwd", b"x")), None, "is a symlink", "up/etc/passwd"),
    "hardlink-through-symlink": (
        lambda: tar_bytes(sym("etc", "/host-etc"), hl("stolen", "etc/shadow")), None, "not in the tree", "stolen"),
    "parent-is-a-file": (lambda: tar_bytes(f("etc", b"file"), f("etc/passwd", b"x")), None, "not a directory", "etc/passwd"),
    "hardlink-outside": (lambda: tar_bytes(hl("shadow", "../../etc/shadow")), None, "escapes the root", "shadow"),
    "hardlink-absolute-missing": (lambda: tar_bytes(hl("shadow", "/etc/shadow")), None, "not in the tree", "shadow"),
    "hardlink-forward": (lambda: tar_bytes(hl("a", "b"), f("b", b"b")), None, "not in the tree", "a"),
    "hardlink-to-dir": (lambda: tar_bytes(d("dir"), hl("link", "dir")), None, "hard link to directory", "link"),
    "device-outside-dev": (lambda: tar_bytes(dev("tmp/mem", major=1, minor=1)), None, "outside /dev", "tmp/mem"),
    "block-device-outside-dev": (lambda: tar_bytes(dev("sda", tarfile.BLKTYPE, 8, 0)), None, "outside /dev", "sda"),
    "world-writable-setuid": (lambda: tar_bytes(f("bin/su", b"x", mode=0o4777)), None, "world-writable setuid", "bin/su"),
    "sparse": (_sparse_member, None, "unsupported tar member type", "sparse"),
    "long-path": (lambda: _raw_with_name("a/" * 40 + "x"), Limits(max_path=64), "longer than 64 bytes", None),
    "long-component": (lambda: _raw_with_name("dir/" + "n" * 256), None, "longer than 255 bytes", "dir/" + "n" * 256),
    "too-many-entries": (lambda: tar_bytes(*[f(f"f{i}") for i in range(50)]), Limits(max_entries=20), "max_entries", None),
    "ratio-bomb": (lambda: tar_bytes(f("zeros", bytes(8 << 20))), Limits(max_ratio=100, ratio_floor=1 << 20), "max_ratio", None),
    "size-bomb": (lambda: tar_bytes(f("big", bytes(3 << 20))), Limits(max_total_bytes=2 << 20), "beyond the limit", None),
    "whiteout-dotdot": (lambda: tar_bytes(f("etc/.wh.."), ), None, "escapes the root|names no file", None),
}


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused(cache, work, tmp_path, case, kind):
    build, limits, message, path = HOSTILE[case]
    base = tar_bytes(d("dev"), f("ok", b"fine"))
    image = image_of(cache, base, build(), kind=kind)
    with pytest.raises(ImageError) as err:
        unpack_image(cache, image, work, limits or Limits())
    e = err.value
    assert e.image == "example.com/test/image:1"
    assert e.layer == image.layers[1].digest  # the hostile layer, not the good one below it
    assert __import__("re").search(message, str(e)), str(e)
    if path is not None:
        assert e.path == path
    # nothing escaped: the only files anywhere under tmp_path are the cache's and work/'s tars
    stray = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts and p.suffix != ".tar"]
    assert stray == []
    assert not any(p.name.endswith(".partial") for p in work.iterdir())


def _corrupt(cache, blob: bytes, media_type: str):
    return add_image(cache, [(blob, media_type)])


def test_corrupt_and_truncated_blobs_are_refused(cache, work):
    raw = tar_bytes(f("a", bytes(range(256)) * 400))
    gz, zst = compress(raw, "gzip"), compress(raw, "zstd")
    cases = [
        (gz[: len(gz) // 2], GZIP_TYPE, "truncated gzip"),
        (zst[: len(zst) // 2], ZSTD_TYPE, "truncated zstd"),
        (gz + b"trailing garbage", GZIP_TYPE, "garbage after the gzip"),
        (gz[:20] + bytes(len(gz) - 20), GZIP_TYPE, "corrupt gzip"),
        (raw[:600], PLAIN_TYPE, "truncated"),  # header + part of the data
        (raw[:512] + b"x" * 512 + raw[1024:], PLAIN_TYPE, None),  # data garbled is not detectable ...
        (raw + b"\xff" * 1024, PLAIN_TYPE, "corrupt tar header"),  # ... but a garbled header is
    ]
    for blob, media_type, message in cases:
        image = _corrupt(cache, blob, media_type)
        if message is None:
            unpack_image(cache, image, work)
            continue
        with pytest.raises(ImageError, match=message) as err:
            unpack_image(cache, image, work)
        assert err.value.layer == image.layers[0].digest
    assert not any(p.name.endswith(".partial") for p in work.iterdir())


def test_digest_mismatch_is_refused_and_leaves_nothing(cache, work):
    image = image_of(cache, tar_bytes(f("a", b"a")))
    path = cache.blob_path(image.layers[0].digest)
    path.chmod(0o644)
    path.write_bytes(compress(tar_bytes(f("a", b"tampered")), "gzip"))
    with pytest.raises(ImageError, match="digest mismatch") as err:
        unpack_image(cache, image, work)
    assert err.value.layer == image.layers[0].digest
    assert list(work.iterdir()) == []
    path.write_bytes(b"\x1f\x8b not gzip at all")  # tampered and undecodable: still named as tampering
    with pytest.raises(ImageError, match="digest mismatch"):
        unpack_image(cache, image, work)
    assert list(work.iterdir()) == []


def test_unknown_media_type_is_refused(cache, work):
    image = add_image(cache, [(tar_bytes(f("a")), "application/vnd.oci.image.config.v1+json")])
    with pytest.raises(ImageError, match="unsupported layer media type"):
        unpack_image(cache, image, work)


def test_flattened_tar_does_not_depend_on_compression_or_work_dir(cache, tmp_path):
    import io

    from mobykit.image.tree import write_tar

    lower = tar_bytes(f("etc/a", b"A" * 1000, uid=3), hl("etc/b", "etc/a"), sym("lib", "usr/lib"), d("usr/lib"))
    upper = tar_bytes(whiteout("etc/a"), f("etc/c", b"C"))
    tars = set()
    for i, kind in enumerate(("gzip", "zstd", "plain")):
        tree = unpack_image(cache, image_of(cache, lower, upper, kind=kind, ref=f"r/{kind}:1"), tmp_path / f"w{i}")
        buf = io.BytesIO()
        write_tar(tree, buf, 0)
        tars.add(buf.getvalue())
    assert len(tars) == 1


def test_contents_are_streamed_never_held(cache, tmp_path):
    """Peak memory of flattening and writing a 160 MB image stays far below the image size: the
    promise that lets a 500 MB image build in under 200 MB of RAM."""
    import subprocess
    import sys
    import textwrap

    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as tf:
        for i in range(4):
            info = tarfile.TarInfo(f"opt/blob{i}")
            info.size = 40 << 20
            with open("/dev/urandom", "rb") as rnd:
                tf.addfile(info, rnd)
    with open(big, "rb") as fh:
        digest = cache.write_blob(fh)
    big.unlink()
    script = textwrap.dedent(f"""
        import io, sys
        from mobykit.image.cache import Cache, ImageInfo, Layer
        from mobykit.image.layers import unpack_image
        from mobykit.image.tree import write_tar
        cache = Cache({str(cache.root)!r})
        image = ImageInfo("big:1", "sha256:" + "1" * 64, None, {{}}, [Layer({digest!r}, {PLAIN_TYPE!r}, {160 << 20})])
        tree = unpack_image(cache, image, {str(tmp_path / "work")!r})
        with open({str(tmp_path / "out.tar")!r}, "wb") as out:
            write_tar(tree, out, 0)
        print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
    """)
    peak_kb = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert (tmp_path / "out.tar").stat().st_size > 160 << 20
    assert peak_kb < 100 * 1024, f"peak RSS {peak_kb} kB"


def test_symlink_from_a_lower_layer_is_never_followed(cache, work):
    lower = tar_bytes(sym("usr/lib/evil", "/etc"), f("usr/lib/ok", b"ok"))
    upper = tar_bytes(f("usr/lib/evil/cron.d/job", b"* * * * * root sh"))
    image = image_of(cache, lower, upper)
    with pytest.raises(ImageError, match="'usr/lib/evil' is a symlink") as err:
        unpack_image(cache, image, work)
    assert (err.value.layer, err.value.path) == (image.layers[1].digest, "usr/lib/evil/cron.d/job")
    # replacing the symlink by a directory first is legitimate (Docker does the same)
    fixed = tar_bytes(d("usr/lib/evil"), f("usr/lib/evil/cron.d/job", b"x"))
    tree = unpack_image(cache, image_of(cache, lower, fixed, ref="r/fixed:1"), work)
    assert tree.get("usr/lib/evil").type == "dir" and contents(tree, "usr/lib/evil/cron.d/job") == b"x"
