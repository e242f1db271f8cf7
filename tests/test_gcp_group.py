"""A group on ``mobykit/gcp``: the real group controller, moby flavor and InstanceCore over the GCP
provider, against the fake Compute server and the storage emulator, with and without injected faults
(20% of Compute and Cloud Storage calls answered 429/5xx, half of them after the effect)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("google.cloud.compute_v1")
pytest.importorskip("google.cloud.storage")
pytest.importorskip("gcp_storage_emulator")
pytest_plugins = ("gce_fake.fixtures",)  # env, cloud, images

from gce_fake.common import (  # noqa: E402
    BUCKET,
    WAIT,
    ZONE,
    config,
    instances,
    label_of,
)
from gce_fake.server import FakeCompute  # noqa: E402

from mobykit.core.instance import InstanceCore  # noqa: E402
from mobykit.flavor.moby import MobyFlavor  # noqa: E402
from mobykit.group.controller import GroupController, Options  # noqa: E402
from mobykit.group.spec import parse as parse_group  # noqa: E402
from mobykit.providers.gcp import GCPProvider  # noqa: E402
from mobykit.spi.group import GroupSpec  # noqa: E402


def group_spec(images: dict, version: str, size: int, zone: str = ZONE) -> GroupSpec:
    return GroupSpec("workers", {
        "Allocation": {"Size": size},
        "Instance": {"Plugin": "mobykit/gcp", "Properties": {"Zone": zone, "NamePrefix": "workers",
                                                             "MachineType": "e2-small"}},
        "Flavor": {"Plugin": "mobykit/moby", "Properties": {"Image": str(images["root"] / f"{version}.yml"),
                                                            "Health": {"Deadline": "120s"}}},
        "Updating": {"MaxSurge": 1, "MaxUnavailable": 0},
    })


class Bounds:
    """Samples the fake's instances of the group throughout a rolling update."""

    def __init__(self, fake: FakeCompute, size: int, surge: int, unavailable: int):
        self.fake, self.size, self.surge, self.unavailable = fake, size, surge, unavailable
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            group = [i for i in instances(self.fake) if i["labels"].get("infrakit_2egroup") == "workers"]
            ready = [i for i in group if i["status"] == "RUNNING"]
            if len(group) > self.size + self.surge:
                self.violations.append(f"{len(group)} instances")
            if len(ready) < self.size - self.unavailable:
                self.violations.append(f"only {len(ready)} running")

    def __enter__(self) -> Bounds:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_for(what: str, cond, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("fault_rate", [0.0, 0.2])
def test_a_group_converges_rolls_to_a_new_image_and_scales_to_zero(cloud, images, fault_rate):
    fake, gcs = cloud
    fake.fault_rate, fake.seed = fault_rate, 7
    fake.storage_faults.fault_rate = fault_rate
    cfg = {"default_provider": "gcp", "cache": str(images["cache"].root), "providers": {"gcp": config(fake)}}
    provider = GCPProvider(config(fake))
    core = InstanceCore(cfg, providers={"gcp": provider})
    flavor = MobyFlavor(cfg, instances=core)
    v1 = parse_group(group_spec(images, "v1", 3))
    ctl = GroupController(v1, core, flavor, options=Options(poll_interval=0.1, backoff_initial=0.1, max_failures=50))

    def group() -> list[dict]:
        return [i for i in instances(fake) if i["labels"].get("infrakit_2egroup") == "workers"]

    def on(image) -> bool:
        g = group()
        return len(g) == 3 and all(i["labels"]["mobykit_2eimage"] == label_of(image.id) and i["status"] == "RUNNING"
                                   for i in g)

    ctl.start()
    try:
        wait_for("3 instances on v1", lambda: on(images["v1"]) and ctl.status().converged)
        first = {i["name"] for i in group()}
        with Bounds(fake, 3, 1, 0) as bounds:
            ctl.update(parse_group(group_spec(images, "v2", 3)))
            wait_for("3 instances on v2", lambda: on(images["v2"]) and ctl.status().converged)
        assert bounds.violations == []
        assert first.isdisjoint({i["name"] for i in group()})  # every instance replaced
        assert fake.world.counts["images.insert"] == 2  # each image published once
        ctl.set_size(0)
        wait_for("no instance", lambda: not instances(fake) and ctl.status().converged)
    finally:
        ctl.stop()
        provider.close()
    # no duplicate, no leak: every insert the fake applied was a distinct instance, and all are gone
    assert fake.world.counts["instances.insert"] == 6 and ctl.status().provisions == 6
    assert fake.world.counts.get("instances.delete", 0) == 6
    assert len(fake.world.images) == 2 and gcs.objects(BUCKET) == []
    if fault_rate:
        assert sum(1 for c in fake.calls if c[2] in (429, 500, 503)) > 10  # faults really were injected
        assert fake.storage_faults.faults >= 1  # ... on the storage path too
