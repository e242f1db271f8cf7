"""The firmware a qemu guest boots with: SeaBIOS for BIOS formats, Debian's OVMF for EFI ones.

Why nothing for BIOS: qemu's ``pc`` machine runs SeaBIOS (Debian's ``seabios`` package, a
dependency of qemu-system-x86) unless told otherwise, and direct kernel boot goes through it too.

Why OVMF as two pflash drives: the code is shared and must never change (read-only), while the
variable store is written by the firmware at every boot (boot entries, the console's settings). Each
boot gets its own copy of the pristine ``OVMF_VARS`` template in the run's temp directory, removed
with it, so no boot sees another's variables and the system's template is never written.

Debian 12's ``ovmf`` ships two matched pairs: the 4 MiB build (what libvirt and Debian prefer) and
the older 2 MiB one; a code file only works with the variable store of its own size.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mobykit.errors import InvalidArgument, MissingTool

Firmware = Literal["bios", "efi"]
FIRMWARES: tuple[Firmware, ...] = ("bios", "efi")
OVMF_DIR = Path("/usr/share/OVMF")
# (code, variable store template), best first.
OVMF_PAIRS = (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd"))


@dataclass(frozen=True)
class Ovmf:
    code: Path  # attached read-only
    vars: Path  # the template each boot copies


def find_ovmf(where: Path = OVMF_DIR) -> Ovmf:
    """The first complete OVMF pair installed under ``where``; MissingTool (exit 2) naming the package."""
    for code, template in OVMF_PAIRS:
        if (where / code).is_file() and (where / template).is_file():
            return Ovmf(where / code, where / template)
    raise MissingTool(f"EFI firmware (OVMF) not found in {where}: apt-get install ovmf")


def qemu_args(firmware: str, scratch: Path, *, ovmf_dir: Path = OVMF_DIR) -> list[str]:
    """qemu arguments for ``firmware``. For EFI, the variable store is copied into ``scratch``
    (the caller's temp directory, which it removes when qemu has stopped)."""
    if firmware == "bios":
        return []
    if firmware != "efi":
        raise InvalidArgument(f"firmware {firmware!r}: must be one of {', '.join(FIRMWARES)}")
    ovmf = find_ovmf(ovmf_dir)
    store = scratch / "OVMF_VARS.fd"
    shutil.copyfile(ovmf.vars, store)
    store.chmod(0o600)
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={store}",
    ]  # fmt: skip
