"""``tar``: the canonical tar itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mobykit.image.outputs import OutputContext, Staged, register


@register("tar")
def output_tar(ctx: OutputContext) -> list[Path]:
    """``NAME.tar``: the canonical tar itself (a hard link when it is on the same filesystem)."""
    with Staged(ctx.outdir) as staged:
        tmp = staged.path(f"{ctx.name}.tar")
        tmp.unlink(missing_ok=True)
        try:
            os.link(ctx.tar_path, tmp)
        except OSError:
            shutil.copyfile(ctx.tar_path, tmp)
        return staged.commit()
