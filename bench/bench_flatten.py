"""Flatten ~500 MB of layers, write the canonical tar and a kernel+initrd; report time and peak RSS.

    .venv/bin/python bench/bench_flatten.py [--mb 500] [--keep DIR]

Targets (from the design): peak RSS <= 200 MB while flattening ~500 MB of layers, and the cold
kernel+initrd step <= 1.3x ``tar -c | gzip -6`` of the same tree. Each phase runs in a child
process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

ALPHABET = bytes.maketrans(bytes(range(256)), bytes(b"etaoinshrdlucmfw"[i % 16] for i in range(256)))


def _data(n: int, seed: int) -> bytes:
    """Half random, half 16-letter text: compresses about like a real root filesystem (~2.5x)."""
    half = n // 2
    return os.urandom(half) + os.urandom(n - half).translate(ALPHABET)


def _layer(path: Path, members: list[tuple[str, int]], whiteouts: list[str] = ()) -> None:
    raw = path.with_suffix(".raw")
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, size in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = size, 0o644
            import io

            tf.addfile(info, io.BytesIO(_data(size, hash(name))))
        for w in whiteouts:
            parent, _, base = w.rpartition("/")
            tf.addfile(tarfile.TarInfo(f"{parent}/.wh.{base}"), None)
    comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with open(raw, "rb") as src, open(path, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(comp.compress(chunk))
        out.write(comp.flush())
    raw.unlink()


def make_image(base: Path, mb: int) -> dict:
    from mobykit.image.cache import Cache, Layer

    cache = Cache(base / "cache")
    small = [(f"usr/share/pkg{i // 500}/file{i}.txt", 8192) for i in range(int(mb * 0.3 * 1024 / 8))]
    big = [(f"usr/lib/big{i}.so", 5 << 20) for i in range(int(mb * 0.4 / 5))]
    top = [(f"opt/app/blob{i}", 30 << 20) for i in range(max(1, int(mb * 0.3 / 30)))]
    layers = []
    for i, (members, wh) in enumerate([(small, []), (big, []), (top, [n for n, _ in small[:1000]])]):
        p = base / f"layer{i}.tar.gz"
        _layer(p, members, wh)
        with open(p, "rb") as fh:
            digest = cache.write_blob(fh)
        layers.append(Layer(digest, "application/vnd.oci.image.layer.v1.tar+gzip", p.stat().st_size))
        p.unlink()
    return {"cache": str(cache.root), "layers": [(lay.digest, lay.media_type, lay.size) for lay in layers]}


def phase(name: str, base: Path, image: dict) -> dict:
    """Runs inside a child process."""
    from mobykit.image.cache import Cache, ImageInfo, Layer
    from mobykit.image.layers import unpack_image
    from mobykit.image.outputs import FORMATS, OutputContext
    from mobykit.image.tree import write_tar

    cache = Cache(image["cache"])
    info = ImageInfo("bench/image:1", "sha256:" + "0" * 64, None, {}, [Layer(*t) for t in image["layers"]])
    out = {}
    if name == "flatten":
        work = base / "work"
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        tree = unpack_image(cache, info, work)
        out["unpack_s"] = time.perf_counter() - t
        tree.add_bytes("boot/kernel", b"k" * 4096)
        tree.add_bytes("boot/cmdline", b"console=ttyS0")
        t = time.perf_counter()
        with open(base / "canonical.tar", "wb") as fh:
            write_tar(tree, fh, 0)
        out["write_tar_s"] = time.perf_counter() - t
        out["entries"] = len(tree)
    elif name == "initrd":
        outdir = base / "out"
        shutil.rmtree(outdir, ignore_errors=True)
        outdir.mkdir()
        t = time.perf_counter()
        FORMATS["kernel+initrd"](OutputContext("bench", outdir, base / "canonical.tar", "sha256:x", 0))
        out["initrd_s"] = time.perf_counter() - t
        out["initrd_bytes"] = (outdir / "bench-initrd.img").stat().st_size
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child would report the
    # parent's peak (the generator's) instead of its own
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    out["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--keep")
    ap.add_argument("--phase")
    ap.add_argument("--base")
    ap.add_argument("--image")
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.base), json.loads(args.image))))
        return
    base = Path(args.keep or tempfile.mkdtemp(prefix="bench-flatten-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        image = make_image(base, args.mb)
        print(f"generated {args.mb} MB of layers in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        results = {}
        for name in ("flatten", "initrd"):
            cmd = [sys.executable, __file__, "--phase", name, "--base", str(base), "--image", json.dumps(image)]
            results[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        # baseline: the same tree through GNU tar and gzip -6
        tree_dir = base / "tree"
        tree_dir.mkdir()
        subprocess.run(["tar", "-xf", str(base / "canonical.tar"), "-C", str(tree_dir), "--exclude", "boot"], check=True)
        t = time.perf_counter()
        subprocess.run(f"tar -cf - -C {tree_dir} . | gzip -6 > {base / 'baseline.tar.gz'}", shell=True, check=True)
        baseline = time.perf_counter() - t
        results["baseline_tar_gzip6_s"] = baseline
        results["initrd_over_baseline"] = results["initrd"]["initrd_s"] / baseline
        results["canonical_tar_mb"] = (base / "canonical.tar").stat().st_size / 1e6
        print(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
