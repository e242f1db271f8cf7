"""A tiny bootable kernel+initrd for tests that exercise ``mobykit run qemu`` without a full build.

The kernel and its modules come from the ``kernel`` package recipe (built into the test's cache
from the shared .deb cache); the initrd is busybox plus a /init whose behaviour is chosen on the
kernel command line (``mobykit.test=ready|notready|silent|data|http|poweroff``), so one initrd
serves every case. The /init prints the same console lines as the real init.
"""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

from mobykit.image.cache import Cache
from mobykit.image.cpio import write_newc
from mobykit.image.tree import Entry, FileContent, Tree, read_tar

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "specs" / "pkgs"

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /www /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules-load.d/mobykit.conf); do modprobe "$m" 2>/dev/null; done
mode=$(sed -n 's/.*mobykit\.test=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "tinyvm: mode $mode"
case "$mode" in
ready) echo "mobykit: ready sha256:feedface" ;;
notready) echo "mobykit: onboot 000-check failed: exit 3"; echo "mobykit: not ready sha256:feedface (onboot 000-check failed)" ;;
silent) ;;
poweroff) echo "tinyvm: goodbye"; poweroff -f ;;
data)
	for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/sr0 ] && break; sleep 0.5; done
	mount -t iso9660 -o ro /dev/sr0 /mnt && echo "userdata: $(cat /mnt/user-data)"
	echo "mobykit: ready sha256:feedface" ;;
http)
	ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
	echo "tinyvm page" >/www/index.html
	httpd -p 80 -h /www
	echo "mobykit: ready sha256:feedface" ;;
esac
while :; do sleep 600; done
"""


def build_tinyvm(outdir: Path, cache: Cache, name: str = "tiny") -> Path:
    """Write NAME-kernel and NAME-initrd.img into ``outdir``; return the NAME prefix path."""
    from mobykit.pkg.build import build

    ref = build(RECIPES / "kernel", cache=cache).ref
    info = cache.resolve(ref, "amd64")
    work = outdir / ".tinyvm"
    work.mkdir(parents=True)
    try:
        layer = work / "layer.tar"
        with gzip.open(cache.blob_path(info.layers[0].digest)) as src, open(layer, "wb") as dst:
            shutil.copyfileobj(src, dst)
        kimg = read_tar(layer)
        prefix = outdir / name
        Path(f"{prefix}-kernel").write_bytes(kimg.get("kernel").source.read())
        ktar = work / "kernel.tar"
        ktar.write_bytes(kimg.get("kernel.tar").source.read())
        tree = Tree()
        tree.graft("", read_tar(ktar))
        busybox = shutil.which("busybox") or "/bin/busybox"
        size = Path(busybox).stat().st_size

        tree.add(Entry(path="bin/busybox", type="file", mode=0o755, size=size, source=FileContent(Path(busybox), 0, size)))
        tree.add_bytes("init", INIT.encode(), mode=0o755)
        buf = io.BytesIO()
        write_newc(tree, buf, mtime=0)
        Path(f"{prefix}-initrd.img").write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return prefix


def set_mode(prefix: Path, mode: str, extra: str = "") -> None:
    Path(f"{prefix}-cmdline").write_text(f"quiet mobykit.test={mode} {extra}".strip() + "\n")
