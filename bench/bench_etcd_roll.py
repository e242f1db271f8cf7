"""The 3-member etcd cluster of specs/groups/etcd.yml rolled to specs/images/etcd-v2.yml on a private
session libvirtd under TCG, while a client keeps writing (issue 16's performance section).

    .venv/bin/python bench/bench_etcd_roll.py [--rolls 1]

Reported, per roll:
  - duration: from the commit of the new image to the group converged (every member HEALTHY on the
    new config), and as a ratio to a floor measured in the same run: 3 x (the new members' median
    boot to ready - libvirt's start event to the readiness line on the console, as
    providers.libvirt.boottimes times it - + MinReadySeconds). A quorum group replaces one member
    at a time, destroy first, so 3 x (boot + MinReady) is the least a roll can take here.
  - write availability: the share of 100 ms windows during the roll holding at least one
    acknowledged write (one client writing one key at a time through the members' published client
    ports, the next member on failure, 50 ms between writes), beside the same share over a
    stretch of the same length before the roll (the cluster at rest on this loaded machine).
  - the fewest members whose etcd answered in one status poll (every 0.5 s) during the roll.
Each further roll goes back and forth between the two images. The load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_etcd_cluster_e2e as e2e  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rolls", type=int, default=1)
    args = ap.parse_args(argv)

    from mobykit import demo
    from mobykit.image.cache import Cache, default_root
    from mobykit.run.libvirtd import session_libvirtd

    cache = Cache(os.environ.get("MOBYKIT_CACHE") or default_root())
    demo.build_image(e2e.IMAGE_V1, cache=cache)
    demo.build_image(e2e.IMAGE_V2, cache=cache)
    specs = [demo.group_spec(e2e.GROUP, e2e.IMAGE_V1), demo.group_spec(e2e.GROUP, e2e.IMAGE_V2)]
    min_ready = float(specs[0].properties.get("Updating", {}).get("MinReadySeconds") or 0)
    rows = []
    with session_libvirtd() as daemon:
        config = daemon.config
        try:
            with demo.stack(libvirt_config=config, cache_root=cache.root, group_id=specs[0].id) as st:
                current = specs[0]
                st.clients.group.commit_group(current, False)
                members = e2e.wait_converged(st, current, 900)
                ports = [m.port for m in members]
                for r in range(args.rolls):
                    # the cluster at rest, for the same length of time as the roll will take (estimated
                    # by the previous roll, else 60 s)
                    rest = rows[-1]["seconds"] if rows else 60.0
                    with e2e.Writer(ports) as w:
                        t0 = time.monotonic()
                        time.sleep(rest)
                        t1 = time.monotonic()
                    rest_avail = e2e.availability(w.stats.ok_times, t0, t1)
                    nxt = specs[(r + 1) % 2]
                    clock = demo._boot_times(st)
                    latest = {"ports": ports}
                    with e2e.Writer(ports) as writer, e2e.Liveness(lambda latest=latest: latest["ports"]) as live:

                        def on_listing(ms, writer=writer, latest=latest):
                            now = [m.port for m in ms if m.port]
                            if now:
                                latest["ports"] = now
                                writer.ports = now

                        t0 = time.monotonic()
                        st.clients.group.commit_group(nxt, False)
                        members = e2e.wait_converged(st, nxt, 900, on_listing=on_listing)
                        t1 = time.monotonic()
                    boot = clock.median_boot([m.id for m in members]) if clock else None
                    if clock:
                        clock.close()
                    ports = [m.port for m in members]
                    floor = 3 * (boot + min_ready) if boot else None
                    row = {"seconds": t1 - t0, "boot": boot, "floor": floor,
                           "avail": e2e.availability(writer.stats.ok_times, t0, t1), "rest": rest_avail,
                           "acked": len(writer.stats.acked), "attempts": writer.stats.attempts,
                           "min_alive": live.min_alive}
                    rows.append(row)
                    ratio = f"{row['seconds'] / floor:.2f}x" if floor else "n/a"
                    print(f"roll {r + 1} to {Path(nxt.properties['Flavor']['Properties']['Image']).name}: "
                          f"{row['seconds']:.1f}s = {ratio} the floor 3 x (boot {boot or 0:.1f}s + MinReady "
                          f"{min_ready:g}s); write availability {row['avail']:.1%} of 100 ms windows "
                          f"(at rest: {rest_avail:.1%}); {row['acked']} writes acked of {row['attempts']} "
                          f"attempts; fewest live members in a poll: {row['min_alive']}", flush=True)
        finally:
            e2e.remove_volumes(config, specs[0].id)
    if rows:
        print(f"median roll {statistics.median(r['seconds'] for r in rows):.1f}s, "
              f"median availability {statistics.median(r['avail'] for r in rows):.1%}, "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
