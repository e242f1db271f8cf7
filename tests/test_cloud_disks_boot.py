"""The ``aws`` and ``gcp`` disks of specs/images/minimal.yml boot on their cloud's kind of disk
controller, under qemu TCG, to readiness.

Why: an AMI boots from an EBS volume that Nitro presents as NVMe, and a GCE image from a
virtio-scsi disk; a disk that only boots from qemu's default IDE would pass every other test and
fail on the cloud. The disk is attached exactly as the cloud does it (``-device nvme`` / ``-device
virtio-scsi-pci`` + ``scsi-hd``; ``snapshot=on`` so the build output is never written), the boot
loader on it loads the kernel and initrd, and the console must say ``mobykit: ready <image id>``.
A cidata user-data script reports which drivers the init loaded and which cloud NIC drivers the
guest's modules.alias maps from their PCI ids. The init loads modules by modalias (coldplug), so
a driver loads only for hardware that is there: virtio-net and virtio-scsi are emulated and must be
loaded; ENA (PCI 1d0f:ec20) and gVNIC (1ae0:0042) cannot be, so their alias lines must be there for
the coldplug on Nitro and GCE hardware to find them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guestkit import workdir
from mobykit.image.build import build
from mobykit.image.cache import Cache
from mobykit.run.cidata import make_iso

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = ROOT / "specs" / "images" / "minimal.yml"
BOOT_WAIT = 300.0
USER_DATA = """#!/bin/sh
for m in virtio_scsi virtio_net nvme; do
  grep -q "^$m " /proc/modules && echo "cloud module $m loaded"
done
for d in ena:pci:v00001D0Fd0000EC20 gve:pci:v00001AE0d00000042; do
  grep -qi "^alias ${d#*:}sv.* ${d%%:*}$" /lib/modules/*/modules.alias && echo "cloud driver ${d%%:*} by alias"
done
i=0
while [ $i -lt 40 ] && ! ls /sys/block | grep -q -E '^(sd|nvme)'; do sleep 0.25; i=$((i + 1)); done
ls /sys/block | grep -E '^(sd|nvme)' | sed 's/^/cloud disk /'
"""
CONTROLLERS = {
    "nvme": ["-device", "nvme,drive=d,serial=mobykit"],
    "virtio-scsi": ["-device", "virtio-scsi-pci,id=scsi", "-device", "scsi-hd,drive=d,bus=scsi.0"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    os.environ.setdefault("MOBYKIT_DEB_CACHE", str(ROOT / ".cache" / "debs"))
    out = tmp_path_factory.mktemp("out")
    return build([MINIMAL], formats=["aws", "gcp"], outdir=out, name="minimal",
                 cache=Cache(tmp_path_factory.mktemp("cache")))


@contextlib.contextmanager
def boot_disk(disk: Path, controller: str, wd: Path, cdrom: Path) -> Iterator[Path]:
    """qemu TCG booting ``disk`` (BIOS) from ``controller``; yields the console file. Killed by PID."""
    console = wd / f"{controller}.console"
    cmd = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "512", "-display", "none", "-no-reboot",
           "-drive", f"if=none,id=d,file={disk},format=raw,snapshot=on", *CONTROLLERS[controller],
           "-drive", f"file={cdrom},media=cdrom,if=ide,index=2,readonly=on,format=raw",
           "-nic", "user,model=virtio-net-pci", "-serial", f"file:{console}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=(wd / f"{controller}.qemu.err").open("wb"))
    try:
        yield console
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(console: Path, image_id: str, also: str) -> str:
    deadline = time.monotonic() + BOOT_WAIT
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        if re.search(rf"mobykit: (ready {image_id}|not ready.*)\n", text) and also in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"no readiness line within {BOOT_WAIT:.0f}s:\n{text[-4000:]}")
        time.sleep(0.5)


def test_aws_disk_boots_from_nvme_and_gcp_disk_from_virtio_scsi(built):
    with workdir() as wd:
        iso = make_iso(wd / "cidata.iso", USER_DATA)
        disks = {"nvme": built.path(".raw")}
        subprocess.run(["tar", "-xSzf", str(built.path(".img.tar.gz")), "-C", str(wd)], check=True)
        disks["virtio-scsi"] = wd / "disk.raw"
        for controller, disk in disks.items():
            with boot_disk(disk, controller, wd, iso) as console:
                text = wait_ready(console, built.image_id, "cloud disk")
                assert f"mobykit: ready {built.image_id}" in text, text[-4000:]
                text = console.read_text(errors="replace")
                loaded = set(re.findall(r"cloud module (\S+) loaded", text))
                assert "virtio_net" in loaded, (controller, text[-3000:])
                if controller == "virtio-scsi":
                    assert "virtio_scsi" in loaded, text[-3000:]
                aliased = set(re.findall(r"cloud driver (\S+) by alias", text))
                assert aliased == {"ena", "gve"}, (controller, text[-3000:])
                disks_seen = set(re.findall(r"cloud disk (\S+)", text))  # the boot disk, as the guest sees it
                assert disks_seen == ({"nvme0n1"} if controller == "nvme" else {"sda"}), (controller, text[-3000:])
