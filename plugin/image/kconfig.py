"""What the image's kernel was built with, and so which initrd compression it can unpack.

The initrd is compressed with LZ4 when the kernel says it unpacks LZ4 (``CONFIG_RD_LZ4=y``: a
fraction of gzip's unpacking time under TCG), else gzip, which every kernel we boot unpacks.
A kernel says so in one of two places:

- ``boot/config-<version>`` (or ``boot/config``) in the image, as a Debian kernel package and
  mobykit's own kernel recipes carry it (``boot/`` never goes into the initrd);
- its embedded config (``CONFIG_IKCONFIG``, LinuxKit's kernels): the bzImage's payload is
  decompressed and the gzip'd config between ``IKCFG_ST`` and ``IKCFG_ED`` read.

A kernel that says neither gets gzip. The kernel image is untrusted input: every length is
checked and decompression is bounded, and anything unexpected means "unknown", never an error
(the build goes on with gzip).
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import zlib

from mobykit.image import lz4legacy

MAX_VMLINUX = 512 << 20  # a decompressed kernel larger than this is not read for its config
_IK_START, _IK_END = b"IKCFG_ST", b"IKCFG_ED"


def config_from_tree(tree) -> str | None:
    """The text of the image's one ``boot/config-*`` (or ``boot/config``), if it has exactly one."""
    found = [e for e in tree if e.type == "file" and (e.path == "boot/config" or e.path.startswith("boot/config-"))]
    if len(found) != 1 or found[0].source is None:
        return None
    return b"".join(found[0].source.chunks()).decode("utf-8", "replace")


def _bounded(d, data: bytes) -> bytes | None:
    out = d.decompress(data, MAX_VMLINUX)
    return out if len(out) < MAX_VMLINUX else None


def _decompress_payload(payload: bytes) -> bytes | None:
    try:
        if payload.startswith(b"\x1f\x8b"):
            return _bounded(zlib.decompressobj(31), payload)
        if payload.startswith(b"\xfd7zXZ\x00"):
            return _bounded(lzma.LZMADecompressor(lzma.FORMAT_XZ), payload)
        if payload.startswith(b"\x5d\x00\x00"):
            return _bounded(lzma.LZMADecompressor(lzma.FORMAT_ALONE), payload)
        if payload.startswith(b"BZh"):
            return _bounded(bz2.BZ2Decompressor(), payload)
        if payload.startswith(b"\x28\xb5\x2f\xfd"):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as r:
                out = r.read(MAX_VMLINUX)
            return out if len(out) < MAX_VMLINUX else None
        if payload.startswith(lz4legacy.MAGIC):  # the kernel's build appends the 4-byte size
            return lz4legacy.decompress(payload[:-4], limit=MAX_VMLINUX)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, ImportError):
        return None
    return None  # lzo payloads: not read


def config_from_bzimage(kernel: bytes) -> str | None:
    """The embedded config of an x86 bzImage (boot protocol >= 2.08 gives the payload's place)."""
    if len(kernel) < 0x250 or kernel[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", kernel, 0x206)
    if version < 0x208:
        return None
    setup_sects = kernel[0x1F1] or 4
    offset, length = struct.unpack_from("<II", kernel, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if start + length > len(kernel) or length < 4:
        return None
    vmlinux = _decompress_payload(kernel[start:start + length])
    if not vmlinux:
        return None
    i = vmlinux.find(_IK_START)
    j = vmlinux.find(_IK_END, i + len(_IK_START)) if i >= 0 else -1
    if j < 0:
        return None
    try:
        d = zlib.decompressobj(31)
        text = d.decompress(vmlinux[i + len(_IK_START):j], 16 << 20)
    except zlib.error:
        return None
    return text.decode("utf-8", "replace")


def initrd_compression(config: str | None) -> str:
    """``lz4`` when the config builds in LZ4 initrd support, else ``gzip``."""
    if config and any(line.strip() == "CONFIG_RD_LZ4=y" for line in config.splitlines()):
        return "lz4"
    return "gzip"

