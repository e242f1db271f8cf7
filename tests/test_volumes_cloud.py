"""Persistent volumes (``Volumes``) and Infrakit ``Attachments`` on the clouds, against the local
servers: moto in server mode (EBS) and the fake Compute API (persistent disks). A logical id's
volume is found by tag/label, attached, and kept when its instance is replaced: the replacement
gets the same volume, with nothing deleted; bad input names the key and creates nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator

import boto3
import pytest

from harness.moto_server import MotoServer, aws_env, extended_moto
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound
from mobykit.providers.aws import AWSProvider
from mobykit.providers.base import MachineSpec

REGION = "us-east-1"
GROUP = "infrakit.group"
NS = {"deployment": "test"}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with extended_moto() as server:
        yield server


@pytest.fixture
def aws(moto: MotoServer) -> Iterator[AWSProvider]:
    moto.reset()
    with aws_env(moto.url, REGION):
        p = AWSProvider({})
        p.poll = 0.05
        try:
            yield p
        finally:
            p.close()
            moto.reset()


_CLIENTS: dict[str, object] = {}


def ec2():
    """One boto3 client per moto server (making one loads EC2's model: a second or so under load)."""
    url = os.environ["AWS_ENDPOINT_URL"]
    if url not in _CLIENTS:
        _CLIENTS[url] = boto3.client("ec2")
    return _CLIENTS[url]


def ami() -> str:
    return "ami-12c6146b"  # one of moto's default AMIs (moto checks the id)


def props(**extra) -> dict:
    return {"RunInstancesInput": {"ImageId": ami(), "InstanceType": "t3.micro"},
            "Volumes": [{"Name": "data", "SizeGb": 2}], **extra}


def spec(p: dict, lid: str = "db1", attachments=()) -> MachineSpec:
    return MachineSpec(p, {GROUP: "db", **NS}, logical_id=lid, namespace=dict(NS), attachments=list(attachments))


def ours() -> list[dict]:
    return ec2().describe_volumes(Filters=[{"Name": "tag-key", "Values": ["mobykit.volume"]}])["Volumes"]


def attached(instance_id: str) -> dict[str, str]:
    """device -> volume id of what EC2 shows attached to the instance (root volume left out)."""
    r = ec2().describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {b["DeviceName"]: b["Ebs"]["VolumeId"] for b in r.get("BlockDeviceMappings", [])
            if b["DeviceName"] != "/dev/sda1"}


def test_aws_volume_is_made_tagged_attached_and_kept_across_replacement(aws):
    p = props(Volumes=[{"Name": "data", "SizeGb": 2}, {"Name": "logs", "SizeGb": 1}])
    first = aws.create(spec(p))
    [data, logs] = sorted(ours(), key=lambda v: v["Size"], reverse=True)
    tags = {t["Key"]: t["Value"] for t in data["Tags"]}
    assert tags == {"mobykit.volume": "db-db1-data", GROUP: "db", "mobykit.logical_id": "db1", **NS}
    assert data["VolumeType"] == "gp3" and data["Size"] == 2 and logs["Size"] == 1
    zone = first.properties["Placement"]
    assert data["AvailabilityZone"] == zone
    assert attached(first.id) == {"/dev/sdf": data["VolumeId"], "/dev/sdg": logs["VolumeId"]}
    r = ec2().describe_instances(InstanceIds=[first.id])["Reservations"][0]["Instances"][0]
    assert [b["Ebs"]["DeleteOnTermination"] for b in r["BlockDeviceMappings"] if b["DeviceName"] != "/dev/sda1"] \
        == [False, False]

    # a second instance for the same logical id while the first runs: refused, nothing launched
    with pytest.raises(FailedPrecondition, match=f"still attached to instance {first.id}"):
        aws.create(spec(p))
    assert [m.id for m in aws.list({GROUP: "db"})] == [first.id]

    # a roll: the old instance goes, the replacement takes over the same volumes in their zone
    aws.destroy(first.id)
    second = aws.create(spec(p))
    assert second.id != first.id and second.properties["Placement"] == zone
    assert attached(second.id) == {"/dev/sdf": data["VolumeId"], "/dev/sdg": logs["VolumeId"]}
    assert len(ours()) == 2  # nothing made twice, nothing deleted

    # another logical id owns its own volume
    other = aws.create(spec(p, lid="db2"))
    assert len(ours()) == 4 and attached(other.id)["/dev/sdf"] not in (data["VolumeId"], logs["VolumeId"])

    listed = aws.list_volumes(NS)
    assert [(v["Name"], v["SizeGb"], v["Instance"]) for v in listed][:2] == [
        ("db-db1-data", 2, second.id), ("db-db1-logs", 1, second.id)]
    assert aws.list_volumes({"deployment": "other"}) == []
    with pytest.raises(FailedPrecondition, match="attached to instance"):
        aws.remove_volume("db-db1-data", NS)
    aws.destroy(second.id)
    aws.destroy(other.id)
    aws.remove_volume("db-db1-data", NS)
    with pytest.raises(NotFound, match="db-db1-data"):
        aws.remove_volume("db-db1-data", NS)
    assert sorted(v["Name"] for v in aws.list_volumes(NS)) == ["db-db1-logs", "db-db2-data", "db-db2-logs"]


def test_aws_replacement_waits_until_a_terminating_instance_releases_the_volume(aws):
    """EC2 keeps a volume attached while its instance shuts down (moto detaches at once: here the
    old instance is put in shutting-down with the volume still attached, and released later)."""
    import threading
    import time

    from harness.moto_server import ec2_backend

    p = props()
    first = aws.create(spec(p))
    [vol] = ours()
    backend = ec2_backend(REGION)
    inst = backend.get_instance(first.id)
    inst._state.name, inst._state.code = "shutting-down", 32
    released = threading.Event()

    def release() -> None:
        time.sleep(0.3)
        backend.detach_volume(vol["VolumeId"], first.id, "/dev/sdf")
        inst._state.name, inst._state.code = "terminated", 48
        released.set()

    t = threading.Thread(target=release)
    t.start()
    try:
        second = aws.create(spec(p))
    finally:
        t.join()
    assert released.is_set() and attached(second.id) == {"/dev/sdf": vol["VolumeId"]}


def test_aws_attachment_id_names_an_existing_volume(aws):
    """Through the instance core, as Infrakit's Provision carries it (Spec.Attachments)."""
    from mobykit.core.instance import InstanceCore
    from mobykit.spi.types import Attachment, Spec

    vol = ec2().create_volume(AvailabilityZone="us-east-1c", Size=3)["VolumeId"]
    core = InstanceCore({"default_provider": "aws", "providers": {"aws": {"NamespaceTags": NS}}},
                        providers={"aws": aws})
    iid = core.provision("aws", Spec(properties={"RunInstancesInput": {"ImageId": ami()}}, tags={GROUP: "g"},
                                     attachments=[Attachment(vol, "ebs")]))
    [m] = aws.list({GROUP: "g", **NS})
    assert m.id == iid and m.properties["Placement"] == "us-east-1c"  # launched where the volume is
    assert attached(m.id) == {"/dev/sdf": vol}
    aws.destroy(m.id)
    assert ec2().describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available"  # kept


@pytest.mark.parametrize("properties, attachments, names", [
    ({"Volumes": [{"Name": "data", "SizeGB": 1}]}, [], "Properties.Volumes[0].SizeGB: unknown key"),
    ({"Volumes": [{"Name": "Data", "SizeGb": 1}]}, [], "Properties.Volumes[0].Name"),
    ({"Volumes": [{"Name": "data", "SizeGb": 0}]}, [], "Properties.Volumes[0].SizeGb"),
    ({"Volumes": {"Name": "data"}}, [], "Properties.Volumes: must be a list"),
    ({}, [("vol-0123456789abcdef0", "ebs")], "Spec.Attachments[0].ID: no EBS volume"),
    ({}, [("disk-1", "ebs")], "Spec.Attachments[0].ID: 'disk-1' is not an EBS volume id"),
    ({}, [("vol-0123456789abcdef0", "nfs")], "Spec.Attachments[0].Type"),
])
def test_aws_bad_volume_input_names_the_key_and_creates_nothing(aws, properties, attachments, names):
    p = {"RunInstancesInput": {"ImageId": ami()}, **properties}
    with pytest.raises(InvalidArgument) as e:
        aws.validate(p)
        aws.create(MachineSpec(p, {GROUP: "g"}, logical_id="a", attachments=attachments))
    assert names in str(e.value)
    assert aws.list({GROUP: "g"}) == [] and ours() == []


def test_aws_volumes_without_a_logical_id_are_refused(aws):
    with pytest.raises(InvalidArgument, match="Properties.Volumes: volumes belong to a logical id"):
        aws.create(MachineSpec(props(), {GROUP: "g"}))
    assert aws.list({GROUP: "g"}) == [] and ours() == []


# -- GCP: persistent disks on the fake Compute API ------------------------------------------------


@pytest.fixture(scope="module")
def gce_server() -> Iterator:
    pytest.importorskip("google.cloud.compute_v1")
    from gce_fake.server import FakeCompute, running

    with running(FakeCompute()) as fake:
        yield fake


@pytest.fixture
def gce(gce_server, monkeypatch) -> Iterator[tuple]:
    """The fake Compute API (a fresh World) with one READY source image, and a provider on it
    (no credentials)."""
    from gce_fake.common import PROJECT, ZONE
    from gce_fake.state import BASE, World

    from mobykit.providers.gcp import GCPProvider

    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "MOBYKIT_GCP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    fake = gce_server
    fake.world = World()
    link = f"{BASE}/projects/{PROJECT}/global/images/base"
    fake.world.images[(PROJECT, "base")] = {"name": "base", "status": "READY", "description": "",
                                            "selfLink": link, "labels": {}}
    p = GCPProvider({"Project": PROJECT, "Zone": ZONE, "Endpoint": fake.endpoint})
    try:
        yield fake, p, f"projects/{PROJECT}/global/images/base"
    finally:
        p.close()


def gce_disks(fake) -> dict[str, dict]:
    with fake.world.lock:
        return {k[2]: dict(v) for k, v in fake.world.disks.items()}


def gce_attached(fake, name: str) -> dict[str, str]:
    """deviceName -> disk name of an instance's non-boot disks, as the fake holds them."""
    with fake.world.lock:
        inst = next(v for k, v in fake.world.instances.items() if k[2] == name)
        return {d["deviceName"]: d["source"].rsplit("/", 1)[-1] for d in inst["disks"] if not d["boot"]}


def test_gcp_disk_is_made_labelled_attached_at_insert_and_kept_across_replacement(gce):
    fake, p, image = gce
    props = {"Image": image, "Volumes": [{"Name": "data", "SizeGb": 3}]}
    first = p.create(spec(props, lid="Db.1"))  # not a GCE name: the disk name is escaped
    [(name, disk)] = gce_disks(fake).items()
    assert name.startswith("db-db-1-data-") and disk["sizeGb"] == "3" and disk["type"].endswith("/pd-balanced")
    from mobykit.providers.gcp.labels import label_value

    assert disk["labels"]["mobykit_2evolume"] == label_value("db-Db.1-data") and disk["labels"]["deployment"] == "test"
    assert disk["description"] == "db-Db.1-data" and [u.rsplit("/", 1)[-1] for u in disk["users"]] == [first.id]
    assert gce_attached(fake, first.id) == {"data": name}
    with fake.world.lock:
        inst = next(v for k, v in fake.world.instances.items() if k[2] == first.id)
    assert [d["autoDelete"] for d in inst["disks"] if not d["boot"]] == [False]

    with pytest.raises(FailedPrecondition, match=f"still attached to instance {first.id}"):
        p.create(spec(props, lid="Db.1"))
    p.destroy(first.id)
    assert list(gce_disks(fake)) == [name] and "users" not in gce_disks(fake)[name]  # kept, released
    second = p.create(spec(props, lid="Db.1"))
    assert gce_attached(fake, second.id) == {"data": name} and len(gce_disks(fake)) == 1
    assert fake.world.counts["disks.insert"] == 1

    [listed] = p.list_volumes(NS)
    assert (listed["Name"], listed["SizeGb"], listed["Instance"]) == ("db-Db.1-data", 3, second.id)
    assert p.list_volumes({"deployment": "other"}) == []
    with pytest.raises(FailedPrecondition, match="attached to instance"):
        p.remove_volume("db-Db.1-data", NS)
    p.destroy(second.id)
    p.remove_volume("db-Db.1-data", NS)
    assert gce_disks(fake) == {}
    with pytest.raises(NotFound):
        p.remove_volume("db-Db.1-data", NS)


def test_gcp_replacement_waits_until_a_deleted_instance_releases_the_disk(gce):
    """The old member's delete is still running (STOPPING, the disk still in use): the new one,
    named for the same logical id, waits until it is gone, then is inserted with the disk."""
    import threading
    import time

    from gce_fake.common import PROJECT, ZONE

    fake, p, image = gce
    props = {"Image": image, "Volumes": [{"Name": "data", "SizeGb": 1}]}
    first = p.create(spec(props, lid="db1"))
    assert first.id == "db1"
    with fake.world.lock:
        op = fake.world.delete_instance(PROJECT, ZONE, "db1", None)  # someone else's delete, not polled yet

    def finish() -> None:
        time.sleep(0.3)
        with fake.world.lock:
            fake.world.poll(op["name"])
            fake.world.poll(op["name"])

    t = threading.Thread(target=finish)
    t.start()
    try:
        second = p.create(spec(props, lid="db1"))
    finally:
        t.join()
    [name] = gce_disks(fake)
    assert second.id == "db1" and gce_attached(fake, "db1") == {"data": name}
    assert [u.rsplit("/", 1)[-1] for u in gce_disks(fake)[name]["users"]] == ["db1"]


def test_gcp_attachment_names_an_existing_disk(gce):
    from gce_fake import disks
    from gce_fake.common import PROJECT, ZONE

    fake, p, image = gce
    with fake.world.lock:
        op = disks.insert(fake.world, PROJECT, ZONE, {"name": "shared", "sizeGb": "5"}, None)
        fake.world.poll(op["name"])
        fake.world.poll(op["name"])
    m = p.create(MachineSpec({"Image": image}, {GROUP: "g"}, attachments=[("shared", "disk")]))
    assert gce_attached(fake, m.id) == {"shared": "shared"}
    p.destroy(m.id)
    assert "shared" in gce_disks(fake)


@pytest.mark.parametrize("properties, attachments, names", [
    ({"Volumes": [{"Name": "data", "Size": 1}]}, [], "Properties.Volumes[0].Size: unknown key"),
    ({"Volumes": [{"Name": "data", "SizeGb": "1"}]}, [], "Properties.Volumes[0].SizeGb"),
    ({}, [("nosuch", "disk")], "Spec.Attachments[0].ID: no disk 'nosuch'"),
    ({}, [("Bad_Name", "")], "Spec.Attachments[0].ID: 'Bad_Name' is not a GCE disk name"),
    ({}, [("shared", "nfs")], "Spec.Attachments[0].Type"),
])
def test_gcp_bad_volume_input_names_the_key_and_creates_nothing(gce, properties, attachments, names):
    fake, p, image = gce
    with pytest.raises(InvalidArgument) as e:
        p.create(MachineSpec({"Image": image, **properties}, {GROUP: "g"}, logical_id="a",
                             attachments=attachments))
    assert names in str(e.value)
    assert fake.world.instances == {} and fake.world.disks == {}


def test_gcp_volumes_without_a_logical_id_are_refused(gce):
    fake, p, image = gce
    with pytest.raises(InvalidArgument, match="Properties.Volumes: volumes belong to a logical id"):
        p.create(MachineSpec({"Image": image, "Volumes": [{"Name": "data", "SizeGb": 1}]}, {GROUP: "g"}))
    assert fake.world.instances == {} and fake.world.disks == {}


# -- the CLI: volume ls/rm on a cloud provider, group destroy --volumes ---------------------------


def test_group_destroy_volumes_removes_what_its_logical_ids_own(aws, tmp_path, capsys):
    """A logical-ID group on AWS through the real group controller and gRPC server: its members
    get their volumes; ``volume ls --provider aws`` lists them; ``group destroy --volumes``
    destroys the group and then its volumes, and only its own."""
    import time

    import yaml

    from harness.mobykit_server import grpc_server, memory_plugins
    from mobykit.cli.main import main
    from mobykit.core.instance import InstanceCore
    from mobykit.flavor.vanilla import VanillaFlavor
    from mobykit.group.controller import Options
    from mobykit.group.plugin import GroupPluginImpl
    from mobykit.spi.group import GroupSpec

    config = {"default_provider": "aws", "providers": {"aws": {"NamespaceTags": NS}}}
    cfg_file = tmp_path / "serve.yml"
    cfg_file.write_text(yaml.safe_dump(config))
    core = InstanceCore(config, providers={"aws": aws})
    flavor = VanillaFlavor()
    plugin = GroupPluginImpl(lambda name: core, lambda name: flavor, options=Options(poll_interval=0.05))
    # someone else's volume of the same owner names in another namespace: never touched
    ec2().create_volume(AvailabilityZone="us-east-1a", Size=1, TagSpecifications=[{"ResourceType": "volume", "Tags": [
        {"Key": "mobykit.volume", "Value": "db-m1-data"}, {"Key": "deployment", "Value": "other"}]}])
    try:
        with grpc_server(memory_plugins(aws, name="aws", config=config, group=plugin)) as (_, bound, _tmp):
            plugin.commit_group(GroupSpec("db", {
                "Allocation": {"LogicalIDs": ["m1", "m2"]},
                "Instance": {"Plugin": "mobykit/aws", "Properties": {
                    "RunInstancesInput": {"ImageId": ami()}, "Volumes": [{"Name": "data", "SizeGb": 1}]}},
                "Flavor": {"Plugin": "vanilla", "Properties": {}}}), False)
            deadline = time.monotonic() + 60  # a liveness bound, not a speed assertion
            while len([v for v in aws.list_volumes(NS) if v["Instance"]]) < 2:
                assert time.monotonic() < deadline, "the group's members never got their volumes"
                time.sleep(0.05)

            ids = {v["Name"]: (v["Id"], v["Instance"]) for v in aws.list_volumes(NS)}

            # a rolling update replaces each member; the replacement gets its logical id's volume
            plugin.commit_group(GroupSpec("db", {
                "Allocation": {"LogicalIDs": ["m1", "m2"]},
                "Instance": {"Plugin": "mobykit/aws", "Properties": {
                    "RunInstancesInput": {"ImageId": ami(), "InstanceType": "t3.small"},
                    "Volumes": [{"Name": "data", "SizeGb": 1}]}},
                "Flavor": {"Plugin": "vanilla", "Properties": {}}}), False)
            while True:
                now = {v["Name"]: (v["Id"], v["Instance"]) for v in aws.list_volumes(NS)}
                if all(now[n][1] and now[n][1] != ids[n][1] for n in ids) and plugin.describe_group("db").converged:
                    break
                assert time.monotonic() < deadline + 60, "the roll did not finish"
                time.sleep(0.05)
            assert {n: v[0] for n, v in now.items()} == {n: v[0] for n, v in ids.items()}  # same volumes

            capsys.readouterr()
            assert main(["volume", "ls", "--config", str(cfg_file)]) == 0
            rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
            assert [(r[0], r[1]) for r in rows] == [("db-m1-data", "1G"), ("db-m2-data", "1G")]
            assert all(r[3].startswith("i-") for r in rows) and [r[4] for r in rows] == ["db/m1", "db/m2"]

            assert main(["group", "--server", bound[0], "destroy", "--volumes", "--config", str(cfg_file), "db"]) == 0
            out = capsys.readouterr().out
            assert "group db destroyed" in out and "volume db-m1-data removed" in out and "volume db-m2-data removed" in out
            assert aws.list_volumes(NS) == [] and aws.list({GROUP: "db"}) == []
            assert [v["Name"] for v in aws.list_volumes({"deployment": "other"})] == ["db-m1-data"]
            assert main(["volume", "rm", "--provider", "aws", "--config", str(cfg_file), "db-m1-data"]) \
                == NotFound.exit_code
    finally:
        plugin.close()
