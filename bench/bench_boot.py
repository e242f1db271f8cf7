"""Boot to readiness of specs/images/minimal.yml under qemu TCG, against a floor booted in the same run.

    .venv/bin/python bench/bench_boot.py [--runs 3]

- image: minimal.yml's kernel+initrd, from qemu start to `mobykit: ready` on the serial console
  (init, modules, DHCP, user-data lookup, sysctl + hello onboot containers with runc, httpd);
- floor: the same kernel and command line with a bare busybox initrd whose /init prints a marker
  at once (a shell prompt's worth of work);
- where the difference goes, from two more images booted in the same run (bench/specs): the same
  kernel, command line and init with no containers (the init's own work: modules, DHCP, mounts),
  and with one onboot container that does nothing (the difference is one "runc run").

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
FLOOR_INIT = (
    b"#!/bin/busybox sh\n/bin/busybox echo FLOOR-SHELL-READY\nwhile :; do /bin/busybox sleep 60; done\n"
)


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
    cmd = [
        "qemu-system-x86_64",
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-nic",
        "user,model=virtio-net-pci",
    ]
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
        builds = {
            name: build([spec], outdir=work, name=name, cache=cache)
            for name, spec in (
                ("minimal", ROOT / "specs/images/minimal.yml"),
                ("empty", ROOT / "bench/specs/boot-empty.yml"),
                ("one", ROOT / "bench/specs/boot-one.yml"),
            )
        }
        r = builds["minimal"]
        cmdline = r.path("-cmdline").read_text().strip()
        for name, b in builds.items():
            if (
                b.path("-cmdline").read_text().strip() != cmdline
                or b.path("-kernel").read_bytes() != r.path("-kernel").read_bytes()
            ):
                raise SystemExit(f"bench/specs: {name} must use minimal.yml's kernel and cmdline")
        cmdline += " mobykit.metadata=none"
        floor_initrd(work / "floor-initrd.img")
        times: dict[str, list[float]] = {"floor": [], "empty": [], "one": [], "minimal": []}
        for _ in range(args.runs):
            times["floor"].append(
                time_to(b"FLOOR-SHELL-READY", r.path("-kernel"), work / "floor-initrd.img", cmdline)
            )
            for name in ("empty", "one", "minimal"):
                times[name].append(
                    time_to(b"mobykit: ready", r.path("-kernel"), builds[name].path("-initrd.img"), cmdline)
                )
        f, e, o, i = (statistics.median(times[k]) for k in ("floor", "empty", "one", "minimal"))
        size = r.path("-initrd.img").stat().st_size

        def spread(k: str) -> str:
            return f"{min(times[k]):.2f}-{max(times[k]):.2f} s"

        print(f"| measure (TCG, median of {args.runs}) | median | range | target |")
        print("|---|---|---|---|")
        print(f"| minimal.yml: qemu start to `mobykit: ready` | {i:.2f} s | {spread('minimal')} | |")
        print(f"| floor: same kernel, bare busybox initrd to a shell | {f:.2f} s | {spread('floor')} | |")
        print(f"| image / floor | {i / f:.2f}x | | <= 1.5x |")
        print(f"| minimal.yml initrd | {size / 1e6:.1f} MB | | LinuxKit minimal: ~35 MB |")
        print(
            f"| boot-empty.yml (init, no containers) | {e:.2f} s ({e / f:.2f}x floor) | {spread('empty')} | |"
        )
        print(f"| boot-one.yml (one no-op onboot container) | {o:.2f} s | {spread('one')} | |")
        print(f"| a boot's first `runc run` (boot-one - boot-empty) | {o - e:.2f} s | | |")
        print(f"| minimal.yml's three containers (minimal - boot-empty) | {i - e:.2f} s | | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
