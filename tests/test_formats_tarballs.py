"""tar-kernel-initrd, docker and kernel+squashfs: LinuxKit's file names and members, the tree's
metadata kept exactly (squashfs), every path once (docker), byte-reproducible builds (two
directories, two times)."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from harness.images import SPEC, standard_images
from mobykit.errors import MissingTool
from mobykit.image.build import build
from mobykit.image.cache import Cache
from mobykit.image.disk import tools
from mobykit.image.outputs import FORMATS, OutputContext
from mobykit.image.tree import BytesContent, Entry, Tree, write_tar

UCODE = b"070701" + b"0" * 106 + b"UCODE..."  # 120 bytes: a stand-in early microcode cpio
FORMAT_FILES = {
    "tar-kernel-initrd": ["moby-initrd.tar"],
    "docker": ["moby.docker"],
    "kernel+squashfs": ["moby-cmdline", "moby-kernel", "moby-squashfs-initrd.img", "moby-squashfs.img"],
}


def _ctx(tar: Path, image_id: str, where: Path) -> OutputContext:
    (where / "out").mkdir(parents=True)
    (where / "work").mkdir()
    return OutputContext(name="moby", outdir=where / "out", tar_path=tar, image_id=image_id, mtime=0,
                         workdir=where / "work")


def _tar(tree: Tree, path: Path) -> tuple[Path, str]:
    with open(path, "wb") as out:
        return path, "sha256:" + write_tar(tree, out, 0)


def _tree(*, ucode: bool = False, cmdline: bytes = b"console=ttyS0 quiet") -> Tree:
    tree = Tree()
    tree.add_bytes("boot/kernel", b"bzImage" * 2000)
    tree.add_bytes("boot/cmdline", cmdline)
    if ucode:
        tree.add_bytes("boot/ucode.cpio", UCODE)
    tree.add_bytes("init", b"#!/bin/sh\n", mode=0o755)
    tree.add_bytes("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    tree.add(Entry("containers/onboot/000-x/lower/bin/busybox", "hardlink", 0, linkname="bin/busybox"))
    tree.add_symlink("bin/sh", "busybox")
    tree.add_dir("home/user", mode=0o700, uid=1000, gid=1000)
    tree.add_bytes("home/user/secret", b"s", mode=0o600, uid=1000, gid=100)
    tree.add_bytes("usr/bin/su", b"su", mode=0o4755)
    tree.add_dir("tmp", mode=0o1777)
    tree.add(Entry("dev/null", "char", 0o666, devmajor=1, devminor=3))
    tree.add(Entry("dev/sda", "block", 0o660, gid=6, devmajor=8, devminor=0))
    tree.add(Entry("run/fifo", "fifo", 0o600))
    tree.add(Entry("usr/bin/ping", "file", 0o755, size=4, source=BytesContent(b"ping"),
                   xattrs={"security.capability": b"\x01\x00\x00\x02"}))
    tree.add_bytes("lib/modules/6.1.0-test/modules.dep", b"")
    return tree


@pytest.fixture(scope="module")
def harness_tar(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("harness")
    (d / "example.yml").write_text(SPEC)
    (d / "app.json").write_text('{"app": true}\n')
    cache = Cache(d / "cache")
    standard_images(cache)
    build([d / "example.yml"], formats=["tar"], outdir=d / "out", cache=cache)
    tar = d / "out" / "example.tar"
    return tar, "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()


def test_each_format_is_byte_reproducible_across_directories_and_times(harness_tar, tmp_path):
    tar, image_id = harness_tar
    runs = []
    for i in (1, 2):
        ctx = _ctx(tar, image_id, tmp_path / f"run{i}")
        for fmt, names in FORMAT_FILES.items():
            assert sorted(p.name for p in FORMATS[fmt](ctx)) == names
        runs.append({p.name: p.read_bytes() for p in ctx.outdir.iterdir()})
        if i == 1:
            time.sleep(1.2)
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert runs[0][name] == runs[1][name], f"{name} differs between two builds"


def test_tar_kernel_initrd_has_linuxkits_members_and_splits_the_microcode(tmp_path):
    tar, image_id = _tar(_tree(ucode=True), tmp_path / "c.tar")
    ctx = _ctx(tar, image_id, tmp_path)
    FORMATS["kernel+initrd"](ctx)
    (path,) = FORMATS["tar-kernel-initrd"](ctx)
    assert path.name == "moby-initrd.tar"
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["kernel", "initrd.img", "cmdline", "ucode.cpio"]
        assert {(m.mode, m.uid, m.gid, m.mtime, m.type) for m in members} == {(0o644, 0, 0, 0, tarfile.REGTYPE)}
        data = {m.name: tf.extractfile(m).read() for m in members}
    assert data["kernel"] == b"bzImage" * 2000
    assert data["cmdline"] == b"console=ttyS0 quiet"
    assert data["ucode.cpio"] == UCODE
    whole = (ctx.outdir / "moby-initrd.img").read_bytes()  # kernel+initrd's: microcode first
    assert whole == UCODE + data["initrd.img"]
    assert b"etc/mobykit/image-id" in gzip.decompress(data["initrd.img"])


def test_tar_kernel_initrd_has_no_cmdline_member_for_an_empty_cmdline(tmp_path):
    tar, image_id = _tar(_tree(cmdline=b""), tmp_path / "c.tar")
    (path,) = FORMATS["tar-kernel-initrd"](_ctx(tar, image_id, tmp_path))
    with tarfile.open(path) as tf:
        assert tf.getnames() == ["kernel", "initrd.img"]


def test_docker_is_the_whole_tree_once_with_a_dockerfile(harness_tar, tmp_path):
    tar, image_id = harness_tar
    (path,) = FORMATS["docker"](_ctx(tar, image_id, tmp_path))
    assert path.name == "moby.docker"
    with tarfile.open(path) as tf:
        names = tf.getnames()
        dockerfile = tf.extractfile("Dockerfile").read().decode()
        assert tf.extractfile("etc/mobykit/image-id").read() == (image_id + "\n").encode()
    assert len(names) == len(set(names))  # docker import: every path once
    with tarfile.open(tar) as tf:
        assert set(tf.getnames()) | {"Dockerfile", "etc/mobykit", "etc/mobykit/image-id"} == set(names)
    assert dockerfile == 'FROM scratch\nCOPY . ./\nENTRYPOINT ["/init"]\n'


def test_docker_keeps_a_dockerfile_the_spec_ships(tmp_path):
    tree = _tree()
    tree.add_bytes("Dockerfile", b"FROM scratch\nCOPY . ./\nENTRYPOINT [\"/sbin/my-init\"]\n")
    tar, image_id = _tar(tree, tmp_path / "c.tar")
    (path,) = FORMATS["docker"](_ctx(tar, image_id, tmp_path))
    with tarfile.open(path) as tf:
        assert b"/sbin/my-init" in tf.extractfile("Dockerfile").read()


def test_squashfs_keeps_the_trees_metadata_exactly(tmp_path):
    tar, image_id = _tar(_tree(), tmp_path / "c.tar")
    ctx = _ctx(tar, image_id, tmp_path)
    FORMATS["kernel+squashfs"](ctx)
    image = ctx.outdir / "moby-squashfs.img"
    assert (ctx.outdir / "moby-cmdline").read_bytes() == b"console=ttyS0 quiet"  # unchanged, as LinuxKit
    assert (ctx.outdir / "moby-kernel").read_bytes() == b"bzImage" * 2000
    listing = subprocess.run(["unsquashfs", "-lln", "-d", "", str(image)], capture_output=True,
                             check=True).stdout.decode()
    rows = {}
    for line in listing.splitlines():  # mode uid/gid size-or-device date time path [-> target]
        parts = line.split()
        devices = parts[0].startswith(("c", "b"))
        rows[parts[6 if devices else 5] if len(parts) > (6 if devices else 5) else "/"] = (parts[0], parts[1])
    assert rows["/"] == ("drwxr-xr-x", "0/0")  # the root directory too, whatever the builder's umask
    assert rows["/home/user"] == ("drwx------", "1000/1000")
    assert rows["/home/user/secret"] == ("-rw-------", "1000/100")
    assert rows["/usr/bin/su"] == ("-rwsr-xr-x", "0/0")
    assert rows["/tmp"] == ("drwxrwxrwt", "0/0")
    assert rows["/run/fifo"] == ("prw-------", "0/0")
    assert not any(p == "/boot" or p.startswith("/boot/") for p in rows)  # the boot loader's files
    assert "/etc/mobykit/image-id" in rows
    assert "crw-rw-rw- 0/0" in listing and "1,  3" in listing and "brw-rw---- 0/6" in listing
    info = subprocess.run(["unsquashfs", "-s", str(image)], capture_output=True, check=True).stdout.decode()
    assert "Number of xattr ids 1" in info  # security.capability of usr/bin/ping
    assert "Creation or last append time Thu Jan  1 00:00:00 1970" in info
    dest = tmp_path / "x"
    subprocess.run(["unsquashfs", "-no-xattrs", "-d", str(dest), str(image), "bin", "containers"],
                   capture_output=True, check=True)
    assert os.stat(dest / "bin/busybox").st_ino == os.stat(dest / "containers/onboot/000-x/lower/bin/busybox").st_ino


def test_kernel_squashfs_ships_the_root_loader(tmp_path):
    tar, image_id = _tar(_tree(), tmp_path / "c.tar")
    ctx = _ctx(tar, image_id, tmp_path)
    FORMATS["kernel+squashfs"](ctx)
    loader = gzip.decompress((ctx.outdir / "moby-squashfs-initrd.img").read_bytes())
    members = subprocess.run(["cpio", "-it", "--quiet"], input=loader, capture_output=True, check=True).stdout.split()
    assert {b"init", b"bin/busybox", b"bin/modprobe", b"lib/modules/6.1.0-test/modules.dep",
            b"etc/mobykit/image-id"} <= set(members)
    assert image_id.encode() in loader and b"squashfs" in loader


def test_missing_mksquashfs_names_the_debian_package(harness_tar, tmp_path, monkeypatch):
    which = tools.shutil.which
    monkeypatch.setattr(tools.shutil, "which", lambda name: None if name == "mksquashfs" else which(name))
    tar, image_id = harness_tar
    ctx = _ctx(tar, image_id, tmp_path)
    with pytest.raises(MissingTool, match=r"mksquashfs is not installed \(Debian package squashfs-tools"):
        FORMATS["kernel+squashfs"](ctx)
    assert os.listdir(ctx.outdir) == []
