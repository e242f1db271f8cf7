"""Volumes in a booted guest, two ways.

LinuxKit's build-time ``volumes:``: the init (specs/pkgs/init/rootfs/init, via
usr/bin/mobykit-volumes) mounts every /containers/volumes/NAME before the onboot containers run.
The volumes are laid out by hand exactly as mobykit.image.assemble lays them out (lower/, merged/,
and tmp/ unless read-only; what the build does is tested in test_volumes.py), and the containers
bind their merged/ directories as the build rewrites ``binds: [NAME:/path]``.

Disks: the format and mount packages (specs/pkgs/format, specs/pkgs/mount) in a real build of a
spec, booted twice with the same two virtio disks (serials as the libvirt provider gives its
persistent volumes): a blank one is formatted at the first boot only, one holding a filesystem
never, and a service sees the mount and its data from the first boot at the second. The same boots back a
``persistent: true`` volume with a third blank disk (serial pvol), formatted by the init's
mobykit-volumes at the first boot only.

Each scenario boots once (module fixtures); each test checks one promise against the consoles."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import guestkit as gk

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

IMAGE_ID = "sha256:" + "70" * 32
VOLUMES = "/containers/volumes"

# The service: every result on one line each, then it stays up (a service).
READER = r"""
echo "reader: content=$(cat /content/greeting.txt)"
echo "reader: scratch=$(cat /scratch/from-onboot 2>&1)"
if echo x > /content/new 2>/dev/null; then echo "reader: content-write=ok"; else echo "reader: content-write=refused"; fi
if echo x > /ro/new 2>/dev/null; then echo "reader: ro-write=ok"; else echo "reader: ro-write=refused"; fi
echo "reader: ro=$(cat /ro/fixed.txt)"
echo "reader: done"
exec sleep 3600
"""

# An onboot container after the writer that sees /containers/volumes (recursively, so with the
# init's mounts on each merged/) at /volumes: what is mounted where, and lower/ untouched.
INSPECT = r"""
for v in content scratch ro; do
  echo "mounts: $v $(grep " /volumes/$v/merged " /proc/self/mounts | cut -d' ' -f3,4 | cut -d, -f1)"
done
[ -e /volumes/scratch/lower/from-onboot ] && echo "lower: scratch changed" || echo "lower: scratch untouched"
"""


def _bind(name: str, dest: str, opts: str = "rw") -> dict:
    return {"destination": dest, "type": "bind", "source": f"{VOLUMES}/{name}/merged", "options": ["rbind", opts]}


def _volume(img: gk.GuestImage, name: str, files: dict[str, str], *, readonly: bool = False) -> None:
    """containers/volumes/NAME as the build lays it out (mobykit.image.assemble)."""
    v = img.root / "containers" / "volumes" / name
    (v / "lower").mkdir(parents=True)
    (v / "merged").mkdir()
    if not readonly:
        (v / "tmp").mkdir()
    for rel, text in files.items():
        (v / "lower" / rel).write_text(text)


@pytest.fixture(scope="module")
def console() -> str:
    parts = gk.parts()
    with gk.workdir() as w:
        img = gk.GuestImage(w, parts)
        img.add_system(image_id=IMAGE_ID)
        # "content": laid out from an image (its root filesystem is lower/); writable
        _volume(img, "content", {"greeting.txt": "hello from a volume image\n"})
        # "scratch": blank, writable; "ro": readonly: true
        _volume(img, "scratch", {})
        _volume(img, "ro", {"fixed.txt": "fixed\n"}, readonly=True)

        writer = gk.oci_config(["/bin/sh", "-c", "echo written-at-boot > /scratch/from-onboot && echo writer: ok"])
        writer["mounts"].append(_bind("scratch", "/scratch"))
        b = img.add_bundle("onboot", "000-writer", writer)
        (b / "rootfs" / "scratch").mkdir()
        inspect = gk.oci_config(["/bin/sh", "-c", INSPECT])
        inspect["mounts"].append({"destination": "/volumes", "type": "bind", "source": VOLUMES,
                                  "options": ["rbind", "rw"]})
        b = img.add_bundle("onboot", "001-inspect", inspect)
        (b / "rootfs" / "volumes").mkdir()

        reader = gk.oci_config(["/bin/sh", "-c", READER])
        # the readonly volume is bound read-write on purpose: the init's read-only bind must hold
        reader["mounts"] += [_bind("content", "/content"), _bind("scratch", "/scratch"), _bind("ro", "/ro")]
        b = img.add_bundle("services", "reader", reader)
        for d in ("content", "scratch", "ro"):
            (b / "rootfs" / d).mkdir()

        initrd = img.write_initrd(w / "initrd.gz")
        with gk.boot(parts.kernel, initrd, w, append="mobykit.metadata=none", http=False) as g:
            g.wait_for(r"^mobykit: (not )?ready .*$", 150)
            g.wait_for(r"^reader: done", 60)
            return g.text()


def test_boot_is_ready_with_volumes(console):
    assert f"mobykit: ready {IMAGE_ID}" in console, console[-3000:]
    assert "mobykit: volume" not in console


def test_service_reads_a_file_from_a_volume_laid_out_from_an_image(console):
    assert "reader: content=hello from a volume image" in console


def test_writable_volume_is_shared_between_containers(console):
    assert "writer: ok" in console
    assert "reader: scratch=written-at-boot" in console
    assert "reader: content-write=ok" in console


def test_writes_go_to_the_overlay_not_the_image(console):
    assert "mounts: content overlay rw" in console
    assert "mounts: scratch overlay rw" in console
    assert "lower: scratch untouched" in console


def test_readonly_volume_is_not_writable_even_bound_rw(console):
    assert re.search(r"^mounts: ro \S+ ro$", console, re.M), console[-3000:]
    assert "reader: ro=fixed" in console
    assert "reader: ro-write=refused" in console
    assert "reader: ro-write=ok" not in console


# --- the format and mount packages on a real build, with virtio disks ------------------------
ROOT = Path(__file__).resolve().parent.parent
PKGS = ROOT / "specs" / "pkgs"

# "data" is blank at the first boot; "other" holds a filesystem made on the host, which format
# must leave alone even when asked to format it. The service counts its boots on the mount.
DISK_SPEC = f"""\
kernel:
  image: "@pkg:{PKGS}/kernel"
  cmdline: "console=ttyS0 panic=-1"
init:
  - "@pkg:{PKGS}/init"
  - "@pkg:{PKGS}/runc"
onboot:
  - name: format
    image: "@pkg:{PKGS}/format"
    command: ["/usr/bin/format", "-label", "data", "/dev/disk/by-id/virtio-data"]
  - name: format-other
    image: "@pkg:{PKGS}/format"
    command: ["/usr/bin/format", "-label", "clobber", "/dev/disk/by-id/virtio-other"]
  - name: mount
    image: "@pkg:{PKGS}/mount"
    command: ["/usr/bin/mountie", "-label", "data", "/var/lib/data"]
services:
  - name: app
    image: "@pkg:{PKGS}/init"
    binds: ["/var/lib/data:/data", "pvol:/pv"]
    command: ["/bin/sh", "-c", "n=$(( $(cat /data/boots 2>/dev/null || echo 0) + 1 )); echo $n > /data/boots;
      p=$(( $(cat /pv/boots 2>/dev/null || echo 0) + 1 )); echo $p > /pv/boots; sync;
      echo \\"app: pvol=$p fs=$(grep ' /pv ' /proc/self/mounts | cut -d' ' -f3,4 | cut -d, -f1)\\";
      echo \\"app: boot=$n fs=$(grep ' /data ' /proc/self/mounts | cut -d' ' -f3)\\"; exec sleep 3600"]
volumes:
  - name: pvol
    persistent: true
"""


@contextlib.contextmanager
def _qemu(kernel: Path, initrd: Path, cmdline: str, disks: dict[str, Path], wd: Path):
    """qemu TCG with each disk as a virtio-blk device whose serial is its name (as the libvirt
    provider attaches persistent volumes); killed by PID on the way out."""
    console = wd / "console.log"
    console.unlink(missing_ok=True)
    cmd = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "512", "-display", "none", "-no-reboot",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", f"{cmdline} mobykit.metadata=none",
           "-nic", "user,model=virtio-net-pci", "-serial", f"file:{console}", "-monitor", "none"]
    for name, path in disks.items():
        cmd += ["-drive", f"file={path},if=none,id={name},format=raw,cache=writeback",
                "-device", f"virtio-blk-pci,drive={name},serial={name}"]
    err = (wd / "qemu.err").open("wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield gk.Guest(proc, console, wd / "no-monitor", None)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        err.close()


@dataclass
class DiskBoots:
    first: str
    second: str
    image_id: str
    data_disk: Path
    other_disk: Path
    pvol_disk: Path
    other_file: str


@pytest.fixture(scope="module")
def disk_boots(tmp_path_factory) -> DiskBoots:
    from mobykit.image.build import build
    from mobykit.image.cache import Cache

    os.environ.setdefault("MOBYKIT_DEB_CACHE", str(ROOT / ".cache" / "debs"))
    tmp = tmp_path_factory.mktemp("disks")
    spec = tmp / "disks.yml"
    spec.write_text(DISK_SPEC)
    result = build([spec], outdir=tmp / "out", name="disks", cache=Cache(tmp / "cache"))
    data, other, pvol = tmp / "data.raw", tmp / "other.raw", tmp / "pvol.raw"
    for blank, size in ((data, 64 << 20), (pvol, 16 << 20)):
        with open(blank, "wb") as f:
            f.truncate(size)
    content = tmp / "content"
    content.mkdir()
    (content / "hello").write_text("made on the host\n")
    with open(other, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "keep", "-d", str(content), str(other)], check=True)
    consoles = []
    for _ in range(2):
        with gk.workdir() as wd, _qemu(result.path("-kernel"), result.path("-initrd.img"),
                                       result.path("-cmdline").read_text().strip(),
                                       {"data": data, "other": other, "pvol": pvol}, wd) as g:
            g.wait_for(r"^mobykit: (not )?ready .*$", 240)
            g.wait_for(r"^app: boot=", 60)
            consoles.append(g.text())
    cat = subprocess.run(["debugfs", "-R", "cat /hello", str(other)], capture_output=True, text=True)
    return DiskBoots(consoles[0], consoles[1], result.image_id, data, other, pvol, cat.stdout)


def test_disk_boots_are_ready(disk_boots):
    for console in (disk_boots.first, disk_boots.second):
        assert f"mobykit: ready {disk_boots.image_id}" in console, console[-4000:]


def test_blank_disk_is_formatted_once_with_its_label(disk_boots):
    assert re.search(r"^format: making an ext4 filesystem labelled data on /dev/vd\w1$", disk_boots.first, re.M), \
        disk_boots.first[-4000:]
    assert "format: making an ext4" not in disk_boots.second
    assert re.search(r"^format: /dev/vd\w holds data .*: left alone$", disk_boots.second, re.M), disk_boots.second[-4000:]
    probe = subprocess.run(["blkid", "-p", "-o", "export", "--offset", str(1 << 20), str(disk_boots.data_disk)],
                           capture_output=True, text=True)
    assert "LABEL=data" in probe.stdout and "TYPE=ext4" in probe.stdout, probe


def test_data_survives_the_second_boot(disk_boots):
    assert "app: boot=1 fs=ext4" in disk_boots.first
    assert "app: boot=2 fs=ext4" in disk_boots.second


def test_a_disk_holding_a_filesystem_is_never_formatted(disk_boots):
    for console in (disk_boots.first, disk_boots.second):
        assert "labelled clobber" not in console
    assert disk_boots.other_file == "made on the host\n"


def test_a_persistent_volume_is_the_disk_of_its_name_formatted_once(disk_boots):
    first, second = disk_boots.first, disk_boots.second
    assert re.search(r"^mobykit: volume pvol: making an ext2 filesystem labelled pvol on /dev/vd\w$", first, re.M), \
        first[-4000:]
    assert "making an ext2" not in second
    assert "mobykit: volume pvol failed" not in first + second
    assert re.search(r"^app: pvol=1 fs=ext[24] rw$", first, re.M), first[-4000:]
    assert re.search(r"^app: pvol=2 fs=ext[24] rw$", second, re.M), second[-4000:]
    probe = subprocess.run(["blkid", "-p", "-o", "export", str(disk_boots.pvol_disk)], capture_output=True, text=True)
    assert "LABEL=pvol" in probe.stdout, probe


def test_a_persistent_volume_without_its_disk_fails_the_volume(tmp_path):
    """The script as the guest runs it (Debian's busybox sh, whose applets come before PATH), on
    this machine, which has no disk with that label or serial: after its bounded wait it names
    the volume and exits 1, and leaves merged/ unmounted."""
    name = "mobykit-test-no-such-disk"
    v = tmp_path / name
    (v / "lower").mkdir(parents=True)
    (v / "merged").mkdir()
    (v / "persistent").write_text("rw")
    script = ROOT / "specs" / "pkgs" / "init" / "rootfs" / "usr" / "bin" / "mobykit-volumes"
    r = subprocess.run(["busybox", "sh", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert r.stdout == f"mobykit: volume {name} failed: no disk for persistent volume {name}\n", r
    assert f" {v / 'merged'} " not in Path("/proc/mounts").read_text()
