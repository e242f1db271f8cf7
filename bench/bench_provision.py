"""Provision to readiness of one VM on a session libvirtd under TCG, split into its steps.

    .venv/bin/python bench/bench_provision.py [--runs 3]

Steps, as the moby flavor and the instance core run them:
- build: `store.build_and_store(specs/images/minimal.yml)` with everything cached (what every
  Prepare after the first costs);
- publish: `provider.publish_image` (kernel+initrd uploaded into the pool once per image; later
  runs find them);
- define: `provider.create` (cidata ISO, domain XML, define + start; returns with the instance listed);
- boot: from create's return to `mobykit: ready` in `provider.console_output`.
Medians of --runs; every VM is destroyed, the daemon stopped and its directory removed.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cache = Cache(default_root())
    store.build_and_store([ROOT / "specs/images/minimal.yml"], cache=cache)  # warm: the bench measures cached builds
    steps: dict[str, list[float]] = {"build (cached)": [], "publish": [], "define": [], "boot": [], "total": []}
    with session_libvirtd() as daemon:
        provider = LibvirtProvider(daemon.config)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            image = store.build_and_store([ROOT / "specs/images/minimal.yml"], cache=cache)
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
            for key, value in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                steps[key].append(value)
    print(f"| step (TCG, median of {args.runs}) | seconds |")
    print("|---|---|")
    for key, values in steps.items():
        print(f"| {key} | {statistics.median(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
