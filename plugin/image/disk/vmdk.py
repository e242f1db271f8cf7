"""Making ``qemu-img``'s streamOptimized VMDK reproducible: the descriptor's CID and extent name.

Why a hand-written fix-up: qemu-img (``-O vmdk -o subformat=streamOptimized``) writes a random
content id (``CID=``) into the embedded text descriptor, and names the extent after the file it
was written to (our staging name, not the final one); it has no option for either and no Python
library writes streamOptimized VMDKs. The descriptor is plain text in a fixed region of the
file (``descriptorOffset``/``descriptorSize`` sectors of the sparse extent header, VMware's
"Virtual Disk Format 1.1"), padded with NULs and covered by no checksum, so it is rewritten in
place at the same offset. Nothing else qemu-img writes there depends on time or chance.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

MAGIC = b"KDMV"
SECTOR = 512
HEADER = struct.Struct("<4sIIQQQQ")  # magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize
NO_PARENT = 0xFFFFFFFF  # the CID value that means "no parent"; never ours


def fixed_descriptor(text: str, *, cid: int, extent_name: str) -> str:
    """``text`` with ``CID`` set to ``cid`` and every extent line naming ``extent_name``."""
    if cid == NO_PARENT:
        cid -= 1
    text, n = re.subn(r"(?m)^CID=[0-9a-fA-F]+$", f"CID={cid:08x}", text)
    if n != 1:
        raise ValueError("VMDK descriptor without exactly one CID line")
    return re.sub(r'(?m)^((?:RW|RDONLY|NOACCESS) \d+ \w+ )"[^"\n]*"', lambda m: f'{m.group(1)}"{extent_name}"', text)


def fix(path: Path, *, cid: int, extent_name: str) -> None:
    """Rewrite the descriptor embedded in the VMDK at ``path`` (see the module docstring)."""
    with open(path, "r+b") as f:
        magic, _version, _flags, _capacity, _grain, offset, size = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC or not offset or not size:
            raise ValueError(f"{path}: not a VMDK sparse extent with an embedded descriptor")
        f.seek(offset * SECTOR)
        region = f.read(size * SECTOR)
        text = region.split(b"\0", 1)[0].decode("utf-8")
        new = fixed_descriptor(text, cid=cid, extent_name=extent_name).encode("utf-8")
        if len(new) >= len(region):
            raise ValueError(f"{path}: the fixed descriptor does not fit its {len(region)}-byte region")
        f.seek(offset * SECTOR)
        f.write(new.ljust(len(region), b"\0"))
