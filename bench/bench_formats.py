"""Every output format of specs/images/minimal.yml: build time and boot to ready, as ratios to
``kernel+initrd`` measured in the same run; and a libvirt disk boot against a direct kernel boot.

    .venv/bin/python bench/bench_formats.py [--runs 3] [--only build,boot,libvirt]

- build: ``mobykit.image.build.build`` of the reference spec in one format, into a fresh output
  directory, with a warm cache (the images are in it; one build beforehand warms it), so what is
  measured is the pipeline (resolve, unpack, canonical tar) plus that format. Also: every format
  in one build (bootable formats share one kernel, initrd and raw disk per build) and, per format,
  its time over a ``tar``-only build (the format's own cost). LinuxKit's published figure for
  adding ISO outputs on its CI was about 4x (2.5 min to 11 min).
- boot: ``mobykit run qemu -f FORMAT --until-ready`` in-process (``QemuVM``: TCG, 512 MiB, the
  same qemu flags for every format), from the start (archives unpacked, OVMF variables copied)
  to the readiness line on the console. The difference to ``kernel+initrd`` is the firmware
  (SeaBIOS or OVMF), the boot loader reading the kernel and initrd from a CD-ROM or disk, and for
  kernel+squashfs / iso-efi the root loader.
- libvirt: on a private session libvirtd, create to ``mobykit: ready`` on the console for
  ``Boot: kernel`` and ``Boot: disk`` (a qcow2 overlay over the pool's base), alternately; also
  the one-time publication of each.

Formats are interleaved within each round and medians of --runs are reported, so a noisy
neighbour moves both sides of a ratio. Every VM is stopped, every temp dir removed.

Every boot gets user data on a ``cidata`` CD-ROM (a comment, which runs nothing), so the init takes
it from there and never waits on the cloud metadata addresses, which nothing answers under qemu's
user network: seconds of timeouts that would drown the firmware's share in noise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mobykit.image.build import build
from mobykit.image.cache import Cache, default_root
from mobykit.image.outputs import FORMATS
from mobykit.run import media, qemu

ROOT = Path(__file__).resolve().parent.parent
USER_DATA = "# bench_formats: nothing to run\n"  # see the module docstring
MINIMAL = ROOT / "specs" / "images" / "minimal.yml"
FLOOR = "kernel+initrd"
SEPARATE = {"dynamic-vhd": "minimal-dynamic"}  # NAME.vhd, as vhd: never in the same build (LinuxKit's names)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def _table(title: str, times: dict[str, list[float]], unit: str, extra: Callable[[str], str] | None = None) -> None:
    floor = _median(times[FLOOR])
    print(f"\n{title}\n")
    print(f"| format | median ({unit}) | range | / {FLOOR} |{' over tar |' if extra else ''}")
    print(f"|---|---|---|---|{'---|' if extra else ''}")
    for fmt, xs in times.items():
        row = f"| {fmt} | {_median(xs):.2f} | {_spread(xs)} | {_median(xs) / floor:.2f}x |"
        print(row + (f" {extra(fmt)} |" if extra else ""))


def bench_build(cache: Cache, work: Path, runs: int) -> None:
    formats = [FLOOR] + sorted(f for f in FORMATS if f != FLOOR)
    build([MINIMAL], formats=["tar"], outdir=work / "warm", name="minimal", cache=cache)  # warm the cache
    times: dict[str, list[float]] = {f: [] for f in formats}
    together: list[float] = []
    for r in range(runs):
        for fmt in formats:
            out = work / f"build-{r}-{fmt}"
            t = time.perf_counter()
            build([MINIMAL], formats=[fmt], outdir=out, name="minimal", cache=cache)
            times[fmt].append(time.perf_counter() - t)
            shutil.rmtree(out)
        out = work / f"build-{r}-all"
        t = time.perf_counter()
        build([MINIMAL], formats=[f for f in formats if f not in SEPARATE], outdir=out, name="minimal", cache=cache)
        together.append(time.perf_counter() - t)
        shutil.rmtree(out)
    tar = _median(times["tar"])
    _table(f"Build, warm cache, one format per build (median of {runs}, seconds):", times, "s",
           lambda fmt: f"{_median(times[fmt]) - tar:+.2f} s")
    solo = sum(_median(times[f]) for f in formats if f not in SEPARATE)
    print(f"\nEvery format but {', '.join(SEPARATE)} in one build: {_median(together):.2f} s "
          f"({_median(together) / _median(times[FLOOR]):.2f}x {FLOOR}; the same formats built one by one: {solo:.2f} s)")


def bench_boot(cache: Cache, work: Path, runs: int) -> None:
    out = work / "boot"
    build([MINIMAL], formats=[f for f in media.LAYOUTS if f not in SEPARATE], outdir=out, name="minimal", cache=cache)
    for fmt, name in SEPARATE.items():
        build([MINIMAL], formats=[fmt], outdir=out, name=name, cache=cache)
    times: dict[str, list[float]] = {f: [] for f in media.LAYOUTS}
    opts = qemu.RunOptions(accel="tcg", until_ready=True, timeout=300, data=USER_DATA.encode())
    for _ in range(runs):
        for fmt in media.LAYOUTS:
            source = media.find(out / SEPARATE.get(fmt, "minimal"), fmt)
            t = time.perf_counter()
            with qemu.QemuVM(source, opts) as vm:
                outcome = vm.wait(opts.timeout, until_ready=True)
                elapsed = time.perf_counter() - t
            if not outcome.ready:
                raise SystemExit(f"{fmt}: {outcome.reason}:\n{outcome.tail}")
            times[fmt].append(elapsed)
    _table(f"Boot to `mobykit: ready` under TCG, `mobykit run qemu -f FORMAT` (median of {runs}, seconds):",
           times, "s")


def bench_libvirt(cache: Cache, runs: int) -> None:
    from mobykit.image import store
    from mobykit.providers.base import MachineSpec
    from mobykit.providers.libvirt import LibvirtProvider
    from mobykit.run import accel
    from mobykit.run.libvirtd import session_libvirtd

    accel.detect()  # the provider's first create probes KVM once (cached): not a cost of either boot
    image = store.build_and_store([MINIMAL], cache=cache)
    t = time.perf_counter()
    image.format("qcow2-bios")  # what Prepare does for Boot: disk (free when already made)
    make_disk = time.perf_counter() - t
    modes = {"kernel": {}, "disk": {"Boot": "disk"}}
    times: dict[str, list[float]] = {m: [] for m in modes}
    creates: dict[str, list[float]] = {m: [] for m in modes}
    publish: dict[str, float] = {}
    with session_libvirtd() as daemon:
        provider = LibvirtProvider(daemon.config)
        try:
            for mode, extra in modes.items():
                t = time.perf_counter()
                provider.publish_image(image, extra)
                publish[mode] = time.perf_counter() - t
            for _ in range(runs):
                for mode, extra in modes.items():
                    t0 = time.perf_counter()
                    m = provider.create(MachineSpec(properties={"Image": image.id, "Memory": 512, **extra},
                                                    user_data=USER_DATA))
                    t1 = time.perf_counter()
                    try:
                        while f"mobykit: ready {image.id}" not in provider.console_output(m.id):
                            if time.perf_counter() - t1 > 300:
                                raise SystemExit(f"Boot: {mode}: no readiness line within 300 s")
                            time.sleep(0.05)
                        times[mode].append(time.perf_counter() - t0)
                        creates[mode].append(t1 - t0)
                    finally:
                        provider.destroy(m.id)
        finally:
            provider.close()
    k, d = _median(times["kernel"]), _median(times["disk"])
    print(f"\nlibvirt (session daemon, TCG), create to `mobykit: ready` (median of {runs}):\n")
    print("| Boot | create to ready | range | of which create | publish (once per image) |")
    print("|---|---|---|---|---|")
    print(f"| kernel | {k:.2f} s | {_spread(times['kernel'])} s | {_median(creates['kernel']):.2f} s | "
          f"{publish['kernel']:.2f} s |")
    print(f"| disk | {d:.2f} s ({d / k:.2f}x) | {_spread(times['disk'])} s | {_median(creates['disk']):.2f} s | "
          f"{publish['disk']:.2f} s (+ {make_disk:.2f} s making qcow2-bios, once) |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="build,boot,libvirt", help="comma-separated: build, boot, libvirt")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    cache = Cache(os.environ.get("MOBYKIT_CACHE") or default_root())
    work = Path(tempfile.mkdtemp(prefix="mobykit-bench-formats-"))
    try:
        if "build" in parts:
            bench_build(cache, work, args.runs)
        if "boot" in parts:
            bench_boot(cache, work, args.runs)
        if "libvirt" in parts:
            bench_libvirt(cache, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
