"""Group controller benchmark: converge, roll, the CPU cost of one pass over a huge group, the idle
cost of a server, and (``--libvirt``) a rolling update of real VMs against their own boot time.

    .venv/bin/python bench/bench_group.py [--scale 0.05] [--idle-seconds 30]
    .venv/bin/python bench/bench_group.py --libvirt 3      # real VMs (TCG) on a private session libvirtd

Latencies are those of the brief (provision 2 s, boot 3 s, MinReadySeconds 1 s) run for real on
threads against the memory provider, with every second scaled by ``--scale`` (0.05: one spec
second is 50 ms of wall time) so the bench takes seconds; results are reported in spec seconds
(wall time / scale). Health is read from the console ("mobykit: ready"), as the moby flavor does.

Infrakit's schedule on the same latencies is computed from its documented behaviour, not run: it
polls every 10 s, rolls one instance at a time, destroy first, and the replacement is created by
the scaler's next poll; the updater moves on at the first poll after the new instance is healthy.

Idle: 10 groups of 3 healthy memory-provider instances behind the moby flavor (console health,
its watch and health events) and the default controller options, converged; then the process's
CPU time over ``--idle-seconds`` of wall time, as % of one core, with and without health events
(without: a flavor reached over the wire, polled every PollInterval).

``--libvirt N``: ``make demo``'s stack (its images, a private session libvirtd, ``mobykit serve``,
the gRPC client): converge 0 -> 3, then N rolls of 3 (MaxSurge 1, MaxUnavailable 0, MinReadySeconds
3, console health), each against 3 x (median boot-to-ready of its new VMs + MinReady + 1 s),
boot-to-ready timed from libvirt's start event to the readiness line in the console file
(``providers.libvirt.boottimes``), the roll from its commit to the last old VM's undefine.
"""

from __future__ import annotations

import argparse
import math
import os
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


IMAGE = "sha256:" + "ab" * 32


class _Prepared:
    """The moby flavor, with Prepare giving a fixed image id instead of building a spec (what the
    idle bench measures is Healthy and the watch). ``events=False`` hides ``subscribe_health``."""

    def __init__(self, flavor, events=True):
        self.flavor, self.events = flavor, events

    def __getattr__(self, name):
        if name == "subscribe_health" and not self.events:
            raise AttributeError(name)
        return getattr(self.flavor, name)

    def prepare(self, type, properties, spec, allocation, index):
        spec.tags = {**spec.tags, "mobykit.image": IMAGE}
        return spec


def idle_cpu(seconds: float, events: bool) -> tuple[float, int]:
    """% of a core over ``seconds`` with 10 converged groups of 3, and the passes they ran meanwhile."""
    import tempfile

    from mobykit.core.instance import InstanceCore
    from mobykit.flavor.moby import MobyFlavor

    mp = MemoryProvider({})
    core = InstanceCore({"default_provider": "memory"}, providers={"memory": mp})
    flavor = MobyFlavor({"default_provider": "memory"}, instances=core)
    instance, wrapped = ProviderInstancePlugin(mp), _Prepared(flavor, events)
    plugin = GroupPluginImpl(lambda n: instance, lambda n: wrapped, options=Options())
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        spec_file = Path(tmp) / "web.yml"
        spec_file.write_text("kernel:\n  image: linuxkit/kernel:6.6\ninit: []\n")
        for g in range(10):
            doc = group_spec(id=f"g{g}", size=3)
            doc["Properties"]["Instance"] = {"Plugin": "mobykit/memory", "Properties": {"Image": IMAGE}}
            doc["Properties"]["Flavor"] = {"Plugin": "mobykit/moby", "Properties": {"Image": str(spec_file)}}
            plugin.commit_group(GroupSpec(doc["ID"], doc["Properties"]), False)
        # Converged: without events, the first poll after the boot finds them healthy.
        wait(lambda: all(plugin.status(f"g{g}").converged for g in range(10)), timeout=60)
        ctls = [plugin.controller(f"g{g}") for g in range(10)]
        passes0 = sum(c.passes["total"] for c in ctls)
        t0, c0 = time.monotonic(), time.process_time()
        time.sleep(seconds)
        cpu, wall = time.process_time() - c0, time.monotonic() - t0
        passes = sum(c.passes["total"] for c in ctls) - passes0
        plugin.close()
        flavor.close()
    return 100 * cpu / wall, passes


def libvirt_runs(runs: int, args_verbose: bool = False, keep_log: str | None = None) -> None:
    """Converge 0 -> 3 and ``runs`` rolls of 3 real VMs through ``make demo``'s steps."""
    import statistics

    from mobykit import demo
    from mobykit.image.cache import Cache, default_root

    cache_root = Path(os.environ.get("MOBYKIT_CACHE") or default_root())
    cache = Cache(cache_root)
    images = [demo.IMAGE_V1, demo.IMAGE_V2]
    for image in images:
        demo.build_image(image, cache=cache)
    specs = [demo.group_spec(demo.GROUP_SPEC, image) for image in images]
    rows, converges = [], []
    with demo.stack(cache_root=cache_root, group_id=specs[0].id) as st:
        timed: list[demo.Timed] = []
        demo.converge(st, specs[0], interval=0.2, timed=timed)
        for c in timed:
            converges.append(c)
            print(f"converge 0 -> 3: {c.seconds:.1f} s = {c.ratio:.2f}x one VM's boot to ready "
                  f"({c.boot:.1f} s, median of the 3)", flush=True)
        for i in range(runs):
            r = demo.roll(st, specs[(i + 1) % 2], interval=0.2)
            if r.timed is None:
                raise SystemExit("bench: the roll could not be timed (boot times need a local libvirtd)")
            rows.append(r)
            print(f"roll {i + 1}: {r.timed.seconds:.1f} s = {r.timed.ratio:.2f}x 3 x (boot {r.timed.boot:.1f} s "
                  f"+ MinReady {r.timed.min_ready:g} s + 1 s) = {r.timed.ideal:.1f} s; "
                  f"never fewer than {r.min_healthy} HEALTHY; per wave: destroy {r.timed.destroy or 0:.1f} s, "
                  f"next provision {r.timed.define or 0:.1f} s; {r.timed.seconds / r.timed.floor:.2f}x "
                  f"3 x (boot + MinReady + destroy + provision)", flush=True)
            if args_verbose:
                print("  " + "\n  ".join(r.timed.timeline), flush=True)
        if keep_log:
            import shutil

            shutil.copy(st.serve_log, keep_log)
    ratios = [r.timed.ratio for r in rows]
    floors = [r.timed.seconds / r.timed.floor for r in rows]
    print(f"rolls: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x) "
          f"over {len(ratios)}; median roll {statistics.median(r.timed.seconds for r in rows):.1f} s, "
          f"median boot {statistics.median(r.timed.boot for r in rows):.1f} s; against 3 x (boot + MinReady + "
          f"this host's destroy + provision): median {statistics.median(floors):.2f}x; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.05, help="wall seconds per spec second")
    ap.add_argument("--idle-seconds", type=float, default=30.0, help="wall seconds the idle CPU is measured over")
    ap.add_argument("-v", "--verbose", action="store_true", help="--libvirt: each VM's start, ready and undefine")
    ap.add_argument("--keep-log", metavar="FILE", help="--libvirt: copy the server's log here")
    ap.add_argument("--libvirt", type=int, default=0, metavar="N",
                    help="instead: converge 3 real VMs and roll them N times on a private session libvirtd")
    args = ap.parse_args()
    if args.libvirt:
        libvirt_runs(args.libvirt, args.verbose, args.keep_log)
        return
    one = PROVISION + BOOT
    c = converge(args.scale)
    r = roll(args.scale)
    ideal_roll = math.ceil(10 / 2) * (PROVISION + BOOT + MIN_READY)
    steady, rolling = reconcile_cpu()
    idle_ev, passes_ev = idle_cpu(args.idle_seconds, True)
    idle_poll, passes_poll = idle_cpu(args.idle_seconds, False)
    rows = [
        ("converge 0 -> 10", f"{c:.1f} s", f"{c / one:.2f}x one instance ({one:g} s)", "<= 1.3x",
         f"{infrakit_converge():.0f} s"),
        ("roll 10, surge 2, min ready 1 s", f"{r:.1f} s", f"{r / ideal_roll:.2f}x ideal ({ideal_roll:g} s)", "<= 1.2x",
         f"{infrakit_roll():.0f} s"),
        ("reconcile 10,000 (steady) CPU", f"{steady:.3f} s", "", "<= 0.5 s", ""),
        ("reconcile 10,000 (roll start) CPU", f"{rolling:.3f} s", "incl. 1,000 inline fake provisions", "", ""),
        ("idle, 10 groups x 3, health events", f"{idle_ev:.2f}% of a core",
         f"{passes_ev} passes in {args.idle_seconds:g} s", "< 1%", ""),
        ("idle, 10 groups x 3, polled (no events)", f"{idle_poll:.2f}% of a core",
         f"{passes_poll} passes in {args.idle_seconds:g} s", "", ""),
    ]
    print(f"latencies: provision {PROVISION:g} s, boot {BOOT:g} s; scale {args.scale} wall s per spec s; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    head = ("measure", "mobykit", "ratio", "target", "Infrakit (modelled)")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(5)]
    for row in [head] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
