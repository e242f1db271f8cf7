"""The AWS provider against moto in server mode, over boto3's real HTTP wire (no mocks in its path).

moto runs in this process (``harness.moto_server``: ThreadedMotoServer behind a fault-injecting
WSGI middleware), started once for the module and reset before every test; boto3 reaches it
through ``AWS_ENDPOINT_URL``. moto is extended in this process where it lacks what AWS does
(see ``harness/moto_server.py``): a console that prints our readiness line for instances of our
AMIs (there is no guest: health mode ``console`` reads that line), RegisterImage tags and name
uniqueness, pending EBS snapshots, ClientToken idempotency, ImportSnapshot.

The group tests drive the real group controller, the real moby flavor (building the harness's
small images) and the real InstanceCore over this provider.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from harness.images import SPEC, standard_images
from harness.moto_server import MotoServer, aws_env, ec2_backend, extended_moto, sparse_disk
from mobykit.core import paths
from mobykit.core.instance import InstanceCore
from mobykit.errors import FailedPrecondition, InvalidArgument
from mobykit.flavor.moby import MobyFlavor
from mobykit.group.controller import GroupController, Options
from mobykit.group.spec import parse as parse_group
from mobykit.image.cache import Cache
from mobykit.providers.aws import AWSProvider
from mobykit.providers.aws.blocks import BLOCK
from mobykit.providers.base import BootImage, MachineSpec
from mobykit.spi.group import GroupSpec
from mobykit.spi.types import Spec

REGION = "us-east-1"
IMAGE_TAG = "mobykit.image"
GROUP_TAG = "infrakit.group"
WAIT = 120.0


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with extended_moto() as server:
        yield server


@pytest.fixture
def aws(moto: MotoServer) -> Iterator[MotoServer]:
    moto.reset()
    with aws_env(moto.url, REGION):
        yield moto
    moto.reset()


def provider(**config) -> AWSProvider:
    p = AWSProvider(config)
    p.poll = 0.05
    p.settle = 1.1  # StartTime has whole seconds (moto, as EC2): just over one, not the default 2
    return p


def fake_image(tmp_path: Path, seed: str = "a", size: int = 1 << 30) -> BootImage:
    """A BootImage whose ``aws`` format is a sparse disk (1 GiB) with a few MiB of data."""
    disk = tmp_path / f"{seed}.raw"
    sparse_disk(disk, size, {0: b"\xeb" * 700, 4 << 20: os.urandom(3 * BLOCK + 17), size - 3 * 9: b"end" * 9})
    image_id = "sha256:" + hashlib.sha256(seed.encode()).hexdigest()
    return BootImage(id=image_id, name=seed, kernel=disk, initrd=disk, cmdline="",
                     files=lambda name, size=None: [disk])


def ec2():
    return boto3.client("ec2")


def tagged_amis(image_id: str | None = None) -> list[dict]:
    filters = [{"Name": f"tag:{IMAGE_TAG}", "Values": [image_id] if image_id else ["*"]}]
    return ec2().describe_images(Owners=["self"], Filters=filters)["Images"]


def tagged_snapshots(image_id: str | None = None) -> list[dict]:
    filters = [{"Name": f"tag:{IMAGE_TAG}", "Values": [image_id] if image_id else ["*"]}]
    return ec2().describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]


def backend_instances(group: str | None = None, live: bool = True) -> list:
    """Every instance moto holds (read in this process, without going through the provider)."""
    for _ in range(20):
        try:
            out = []
            for r in list(ec2_backend(REGION).reservations.values()):
                for i in list(r.instances):
                    tags = {t["key"]: t["value"] for t in i.get_tags()}
                    if group is not None and tags.get(GROUP_TAG) != group:
                        continue
                    if live and i._state.name not in ("pending", "running"):
                        continue
                    out.append(i)
            return out
        except RuntimeError:  # a dict changed size under us: the server is busy, read again
            time.sleep(0.001)
    raise AssertionError("could not read moto's instances")


def wait_until(cond, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.05)


# -- properties ----------------------------------------------------------------------------------


INFRAKIT_PROPERTIES = {  # the shape Infrakit's AWS instance plugin reads, as its users wrote it
    "RunInstancesInput": {
        "ImageId": "ami-12345678", "InstanceType": "t2.micro", "KeyName": "ops",
        "SubnetId": "subnet-1", "SecurityGroupIds": ["sg-1"],
        "IamInstanceProfile": {"Name": "worker"}, "Placement": {"AvailabilityZone": "us-east-1a"},
        "BlockDeviceMappings": [{"DeviceName": "/dev/sdb", "Ebs": {"VolumeSize": 20, "VolumeType": "gp2",
                                                                   "DeleteOnTermination": True}}],
        "UserData": base64.b64encode(b"#!/bin/sh\necho hi\n").decode(),
        "Monitoring": {"Enabled": False},
    },
    "Tags": {"env": "prod"},
}


def test_infrakit_aws_properties_validate_as_they_are():
    AWSProvider({}).validate(INFRAKIT_PROPERTIES)
    # A group spec's instance properties are validated at commit, before the flavor adds Image.
    AWSProvider({}).validate({"RunInstancesInput": {"InstanceType": "t3.micro"}, "Tags": {"a": "b"}})
    AWSProvider({}).validate({"Image": "sha256:" + "0" * 64, "Region": "eu-west-1",
                              "RunInstancesInput": {"NetworkInterfaces": [{"DeviceIndex": 0, "SubnetId": "s"}]}})


@pytest.mark.parametrize("props,names", [
    ({"RunInstancesInput": {"InstanceTyp": "t3.micro", "ImageId": "ami-1"}},
     "Properties.RunInstancesInput.InstanceTyp: unknown field of RunInstancesRequest (did you mean"),
    ({"RunInstancesInput": {"ImageId": "ami-1", "Placement": {"AvailabilityZon": "a"}}},
     "Properties.RunInstancesInput.Placement.AvailabilityZon: unknown field"),
    ({"RunInstancesInput": {"ImageId": "ami-1", "SecurityGroupIds": "sg-1"}},
     "Properties.RunInstancesInput.SecurityGroupIds: must be a list"),
    ({"RunInstancesInput": {"ImageId": "ami-1", "EbsOptimized": "yes"}},
     "Properties.RunInstancesInput.EbsOptimized: must be a boolean"),
    ({"RunInstancesInput": {"ImageId": "ami-1", "InstanceType": 3}},
     "Properties.RunInstancesInput.InstanceType: must be a string"),
    ({"RunInstancesInput": {"ImageId": "ami-1", "InstanceType": "t3.gigantic"}},
     "Properties.RunInstancesInput.InstanceType: 't3.gigantic' is not one of"),
    ({"RunInstancesInput": {"ImageId": "ami-1", "MaxCount": 5}}, "Properties.RunInstancesInput.MaxCount: set by"),
    ({"RunInstancesInput": {"ImageId": "ami-1"}, "Tagz": {}}, "Properties.Tagz: unknown key for aws"),
    ({"RunInstancesInput": {"ImageId": "ami-1"}, "Tags": {"a": 1}}, "Properties.Tags: must be an object of strings"),
    ({"RunInstancesInput": {"ImageId": "ami-1"}, "Region": "mars-north-1"}, "Properties.Region: unknown region"),
    ({"Image": "latest"}, "Properties.Image: 'latest' is not a built image id"),
])
def test_bad_properties_name_the_key(props, names):
    with pytest.raises(InvalidArgument) as e:
        AWSProvider({}).validate(props)
    assert names in str(e.value)


def test_any_json_is_accepted_or_refused_with_invalid_argument():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(["RunInstancesInput", "Tags", "Region", "Image", "InstanceType", "Placement",
                            "BlockDeviceMappings", "Ebs", "VolumeSize", "NetworkInterfaces", "UserData"]) | st.text(max_size=6)
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                          max_leaves=20)
    provider = AWSProvider({})

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(keys, values, max_size=4))
    def check(props):
        try:
            provider.validate(props)
        except InvalidArgument:
            pass

    check()


@pytest.mark.parametrize("config,names", [
    ({"Regoin": "x"}, "providers.aws: unknown key(s) Regoin"),
    ({"Import": "ftp"}, "providers.aws.Import: 'ftp'"),
    ({"Import": "s3"}, "providers.aws.Bucket: required"),
    ({"Region": "nowhere-1"}, "providers.aws.Region: unknown region"),
])
def test_bad_config_names_the_key(config, names):
    with pytest.raises(InvalidArgument) as e:
        AWSProvider(config)
    assert names in str(e.value)


# -- publishing ----------------------------------------------------------------------------------


def test_publish_uploads_nonzero_blocks_once_with_checksums(aws, tmp_path):
    p = provider()
    image = fake_image(tmp_path)
    ami = p.publish_image(image, {"Image": image.id})
    assert p.publish_image(image, {"Image": image.id}) == ami  # remembered
    assert provider().publish_image(image, {"Image": image.id}) == ami  # found again by tag, by a new server
    assert p.publisher().uploads == 1
    [snap] = tagged_snapshots(image.id)
    assert snap["State"] == "completed"
    [registered] = tagged_amis(image.id)
    assert registered["ImageId"] == ami
    assert registered["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == snap["SnapshotId"]
    from moto.ebs.models import ebs_backends

    blocks = ebs_backends["123456789012"][REGION].snapshots[snap["SnapshotId"]].blocks
    assert set(blocks) == {0, 8, 9, 10, 11, 2047}  # where fake_image wrote: the zeros of 1 GiB are never sent
    with open(image.kernel, "rb") as disk:
        for index, block in blocks.items():
            assert len(block.block_data) == BLOCK and block.data_length == BLOCK
            assert block.checksum_algorithm == "SHA256"
            assert block.checksum == base64.b64encode(hashlib.sha256(block.block_data).digest()).decode()
            assert block.block_data == os.pread(disk.fileno(), BLOCK, index * BLOCK)


def test_two_servers_publishing_at_once_upload_once(aws, tmp_path):
    image = fake_image(tmp_path, "b")
    servers = [provider(), provider()]
    barrier = threading.Barrier(2)
    results: list[str] = []

    def publish(p: AWSProvider) -> None:
        barrier.wait()
        results.append(p.publish_image(image, {"Image": image.id}))

    threads = [threading.Thread(target=publish, args=(p,)) for p in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(results) == 2 and results[0] == results[1]
    assert sum(p.publisher().uploads for p in servers) == 1
    assert len(tagged_amis(image.id)) == 1 and len(tagged_snapshots(image.id)) == 1


def test_explicit_image_id_wins_and_nothing_is_published(aws, tmp_path):
    p = provider()
    image = fake_image(tmp_path)
    ami = ec2().register_image(Name="someone-elses")["ImageId"]
    props = {"Image": image.id, "RunInstancesInput": {"ImageId": ami}}
    assert p.publish_image(image, props) == ami
    m = p.create(MachineSpec(props, {"a": "1"}))
    assert m.properties["ImageId"] == ami and tagged_amis() == [] and tagged_snapshots() == []


def test_import_from_s3_is_the_alternative(aws, tmp_path):
    boto3.client("s3").create_bucket(Bucket="images")
    p = provider(Import="s3", Bucket="images")
    image = fake_image(tmp_path, "s3", 16 << 20)  # small: moto's S3 keeps every byte
    ami = p.publish_image(image, {"Image": image.id})
    [snap] = tagged_snapshots(image.id)
    assert tagged_amis(image.id)[0]["ImageId"] == ami and snap["VolumeSize"] == 1
    assert boto3.client("s3").list_objects_v2(Bucket="images").get("KeyCount") == 0  # the upload is removed


# -- instances -----------------------------------------------------------------------------------


def test_instances_are_tagged_at_launch_listed_by_tag_labelled_and_destroyed(aws, tmp_path):
    p = provider()
    image = fake_image(tmp_path)
    props = {"Image": image.id, "Tags": {"team": "infra"},
             "RunInstancesInput": {"InstanceType": "t3.micro", "Placement": {"AvailabilityZone": "us-east-1b"}}}
    p.publish_image(image, props)
    m = p.create(MachineSpec(props, {GROUP_TAG: "g", "team": "group-wins"}, "#!/bin/sh\necho init\n", "10.0.0.7"))
    [inst] = backend_instances("g")
    tags = {t["key"]: t["value"] for t in inst.get_tags()}
    assert tags == {GROUP_TAG: "g", "team": "group-wins", IMAGE_TAG: image.id, "mobykit.logical_id": "10.0.0.7"}
    assert m.logical_id == "10.0.0.7" and inst.private_ip == "10.0.0.7"
    user_data = ec2().describe_instance_attribute(InstanceId=m.id, Attribute="userData")["UserData"]["Value"]
    assert base64.b64decode(user_data).decode() == "#!/bin/sh\necho init\n"  # the init, encoded once
    assert inst.instance_type == "t3.micro" and m.properties["Placement"] == "us-east-1b"
    p.create(MachineSpec(props, {GROUP_TAG: "other"}))
    assert [x.id for x in p.list({GROUP_TAG: "g"})] == [m.id]
    assert {x.id for x in p.list({})} >= {m.id}
    assert f"mobykit: ready {image.id}" in p.console_output(m.id)

    ec2().create_tags(Resources=[m.id], Tags=[{"Key": "aws:cloudformation:stack-name", "Value": "s"}])
    p.set_tags(m.id, {GROUP_TAG: "g", "new": "1"})
    tags = {t["Key"]: t["Value"] for t in ec2().describe_tags(
        Filters=[{"Name": "resource-id", "Values": [m.id]}])["Tags"]}
    assert tags == {GROUP_TAG: "g", "new": "1", "aws:cloudformation:stack-name": "s"}
    p.destroy(m.id)
    p.destroy(m.id)  # idempotent
    p.destroy("i-0123456789abcdef0")  # never existed: success too
    assert p.list({GROUP_TAG: "g"}) == []


def test_an_instance_in_another_region_is_published_listed_labelled_and_destroyed_there(aws, tmp_path):
    p = provider()
    image = fake_image(tmp_path)
    props = {"Image": image.id, "Region": "eu-west-1",
             "RunInstancesInput": {"TagSpecifications": [{"ResourceType": "instance", "Tags": [
                 {"Key": "cost-center", "Value": "42"}, {"Key": GROUP_TAG, "Value": "spec-loses"}]}]}}
    p.publish_image(image, props)
    m = p.create(MachineSpec(props, {GROUP_TAG: "eu"}))
    assert tagged_amis(image.id) == []  # nothing in the default region
    [listed] = p.list({GROUP_TAG: "eu"})
    assert listed.id == m.id and listed.properties["Placement"].startswith("eu-west-1")
    assert listed.tags == {GROUP_TAG: "eu", "cost-center": "42", IMAGE_TAG: image.id}
    p.set_tags(m.id, {GROUP_TAG: "eu", "x": "y"})
    assert p.list({"x": "y"})[0].id == m.id
    assert f"mobykit: ready {image.id}" in p.console_output(m.id)
    p.destroy(m.id)
    assert p.list({GROUP_TAG: "eu"}) == []


def server_filters(calls: list[dict[str, str]], action: str) -> list[dict[str, set[str]]]:
    """The ``Filter.N.Name``/``Filter.N.Value.M`` of each recorded call of ``action``, as name -> values."""
    out = []
    for c in calls:
        if c.get("Action") != action:
            continue
        filters: dict[str, set[str]] = {}
        for key, name in c.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "Filter" and parts[2] == "Name":
                prefix = f"Filter.{parts[1]}.Value."
                filters[name] = {v for k, v in c.items() if k.startswith(prefix)}
        out.append(filters)
    return out


def test_listings_are_pending_and_running_on_the_server_and_a_groups_stopped_instances_are_terminated(aws):
    """A stopped instance is no member (listings filter states pending and running on the server, as
    Infrakit's AWS plugin does), so its group replaces it; the group's listing then has the provider
    terminate it, as an Auto Scaling group does, rather than leave it behind with the group's tags.
    Only that group's stopped instances, in that namespace: nothing else is touched."""
    p = provider()
    p.reap_interval = 0.0
    props = {"RunInstancesInput": {"ImageId": ec2().register_image(Name="base")["ImageId"]}}
    keep, stop = (p.create(MachineSpec(props, {GROUP_TAG: "stops", "ns": "a"})) for _ in range(2))
    elsewhere = p.create(MachineSpec(props, {GROUP_TAG: "stops", "ns": "b"}))  # another deployment's
    loose = p.create(MachineSpec(props, {"ns": "a"}))  # no group's
    assert {m.id for m in p.list({})} == {keep.id, stop.id, elsewhere.id, loose.id}  # EC2 shows them all now
    ec2().stop_instances(InstanceIds=[stop.id, elsewhere.id, loose.id])
    aws.faults.record = []
    assert [m.id for m in p.list({GROUP_TAG: "stops", "ns": "a"})] == [keep.id]
    assert [m.id for m in p.list({"ns": "a"})] == [keep.id]

    def state(iid: str) -> str:
        return ec2_backend(REGION).get_instance(iid)._state.name

    wait_until(lambda: state(stop.id) in ("shutting-down", "terminated"), "the group's stopped instance terminated")
    assert state(keep.id) == "running"
    assert state(elsewhere.id) == "stopped" and state(loose.id) == "stopped"
    p.close()
    described = server_filters(aws.faults.record, "DescribeInstances")
    live = {"instance-state-name": {"pending", "running"}}
    assert [f for f in described if f["instance-state-name"] != {"stopping", "stopped"}] == [
        {**live, f"tag:{GROUP_TAG}": {"stops"}, "tag:ns": {"a"}}, {**live, "tag:ns": {"a"}}]
    # the group's listing had the provider look for its stopped instances, on the server too
    assert [f for f in described if f["instance-state-name"] == {"stopping", "stopped"}] == [
        {"instance-state-name": {"stopping", "stopped"}, f"tag:{GROUP_TAG}": {"stops"}, "tag:ns": {"a"}}]


def test_a_launch_is_listed_until_ec2_shows_it_then_ec2_decides():
    """DescribeInstances is eventually consistent: an instance RunInstances returned is listed (as
    pending, with the tags it was launched with) until a listing shows it, for at most ``trust``."""
    from mobykit.providers.aws.recent import Recent
    from mobykit.providers.base import Machine

    now = [0.0]
    recent = Recent(trust=10.0, clock=lambda: now[0])
    a = Machine("i-a", {GROUP_TAG: "g", "ns": "1"}, "pending")
    b = Machine("i-b", {GROUP_TAG: "g", "ns": "1"}, "pending")
    other = Machine("i-c", {GROUP_TAG: "h", "ns": "1"}, "pending")
    for m in (a, b, other):
        recent.launched(m)
    running_a = Machine("i-a", a.tags, "running")
    assert recent.merge([running_a], {GROUP_TAG: "g"}) == [running_a, b]  # b: launched, not shown yet
    assert recent.merge([], {GROUP_TAG: "g"}) == [b]  # a was shown: from now on EC2 decides
    recent.retagged("i-b", {GROUP_TAG: "g", "ns": "2"})  # labelled before EC2 showed it
    assert recent.merge([], {"ns": "1", GROUP_TAG: "g"}) == []
    assert [m.tags["ns"] for m in recent.merge([], {GROUP_TAG: "g"})] == ["2"]
    recent.gone("i-b")  # destroyed
    assert recent.merge([], {GROUP_TAG: "g"}) == []
    assert recent.merge([], {"ns": "1"}) == [other]
    now[0] += 10.5
    assert recent.merge([], {"ns": "1"}) == []  # never shown within trust: taken to be gone


def test_listings_page_through_every_instance(aws, monkeypatch):
    from mobykit.providers.aws import instances

    p = provider()
    spec = {"RunInstancesInput": {"ImageId": ec2().register_image(Name="base")["ImageId"]}}
    made = {p.create(MachineSpec(spec, {GROUP_TAG: "paged"})).id for _ in range(6)}
    p.create(MachineSpec(spec, {GROUP_TAG: "elsewhere"}))
    monkeypatch.setattr(instances, "PAGE", 5)  # EC2's smallest page
    aws.faults.record = []
    assert {m.id for m in p.list({GROUP_TAG: "paged"})} == made
    pages = [c for c in aws.faults.record if c["Action"] == "DescribeInstances"]
    assert len(pages) == 2 and "NextToken" not in pages[0] and pages[1]["NextToken"], pages
    assert pages[0]["MaxResults"] == "5"
    p.close()


def test_clients_retry_in_adaptive_mode_with_a_pool_as_wide_as_the_uploads():
    from mobykit.providers.aws import blocks, console

    c = AWSProvider({"Region": "eu-west-1"}).clients.get()
    for client in (c.ec2, c.ebs, c.s3):
        assert client.meta.config.retries["mode"] == "adaptive"
        assert client.meta.config.max_pool_connections >= max(blocks.PARALLEL, console.PARALLEL)
        assert client.meta.region_name == "eu-west-1"


def test_a_retried_runinstances_whose_answer_was_lost_starts_one_instance(aws, tmp_path):
    p = provider()
    image = fake_image(tmp_path)
    props = {"Image": image.id}
    p.publish_image(image, props)
    aws.faults.kinds, aws.faults.rate = ("lost",), 0.6  # most answers lost after the call was served
    try:
        made = [p.create(MachineSpec(props, {GROUP_TAG: "lost"})).id for _ in range(4)]
    finally:
        aws.faults.rate, aws.faults.kinds = 0.0, ("throttle", "503", "lost")
    assert aws.faults.injected.get("lost", 0) > 0
    assert sorted(i.id for i in backend_instances("lost", live=False)) == sorted(made)


# -- bad input through the core: one clear error, nothing created ----------------------------------


def test_bad_input_through_the_core_creates_nothing(aws, tmp_path, monkeypatch):
    core = InstanceCore({"default_provider": "aws"}, providers={"aws": provider()})
    image = "sha256:" + "1" * 64
    with pytest.raises(InvalidArgument, match=r"Properties\.RunInstancesInput\.InstanceType: must be a string"):
        core.provision("aws", Spec(properties={"Image": image, "RunInstancesInput": {"InstanceType": 2}}))
    with pytest.raises(InvalidArgument, match=r"Properties: Image \(a built image id"):
        core.provision("aws", Spec(properties={"RunInstancesInput": {"InstanceType": "t3.micro"}}))
    with pytest.raises(InvalidArgument, match=r"Properties\.Region: unknown region 'us-moon-1'"):
        core.provision("aws", Spec(properties={"Image": image, "Region": "us-moon-1"}))
    zone = {"RunInstancesInput": {"ImageId": "ami-12345678", "Placement": {"AvailabilityZone": "us-east-1z"}}}
    with pytest.raises(InvalidArgument, match=r"RunInstancesInput\.Placement\.AvailabilityZone: unknown zone "
                                              r"'us-east-1z' in us-east-1 \(known: us-east-1a"):
        core.provision("aws", Spec(properties=zone))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    bare = InstanceCore({"default_provider": "aws"}, providers={"aws": provider()})
    with pytest.raises(FailedPrecondition, match="AWS credentials: none found"):
        bare.provision("aws", Spec(properties={"RunInstancesInput": {"ImageId": "ami-12345678"}}))
    assert backend_instances(live=False) == [] and tagged_amis() == [] and tagged_snapshots() == []


# -- groups --------------------------------------------------------------------------------------


def group(spec_path: Path, size: int, updating: dict | None = None) -> GroupSpec:
    props = {
        "Allocation": {"Size": size},
        "Instance": {"Plugin": "mobykit/aws", "Properties": {"RunInstancesInput": {"InstanceType": "t3.micro"},
                                                             "Tags": {"team": "infra"}}},
        "Flavor": {"Plugin": "mobykit/moby", "Properties": {"Image": str(spec_path),
                                                            "Health": {"Mode": "console", "Deadline": "60s"}}},
        "Updating": updating or {"MaxSurge": 1, "MaxUnavailable": 0},
    }
    return GroupSpec(id="workers", properties=props)


class Bounds:
    """Samples moto's live instances of the group every few ms and keeps the extremes."""

    def __init__(self) -> None:
        self.most, self.least = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            n = len(backend_instances("workers"))
            self.most = max(self.most, n)
            self.least = n if self.least is None else min(self.least, n)
            time.sleep(0.002)

    def __enter__(self) -> Bounds:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def world(aws, tmp_path) -> Iterator[dict]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "app.json").write_text('{"app": true}\n')
    (root / "v1.yml").write_text(SPEC)
    (root / "v2.yml").write_text(SPEC.replace("welcome", "welcome to v2"))
    cache = Cache(tmp_path / "cache")
    standard_images(cache)
    config = {"cache": str(cache.root), "default_provider": "aws", "providers": {"aws": {}}}
    aws_provider = provider()
    core = InstanceCore(config, providers={"aws": aws_provider})
    flavor = MobyFlavor(config, instances=core)
    controllers: list[GroupController] = []

    def start(spec: GroupSpec) -> GroupController:
        ctl = GroupController(parse_group(spec), core, flavor, options=Options(poll_interval=0.2, idle_poll_interval=0.2,
                                                                         backoff_initial=0.2))
        controllers.append(ctl)
        ctl.start()
        return ctl

    with paths.using(paths.PathPolicy.under([root])):
        try:
            yield {"root": root, "provider": aws_provider, "start": start, "core": core, "flavor": flavor}
        finally:
            for ctl in controllers:
                ctl.stop()
            flavor.close()


def converge(ctl: GroupController, size: int) -> None:
    wait_until(lambda: ctl.status().converged and len(backend_instances("workers")) == size,
               f"group converged at {size}: {ctl.status()}")


def run_group_lifecycle(world: dict, aws: MotoServer) -> dict:
    """3 instances, a roll to a new image, then size 0; returns what happened."""
    ctl = world["start"](group(world["root"] / "v1.yml", 3))
    converge(ctl, 3)
    first = {i.id for i in backend_instances("workers")}
    old_image = {t["value"] for i in backend_instances("workers") for t in i.get_tags() if t["key"] == IMAGE_TAG}
    with Bounds() as bounds:
        ctl.update(parse_group(group(world["root"] / "v2.yml", 3)))
        wait_until(lambda: ctl.status().converged and not first & {i.id for i in backend_instances("workers")}
                   and len(backend_instances("workers")) == 3, f"rolled: {ctl.status()}")
    new_image = {t["value"] for i in backend_instances("workers") for t in i.get_tags() if t["key"] == IMAGE_TAG}
    ctl.set_size(0)
    wait_until(lambda: ctl.status().converged and backend_instances("workers") == [], "scaled to 0")
    return {"old": old_image, "new": new_image, "bounds": bounds, "first": first}


def assert_clean(world: dict, seen: dict) -> None:
    [old], [new] = seen["old"], seen["new"]
    assert old != new
    assert world["provider"].publisher().uploads == 2  # one upload per image, ever
    for image in (old, new):
        assert len(tagged_amis(image)) == 1 and len(tagged_snapshots(image)) == 1
    assert all(s["State"] == "completed" for s in tagged_snapshots())
    # No duplicate: every instance ever started was asked for by one Provision (6 = 3 + 3 replacements).
    everything = backend_instances("workers", live=False)
    assert len(everything) == 6, [i.id for i in everything]
    assert all(i._state.name in ("terminated", "shutting-down") for i in everything)  # none leaked


def test_the_group_plugin_accepts_an_aws_group_spec_at_commit(world):
    from mobykit.group.plugin import GroupPluginImpl

    plugin = GroupPluginImpl(lambda name: world["core"], lambda name: world["flavor"], run=False)
    assert "workers" in plugin.commit_group(group(world["root"] / "v1.yml", 3), pretend=True)
    bad = group(world["root"] / "v1.yml", 3)
    bad.properties["Instance"]["Properties"]["RunInstancesInput"]["InstanceTypo"] = "t3.micro"
    with pytest.raises(InvalidArgument, match=r"RunInstancesInput\.InstanceTypo: unknown field"):
        plugin.commit_group(bad, pretend=True)


def test_a_group_converges_rolls_to_a_new_image_and_scales_to_zero(world, aws):
    seen = run_group_lifecycle(world, aws)
    assert seen["bounds"].most <= 3 + 1 and seen["bounds"].least >= 3  # MaxSurge 1, MaxUnavailable 0
    assert_clean(world, seen)


def test_with_throttling_and_5xx_on_a_fifth_of_calls_the_group_still_converges_and_rolls(world, aws):
    aws.faults.rate = 0.2
    seen = run_group_lifecycle(world, aws)
    injected = dict(aws.faults.injected)
    aws.faults.rate = 0.0
    assert sum(injected.values()) >= 10 and set(injected) == {"throttle", "503", "lost"}, injected
    assert seen["bounds"].most <= 3 + 1 and seen["bounds"].least >= 3
    assert_clean(world, seen)


def test_a_stopped_member_is_replaced_and_terminated_not_leaked(world, aws):
    """(The controller's idle poll is 0.2 s here: what it takes to notice the stop is its business.)"""
    world["provider"].reap_interval = 0.0
    ctl = world["start"](group(world["root"] / "v1.yml", 2))
    converge(ctl, 2)
    victim = backend_instances("workers")[0]
    ec2().stop_instances(InstanceIds=[victim.id])
    wait_until(lambda: victim._state.name in ("shutting-down", "terminated"), "the stopped member terminated")
    converge(ctl, 2)
    assert victim.id not in {i.id for i in backend_instances("workers")}
    assert len(backend_instances("workers", live=False)) == 3  # one replacement, no duplicate


# -- console reads ---------------------------------------------------------------------------------


def test_console_reads_prefetched_by_a_listing_are_used_only_while_young():
    from mobykit.errors import Unavailable
    from mobykit.providers.aws.console import ConsoleReads

    now = [100.0]
    reads: list[str] = []
    fail = set()

    def read(iid: str) -> str:
        reads.append(iid)
        if iid in fail:
            fail.discard(iid)
            raise Unavailable(f"GetConsoleOutput {iid}: throttled")
        return f"console of {iid} read #{len(reads)}"

    consoles = ConsoleReads(read, max_age=2.0, clock=lambda: now[0])
    try:
        consoles.prefetch(["i-1", "i-2"])
        first = consoles.get("i-1")
        assert first.startswith("console of i-1")
        wait_until(lambda: len(reads) == 2, "both prefetched", 10)
        assert sorted(reads) == ["i-1", "i-2"]  # both read once, by the listing
        consoles.prefetch(["i-1", "i-2"])  # the next pass, at once: the reads just made serve it
        assert consoles.get("i-1") == first and len(reads) == 2
        now[0] += 1.5  # older than half max_age: a listing reads again; until then the old one serves
        assert consoles.get("i-1") == first and len(reads) == 2
        consoles.prefetch(["i-1"])
        wait_until(lambda: len(reads) == 3, "read again", 10)
        assert consoles.get("i-1") == "console of i-1 read #3"
        now[0] += 2.5
        assert consoles.get("i-2") == "console of i-2 read #4"  # too old: read afresh
        fail.add("i-3")
        consoles.prefetch(["i-3"])
        with pytest.raises(Unavailable):
            consoles.get("i-3")  # a failed read is raised once ...
        assert consoles.get("i-3") == "console of i-3 read #6"  # ... and then read afresh
        consoles.prefetch([f"i-{n}" for n in range(200)])  # a scan, not a group: nothing prefetched
        assert len(reads) == 6
    finally:
        consoles.close()


def test_a_groups_consoles_are_read_while_its_listing_runs(aws):
    """The instances a group's listing will show (the last listing's, and those launched with its
    tags since) have their consoles read while DescribeInstances runs, so a health pass costs one
    round trip; a destroyed one is no longer read."""
    p = provider()
    p.reap_interval = 3600.0  # only the first listing looks for stopped instances: not the one recorded
    image = "sha256:" + "e" * 64  # an AMI of ours (tagged), so moto's console prints the ready line
    ami = ec2().register_image(Name="ours", TagSpecifications=[
        {"ResourceType": "image", "Tags": [{"Key": IMAGE_TAG, "Value": image}]}])["ImageId"]
    props = {"RunInstancesInput": {"ImageId": ami}}
    tags = {GROUP_TAG: "early", "ns": "a"}
    assert p.list(tags) == []
    a = p.create(MachineSpec(props, {**tags, "x": "1"}))
    other = p.create(MachineSpec(props, {GROUP_TAG: "other", "ns": "a"}))
    assert p.expected.before(tags) == {a.id}
    aws.faults.latency = 1.0  # every answer leaves the server at least this long after its request came
    aws.faults.record = []
    assert [m.id for m in p.list(tags)] == [a.id]
    assert f"mobykit: ready {image}" in p.console_output(a.id)
    aws.faults.latency = 0.0
    arrived = {c["Action"]: float(c["at"]) for c in aws.faults.record}
    assert len(aws.faults.record) == 2 and set(arrived) == {"DescribeInstances", "GetConsoleOutput"}  # "other" not read
    # The console was asked for before the listing could have been answered.
    assert arrived["GetConsoleOutput"] < arrived["DescribeInstances"] + 1.0
    p.destroy(a.id)
    assert p.expected.before(tags) == frozenset()
    p.destroy(other.id)
    p.close()


def test_an_instance_launched_while_its_groups_listing_runs_has_its_console_read_meanwhile(aws):
    """The controller lists as soon as the first launch of a wave returns; the rest return while that
    listing runs, and it shows them (recent.py). Their consoles are read from their launch on, not
    after the listing returns; a launch for another group is not read."""
    p = provider()
    p.reap_interval = 3600.0
    image = "sha256:" + "f" * 64
    ami = ec2().register_image(Name="ours", TagSpecifications=[
        {"ResourceType": "image", "Tags": [{"Key": IMAGE_TAG, "Value": image}]}])["ImageId"]
    props = {"RunInstancesInput": {"ImageId": ami}}
    tags = {GROUP_TAG: "wave", "ns": "a"}
    assert p.list(tags) == []
    aws.faults.slow = {"DescribeInstances": 0.8}  # < MAX_AGE / 2: the read is not redone
    aws.faults.record = []
    listed: list[list[str]] = []
    lister = threading.Thread(target=lambda: listed.append([m.id for m in p.list(tags)]))
    lister.start()
    wait_until(lambda: any(c["Action"] == "DescribeInstances" for c in aws.faults.record), "the listing sent", 10)
    made = p.create(MachineSpec(props, {**tags, "x": "1"}))
    p.create(MachineSpec(props, {GROUP_TAG: "another", "ns": "a"}))
    lister.join(30)
    assert listed == [[made.id]]  # the listing shows the launch that returned while it ran
    aws.faults.slow = {}
    arrived = {c["Action"]: float(c["at"]) for c in aws.faults.record if c["Action"] != "RunInstances"}
    assert [c.get("InstanceId") for c in aws.faults.record if c["Action"] == "GetConsoleOutput"] == [made.id]
    assert arrived["GetConsoleOutput"] < arrived["DescribeInstances"] + 0.8  # asked before the listing returned
    assert f"mobykit: ready {image}" in p.console_output(made.id)
    assert len([c for c in aws.faults.record if c["Action"] == "GetConsoleOutput"]) == 1  # that read served it
    p.close()


def test_the_harness_reads_a_resources_tags_as_moto_does(aws):
    """extend_moto reads one resource's tags from its own entry (moto scans every tag of the region):
    the same answer as moto's describe_tags by resource id, for an instance and for its volume."""
    ami = ec2().register_image(Name="base")["ImageId"]
    tags = [{"Key": "b", "Value": "2"}, {"Key": "a", "Value": ""}]
    specs = [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags[:1]}]
    iid = ec2().run_instances(ImageId=ami, MinCount=1, MaxCount=1, TagSpecifications=specs)["Instances"][0]["InstanceId"]
    backend = ec2_backend(REGION)
    inst = backend.get_instance(iid)
    disks = [backend.get_volume(d.volume_id) for d in inst.block_device_mapping.values()]
    assert disks and disks[0].get_tags()
    for resource in (inst, *disks):
        assert resource.get_tags() == backend.describe_tags(filters={"resource-id": [resource.id]})
    assert {(t["key"], t["value"]) for t in inst.get_tags()} == {("a", ""), ("b", "2")}
    ec2().terminate_instances(InstanceIds=[iid])


# -- through `mobykit serve` ------------------------------------------------------------------------


def test_mobykit_serve_serves_mobykit_aws_over_infrakit_json_rpc(aws):
    """A real ``mobykit serve`` child with ``providers.aws`` in its config reaches this moto through
    the environment (``AWS_ENDPOINT_URL``), as Infrakit's manager would drive it."""
    from harness.mobykit_server import call, serve_process

    ami = ec2().register_image(Name="base")["ImageId"]
    config = {"default_provider": "aws", "providers": {"aws": {"NamespaceTags": {"deployment": "t"}}}}
    with serve_process(["--listen", "unix:grpc.sock"], config=config) as sp:
        sock = sp.addresses[1].removeprefix("infrakit:")
        assert call(sock, "Instance.Validate", {"Type": "aws", "Properties": INFRAKIT_PROPERTIES})["result"]
        bad = call(sock, "Instance.Validate", {"Type": "aws", "Properties": {"RunInstancesInput": {"KeyNam": "x"}}})
        assert "Properties.RunInstancesInput.KeyNam: unknown field" in bad["error"]["message"]
        spec = {"Properties": {"RunInstancesInput": {"ImageId": ami, "InstanceType": "t3.micro"}},
                "Tags": {GROUP_TAG: "served"}, "Init": "echo hi"}
        iid = call(sock, "Instance.Provision", {"Type": "aws", "Spec": spec})["result"]["ID"]
        found = call(sock, "Instance.DescribeInstances", {"Type": "aws", "Tags": {GROUP_TAG: "served"}})
        [desc] = found["result"]["Descriptions"]
        assert desc["ID"] == iid and desc["Tags"] == {GROUP_TAG: "served", "deployment": "t"}
        call(sock, "Instance.Destroy", {"Type": "aws", "Instance": iid, "Context": {"Reason": "terminate"}})
        assert call(sock, "Instance.DescribeInstances", {"Type": "aws", "Tags": {}})["result"]["Descriptions"] == []


def test_destroy_in_a_namespace_reaches_a_stopped_instance_that_no_listing_shows(aws):
    """Listings leave stopped instances out, but Destroy still terminates one of this namespace's
    (found by id, ``find``), and still leaves another namespace's alone."""
    p = provider()
    core = InstanceCore({"default_provider": "aws", "providers": {"aws": {"NamespaceTags": {"ns": "a"}}}},
                        providers={"aws": p})
    props = {"RunInstancesInput": {"ImageId": ec2().register_image(Name="base")["ImageId"]}}
    ours = p.create(MachineSpec(props, {"ns": "a"}))
    theirs = p.create(MachineSpec(props, {"ns": "b"}))
    assert {m.id for m in p.list({})} == {ours.id, theirs.id}  # EC2 shows them: no longer "recent"
    ec2().stop_instances(InstanceIds=[ours.id, theirs.id])
    assert p.list({"ns": "a"}) == [] and p.find(ours.id).state in ("stopping", "stopped")
    core.destroy("aws", ours.id)
    core.destroy("aws", theirs.id)

    def state(iid: str) -> str:
        return ec2_backend(REGION).get_instance(iid)._state.name

    assert state(ours.id) in ("shutting-down", "terminated")
    assert state(theirs.id) == "stopped"
    assert p.find("i-0123456789abcdef0") is None
    p.close()
