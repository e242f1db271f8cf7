"""GCP provider benchmark: converge a group 0 -> 20 against one instance, with a slow API.

    .venv/bin/python bench/bench_gcp.py [--latency 0.2] [--size 20]

Everything is real except Compute Engine: the group controller, the moby flavor (console health),
InstanceCore and the GCP provider talk through google-cloud-compute (REST) to the fake Compute server
of the tests (``tests/gce_fake``), which sleeps ``--latency`` seconds before every answer, and to
gcp-storage-emulator for Cloud Storage. The image (the harness's small spec, built for real, its gcp
format uploaded and imported) is published before timing, so both runs measure provisioning only.

Target: converging N takes at most 1.5x converging one: creates, operation waits and console reads
run in parallel, no operation is waited for serially. The controller's ``max_parallel`` bounds how
many provisions run at once (``Options().max_parallel`` by default): it is reported for the default and
for one above N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gce_fake import FakeCompute, World, running  # noqa: E402
from gce_fake.storage import emulator  # noqa: E402

from harness.images import SPEC, standard_images  # noqa: E402
from mobykit.core import paths  # noqa: E402
from mobykit.core.instance import InstanceCore  # noqa: E402
from mobykit.flavor.moby import MobyFlavor  # noqa: E402
from mobykit.group.controller import GroupController, Options  # noqa: E402
from mobykit.group.spec import parse  # noqa: E402
from mobykit.image import store  # noqa: E402
from mobykit.image.cache import Cache  # noqa: E402
from mobykit.providers.gcp import GCPProvider  # noqa: E402
from mobykit.spi.group import GroupSpec  # noqa: E402

PROJECT, ZONE, BUCKET = "bench", "us-central1-a", "bench-images"


def converge(fake: FakeCompute, cfg: dict, spec_path: Path, size: int, max_parallel: int) -> float:
    """Seconds from commit to every instance RUNNING, healthy and the group converged."""
    provider = GCPProvider(cfg["providers"]["gcp"])
    core = InstanceCore(cfg, providers={"gcp": provider})
    flavor = MobyFlavor(cfg, instances=core)
    group = parse(GroupSpec(f"g{size}x{max_parallel}", {
        "Allocation": {"Size": size},
        "Instance": {"Plugin": "mobykit/gcp", "Properties": {"Zone": ZONE}},
        "Flavor": {"Plugin": "mobykit/moby", "Properties": {"Image": str(spec_path)}},
    }))
    ctl = GroupController(group, core, flavor, options=Options(poll_interval=0.2, max_parallel=max_parallel))
    provider.validate({})  # credentials and the zone are looked up once per process, not timed
    start = time.monotonic()
    ctl.start()
    try:
        while True:
            st = ctl.status()
            if st.converged and st.healthy == size:
                break
            if time.monotonic() - start > 300:
                raise SystemExit(f"bench: {size} did not converge: {st}")
            time.sleep(0.01)
        took = time.monotonic() - start
        ctl.set_size(0)
        while ctl.status().instances or not ctl.status().converged:
            time.sleep(0.05)
    finally:
        ctl.stop()
        provider.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--size", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3, help="groups per row; the median is reported")
    args = ap.parse_args()
    os.environ.setdefault("NO_GCE_CHECK", "True")
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    with tempfile.TemporaryDirectory(prefix="bench-gcp-") as tmp, emulator(BUCKET) as gcs:
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint
        os.environ["CLOUDSDK_CONFIG"] = str(Path(tmp) / "gcloud")
        root = Path(tmp) / "root"
        root.mkdir()
        (root / "app.json").write_text('{"app": true}\n')
        spec_path = root / "bench.yml"
        spec_path.write_text(SPEC)
        cache = Cache(Path(tmp) / "cache")
        standard_images(cache)
        with paths.using(paths.PathPolicy.under([root])), running(FakeCompute(World(storage_exists=gcs.exists))) as fake:
            image = store.build_and_store(str(spec_path), cache=cache)
            cfg = {"default_provider": "gcp", "cache": str(cache.root),
                   "providers": {"gcp": {"Project": PROJECT, "Zone": ZONE, "Bucket": BUCKET, "Endpoint": fake.endpoint}}}
            GCPProvider(cfg["providers"]["gcp"]).publish_image(image, {})
            fake.latency = args.latency
            rows = []
            default = Options().max_parallel
            for size, parallel in ((1, default), (args.size, default), (args.size, args.size + 1)):
                times = sorted(converge(fake, cfg, spec_path, size, parallel) for _ in range(args.runs))
                rows.append((size, parallel, statistics.median(times), times[0], times[-1]))
            assert not fake.world.instances, "bench: instances left behind"
    one = rows[0][2]
    print(f"API latency {args.latency * 1000:.0f} ms per call (fake Compute), one zone, median of {args.runs}\n")
    print("| instances | controller max_parallel | converge (s) | range (s) | x one instance |")
    print("|---:|---:|---:|---:|---:|")
    for size, parallel, med, lo, hi in rows:
        print(f"| {size} | {parallel} | {med:.2f} | {lo:.2f}-{hi:.2f} | {med / one:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
