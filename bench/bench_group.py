"""Group controller benchmark: converge, roll, and the CPU cost of one pass over a huge group.

    .venv/bin/python bench/bench_group.py [--scale 0.05]

Latencies are those of the brief (provision 2 s, boot 3 s, MinReadySeconds 1 s) run for real on
threads against the memory provider, with every second scaled by ``--scale`` (0.05: one spec
second is 50 ms of wall time) so the bench takes seconds; results are reported in spec seconds
(wall time / scale). Health is read from the console ("mobykit: ready"), as the moby flavor does.

Infrakit's schedule on the same latencies is computed from its documented behaviour, not run: it
polls every 10 s, rolls one instance at a time, destroy first, and the replacement is created by
the scaler's next poll; the updater moves on at the first poll after the new instance is healthy.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes import ConsoleFlavor, FakeWorld, ProviderInstancePlugin, group_spec  # noqa: E402

from mobykit.group.controller import GroupController, Options  # noqa: E402
from mobykit.group.plugin import GroupPluginImpl  # noqa: E402
from mobykit.group.spec import parse  # noqa: E402
from mobykit.providers.memory import MemoryProvider  # noqa: E402
from mobykit.spi.group import GroupSpec  # noqa: E402
from mobykit.spi.types import Spec  # noqa: E402

PROVISION, BOOT, MIN_READY = 2.0, 3.0, 1.0
INFRAKIT_POLL = 10.0


def spec(size, version="v1", updating=None):
    doc = group_spec(size=size, version=version, updating=updating)
    doc["Properties"]["Instance"]["Plugin"] = "mobykit/memory"
    return GroupSpec(doc["ID"], doc["Properties"])


def wait(cond, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.001)
    raise SystemExit("bench: did not converge")


def setup(scale):
    provider = MemoryProvider({"provision_latency": PROVISION * scale, "boot_latency": BOOT * scale})
    instance, flavor = ProviderInstancePlugin(provider), ConsoleFlavor(provider)
    plugin = GroupPluginImpl(lambda n: instance, lambda n: flavor,
                             options=Options(poll_interval=0.25 * scale, max_parallel=16))
    return plugin, provider


def converge(scale) -> float:
    plugin, _ = setup(scale)
    t0 = time.monotonic()
    plugin.commit_group(spec(10), False)
    wait(lambda: plugin.describe_group("workers").converged)
    dt = time.monotonic() - t0
    plugin.close()
    return dt / scale


def roll(scale) -> float:
    plugin, provider = setup(scale)
    plugin.commit_group(spec(10), False)
    wait(lambda: plugin.describe_group("workers").converged)
    new = spec(10, "v2", {"MaxSurge": 2, "MinReadySeconds": MIN_READY * scale})
    h = parse(new).hash
    t0 = time.monotonic()
    plugin.commit_group(new, False)
    wait(lambda: plugin.describe_group("workers").converged
         and all(m.tags["infrakit.config.hash"] == h for m in provider.list({})))
    dt = time.monotonic() - t0
    plugin.close()
    return dt / scale


def infrakit_converge() -> float:
    # Notices at its first poll (t=0), provisions all in parallel, reports at the poll after boot.
    return math.ceil((PROVISION + BOOT) / INFRAKIT_POLL) * INFRAKIT_POLL


def infrakit_roll(n=10) -> float:
    t = 0.0
    for _ in range(n):
        t += INFRAKIT_POLL  # destroyed at a poll; the scaler recreates at its next poll
        healthy = t + PROVISION + BOOT
        t = math.ceil(healthy / INFRAKIT_POLL) * INFRAKIT_POLL  # the updater moves on at a poll
    return t


def reconcile_cpu(n=10_000) -> tuple[float, float]:
    w = FakeWorld(boot_seconds=0)
    cfg = parse(GroupSpec(**{k.lower(): v for k, v in group_spec(size=n).items()}))
    for _ in range(n):
        w.instance.provision("", Spec(dict(cfg.instance_properties),
                                      {"infrakit.group": "workers", "infrakit.config.hash": cfg.hash}))
    ctl = GroupController(cfg, w.instance, w.flavor, options=Options(), clock=w.clock, inline=True)
    ctl.reconcile()  # warm-up
    t0 = time.process_time()
    st = ctl.reconcile()
    steady = time.process_time() - t0
    assert st.converged, st
    ctl.update(parse(GroupSpec(**{k.lower(): v for k, v in group_spec(size=n, version="v2",
                                                                        updating={"MaxSurge": "10%"}).items()})))
    t0 = time.process_time()
    ctl.reconcile()  # the first pass of a rolling update: plans 1,000 creates (done inline, fake)
    rolling = time.process_time() - t0
    return steady, rolling


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.05, help="wall seconds per spec second")
    args = ap.parse_args()
    one = PROVISION + BOOT
    c = converge(args.scale)
    r = roll(args.scale)
    ideal_roll = math.ceil(10 / 2) * (PROVISION + BOOT + MIN_READY)
    steady, rolling = reconcile_cpu()
    rows = [
        ("converge 0 -> 10", f"{c:.1f} s", f"{c / one:.2f}x one instance ({one:g} s)", "<= 1.3x",
         f"{infrakit_converge():.0f} s"),
        ("roll 10, surge 2, min ready 1 s", f"{r:.1f} s", f"{r / ideal_roll:.2f}x ideal ({ideal_roll:g} s)", "<= 1.2x",
         f"{infrakit_roll():.0f} s"),
        ("reconcile 10,000 (steady) CPU", f"{steady:.3f} s", "", "<= 0.5 s", ""),
        ("reconcile 10,000 (roll start) CPU", f"{rolling:.3f} s", "incl. 1,000 inline fake provisions", "", ""),
    ]
    print(f"latencies: provision {PROVISION:g} s, boot {BOOT:g} s; scale {args.scale} wall s per spec s")
    head = ("measure", "mobykit", "ratio", "target", "Infrakit (modelled)")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(5)]
    for row in [head] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
