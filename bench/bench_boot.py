"""Boot to readiness of specs/images/minimal.yml under qemu TCG, with crun and with runc, against a
floor booted in the same run.

    .venv/bin/python bench/bench_boot.py [--runs 5] [--run-qemu 5] [--before REV]

- minimal: minimal.yml's kernel+initrd, from qemu start to `mobykit: ready` on the serial console
  (init, modules, DHCP, sysctl + hello onboot containers, the httpd service); built once with
  crun (minimal.yml as it is) and once with runc (the same spec with `@pkg:../pkgs/runc` in its
  init: section - the one line a user changes);
- floor: the same kernel and command line with a bare busybox initrd whose /init prints a marker
  at once (a shell prompt's worth of work);
- where the difference goes, from two more images booted in the same run (bench/specs): the same
  kernel, command line and init with no containers (the init's own work: modules, DHCP, mounts),
  and with one onboot container that does nothing (the difference is one container run);
- per-step medians from the init's own trace (`mobykit.trace=1` on every image's command line:
  seconds since the kernel started, as each step ends);
- with --before REV: a third column, "before": runc with the init package as it was at git
  revision REV (specs/pkgs/init from `git archive`), to show before and after in one run;
- with --run-qemu N: `mobykit run qemu --until-ready` (the command a user types, process start
  to exit) on minimal.yml's build against the same command on the floor's initrd, interleaved;
- with --gzip: a column "gzip": the crun images with their initrd's cpio gzip'd (LinuxKit's and
  mobykit's choice before, and what a kernel without CONFIG_RD_LZ4 gets) instead of LZ4.

Same qemu flags for every image (-M pc, TCG, 512 MiB, virtio-net user networking); all runs are
interleaved (floor, then each image with each runtime, repeated). Target: minimal/floor <= 1.5x.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
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
from mobykit.spec.load import SpecSource

ROOT = Path(__file__).resolve().parent.parent
RUNTIMES = ("crun", "runc")
SPECS = (
    ("empty", ROOT / "bench/specs/boot-empty.yml"),
    ("one", ROOT / "bench/specs/boot-one.yml"),
    ("minimal", ROOT / "specs/images/minimal.yml"),
)
READY = b"mobykit: ready"
# The floor prints the readiness marker too, so `mobykit run qemu --until-ready` can time it.
FLOOR_INIT = (
    b"#!/bin/busybox sh\n/bin/busybox echo 'mobykit: ready sha256:floor'\n"
    b"while :; do /bin/busybox sleep 60; done\n"
)
TRACE = re.compile(rb"^mobykit: trace (\d+\.\d+) (.+?)\r?$", re.M)
MEM = re.compile(rb"^mobykit: trace-mem (\d+) kB", re.M)


def floor_initrd(path: Path) -> None:
    tree = Tree()
    tree.add_bytes("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
    tree.add_bytes("init", FLOOR_INIT, mode=0o755)
    tree.add_dir("dev")
    tree.add_dir("proc")
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        write_newc(iter(tree), gz, 0)


def time_to(marker: bytes, kernel: Path, initrd: Path, cmdline: str, timeout: float = 300) -> tuple[float, bytes]:
    """Seconds from qemu's start to ``marker`` on the console, and the console up to then."""
    cmd = [
        "qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-nic", "user,model=virtio-net-pci",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        seen = b""
        os.set_blocking(proc.stdout.fileno(), False)
        while time.perf_counter() - start < timeout:
            chunk = proc.stdout.read(65536) or b""
            seen += chunk
            if marker in seen:
                return time.perf_counter() - start, seen
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"no {marker!r} within {timeout}s:\n{seen[-3000:].decode(errors='replace')}")
    finally:
        proc.kill()
        proc.wait()


def steps(console: bytes) -> dict[str, float]:
    """Per-step durations from the init's trace lines: each step from the previous line's time
    (the first, "mounts", from the kernel's start: the kernel's boot plus the init's mounts)."""
    out: dict[str, float] = {}
    prev = 0.0
    for stamp, name in TRACE.findall(console):
        t = float(stamp)
        key = name.decode()
        if key.startswith("onboot "):
            key = "onboot containers"
        out[key] = out.get(key, 0.0) + (t - prev)
        prev = t
    return out


def spec_for(path: Path, runtime: str, old_init: Path | None = None) -> SpecSource:
    """The spec as it is (crun) or with its init's crun line naming runc instead ("runc", and
    "before", which also takes every ``@pkg:.../init`` from ``old_init``)."""
    text = path.read_text()
    if runtime in ("runc", "before"):
        text, n = re.subn(r'(@pkg:[./]*?(?:specs/)?pkgs/)crun"', r'\1runc"', text)
        if n != 1:
            raise SystemExit(f"{path}: expected one crun line in init:")
    if runtime == "before":
        assert old_init is not None
        text = re.sub(r'@pkg:[./]*?(?:specs/)?pkgs/init"', f'@pkg:{old_init}"', text)
    return SpecSource(name=f"{path} ({runtime})", text=text, base=path.parent)


def old_init_recipe(rev: str, work: Path) -> Path:
    """specs/pkgs/init as it was at ``rev``, as a recipe directory under ``work``."""
    out = work / "init-before"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "specs/pkgs/init"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "--strip-components=3", "-C", str(out)], input=archive, check=True)
    return out


def gzip_variant(initrd: Path, out: Path) -> Path:
    """``initrd`` with its LZ4 cpio gzip'd instead (what the builder writes for a kernel without
    CONFIG_RD_LZ4), to time the codec alone."""
    from mobykit.image import lz4legacy
    from mobykit.image.pgzip import ParallelGzip

    data = initrd.read_bytes()
    if not data.startswith(lz4legacy.MAGIC):
        raise SystemExit(f"{initrd}: not an LZ4 initrd (does the kernel's config say CONFIG_RD_LZ4=y?)")
    with open(out, "wb") as f:
        gz = ParallelGzip(f)
        gz.write(lz4legacy.decompress(data))
        gz.close()
    return out


def run_qemu(prefix: Path) -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mobykit.cli.main", "run", "qemu", "--until-ready", str(prefix)],
                       capture_output=True, check=False)
    took = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"mobykit run qemu {prefix}: exit {r.returncode}\n{r.stdout[-2000:]!r}{r.stderr[-2000:]!r}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="rounds of the main table (0: only --run-qemu)")
    ap.add_argument("--run-qemu", type=int, default=0, metavar="N",
                    help="also time `mobykit run qemu --until-ready` on minimal.yml against the floor, N each")
    ap.add_argument("--before", metavar="REV", help="add a column: runc with the init package at git revision REV")
    ap.add_argument("--gzip", action="store_true", help="add a column: crun with the initrd's cpio gzip'd")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mobykit-bench-boot-"))
    try:
        cache = Cache(os.environ.get("MOBYKIT_CACHE") or default_root())
        old_init = old_init_recipe(args.before, work) if args.before else None
        runtimes = RUNTIMES + (("before",) if args.before else ())
        builds = {
            (name, rt): build([spec_for(spec, rt, old_init)], outdir=work, name=f"{name}-{rt}", cache=cache)
            for name, spec in SPECS for rt in runtimes
        }
        initrds = {key: b.path("-initrd.img") for key, b in builds.items()}
        if args.gzip:
            for name, _ in SPECS:
                initrds[name, "gzip"] = gzip_variant(initrds[name, "crun"], work / f"{name}-gzip-initrd.img")
                builds[name, "gzip"] = builds[name, "crun"]
            runtimes += ("gzip",)
        r = builds["minimal", "crun"]
        cmdline = r.path("-cmdline").read_text().strip()
        kernel = r.path("-kernel").read_bytes()
        for key, b in builds.items():
            if b.path("-cmdline").read_text().strip() != cmdline or b.path("-kernel").read_bytes() != kernel:
                raise SystemExit(f"bench/specs: {key} must use minimal.yml's kernel and cmdline")
        cmdline += " mobykit.metadata=none mobykit.trace=1"
        floor_initrd(work / "floor-initrd.img")
        times: dict[tuple[str, str], list[float]] = {key: [] for key in builds}
        times["floor", ""] = []
        traces: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in builds}
        mem: dict[tuple[str, str], list[int]] = {key: [] for key in builds}
        for _ in range(args.runs):
            times["floor", ""].append(
                time_to(READY, r.path("-kernel"), work / "floor-initrd.img", cmdline)[0])
            for key in builds:
                took, console = time_to(READY, r.path("-kernel"), initrds[key], cmdline)
                times[key].append(took)
                traces[key].append(steps(console))
                if m := MEM.search(console):
                    mem[key].append(int(m.group(1)))
        if args.runs:
            med = {k: statistics.median(v) for k, v in times.items()}
            f = med["floor", ""]

            def spread(k: tuple[str, str]) -> str:
                return f"{min(times[k]):.2f}-{max(times[k]):.2f}"

            print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores, shared)\n")
            head = " | ".join(runtimes)
            print(f"| qemu start to `mobykit: ready` (TCG, median of {args.runs}) | {head} |")
            print("|---|" + "---|" * len(runtimes))
            print(f"| floor: same kernel and cmdline, bare busybox initrd | {f:.2f} s ({spread(('floor', ''))}) | |")
            for name, label in (("empty", "boot-empty.yml (the init, no containers)"),
                                ("one", "boot-one.yml (one no-op onboot container)"),
                                ("minimal", "minimal.yml (2 onboot + 1 service)")):
                cells = [f"{med[name, rt]:.2f} s ({spread((name, rt))}), {med[name, rt] / f:.2f}x" for rt in runtimes]
                print(f"| {label} | " + " | ".join(cells) + " |")
            for label, a, b in (("one container run (one - empty)", "one", "empty"),
                                ("minimal's three containers (minimal - empty)", "minimal", "empty")):
                print(f"| {label} | " + " | ".join(f"{med[a, rt] - med[b, rt]:.2f} s" for rt in runtimes) + " |")
            print("| minimal.yml initrd | " + " | ".join(
                f"{initrds['minimal', rt].stat().st_size / 1e6:.1f} MB" for rt in runtimes) + " |")
            print("| memory in use at ready (MemTotal - MemAvailable, trace) | " + " | ".join(
                f"{statistics.median(mem['minimal', rt]) / 1024:.1f} MiB" if mem["minimal", rt] else "-"
                for rt in runtimes) + " |")
            print(f"\n| minimal.yml, init trace step (median s) | {head} |")
            print("|---|" + "---|" * len(runtimes))
            names: list[str] = []
            for rt in runtimes:
                for t in traces["minimal", rt]:
                    names += [n for n in t if n not in names]
            for n in names:
                cells = [f"{statistics.median(t.get(n, 0.0) for t in traces['minimal', rt]):.2f}"
                         if any(traces["minimal", rt]) else "-" for rt in runtimes]
                label = "kernel boot + init mounts (from kernel start)" if n == "mounts" else n
                print(f"| {label} | " + " | ".join(cells) + " |")
        if args.run_qemu:
            floor = work / "bare"
            shutil.copy(r.path("-kernel"), f"{floor}-kernel")
            shutil.copy(work / "floor-initrd.img", f"{floor}-initrd.img")
            Path(f"{floor}-cmdline").write_text(r.path("-cmdline").read_text())
            prefix = work / "minimal-crun"
            run_qemu(floor)  # warm-up: the KVM probe's verdict is cached after the first run
            rq: dict[str, list[float]] = {"floor": [], "minimal": []}
            for _ in range(args.run_qemu):
                rq["floor"].append(run_qemu(floor))
                rq["minimal"].append(run_qemu(prefix))
            fm, mm = statistics.median(rq["floor"]), statistics.median(rq["minimal"])
            print(f"\n| `mobykit run qemu --until-ready` (median of {args.run_qemu}, interleaved) | s |")
            print("|---|---|")
            print(f"| bare busybox initrd, minimal.yml's kernel and cmdline | {fm:.2f} |")
            print(f"| minimal.yml (crun) | {mm:.2f} |")
            print(f"| ratio | {mm / fm:.2f}x |")
            print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
