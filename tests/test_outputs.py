"""Output formats over the canonical tar: tar, and kernel+initrd as LinuxKit splits it."""

from __future__ import annotations

import gzip
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from mobykit.errors import BuildError
from mobykit.image.outputs import FORMATS, OutputContext
from mobykit.image.tree import Entry, Tree, write_tar

MTIME = 1_650_000_000


def _canonical(tmp_path, *, ucode: bool = False, kernel: bool = True) -> tuple[Path, str]:
    tree = Tree()
    if kernel:
        tree.add_bytes("boot/kernel", b"bzImage" * 1000)
    tree.add_bytes("boot/cmdline", b"console=ttyS0 quiet")
    tree.add_bytes("boot/extra", b"left out of the initrd")
    if ucode:
        tree.add_bytes("boot/ucode.cpio", b"070701" + b"0" * 106 + b"UCODE...")  # 120 bytes, 4-aligned
    tree.add_bytes("init", b"#!/bin/sh\n", mode=0o755)
    tree.add_bytes("bin/busybox", os.urandom(300_000), mode=0o755)
    tree.add(Entry("bin/sh", "hardlink", 0, linkname="bin/busybox"))
    tree.add_symlink("sbin", "bin")
    tree.add_dir("containers/onboot/000-x/rootfs")
    tar = tmp_path / "canonical.tar"
    with open(tar, "wb") as out:
        digest = write_tar(tree, out, MTIME)
    return tar, f"sha256:{digest}"


def _ctx(tmp_path, tar, image_id, name="moby") -> OutputContext:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return OutputContext(name=name, outdir=out, tar_path=tar, image_id=image_id, mtime=MTIME)


def test_kernel_initrd_splits_the_tree_as_linuxkit_does(tmp_path):
    tar, image_id = _canonical(tmp_path)
    ctx = _ctx(tmp_path, tar, image_id)
    paths = FORMATS["kernel+initrd"](ctx)
    assert sorted(p.name for p in paths) == ["moby-cmdline", "moby-initrd.img", "moby-kernel"]
    assert sorted(os.listdir(ctx.outdir)) == ["moby-cmdline", "moby-initrd.img", "moby-kernel"]  # no temp left
    assert (ctx.outdir / "moby-kernel").read_bytes() == b"bzImage" * 1000
    assert (ctx.outdir / "moby-cmdline").read_bytes() == b"console=ttyS0 quiet"
    initrd = ctx.outdir / "moby-initrd.img"
    subprocess.run(["gzip", "-t", str(initrd)], check=True)
    raw = initrd.read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\0\0\0\0"  # gzip: no name, mtime 0
    cpio = gzip.decompress(raw)
    names = subprocess.run(["cpio", "-it", "--quiet"], input=cpio, capture_output=True, check=True).stdout.decode().split()
    assert names == ["bin", "bin/busybox", "bin/sh", "containers", "containers/onboot", "containers/onboot/000-x",
                     "containers/onboot/000-x/rootfs", "etc", "etc/mobykit", "etc/mobykit/image-id",
                     "init", "sbin"]  # nothing from boot/; the image knows its id
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=dest, check=True)
    assert (dest / "etc/mobykit/image-id").read_text() == ctx.image_id + "\n"
    assert os.stat(dest / "bin/sh").st_ino == os.stat(dest / "bin/busybox").st_ino
    assert (dest / "init").stat().st_mode & 0o777 == 0o755


def test_kernel_initrd_is_reproducible_and_ucode_goes_first_uncompressed(tmp_path):
    tar, image_id = _canonical(tmp_path, ucode=True)
    first = FORMATS["kernel+initrd"](_ctx(tmp_path, tar, image_id))
    one = {p.name: p.read_bytes() for p in first}
    (tmp_path / "out").rename(tmp_path / "out1")
    second = FORMATS["kernel+initrd"](_ctx(tmp_path, tar, image_id))
    assert {p.name: p.read_bytes() for p in second} == one
    initrd = one["moby-initrd.img"]
    assert initrd.startswith(b"070701" + b"0" * 106 + b"UCODE...")
    rest = initrd[120:]
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    cpio = d.decompress(rest)
    assert d.eof and d.unused_data == b"" and cpio.endswith(b"TRAILER!!!\0\0\0\0")


def test_hard_link_group_spanning_boot_keeps_its_content(tmp_path):
    tree = Tree()
    tree.add_bytes("usr/lib/kernel.img", b"KERNEL")
    tree.add(Entry("boot/kernel", "hardlink", 0, linkname="usr/lib/kernel.img"))  # the content sits on boot/kernel
    tree.add_bytes("usr/lib/firmware.bin", b"FW")
    tree.add(Entry("boot/firmware.bin", "hardlink", 0, linkname="usr/lib/firmware.bin"))  # sorts first: holds the data
    tar = tmp_path / "c.tar"
    with open(tar, "wb") as out:
        image_id = "sha256:" + write_tar(tree, out, MTIME)
    ctx = _ctx(tmp_path, tar, image_id)
    FORMATS["kernel+initrd"](ctx)
    dest = tmp_path / "x"
    dest.mkdir()
    cpio = gzip.decompress((ctx.outdir / "moby-initrd.img").read_bytes())
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=dest, check=True)
    assert (dest / "usr/lib/firmware.bin").read_bytes() == b"FW"
    assert (dest / "usr/lib/kernel.img").read_bytes() == b"KERNEL"
    assert (ctx.outdir / "moby-kernel").read_bytes() == b"KERNEL"


def test_missing_kernel_is_a_build_error_naming_the_tar(tmp_path):
    tar, image_id = _canonical(tmp_path, kernel=False)
    ctx = _ctx(tmp_path, tar, image_id)
    with pytest.raises(BuildError, match=f"{tar}: no boot/kernel"):
        FORMATS["kernel+initrd"](ctx)
    assert os.listdir(ctx.outdir) == []


def test_tar_output_is_the_canonical_tar(tmp_path):
    tar, image_id = _canonical(tmp_path)
    ctx = _ctx(tmp_path, tar, image_id)
    assert FORMATS["tar"](ctx) == [ctx.outdir / "moby.tar"]
    assert (ctx.outdir / "moby.tar").read_bytes() == tar.read_bytes()
    assert os.listdir(ctx.outdir) == ["moby.tar"]
    # building again over an existing output replaces it
    assert FORMATS["tar"](ctx) == [ctx.outdir / "moby.tar"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kernel_initrd_boots_and_the_kernel_unpacks_our_cpio(tmp_path):
    """The real consumer of the initrd: Linux's initramfs unpacker (hard links with the data on
    the last member, a device node, symlinks), booted under qemu TCG."""
    from harness import guestkit as gk
    from mobykit.image.tree import FileContent

    parts = gk.parts()
    tree = Tree()
    kernel_size = parts.kernel.stat().st_size
    tree.add(Entry("boot/kernel", "file", 0o644, size=kernel_size, source=FileContent(parts.kernel, 0, kernel_size)))
    tree.add_bytes("boot/cmdline", b"console=ttyS0")
    bb = gk.BUSYBOX.stat().st_size
    tree.add(Entry("usr/bin/busybox", "file", 0o755, size=bb, source=FileContent(gk.BUSYBOX, 0, bb)))
    for name in ("sh", "cat", "stat", "readlink", "poweroff", "mount"):
        tree.add(Entry(f"bin/{name}", "hardlink", 0, linkname="usr/bin/busybox"))
    tree.add(Entry("dev/console", "char", 0o600, devmajor=5, devminor=1))
    tree.add_dir("proc")
    tree.add_symlink("lib64", "usr/lib")
    tree.add_bytes("etc/marker", b"canonical-cpio")
    tree.add_bytes("init", (
        b"#!/bin/sh\n"
        b"mount -t proc proc /proc\n"
        b'echo "INITRD-OK $(cat /etc/marker) $(stat -c %i /bin/sh)=$(stat -c %i /usr/bin/busybox)'
        b' $(stat -c %h /bin/cat) $(readlink /lib64) $(stat -c %t:%T /dev/console)"\n'
        b"poweroff -f\n"
    ), mode=0o755)
    tar = tmp_path / "c.tar"
    with open(tar, "wb") as out:
        image_id = "sha256:" + write_tar(tree, out, MTIME)
    ctx = _ctx(tmp_path, tar, image_id)
    FORMATS["kernel+initrd"](ctx)
    with gk.boot(ctx.outdir / "moby-kernel", ctx.outdir / "moby-initrd.img", tmp_path, http=False) as guest:
        m = guest.wait_for(r"INITRD-OK (\S+) (\d+)=(\d+) (\d+) (\S+) (\S+)", 150)
        assert m.group(1) == "canonical-cpio"
        assert m.group(2) == m.group(3)  # one inode: the kernel rebuilt the hard link
        assert m.group(4) == "7"  # busybox + 6 links
        assert m.group(5) == "usr/lib" and m.group(6) == "5:1"
        assert guest.wait_exit(60) == 0


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 7])
def test_parallel_gzip_is_one_ordinary_gzip_member_whatever_the_worker_count(tmp_path, size):
    import io
    import random

    from mobykit.image.outputs import ParallelGzip

    rng = random.Random(size)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randint(2, 9))) for _ in range(500)]
    data = b" ".join(rng.choices(words, k=size // 5 + 1))[:size]
    outputs = []
    for workers in (1, 2, 3):
        buf = io.BytesIO()
        gz = ParallelGzip(buf, workers=workers)
        for i in range(0, size, 300_001):  # writes that straddle block boundaries
            gz.write(data[i : i + 300_001])
        gz.close()
        outputs.append(buf.getvalue())
    assert len(set(outputs)) == 1  # reproducible: scheduling never shows in the bytes
    out = outputs[0]
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert d.decompress(out) == data and d.eof and d.unused_data == b""  # a single member
    (tmp_path / "x.gz").write_bytes(out)
    subprocess.run(["gzip", "-t", str(tmp_path / "x.gz")], check=True)
    assert len(out) <= len(gzip.compress(data, 6)) * 1.01 + 64  # as small as gzip -6, near enough
