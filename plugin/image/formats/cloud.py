"""Cloud image formats: ``aws`` (``NAME.raw``) and ``gcp`` (``NAME.img.tar.gz``), LinuxKit's names.

Both are the raw-bios disk (MBR, syslinux) at a whole number of GiB (``--size`` rounded up; by
default 1 GiB, or more when the image needs it): GCE requires whole GiB, EC2 volumes are sized
in GiB. Why BIOS: both clouds boot imported disks with BIOS unless told otherwise (GCE images
need the UEFI_COMPATIBLE guest feature, EC2 AMIs ``--boot-mode uefi``), and both attach the
serial console as ttyS0, which syslinux and the spec's ``console=ttyS0`` use.

``gcp`` is what GCE's image import takes: a gzip-compressed tar holding exactly one file,
``disk.raw``, in the old GNU format with the disk's zeros as holes (``disk.sparsetar``), owner
root, mode 0644, the build's mtime; the gzip header has no name and mtime 0.
"""

from __future__ import annotations

from pathlib import Path

from mobykit.image.disk import sparsetar
from mobykit.image.formats.raw import disk, publish
from mobykit.image.outputs import OutputContext, Staged, register
from mobykit.image.pgzip import ParallelGzip

GCP_MEMBER = "disk.raw"  # the one name GCE's import accepts


@register("aws")
def output_aws(ctx: OutputContext) -> list[Path]:
    """``NAME.raw``: the raw-bios disk in whole GiB, for EC2's snapshot import."""
    return publish(ctx, disk(ctx, "bios", fmt="aws", whole_gib=True), f"{ctx.name}.raw")


@register("gcp")
def output_gcp(ctx: OutputContext) -> list[Path]:
    """``NAME.img.tar.gz``: ``disk.raw`` (the raw-bios disk in whole GiB) in a sparse gzip'd tar."""
    raw = disk(ctx, "bios", fmt="gcp", whole_gib=True)
    with Staged(ctx.outdir) as staged:
        with open(staged.path(f"{ctx.name}.img.tar.gz"), "wb") as out:
            gz = ParallelGzip(out)
            try:
                sparsetar.write(gz, raw, GCP_MEMBER, mtime=ctx.mtime)
            except BaseException:
                gz.abort()
                raise
            gz.close()
        return staged.commit()
