"""The ``mobykit/gcp`` provider against real local servers: the fake Compute Engine REST API
(``gce_fake``) and ``gcp-storage-emulator``, reached through the real google-cloud-compute and
google-cloud-storage clients. No mock object is in the provider's path.

The group tests drive the real group controller with the real moby flavor and InstanceCore over
this provider, building the harness's small images for real (the ``gcp`` format included).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("google.cloud.compute_v1")
pytest.importorskip("google.cloud.storage")
pytest.importorskip("gcp_storage_emulator")

from gce_fake import FakeCompute, World, running  # noqa: E402
from gce_fake.storage import FaultProxy, emulator  # noqa: E402

from harness.images import SPEC, standard_images  # noqa: E402
from mobykit.core import paths  # noqa: E402
from mobykit.core.instance import InstanceCore  # noqa: E402
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402
from mobykit.flavor.moby import IMAGE_TAG, MobyFlavor  # noqa: E402
from mobykit.group.controller import GroupController, Options  # noqa: E402
from mobykit.group.spec import parse as parse_group  # noqa: E402
from mobykit.image import store  # noqa: E402
from mobykit.image.cache import Cache  # noqa: E402
from mobykit.providers.base import MachineSpec  # noqa: E402
from mobykit.providers.gcp import GCPProvider  # noqa: E402
from mobykit.spi.group import GroupSpec  # noqa: E402
from mobykit.spi.types import Spec  # noqa: E402

PROJECT, ZONE, ZONE2, BUCKET = "proj-1", "us-central1-a", "us-central1-b", "mobykit-images"
WAIT = 120.0  # bound of every wait (a liveness bound on a loaded 2-core machine, not a measure)


@pytest.fixture
def env(monkeypatch, tmp_path) -> None:
    """No Application Default Credentials anywhere (so loopback endpoints use anonymous ones)."""
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "MOBYKIT_GCP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata-server probe
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


@pytest.fixture
def cloud(env, monkeypatch) -> Iterator[tuple[FakeCompute, object]]:
    """Fake Compute, and the storage emulator behind a proxy that injects faults when asked to
    (``fake.storage_faults.fault_rate``)."""
    with emulator(BUCKET) as gcs:
        proxy = FaultProxy(gcs.endpoint, seed=3)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        fake = FakeCompute(world=World(storage_exists=gcs.exists))
        fake.storage_faults = proxy  # type: ignore[attr-defined]
        try:
            with running(fake):
                yield fake, gcs
        finally:
            proxy.stop()


def config(fake: FakeCompute, **extra) -> dict:
    return {"Project": PROJECT, "Zone": ZONE, "Zones": [ZONE2], "Bucket": BUCKET, "Endpoint": fake.endpoint, **extra}


@pytest.fixture
def provider(cloud) -> Iterator[GCPProvider]:
    p = GCPProvider(config(cloud[0]))
    yield p
    p.close()


@pytest.fixture
def images(tmp_path) -> Iterator[dict]:
    """Two small real images (v1, v2 differ in one file) built into a cache; the path policy allows
    their specs for the flavor's builds."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "app.json").write_text('{"app": true}\n')
    (root / "v1.yml").write_text(SPEC)
    (root / "v2.yml").write_text(SPEC.replace("welcome", "welcome v2"))
    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    with paths.using(paths.PathPolicy.under([root])):
        built = {v: store.build_and_store(str(root / f"{v}.yml"), cache=cache) for v in ("v1", "v2")}
        yield {"root": root, "cache": cache, **built}


def instances(fake: FakeCompute) -> list[dict]:
    with fake.world.lock:
        return [dict(v) for v in fake.world.instances.values()]


# -- images ------------------------------------------------------------------------------------


def test_an_image_is_published_once_and_found_again_by_its_label(cloud, provider, images):
    fake, gcs = cloud
    image = images["v1"]
    links = [provider.publish_image(image, {}) for _ in range(2)]
    threads = [threading.Thread(target=lambda: links.append(provider.publish_image(image, {}))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(set(links)) == 1 and fake.world.counts["images.insert"] == 1
    (stored,) = fake.world.images.values()
    hexid = image.id.removeprefix("sha256:")
    assert stored["labels"] == {"mobykit-image": hexid[:63]} and image.id in stored["description"]
    assert stored["family"] == "mobykit" and stored["status"] == "READY"
    assert stored["rawDisk"]["source"] == f"https://storage.googleapis.com/{BUCKET}/mobykit/{hexid}.img.tar.gz"
    assert gcs.objects(BUCKET) == []  # the staging object is removed once GCE has the image
    fresh = GCPProvider(config(fake))  # another process: found by label, not made again
    try:
        assert fresh.publish_image(image, {}) == links[0]
    finally:
        fresh.close()
    assert fake.world.counts["images.insert"] == 1


def test_two_servers_publishing_one_image_at_once_make_one(cloud, images):
    fake, gcs = cloud
    fake.latency = 0.05  # so that the two really overlap
    servers = [GCPProvider(config(fake)) for _ in range(3)]
    links: list[str] = []
    threads = [threading.Thread(target=lambda p=p: links.append(p.publish_image(images["v2"], {}))) for p in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for p in servers:
        p.close()
    assert len(links) == 3 and len(set(links)) == 1
    assert fake.world.counts["images.insert"] == 1 and len(fake.world.images) == 1
    assert gcs.objects(BUCKET) == []


# -- instances ----------------------------------------------------------------------------------


def test_create_tags_metadata_list_label_console_destroy(cloud, provider, images):
    fake, _ = cloud
    image = images["v1"]
    provider.publish_image(image, {})
    tags = {"infrakit.group": "workers", "infrakit.config.hash": "abc", IMAGE_TAG: image.id, "Name": "Web 1"}
    m = provider.create(MachineSpec({"Image": image.id, "NamePrefix": "web", "Tags": ["http-server"],
                                     "Preemptible": True}, tags, "#!/bin/sh\necho hi\n"))
    assert m.id.startswith("web-") and m.state == "running" and m.tags == tags
    (inst,) = instances(fake)
    items = {i["key"]: i["value"] for i in inst["metadata"]["items"]}
    assert items["infrakit--group"] == "workers" and items["mobykit--image"] == image.id
    assert items["user-data"] == items["userdata"] == items["startup-script"] == "#!/bin/sh\necho hi\n"
    assert inst["labels"]["infrakit_2egroup"] == "workers" and inst["labels"]["x_4eame"] == "_57eb_201"
    assert inst["tags"]["items"] == ["http-server"] and inst["scheduling"]["preemptible"] is True
    inserts = [c for c in fake.calls if c[1] == "instances.insert"]
    assert len(inserts) == 1
    # listed by a server-side label filter, in every configured zone
    assert [x.id for x in provider.list({"infrakit.group": "workers"})] == [m.id]
    assert provider.list({"infrakit.group": "other"}) == []
    assert provider.list({IMAGE_TAG: image.id})[0].tags == tags  # a digest label, exact from metadata
    assert fake.count("instances.list") >= 2 * 3
    assert fake.filters[-1] == f'(labels.mobykit = "1") AND (labels.mobykit_2eimage = "{_label(image.id)}")'
    # labels: replaced with the fingerprint; a concurrent change (412) is read again and redone
    with fake.world.lock:
        fake.world.instances[(PROJECT, ZONE, m.id)]["labelFingerprint"] = "changed-behind-our-back"
    provider.set_tags(m.id, {**tags, "infrakit.config.hash": "def"})
    assert provider.list({"infrakit.config.hash": "def"})[0].id == m.id
    assert {i["key"]: i["value"] for i in instances(fake)[0]["metadata"]["items"]}["infrakit--config--hash"] == "def"
    assert f"mobykit: ready {image.id}" in provider.console_output(m.id)
    provider.destroy(m.id)
    provider.destroy(m.id)  # gone is success
    assert instances(fake) == [] and provider.list({}) == []
    with pytest.raises(NotFound):
        provider.set_tags(m.id, tags)
    with pytest.raises(NotFound):
        provider.console_output(m.id)


def test_listing_pages_through_every_zone(cloud, provider, images):
    fake, _ = cloud
    provider.publish_image(images["v1"], {})
    made = [provider.create(MachineSpec({"Image": images["v1"].id, "Zone": z}, {"g": "x"})).id
            for z in (ZONE, ZONE, ZONE, ZONE2, ZONE2)]
    provider.page_size = 1
    before = fake.count("instances.list")
    assert sorted(m.id for m in provider.list({"g": "x"})) == sorted(made)
    assert fake.count("instances.list") - before == 3 + 2  # a page per instance: 3 in one zone, 2 in the other
    for iid in made:
        provider.destroy(iid)


def test_infrakit_gce_plugin_flat_disk_properties_work_as_they_are(cloud, provider, images):
    fake, _ = cloud
    provider.publish_image(images["v1"], {})
    m = provider.create(MachineSpec({"NamePrefix": "old", "MachineType": "n1-standard-1", "Network": "default",
                                     "Tags": ["web"], "Scopes": ["https://www.googleapis.com/auth/cloudruntimeconfig"],
                                     "DiskSizeMb": 20 * 1024 + 1, "DiskImage": images["v1"].id,
                                     "DiskType": "pd-ssd", "Preemptible": False, "Connect": True,
                                     "Description": "from infrakit"}, {"g": "old"}))
    (inst,) = instances(fake)
    assert inst["disks"][0]["diskSizeGb"] == "21" and inst["description"] == "from infrakit"
    assert {"key": "serial-port-enable", "value": "true"} in inst["metadata"]["items"]
    with pytest.raises(InvalidArgument, match=r"^Properties: give either Disks or DiskSizeMb"):
        provider.validate({"Disks": [{"SizeGb": 10}], "DiskSizeMb": 10240})
    provider.destroy(m.id)


def test_logical_ids_name_instances(cloud, provider, images):
    provider.publish_image(images["v1"], {})
    m = provider.create(MachineSpec({"Image": images["v1"].id}, {"g": "q"}, logical_id="db-0"))
    assert m.id == "db-0" and provider.list({"g": "q"})[0].logical_id == "db-0"
    provider.destroy("db-0")


# -- bad input: one clear error naming the key, nothing created ---------------------------------


@pytest.mark.parametrize("props,match", [
    ({"Preemptible": "yes"}, r"^Properties\.Preemptible: must be true or false"),
    ({"Disks": [{"SizeGb": "10"}]}, r"^Properties\.Disks\[0\]\.SizeGb"),
    ({"Tags": "web"}, r"^Properties\.Tags: must be a list"),
    ({"MachineTyp": "e2"}, r"^Properties: unknown key\(s\) MachineTyp"),
    ({"Zone": "mars-central1-a"}, r"^Properties\.Zone: unknown zone 'mars-central1-a'"),
])
def test_bad_properties_name_the_key_and_create_nothing(cloud, props, match):
    fake, _ = cloud
    core = InstanceCore({"providers": {"gcp": config(fake)}})
    try:
        with pytest.raises(InvalidArgument, match=match):
            core.provision("gcp", Spec(properties={"Image": "projects/debian-cloud/global/images/family/debian-12",
                                                   **props}, tags={"g": "x"}))
    finally:
        core.provider("gcp").close()
    assert not any(r in ("instances.insert", "images.insert") for _, r, _ in fake.calls)


def test_an_unknown_configured_zone_is_named(cloud):
    p = GCPProvider(config(cloud[0], Zones=["nowhere-1a"]))
    with pytest.raises(InvalidArgument, match=r"^providers\.gcp\.Zones: unknown zone 'nowhere-1a'"):
        p.validate({})
    p.close()


def test_missing_credentials_for_a_real_endpoint_is_one_clear_error(env):
    p = GCPProvider({"Project": PROJECT, "Zone": ZONE, "Endpoint": "https://compute.example.test"})
    with pytest.raises(FailedPrecondition, match="no Google credentials.*GOOGLE_APPLICATION_CREDENTIALS"):
        p.validate({})
    p.close()


def test_unknown_config_key_is_named(env):
    with pytest.raises(InvalidArgument, match=r"^providers\.gcp: unknown key\(s\) Regio"):
        GCPProvider({"Regio": "x"})


# -- groups: the real controller, moby flavor and core over this provider -----------------------


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
        return len(g) == 3 and all(i["labels"]["mobykit_2eimage"] == _label(image.id) and i["status"] == "RUNNING"
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


def _label(image_id: str) -> str:
    from mobykit.providers.gcp.labels import label_value

    return label_value(image_id)


# -- labels, endpoint ---------------------------------------------------------------------------


def test_tags_escape_reversibly_to_gce_label_rules():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mobykit.providers.gcp import labels

    def fits(key: str) -> bool:  # a key too long once escaped is refused, naming it (below)
        try:
            labels.label_key(key)
            return True
        except InvalidArgument:
            return False

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.text(min_size=1, max_size=20).filter(fits), st.text(max_size=80), max_size=10))
    def check(tags):
        lab = labels.to_labels(tags)
        assert all(labels.LABEL_KEY.match(k) and labels.LABEL_VALUE.match(v) for k, v in lab.items())
        items = labels.to_metadata_items(tags)
        assert all(labels.METADATA_KEY.match(k) for k in items)
        assert labels.from_labels(lab, items) == tags

    check()
    assert labels.metadata_key("infrakit.group") == "infrakit--group"
    assert labels.from_labels({"my_label": "a_zz", "mobykit": "1"}, {}) == {"my_label": "a_zz"}  # not ours
    assert labels.label_key("infrakit.group") == "infrakit_2egroup"
    with pytest.raises(InvalidArgument, match=r"^Tags\.k{70}: too long for a GCE label key"):
        labels.to_labels({"k" * 70: "v"})


def test_the_endpoint_comes_from_the_environment_and_an_unpublished_image_is_named(cloud, monkeypatch):
    fake, _ = cloud
    monkeypatch.setenv("MOBYKIT_GCP_ENDPOINT", fake.endpoint)
    p = GCPProvider({"Project": PROJECT, "Zone": ZONE})
    try:
        p.validate({})
        with pytest.raises(FailedPrecondition, match="is not published"):
            p.create(MachineSpec({"Image": "sha256:" + "0" * 64}, {}))
    finally:
        p.close()
    assert fake.count("instances.insert") == 0


@pytest.mark.parametrize("bucket,match", [(None, r"^providers\.gcp\.Bucket: required"),
                                          ("no-such-bucket", r"^providers\.gcp\.Bucket: bucket 'no-such-bucket'")])
def test_publishing_without_a_usable_bucket_names_it_and_makes_nothing(cloud, images, bucket, match):
    fake, _ = cloud
    p = GCPProvider({**config(fake), "Bucket": bucket})
    try:
        with pytest.raises(InvalidArgument, match=match):
            p.publish_image(images["v1"], {})
    finally:
        p.close()
    assert fake.world.images == {}
