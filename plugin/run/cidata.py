"""A NoCloud "cidata" ISO: how user data reaches a qemu or libvirt guest without a metadata server.

cloud-init's NoCloud datasource (and our init) look for an ISO9660 volume labelled ``cidata``
holding ``user-data`` and ``meta-data``. The ISO is made with xorriso (the maintained tool; no
Python ISO writer is both reproducible and packaged here). Reproducibility: every file, the root
directory and the volume dates are pinned to SOURCE_DATE_EPOCH (0 unless the caller's environment
sets it), so the same data gives the same bytes and a content hash of the ISO is meaningful.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from mobykit.errors import BuildError, InvalidArgument

LABEL = "cidata"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def make_iso(out: Path, user_data: str | bytes, meta_data: str | bytes = "",
             extra: dict[str, bytes] | None = None) -> Path:
    """Write a NoCloud ISO to ``out`` atomically and return ``out``.

    ``extra`` adds more top-level files (e.g. ``network-config``); names are plain file names.
    """
    out = Path(out)
    files: dict[str, bytes] = {"user-data": _bytes(user_data), "meta-data": _bytes(meta_data)}
    for name, data in (extra or {}).items():
        if not _NAME.match(name) or name in files:
            raise InvalidArgument(f"cidata: extra file name {name!r} is not a plain, new file name")
        files[name] = _bytes(data)
    xorriso = shutil.which("xorriso")
    if not xorriso:
        raise BuildError("cidata: xorriso is not installed (apt-get install xorriso)")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stage = Path(tmp) / "root"
        stage.mkdir(mode=0o755)
        for name in sorted(files):
            p = stage / name
            p.write_bytes(files[name])
            p.chmod(0o644)
            os.utime(p, (epoch, epoch))
        stage.chmod(0o755)
        os.utime(stage, (epoch, epoch))
        part = Path(tmp) / "cidata.iso"
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch))
        r = subprocess.run(
            [xorriso, "-as", "mkisofs", "-quiet", "-V", LABEL, "-J", "-R", "-preparer", "mobykit",
             "-o", str(part), str(stage)],
            capture_output=True, text=True, env=env, check=False,
        )
        if r.returncode != 0 or not part.exists():
            raise BuildError(f"cidata: xorriso failed making {out}: {r.stderr.strip()[-400:]}")
        os.replace(part, out)
    return out
