"""Cold build and unchanged rebuild of a reference spec, against a floor measured in the same run.

    .venv/bin/python bench/bench_build.py [--runs 3]

The reference spec has a kernel, an init (busybox + runc) and three containers (sysctl onboot,
httpd and getty services). Its images are made by `mobykit pkg build` from Debian packages into a
fresh cache, so nothing comes from a registry. Then:

- cold: `mobykit build -f kernel+initrd` into an empty output dir (layers not yet decompressed);
- floor: `tar -c | gzip -6` of the same root tree (the initrd's contents, extracted to disk);
- rebuild: the same `mobykit build` again (the process, start to exit).

Targets: cold <= 1.3x the floor; rebuild <= 0.3 s. Medians of --runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOBYKIT = [sys.executable, "-m", "mobykit.cli.main"]
RECIPES = ("kernel", "init", "runc", "sysctl", "httpd", "getty")


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mobykit-bench-build-"))
    try:
        env = dict(os.environ, MOBYKIT_CACHE=str(work / "cache"))
        refs = {}
        for name in RECIPES:
            _, out = _run([*MOBYKIT, "pkg", "build", str(ROOT / "specs/pkgs" / name)], env)
            refs[name] = out.strip().splitlines()[-1]
        spec = work / "reference.yml"
        spec.write_text(
            f"kernel:\n  image: {refs['kernel']}\n  cmdline: console=ttyS0\n"
            f"init:\n  - {refs['init']}\n  - {refs['runc']}\n"
            f"onboot:\n  - name: sysctl\n    image: {refs['sysctl']}\n"
            f"services:\n  - name: httpd\n    image: {refs['httpd']}\n  - name: getty\n    image: {refs['getty']}\n"
        )
        cold, floor, rebuild = [], [], []
        for i in range(args.runs):
            out = work / f"out{i}"
            t, _ = _run([*MOBYKIT, "build", "-f", "kernel+initrd", "-f", "tar", "-o", str(out), str(spec)], env)
            cold.append(t)
            t, _ = _run([*MOBYKIT, "build", "-f", "kernel+initrd", "-f", "tar", "-o", str(out), str(spec)], env)
            rebuild.append(t)
            # The floor: the same root tree (what the initrd holds) as files on disk, tar | gzip -6.
            tree = work / f"tree{i}"
            tree.mkdir()
            with tarfile.open(out / "reference.tar") as tf:
                tf.extractall(tree, filter="tar")
            shutil.rmtree(tree / "boot", ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(f"tar -C {tree} -cf - . | gzip -6 > {work}/floor.tar.gz", shell=True, check=True)
            floor.append(time.perf_counter() - t0)
            shutil.rmtree(tree)
            shutil.rmtree(work / "cache" / "tmp", ignore_errors=True)
        initrd = (work / "out0" / "reference-initrd.img").stat().st_size
        c, f, r = statistics.median(cold), statistics.median(floor), statistics.median(rebuild)
        print(f"| measure | median of {args.runs} | target |")
        print("|---|---|---|")
        print(f"| cold build (tar + kernel+initrd) | {c:.2f} s | |")
        print(f"| floor: tar -c \\| gzip -6 of the same tree | {f:.2f} s | |")
        print(f"| cold / floor | {c / f:.2f}x | <= 1.3x |")
        print(f"| rebuild of the unchanged spec (whole process) | {r:.3f} s | <= 0.3 s |")
        print(f"| initrd size | {initrd / 1e6:.1f} MB | LinuxKit minimal: 35 MB |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
