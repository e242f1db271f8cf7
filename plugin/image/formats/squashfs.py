"""``kernel+squashfs``, as LinuxKit names it: ``NAME-kernel``, ``NAME-squashfs.img`` (the root file
system: everything but ``boot/``, plus ``etc/mobykit/image-id``) and ``NAME-cmdline`` (the spec's
command line, unchanged: LinuxKit's runners add ``root=/dev/vda`` for the squashfs disk, and our
loader honours that ``root=`` too).

Where we differ: one more file, ``NAME-squashfs-initrd.img``, the root loader of
``disk.rootfs``. LinuxKit boots the kernel alone (its kernels have virtio_blk and squashfs built
in); Debian's kernel has them as modules, so the loader loads them, finds the squashfs by the image
id (on whichever disk it is, ``root=`` first), puts a tmpfs overlay over it and starts ``/init``.
Boot with ``-kernel NAME-kernel -initrd NAME-squashfs-initrd.img -append "$(cat NAME-cmdline)"``
and the image as a (read-only) disk. The kernel image must have the ``squashfs`` module
(``specs/pkgs/kernel`` lists the modules it keeps).

How: ``mksquashfs -tar`` (squashfs-tools 4.5) reads the root tree as a tar on its standard input,
so owners, modes, device nodes, hard links and xattrs are exactly the tree's, with no staging
directory and no privilege; ``-reproducible`` with every time (creation, files, root) set to the
build's timestamp makes it byte-reproducible.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mobykit.errors import BuildError
from mobykit.image.disk import tools
from mobykit.image.disk.rootfs import loader_initrd, root_tree
from mobykit.image.formats.initrd import boot_files, link_or_copy
from mobykit.image.outputs import OutputContext, Staged, register
from mobykit.image.tree import Tree, write_tar


def make_squashfs(out: Path, tree: Tree, *, mtime: int, scratch: Path) -> Path:
    """Write ``tree`` as a squashfs image at ``out`` (root directory 0755 root:root)."""
    tar = scratch / "root.tar"
    with open(tar, "wb") as f:
        write_tar(tree, f, mtime)
    # Explicit times instead of SOURCE_DATE_EPOCH: mksquashfs refuses both at once.
    env = {k: v for k, v in tools.env(mtime).items() if k != "SOURCE_DATE_EPOCH"}
    argv = [tools.need("mksquashfs"), "-", str(out), "-tar", "-noappend", "-reproducible", "-quiet", "-no-progress",
            "-mkfs-time", str(mtime), "-all-time", str(mtime), "-root-time", str(mtime),
            "-root-mode", "0755", "-root-uid", "0", "-root-gid", "0"]
    out.unlink(missing_ok=True)
    try:
        with open(tar, "rb") as stdin:
            r = subprocess.run(argv, stdin=stdin, capture_output=True, env=env, check=False)
    finally:
        tar.unlink(missing_ok=True)
    if r.returncode != 0:
        text = (r.stderr or r.stdout).decode(errors="replace").strip()[-2000:]
        raise BuildError(f"mksquashfs failed (exit status {r.returncode}): {text}")
    return out


@register("kernel+squashfs")
def output_kernel_squashfs(ctx: OutputContext) -> list[Path]:
    """``NAME-kernel``, ``NAME-squashfs.img``, ``NAME-cmdline``, ``NAME-squashfs-initrd.img``."""
    boot = boot_files(ctx)
    with Staged(ctx.outdir) as staged:
        link_or_copy(boot.kernel, staged.path(f"{ctx.name}-kernel"))
        image = staged.path(f"{ctx.name}-squashfs.img")
        make_squashfs(image, root_tree(ctx), mtime=ctx.mtime, scratch=ctx.scratch("squashfs"))
        os.chmod(image, 0o644)
        staged.path(f"{ctx.name}-cmdline").write_bytes(boot.cmdline_bytes)
        link_or_copy(loader_initrd(ctx), staged.path(f"{ctx.name}-squashfs-initrd.img"))
        return staged.commit()
