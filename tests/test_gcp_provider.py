"""The ``mobykit/gcp`` provider against real local servers: the fake Compute Engine REST API
(``gce_fake``) and ``gcp-storage-emulator``, reached through the real google-cloud-compute and
google-cloud-storage clients. No mock object is in the provider's path. Groups: test_gcp_group.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("google.cloud.compute_v1")
pytest.importorskip("google.cloud.storage")
pytest.importorskip("gcp_storage_emulator")
pytest_plugins = ("gce_fake.fixtures",)  # env, cloud, images

from gce_fake.common import (  # noqa: E402
    BUCKET,
    PROJECT,
    WAIT,
    ZONE,
    ZONE2,
    config,
    instances,
    label_of,
)

from mobykit.core.instance import InstanceCore  # noqa: E402
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402
from mobykit.flavor.moby import IMAGE_TAG  # noqa: E402
from mobykit.providers.base import MachineSpec  # noqa: E402
from mobykit.providers.gcp import GCPProvider  # noqa: E402
from mobykit.spi.types import Spec  # noqa: E402


@pytest.fixture
def provider(cloud) -> Iterator[GCPProvider]:
    p = GCPProvider(config(cloud[0]))
    yield p
    p.close()


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
    assert fake.filters[-1] == f'(labels.mobykit = "1") AND (labels.mobykit_2eimage = "{label_of(image.id)}")'
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


@pytest.mark.parametrize("endpoint", [None, "https://compute.example.test", "https://127.0.0.1:8085",
                                      "http://10.1.2.3:8085", "http://compute.example.test"])
def test_missing_credentials_for_a_real_endpoint_is_one_clear_error(env, endpoint):
    """Anonymous credentials only for plain http on loopback (an emulator): anything else that could
    be the real API, or something pretending to be it, needs Application Default Credentials."""
    p = GCPProvider({"Project": PROJECT, "Zone": ZONE, "Endpoint": endpoint})
    with pytest.raises(FailedPrecondition, match="no Google credentials.*GOOGLE_APPLICATION_CREDENTIALS"):
        p.validate({})
    p.close()


@pytest.mark.parametrize("endpoint,anonymous", [
    ("http://127.0.0.1:8085", True), ("http://localhost:8085", True), ("http://[::1]:8085", True),
    ("http://127.8.9.10", True), ("https://127.0.0.1:8085", False), ("http://10.1.2.3", False),
    ("http://localhost.example.test", False), ("http://compute.example.test", False), (None, False), ("", False),
])
def test_anonymous_credentials_are_for_plain_http_loopback_only(endpoint, anonymous):
    from mobykit.providers.gcp.api import is_loopback_http

    assert is_loopback_http(endpoint) is anonymous


def test_the_project_comes_from_the_config_then_the_environment(cloud, monkeypatch):
    fake, _ = cloud
    bare = GCPProvider({"Zone": ZONE, "Endpoint": fake.endpoint})  # no Project; no ADC (env)
    try:
        with pytest.raises(InvalidArgument, match=r"^Properties\.Project: no project .*GOOGLE_CLOUD_PROJECT"):
            bare.validate({})
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
        bare.validate({})  # the zone is looked up in that project
        assert bare.project() == PROJECT
        other = GCPProvider({"Project": "configured", "Zone": ZONE, "Endpoint": fake.endpoint})
        assert other.project() == "configured"  # the config wins over the environment
        other.close()
    finally:
        bare.close()


def test_unknown_config_key_is_named(env):
    with pytest.raises(InvalidArgument, match=r"^providers\.gcp: unknown key\(s\) Regio"):
        GCPProvider({"Regio": "x"})


# -- labels, endpoint ---------------------------------------------------------------------------


def test_tags_escape_reversibly_to_gce_label_rules():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mobykit.providers.gcp import labels

    def fits(key: str) -> bool:  # a key too long once escaped, or mobykit's own, is refused, naming it (below)
        if key == labels.MANAGED_LABEL:
            return False
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
    with pytest.raises(InvalidArgument, match=f"Tags.{labels.MANAGED_LABEL}: reserved by mobykit"):
        labels.to_labels({labels.MANAGED_LABEL: ""})
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
