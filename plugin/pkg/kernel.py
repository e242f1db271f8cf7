"""A LinuxKit-shaped kernel image from a Debian kernel package: ``kernel`` (the bzImage) and
``kernel.tar`` (the modules an image needs, and ``boot/config-<version>``) at the image root.

Why a module subset with our own ``modules.dep``: the Debian package carries 1100+ modules (tens
of MB in every initrd) and no modules.dep (its postinst runs depmod on the installed system). We
take the modules asked for plus what ``modinfo`` says they depend on, and run kmod's
``depmod -b`` over just those, so busybox ``modprobe`` works in the guest - by name, by device
modalias (the init's coldplug) and by the aliases the kernel asks for on first use (fs-iso9660,
rtnl-link-veth), all from the ``modules.alias`` depmod writes. The load order (deps first) is
written to ``etc/modules-load.d/mobykit.conf``: the init loads that whole list only with
``mobykit.modules=all``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mobykit.errors import BuildError
from mobykit.image.tree import Tree, write_tar
from mobykit.pkg.trees import dir_tree, materialize

MODULES_LOAD = "etc/modules-load.d/mobykit.conf"
FORMAT = 2  # what a kernel image holds; 2: boot/config-<version> added (part of the recipe's cache key)
_KO = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")
_AUX = ("modules.builtin", "modules.builtin.modinfo", "modules.order")


@dataclass
class KernelParts:
    version: str
    vmlinuz: Path
    kernel_tar: Path
    modules: list[str]  # load order


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not path:
        raise BuildError(f"{name} is not installed (apt-get install kmod)")
    return path


def build(pkg_tree: Tree, wanted: list[str], work: Path, where: str) -> KernelParts:
    vmlinuz = [e for e in pkg_tree if e.path.startswith("boot/vmlinuz-") and e.type == "file"]
    if len(vmlinuz) != 1:
        raise BuildError(f"{where}: expected one boot/vmlinuz-* in the kernel package, found {len(vmlinuz)}")
    version = vmlinuz[0].path[len("boot/vmlinuz-"):]
    mdir = f"lib/modules/{version}"
    available = {}
    for e in pkg_tree:
        if e.path.startswith(mdir + "/kernel/") and _KO.search(e.path) and e.type == "file":
            name = _KO.sub("", e.path.rsplit("/", 1)[1]).replace("-", "_")
            available[name] = e
    builtin = set()
    b = pkg_tree.get(f"{mdir}/modules.builtin")
    if b is not None and b.source is not None:
        for line in b.source.read().decode().split():
            builtin.add(_KO.sub("", line.rsplit("/", 1)[-1]).replace("-", "_"))

    root = work / "kmod"
    modinfo = _tool("modinfo")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise BuildError(f"{where}: module dependency cycle: {' -> '.join([*chain, name])}")
        if name not in available:
            if name in builtin:
                state[name] = "done"
                return
            raise BuildError(f"{where}: kernel.modules: {name!r} is neither a module nor built into kernel {version}")
        state[name] = "visiting"
        e = available[name]
        local = materialize(e, root / e.path)
        r = subprocess.run([modinfo, "-F", "depends", str(local)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise BuildError(f"{where}: modinfo {e.path}: {r.stderr.strip()}")
        for dep in sorted(d.replace("-", "_") for d in r.stdout.strip().split(",") if d):
            visit(dep, [*chain, name])
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, [])
    # The kernel's build config goes along in boot/ (never copied into the initrd): the image
    # builder reads it for what the kernel can unpack (mobykit/image/kconfig.py), and users for
    # what it was built with, as Debian's /boot/config-* and LinuxKit's /proc/config.gz serve.
    config = pkg_tree.get(f"boot/config-{version}")
    if config is not None and config.type == "file":
        materialize(config, root / config.path)
    for aux in _AUX:
        e = pkg_tree.get(f"{mdir}/{aux}")
        if e is not None:
            materialize(e, root / e.path)
    (root / mdir).mkdir(parents=True, exist_ok=True)
    r = subprocess.run([_tool("depmod"), "-b", str(root), version], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise BuildError(f"{where}: depmod failed: {r.stderr.strip()}")
    if not (root / mdir / "modules.dep").exists():
        raise BuildError(f"{where}: depmod wrote no modules.dep")
    load = root / MODULES_LOAD
    load.parent.mkdir(parents=True, exist_ok=True)
    load.write_text("".join(f"{m}\n" for m in order))
    tar = work / "kernel.tar"
    with open(tar, "wb") as f:
        write_tar(dir_tree(root), f, mtime=0)
    out = work / "vmlinuz"
    materialize(vmlinuz[0], out)
    return KernelParts(version, out, tar, order)
