"""The initrd's cpio is LZ4 (the kernel's legacy frame) when the image's kernel unpacks LZ4, else gzip.

The kernel is the reader that matters, and the boot tests boot LZ4 initrds of Debian's kernel
(its boot/config-* says CONFIG_RD_LZ4=y). Here: the frame as the kernel reads it (checked with
the lz4 command's own legacy reader, an independent implementation), the choice from each place a
kernel says what it unpacks, reproducibility, and untrusted kernel images that say nothing.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import random
import shutil
import struct
import subprocess
import zlib

import pytest
import zstandard

from mobykit.image import kconfig, lz4legacy
from mobykit.image.outputs import FORMATS, OutputContext
from mobykit.image.tree import Tree, write_tar

MTIME = 1_650_000_000
LZ4_CONFIG = b"# Linux/x86 6.1.0 Kernel Configuration\nCONFIG_RD_GZIP=y\nCONFIG_RD_LZ4=y\n"
GZIP_ONLY = b"CONFIG_RD_GZIP=y\n# CONFIG_RD_LZ4 is not set\n"


def _lz4_cli_decompress(data: bytes) -> bytes:
    """The lz4 tool's reader: it recognises the legacy magic by itself (no -l needed to read)."""
    lz4 = shutil.which("lz4")
    assert lz4, "the lz4 command is installed by make setup (APT_PACKAGES)"
    return subprocess.run([lz4, "-dc"], input=data, capture_output=True, check=True).stdout


def test_legacy_frame_is_what_the_lz4_tool_and_the_kernel_read(tmp_path):
    # 20 MiB, mixed compressible and random: three blocks, the last one short
    data = (b"mobykit initrd " * 50_000 + os.urandom(1 << 20)) * 10
    data = data[: 20 << 20]
    with open(tmp_path / "x.lz4", "wb") as f:
        w = lz4legacy.Lz4Legacy(f)
        for i in range(0, len(data), 100_000):
            w.write(data[i:i + 100_000])
        w.close()
    raw = (tmp_path / "x.lz4").read_bytes()
    assert raw[:4] == b"\x02\x21\x4c\x18"
    # framing: size words that add up exactly to the file, every block at most 8 MiB unpacked
    pos, blocks = 4, []
    while pos < len(raw):
        (size,) = struct.unpack_from("<I", raw, pos)
        blocks.append(raw[pos + 4:pos + 4 + size])
        pos += 4 + size
    assert pos == len(raw) and len(blocks) == 3
    assert _lz4_cli_decompress(raw) == data
    assert lz4legacy.decompress(raw) == data
    assert len(raw) < len(data) * 0.6  # it does compress


def _lz4(data: bytes) -> bytes:
    buf = io.BytesIO()
    w = lz4legacy.Lz4Legacy(buf)
    w.write(data)
    w.close()
    return buf.getvalue()


def test_legacy_reader_refuses_damage():
    raw = _lz4(b"abc" * 10_000)
    with pytest.raises(ValueError, match="magic"):
        lz4legacy.decompress(b"\x1f\x8b" + raw)
    with pytest.raises(ValueError, match="needs"):
        lz4legacy.decompress(raw[:-5])
    with pytest.raises(ValueError, match="more than"):
        lz4legacy.decompress(raw, limit=1000)


def _bzimage(payload: bytes, *, version: int = 0x20F, setup_sects: int = 4) -> bytes:
    """An x86 boot sector and setup header as the boot protocol lays them out, then the payload."""
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, version)
    struct.pack_into("<II", head, 0x248, 0x100, len(payload))
    return bytes(head) + b"\0" * 0x100 + payload


def _vmlinux(config: bytes) -> bytes:
    return os.urandom(5000) + b"IKCFG_ST" + gzip.compress(config, mtime=0) + b"IKCFG_ED" + os.urandom(3000)


@pytest.mark.parametrize("codec", ["gzip", "xz", "zstd", "lz4"])
def test_embedded_config_is_read_from_the_bzimage_payload(codec):
    vm = _vmlinux(LZ4_CONFIG)
    if codec == "gzip":
        payload = gzip.compress(vm, mtime=0)
    elif codec == "xz":
        payload = lzma.compress(vm, format=lzma.FORMAT_XZ)
    elif codec == "zstd":
        payload = zstandard.ZstdCompressor().compress(vm)
    else:
        payload = _lz4(vm)
    payload += struct.pack("<I", len(vm))  # the kernel's build appends the unpacked size
    text = kconfig.config_from_bzimage(_bzimage(payload))
    assert text == LZ4_CONFIG.decode()
    assert kconfig.initrd_compression(text) == "lz4"


@pytest.mark.parametrize("kernel", [
    b"",  # nothing
    b"MZ" + b"\0" * 5000,  # no setup header
    _bzimage(b"", version=0x206),  # boot protocol too old to say where the payload is
    _bzimage(gzip.compress(b"no config embedded" * 100, mtime=0)),
    _bzimage(gzip.compress(b"x" * 100 + b"IKCFG_ST" + b"not gzip" + b"IKCFG_ED", mtime=0)),
    _bzimage(b"\x1f\x8b" + os.urandom(2000)),  # corrupt payload
    _bzimage(zlib.compress(b"unknown codec")),
])
def test_a_kernel_that_says_nothing_gets_gzip(kernel):
    assert kconfig.config_from_bzimage(kernel) is None
    assert kconfig.initrd_compression(None) == "gzip"


def test_payload_claiming_more_than_the_file_is_unknown():
    k = bytearray(_bzimage(gzip.compress(_vmlinux(LZ4_CONFIG), mtime=0)))
    struct.pack_into("<II", k, 0x248, 0x100, len(k))  # length past the end
    assert kconfig.config_from_bzimage(bytes(k)) is None


def _canonical(tmp_path, config: bytes | None, name: str) -> tuple:
    tree = Tree()
    tree.add_bytes("boot/kernel", b"bzImage" * 1000)
    tree.add_bytes("boot/cmdline", b"console=ttyS0")
    if config is not None:
        tree.add_bytes("boot/config-6.1.0-test", config)
    tree.add_bytes("init", b"#!/bin/sh\n", mode=0o755)
    tree.add_bytes("bin/busybox", random.Random(7).randbytes(200_000) + b"\0" * 300_000, mode=0o755)
    tar = tmp_path / f"{name}.tar"
    with open(tar, "wb") as out:
        digest = write_tar(tree, out, MTIME)
    out = tmp_path / name
    out.mkdir()
    return OutputContext(name="moby", outdir=out, tar_path=tar, image_id=f"sha256:{digest}", mtime=MTIME)


def _names(cpio: bytes) -> list[str]:
    return subprocess.run(["cpio", "-it", "--quiet"], input=cpio, capture_output=True,
                          check=True).stdout.decode().split()


def test_kernel_with_lz4_gets_an_lz4_initrd_reproducibly_and_without_boot(tmp_path):
    a = _canonical(tmp_path, LZ4_CONFIG, "a")
    b = _canonical(tmp_path, LZ4_CONFIG, "b")
    FORMATS["kernel+initrd"](a)
    FORMATS["kernel+initrd"](b)
    raw = (a.outdir / "moby-initrd.img").read_bytes()
    assert raw[:4] == lz4legacy.MAGIC
    assert raw == (b.outdir / "moby-initrd.img").read_bytes()  # same inputs, same bytes
    names = _names(_lz4_cli_decompress(raw))
    assert "etc/mobykit/image-id" in names and "bin/busybox" in names
    assert not any(n.startswith("boot") for n in names)  # the config stays out, as all of boot/


@pytest.mark.parametrize("config", [None, GZIP_ONLY])
def test_kernel_without_lz4_or_that_says_nothing_gets_gzip(tmp_path, config):
    ctx = _canonical(tmp_path, config, "g")
    FORMATS["kernel+initrd"](ctx)
    raw = (ctx.outdir / "moby-initrd.img").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert "etc/mobykit/image-id" in _names(gzip.decompress(raw))
