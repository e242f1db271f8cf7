"""Provision to readiness of one VM on a session libvirtd under TCG, split into its steps.

    .venv/bin/python bench/bench_provision.py [--runs 3] [--runtime crun,runc]

Steps, as the moby flavor and the instance core run them:
- build: `store.build_and_store(specs/images/minimal.yml)` with everything cached (what every
  Prepare after the first costs);
- publish: `provider.publish_image` (kernel+initrd uploaded into the pool once per image; later
  runs find them);
- define: `provider.create` (cidata ISO, domain XML, define + start; returns with the instance listed);
- boot: from create's return to `mobykit: ready` in `provider.console_output`.
Medians of --runs, per OCI runtime (minimal.yml as it is: crun; with runc: the same spec with
`@pkg:../pkgs/runc` in its init, bench_boot.spec_for), the runtimes interleaved; every VM is
destroyed, the daemon stopped and its directory removed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from mobykit.image import store
from mobykit.image.cache import Cache, default_root
from mobykit.providers.base import MachineSpec
from mobykit.providers.libvirt import LibvirtProvider
from mobykit.run.libvirtd import session_libvirtd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_boot import spec_for  # noqa: E402 (bench/ is not a package)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", default="crun", help="comma-separated: crun, runc (default crun)")
    args = ap.parse_args()
    runtimes = args.runtime.split(",")
    cache = Cache(default_root())
    minimal = ROOT / "specs/images/minimal.yml"
    for rt in runtimes:
        store.build_and_store([spec_for(minimal, rt)], cache=cache)  # warm: the bench measures cached builds
    names = ("build (cached)", "publish", "define", "boot", "total")
    steps = {rt: {k: [] for k in names} for rt in runtimes}
    with session_libvirtd() as daemon:
        provider = LibvirtProvider(daemon.config)
        for _, rt in ((i, rt) for i in range(args.runs) for rt in runtimes):
            t0 = time.perf_counter()
            image = store.build_and_store([spec_for(minimal, rt)], cache=cache)
            t1 = time.perf_counter()
            provider.publish_image(image, {})
            t2 = time.perf_counter()
            machine = provider.create(MachineSpec(properties={"Image": image.id, "Memory": 512}, tags={"bench": "1"}))
            t3 = time.perf_counter()
            try:
                while f"mobykit: ready {image.id}" not in provider.console_output(machine.id):
                    if time.perf_counter() - t3 > 300:
                        raise RuntimeError("no readiness line within 300 s")
                    time.sleep(0.05)
                t4 = time.perf_counter()
            finally:
                provider.destroy(machine.id)
            for key, value in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                steps[rt][key].append(value)
    print(f"| step (TCG, median of {args.runs}, seconds) | " + " | ".join(runtimes) + " |")
    print("|---|" + "---|" * len(runtimes))
    for key in names:
        print(f"| {key} | " + " | ".join(f"{statistics.median(steps[rt][key]):.2f}" for rt in runtimes) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
