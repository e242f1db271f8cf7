"""Boot to readiness of specs/images/minimal.yml under qemu TCG, against a floor booted in the same run.

    .venv/bin/python bench/bench_boot.py [--runs 3]

- image: minimal.yml's kernel+initrd, from qemu start to `mobykit: ready` on the serial console
  (init, modules, DHCP, user-data lookup, sysctl + hello onboot containers with runc, httpd);
- floor: the same kernel and command line with a bare busybox initrd whose /init prints a marker
  at once (a shell prompt's worth of work).

Same qemu flags for both (-M pc, TCG, 512 MiB, virtio-net user networking). Target: image/floor
<= 1.5x. Also reports the initrd size beside LinuxKit's minimal image (about 35 MB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobykit.image.build import build
from mobykit.image.cache import Cache, default_root
from mobykit.image.cpio import write_newc
from mobykit.image.tree import Tree

ROOT = Path(__file__).resolve().parent.parent
FLOOR_INIT = b"#!/bin/busybox sh\n/bin/busybox echo FLOOR-SHELL-READY\nwhile :; do /bin/busybox sleep 60; done\n"


def floor_initrd(path: Path) -> None:
    tree = Tree()
    tree.add_bytes("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    tree.add_bytes("init", FLOOR_INIT, mode=0o755)
    tree.add_dir("dev")
    tree.add_dir("proc")
    import gzip

    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        write_newc(iter(tree), gz, 0)


def time_to(marker: bytes, kernel: Path, initrd: Path, cmdline: str, timeout: float = 300) -> float:
    cmd = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
           "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
           "-nic", "user,model=virtio-net-pci"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        seen = b""
        os.set_blocking(proc.stdout.fileno(), False)
        while time.perf_counter() - start < timeout:
            chunk = proc.stdout.read(65536) or b""
            seen = (seen + chunk)[-65536:]
            if marker in seen:
                return time.perf_counter() - start
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"no {marker!r} within {timeout}s:\n{seen[-3000:].decode(errors='replace')}")
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mobykit-bench-boot-"))
    try:
        cache = Cache(os.environ.get("MOBYKIT_CACHE") or default_root())
        r = build([ROOT / "specs/images/minimal.yml"], outdir=work, name="minimal", cache=cache)
        cmdline = r.path("-cmdline").read_text().strip() + " mobykit.metadata=none"
        floor_initrd(work / "floor-initrd.img")
        image, floor = [], []
        for _ in range(args.runs):
            floor.append(time_to(b"FLOOR-SHELL-READY", r.path("-kernel"), work / "floor-initrd.img", cmdline))
            image.append(time_to(b"mobykit: ready", r.path("-kernel"), r.path("-initrd.img"), cmdline))
        i, f = statistics.median(image), statistics.median(floor)
        size = r.path("-initrd.img").stat().st_size
        print(f"| measure (TCG, median of {args.runs}) | value | target |")
        print("|---|---|---|")
        print(f"| minimal.yml: qemu start to `mobykit: ready` | {i:.2f} s | |")
        print(f"| floor: same kernel, bare busybox initrd to a shell | {f:.2f} s | |")
        print(f"| image / floor | {i / f:.2f}x | <= 1.5x |")
        print(f"| minimal.yml initrd | {size / 1e6:.1f} MB | LinuxKit minimal: ~35 MB |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
