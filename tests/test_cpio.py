"""The newc writer: readable by GNU cpio and bsdtar, hard links stored once, byte-reproducible."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess

import pytest

from mobykit.image.cpio import write_newc
from mobykit.image.tree import BytesContent, Entry, FileContent, Tree

MTIME = 1_600_000_000


def _tree(tmp_path, order_seed: int | None = None) -> Tree:
    blob = tmp_path / "blob"
    if not blob.exists():
        blob.write_bytes(b"....ELF-binary-bytes" + bytes(range(256)) * 40)
    entries = [
        Entry("bin/busybox", "file", 0o755, size=16 + 256 * 40, source=FileContent(blob, 4, 16 + 256 * 40)),
        Entry("bin/sh", "hardlink", 0, linkname="bin/busybox"),
        Entry("sbin/init", "hardlink", 0, linkname="bin/busybox"),
        Entry("etc/odd", "file", 0o600, uid=1000, gid=1001, size=3, source=None),
        Entry("lib", "symlink", 0o777, linkname="usr/lib"),
        Entry("dev/console", "char", 0o600, devmajor=5, devminor=1),
        Entry("run/fifo", "fifo", 0o644),
        Entry("empty", "file", 0o644),
        Entry("etc/unicodé", "file", 0o644, size=1),
    ]
    entries[3].source = BytesContent(b"odd")
    entries[8].source = BytesContent(b"u")
    if order_seed is not None:
        # holders must exist before their links are added; shuffle the rest
        head, rest = entries[:1], entries[3:]
        random.Random(order_seed).shuffle(rest)
        entries = head + rest + entries[1:3]
    tree = Tree()
    for e in entries:
        tree.add(e)
    return tree


def _newc(tree: Tree) -> bytes:
    buf = io.BytesIO()
    write_newc(tree, buf, MTIME)
    return buf.getvalue()


def _parse(data: bytes) -> list[dict]:
    """A strict newc reader for the assertions (independent of the writer's code)."""
    out, pos = [], 0
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    while True:
        assert pos % 4 == 0 and data[pos : pos + 6] == b"070701"
        fields = dict(zip(names, (int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)), strict=True))
        name_end = pos + 110 + fields["namesize"]
        fields["name"] = data[pos + 110 : name_end - 1].decode("utf-8")
        assert data[name_end - 1] == 0
        pos = name_end + (-name_end % 4)
        fields["data"] = data[pos : pos + fields["filesize"]]
        pos += fields["filesize"] + (-fields["filesize"] % 4)
        out.append(fields)
        if fields["name"] == "TRAILER!!!":
            assert pos == len(data)
            return out


def test_headers_are_fixed_and_hard_links_carry_data_once(tmp_path):
    members = _parse(_newc(_tree(tmp_path)))
    by = {m["name"]: m for m in members}
    assert [m["name"] for m in members][:-1] == [e.path for e in _tree(tmp_path)]
    assert all(m["mtime"] == MTIME for m in members[:-1])
    first_seen = list(dict.fromkeys(m["ino"] for m in members[:-1]))
    assert first_seen == list(range(1, len(first_seen) + 1))  # numbered in archive order
    group = [by[p] for p in ("bin/busybox", "bin/sh", "sbin/init")]
    assert len({m["ino"] for m in group}) == 1 and all(m["nlink"] == 3 for m in group)
    assert [len(m["data"]) for m in group] == [0, 0, 16 + 256 * 40]  # the last of the group carries it
    assert group[2]["data"].startswith(b"ELF-binary-bytes")
    assert by["lib"]["mode"] == 0o120777 and by["lib"]["data"] == b"usr/lib"
    assert by["dev/console"]["mode"] == 0o020600 and (by["dev/console"]["rdevmajor"], by["dev/console"]["rdevminor"]) == (5, 1)
    assert (by["etc/odd"]["uid"], by["etc/odd"]["gid"], by["etc/odd"]["data"]) == (1000, 1001, b"odd")
    assert by["etc"]["mode"] == 0o040755 and by["etc"]["nlink"] == 2


def test_reproducible_whatever_the_insertion_order(tmp_path):
    assert len({_newc(_tree(tmp_path, seed)) for seed in (None, 1, 2, 3)}) == 1


def _extract_checks(dest):
    assert (dest / "bin/busybox").read_bytes().startswith(b"ELF-binary-bytes")
    assert os.stat(dest / "bin/sh").st_ino == os.stat(dest / "bin/busybox").st_ino == os.stat(dest / "sbin/init").st_ino
    assert (dest / "sbin/init").stat().st_size == 16 + 256 * 40
    assert os.readlink(dest / "lib") == "usr/lib"
    assert (dest / "etc/odd").read_bytes() == b"odd" and (dest / "etc/odd").stat().st_mode & 0o7777 == 0o600
    assert (dest / "etc/unicodé").read_bytes() == b"u"
    assert (dest / "empty").stat().st_size == 0


def test_gnu_cpio_lists_and_extracts(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(_newc(_tree(tmp_path)))
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=open(archive, "rb"), capture_output=True, check=True, text=True).stdout
    assert "crw-------" in listing and "5,   1" in listing.replace("5,  1", "5,   1")
    names = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(archive, "rb"), capture_output=True, check=True, text=True).stdout
    assert names.split() == [e.path for e in _tree(tmp_path)]
    dest = tmp_path / "x"
    dest.mkdir()
    # devices need CAP_MKNOD; extract everything else
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames", "-f", "dev/console"],
                   stdin=open(archive, "rb"), cwd=dest, check=True)
    _extract_checks(dest)
    assert int((dest / "etc/odd").stat().st_mtime) == MTIME


@pytest.mark.skipif(not shutil.which("bsdtar"), reason="bsdtar (libarchive-tools) not installed")
def test_bsdtar_extracts(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(_newc(_tree(tmp_path)))
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["bsdtar", "-xf", str(archive), "--exclude", "dev/console"], cwd=dest, check=True)
    _extract_checks(dest)
