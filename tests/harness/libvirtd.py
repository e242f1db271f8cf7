"""A private, unprivileged libvirt session daemon for tests, plus a tiny bootable kernel+initrd.

The daemon itself is ``mobykit.run.libvirtd`` (shared with ``make demo``): an unprivileged child
with every file in one temp dir, stopped by PID, the dir removed. This module adds the pytest
fixture (one daemon per test session) and the boot files.

The boot files are a Debian cloud kernel (``apt-get download``, cached under ``.cache/debs``) and a
busybox initrd whose /init prints ``mobykit: ready sha256:<id>`` on the serial console and sleeps,
which is all the readiness protocol needs, without waiting for the real image pipeline.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mobykit.run.libvirtd import (  # noqa: F401 - re-exported for tests
    DAEMON_UID,
    SessionLibvirtd,
    kill_domains,
    missing_tools,
    start_libvirtd,
    stop_libvirtd,
)

REPO = Path(__file__).resolve().parents[2]
DEBS = REPO / ".cache" / "debs"
POOL = "mobykit"


@pytest.fixture(scope="session")
def libvirtd_session() -> Iterator[SessionLibvirtd]:
    """A session libvirtd for the whole test session; yields its URI and config."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    daemon, proc = start_libvirtd()
    try:
        yield daemon
    finally:
        stop_libvirtd(daemon, proc)


# --- boot files -----------------------------------------------------------------------------


def guest_kernel() -> Path:
    """The Debian cloud kernel, downloaded once into .cache/debs and unpacked beside it."""
    DEBS.mkdir(parents=True, exist_ok=True)
    debs = sorted(glob.glob(str(DEBS / "linux-image-*-cloud-amd64_*.deb")))
    if not debs:
        dep = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], check=True,
                             capture_output=True, text=True).stdout
        pkg = next(line.split(":", 1)[1].strip() for line in dep.splitlines() if "Depends:" in line)
        subprocess.run(["apt-get", "download", pkg], cwd=DEBS, check=True, capture_output=True)
        debs = sorted(glob.glob(str(DEBS / "linux-image-*-cloud-amd64_*.deb")))
    deb = Path(debs[-1])
    out = DEBS / (deb.stem + ".unpacked")
    kernels = sorted(out.glob("boot/vmlinuz-*")) if out.exists() else []
    if not kernels:
        tmp = Path(tempfile.mkdtemp(dir=DEBS))
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        kernels = sorted(out.glob("boot/vmlinuz-*"))
    return kernels[-1]


INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
echo "mobykit: ready {image_id}" > /dev/console
exec /bin/busybox sleep 100000
"""


def make_initrd(out: Path, image_id: str) -> Path:
    """A gzip'd newc initrd: static busybox and an /init that announces ``image_id`` on the console."""
    stage = Path(tempfile.mkdtemp(prefix="mobykit-initrd-"))
    try:
        (stage / "bin").mkdir()
        (stage / "dev").mkdir()
        shutil.copy2("/bin/busybox", stage / "bin" / "busybox")
        (stage / "init").write_text(INIT.format(image_id=image_id))
        os.chmod(stage / "init", 0o755)
        os.mknod(stage / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=stage, check=True,
                               capture_output=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--owner=0:0"], cwd=stage,
                              input=b"\n".join(sorted(names.split(b"\n"))).strip() + b"\n",
                              check=True, capture_output=True).stdout
        subprocess.run(["gzip", "-n", "-1"], input=cpio, stdout=open(out, "wb"), check=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


@dataclass
class BootFiles:
    kernel: Path
    initrd: Path
    image_id: str
    cmdline: str = "console=ttyS0 panic=-1 quiet"


@pytest.fixture(scope="session")
def boot_files() -> Iterator[BootFiles]:
    """Kernel + a busybox initrd announcing a fixed fake image id; the initrd's dir is removed after."""
    image_id = "sha256:" + "ab" * 32
    d = Path(tempfile.mkdtemp(prefix="mobykit-boot-"))
    try:
        yield BootFiles(kernel=guest_kernel(), initrd=make_initrd(d / "initrd.img", image_id), image_id=image_id)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def remove_everything(provider, uri: str, pool: str, ids: list[str] | None = None, delete_dir: bool = False) -> None:
    """Destroy ``ids`` (default: every domain ``provider`` lists), then empty and remove ``pool`` and
    close the provider: what a test made (test:///default keeps its state for the whole process; a
    session daemon's dir pool also has a directory, removed with ``delete_dir``)."""
    import libvirt

    for iid in ids if ids is not None else [m.id for m in provider.list({})]:
        provider.destroy(iid)
    conn = libvirt.open(uri)
    try:
        p = conn.storagePoolLookupByName(pool)
        for vol in p.listAllVolumes(0):
            vol.delete(0)
        p.destroy()
        if delete_dir:
            p.delete(0)
        p.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()
    provider.close()
