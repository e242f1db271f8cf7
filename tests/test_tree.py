"""The canonical tree and its tar: order-independent bytes, fixed metadata, hard-link groups."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import tarfile

import pytest

from mobykit.errors import BuildError
from mobykit.image.tree import BytesContent, Entry, FileContent, Tree, read_tar, write_tar

MTIME = 1_700_000_000


def _entries(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"HEADERxxxxPAYLOAD-FROM-FILE" + b"z" * 5000)
    return [
        Entry("etc/hostname", "file", 0o644, size=4, source=BytesContent(b"moby")),
        Entry("usr/bin/prog", "file", 0o4755, uid=1000, gid=50, size=17, source=FileContent(blob, 10, 17)),
        Entry("usr/bin", "dir", 0o750),
        Entry("bin", "symlink", 0o777, linkname="usr/bin"),
        Entry("dev/console", "char", 0o600, devmajor=5, devminor=1),
        Entry("run/fifo", "fifo", 0o644),
        Entry("a-b", "file", 0o644, size=0, source=BytesContent(b"")),
        Entry("cap", "file", 0o755, size=1, source=BytesContent(b"c"),
              xattrs={"user.z": b"last", "security.capability": b"\x01\x00\x00\x02", "user.a": b"first"}),
        Entry("long/" + "d" * 120 + "/name", "file", 0o644, size=1, source=BytesContent(b"L")),
        Entry("unicodé", "file", 0o644, size=1, source=BytesContent(b"u")),
    ]


def _tar(tree: Tree, mtime: int = MTIME) -> tuple[bytes, str]:
    buf = io.BytesIO()
    digest = write_tar(tree, buf, mtime)
    return buf.getvalue(), digest


def test_same_entries_in_any_order_give_identical_bytes(tmp_path):
    entries = _entries(tmp_path)
    outputs = set()
    for seed in range(5):
        shuffled = entries[:]
        random.Random(seed).shuffle(shuffled)
        tree = Tree()
        for e in shuffled:
            tree.add(e)
        data, digest = _tar(tree)
        assert digest == hashlib.sha256(data).hexdigest()
        outputs.add(data)
    assert len(outputs) == 1
    # a different timestamp is a different image
    tree = Tree()
    for e in entries:
        tree.add(e)
    assert _tar(tree, MTIME + 1)[0] not in outputs


def test_tar_has_fixed_metadata_sorted_paths_and_pax_only_when_needed(tmp_path):
    tree = Tree()
    for e in _entries(tmp_path):
        tree.add(e)
    data, _ = _tar(tree)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert names[:3] == ["a-b", "bin", "cap"]
        assert "dev" in names and "usr" in names  # parents made
        for m in members:
            assert (m.mtime, m.uname, m.gname) == (MTIME, "", "")
        by = {m.name: m for m in members}
        assert (by["usr/bin/prog"].mode, by["usr/bin/prog"].uid, by["usr/bin/prog"].gid) == (0o4755, 1000, 50)
        assert tf.extractfile("usr/bin/prog").read() == b"PAYLOAD-FROM-FILE"
        assert by["usr"].mode == 0o755 and by["usr/bin"].mode == 0o750
        assert (by["dev/console"].devmajor, by["dev/console"].devminor) == (5, 1)
        assert by["bin"].issym() and by["bin"].linkname == "usr/bin"
        assert tf.extractfile("long/" + "d" * 120 + "/name").read() == b"L"
    # PAX headers only where ustar cannot say it: the long name and its long parent directory,
    # the non-ASCII name, the xattrs
    assert data.count(b"././@PaxHeader") == 4
    raw = data.decode("latin-1")
    assert raw.index("SCHILY.xattr.security.capability") < raw.index("SCHILY.xattr.user.a") < raw.index("SCHILY.xattr.user.z")


def test_gnu_tar_and_bsdtar_read_it(tmp_path):
    tree = Tree()
    for e in _entries(tmp_path):
        if e.type != "char" and e.path != "cap":  # a device or a bogus capability needs privileges
            tree.add(e)
    tree.add_bytes("z/file", b"linked")
    tree.add(Entry("a/link", "hardlink", 0, linkname="z/file"))
    tar = tmp_path / "out.tar"
    with open(tar, "wb") as out:
        write_tar(tree, out, MTIME)
    tools = [["tar", "-xf", str(tar)]] + ([["bsdtar", "-xf", str(tar)]] if shutil.which("bsdtar") else [])
    for i, cmd in enumerate(tools):
        dest = tmp_path / f"x{i}"
        dest.mkdir()
        subprocess.run(cmd, cwd=dest, check=True)
        assert (dest / "usr/bin/prog").read_bytes() == b"PAYLOAD-FROM-FILE"
        assert os.readlink(dest / "bin") == "usr/bin"
        assert (dest / "unicodé").read_bytes() == b"u"
        assert (dest / "a/link").read_bytes() == b"linked"
        assert os.stat(dest / "a/link").st_ino == os.stat(dest / "z/file").st_ino
        assert int(os.stat(dest / "usr/bin/prog").st_mtime) == MTIME


def test_later_add_wins_and_directories_merge():
    tree = Tree()
    tree.add_bytes("etc/motd", b"one")
    tree.add_bytes("etc/motd", b"two", mode=0o600)
    assert tree.get("etc/motd").source.read() == b"two" and tree.get("etc/motd").mode == 0o600
    tree.add_bytes("opt/x/y", b"y")
    tree.add_dir("opt/x", mode=0o700)  # a directory over a directory keeps its children
    assert tree.get("opt/x").mode == 0o700 and tree.get("opt/x/y") is not None
    tree.add_symlink("opt/x", "/elsewhere")  # anything else over a directory replaces the subtree
    assert tree.get("opt/x/y") is None and [e.path for e in tree] == ["etc", "etc/motd", "opt", "opt/x"]
    tree.remove("etc")
    assert [e.path for e in tree] == ["opt", "opt/x"]
    with pytest.raises(BuildError, match="is a symlink, not a directory"):
        tree.add_bytes("opt/x/through-link", b"")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        tree.add_bytes("../x", b"")


def test_hard_link_content_sits_on_the_first_path_and_survives_removal():
    tree = Tree()
    tree.add_bytes("z/busybox", b"BB", mode=0o755)
    tree.add(Entry("m/sh", "hardlink", 0, linkname="z/busybox"))
    tree.add(Entry("b/ls", "hardlink", 0, linkname="m/sh"))  # a link to a link joins the same group
    got = {e.path: e for e in tree}
    assert got["b/ls"].type == "file" and got["b/ls"].source.read() == b"BB" and got["b/ls"].mode == 0o755
    assert (got["m/sh"].type, got["m/sh"].linkname) == ("hardlink", "b/ls")
    assert (got["z/busybox"].type, got["z/busybox"].linkname) == ("hardlink", "b/ls")
    tree.remove("z/busybox")  # the holder goes: a link inherits the content, as unlink does
    got = {e.path: e for e in tree}
    assert got["b/ls"].source.read() == b"BB" and got["m/sh"].linkname == "b/ls"
    tree.add_bytes("b/ls", b"new")  # replacing one name leaves the other with the old content
    got = {e.path: e for e in tree}
    assert got["m/sh"].type == "file" and got["m/sh"].source.read() == b"BB"
    assert got["b/ls"].source.read() == b"new"
    with pytest.raises(BuildError, match="not in the tree"):
        tree.add(Entry("x", "hardlink", 0, linkname="missing"))


def test_graft_and_read_tar_round_trip(tmp_path):
    rootfs = Tree()
    rootfs.add_bytes("bin/busybox", b"BB", mode=0o755)
    rootfs.add(Entry("bin/sh", "hardlink", 0, linkname="bin/busybox"))
    rootfs.add_symlink("lib", "usr/lib")
    tree = Tree()
    tree.graft("containers/onboot/000-x/rootfs", rootfs)
    tree.graft("", rootfs)
    paths = [e.path for e in tree]
    assert "containers/onboot/000-x/rootfs/bin/sh" in paths and "bin/sh" in paths
    sh = tree.get("containers/onboot/000-x/rootfs/bin/sh")
    assert sh.type == "hardlink" and sh.linkname == "containers/onboot/000-x/rootfs/bin/busybox"
    tar = tmp_path / "t.tar"
    with open(tar, "wb") as out:
        first = write_tar(tree, out, MTIME)
    again = read_tar(tar)
    buf = io.BytesIO()
    assert write_tar(again, buf, MTIME) == first
    assert again.get("bin/busybox").source == FileContent(tar, again.get("bin/busybox").source.offset, 2)


def test_short_source_is_a_build_error(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"abc")
    tree = Tree()
    tree.add(Entry("f", "file", 0o644, size=10, source=FileContent(blob, 0, 10)))
    with pytest.raises(BuildError, match="ended 7 bytes early"):
        write_tar(tree, io.BytesIO(), 0)
