"""Persistent volumes on libvirt (instance property ``Volumes``), on libvirt's in-process
``test:///default`` driver: a logical id owns ``<group>-<lid>-<name>``, made on first use,
attached to whichever instance holds the id, kept when that instance is destroyed (replacement,
scale-down), refused to a second instance while attached, removed only by ``mobykit volume rm``."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

libvirt = pytest.importorskip("libvirt")

from harness.libvirtd import remove_everything  # noqa: E402
from mobykit.cli.main import main  # noqa: E402
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402
from mobykit.providers.base import MachineSpec  # noqa: E402
from mobykit.providers.libvirt import LibvirtProvider  # noqa: E402

URI = "test:///default"
POOL = "mobykit-voltest"
VOLUMES = [{"Name": "data", "SizeGb": 1}, {"Name": "logs", "SizeGb": 2}]


@pytest.fixture
def provider():
    p = LibvirtProvider({"URI": URI, "Pool": POOL})
    yield p
    remove_everything(p, URI, POOL)
    remove_everything(LibvirtProvider({"URI": URI, "Pool": POOL}), URI, POOL + "-volumes")


def _spec(lid: str | None = "m1", group: str = "db", **props) -> MachineSpec:
    props.setdefault("Kernel", "/boot/vmlinuz-test")
    props.setdefault("Initrd", "/boot/initrd-test")
    props.setdefault("Volumes", VOLUMES)
    return MachineSpec(properties=props, tags={"infrakit.group": group}, logical_id=lid)


def _disks(instance_id: str) -> list[tuple[str, str, str]]:
    """(target dev, serial, source file) of the instance's data disks."""
    conn = libvirt.open(URI)
    try:
        root = ET.fromstring(conn.lookupByName(instance_id).XMLDesc(0))
    finally:
        conn.close()
    return [(d.find("target").get("dev"), d.findtext("serial"), d.find("source").get("file"))
            for d in root.iterfind("devices/disk") if d.findtext("serial")]


def _pool(name: str) -> list[str]:
    conn = libvirt.open(URI)
    try:
        pool = conn.storagePoolLookupByName(name)
        pool.refresh(0)
        return sorted(pool.listVolumes())
    finally:
        conn.close()


def test_a_logical_id_owns_its_volumes_across_replacement(provider):
    first = provider.create(_spec())
    disks = _disks(first.id)
    assert [(dev, serial) for dev, serial, _ in disks] == [("vdb", "data"), ("vdc", "logs")]
    assert _pool(POOL + "-volumes") == ["db-m1-data", "db-m1-logs"]
    sizes = {v["Name"]: v["SizeGb"] for v in provider.list_volumes()}
    assert sizes == {"db-m1-data": 1, "db-m1-logs": 2}

    # A second holder while the first still has the disks would corrupt them: refused, nothing made.
    with pytest.raises(FailedPrecondition, match="db-m1-data is still attached to instance " + first.id):
        provider.create(_spec())
    assert [m.id for m in provider.list({})] == [first.id]

    provider.destroy(first.id)  # a rolling replacement destroys first ...
    assert _pool(POOL + "-volumes") == ["db-m1-data", "db-m1-logs"], "destroy keeps the data"
    assert not [n for n in _pool(POOL) if n.startswith(first.id)], "but removes the instance's own volumes"
    second = provider.create(_spec())  # ... then the new holder takes over the same disks
    assert _disks(second.id) == disks
    other = provider.create(_spec(lid="m2"))  # another id: its own volumes
    assert [serial for _, serial, _ in _disks(other.id)] == ["data", "logs"]
    assert _pool(POOL + "-volumes") == ["db-m1-data", "db-m1-logs", "db-m2-data", "db-m2-logs"]


def test_volume_rm_deletes_only_what_no_instance_has_attached(provider, capsys):
    held = provider.create(_spec())
    provider.destroy(provider.create(_spec(lid="m2")).id)  # scale-down: m2's volumes stay
    listing = {v["Name"]: v["Instance"] for v in provider.list_volumes()}
    assert listing == {"db-m1-data": held.id, "db-m1-logs": held.id, "db-m2-data": "", "db-m2-logs": ""}

    args = ["--uri", URI, "--pool", POOL]
    assert main(["volume", "ls", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == ["db-m1-data", "db-m1-logs", "db-m2-data", "db-m2-logs"]
    assert out[0].split("\t")[1] == "1G" and out[0].split("\t")[3] == held.id and out[2].split("\t")[3] == "-"

    assert main(["volume", "rm", "db-m2-data", *args]) == 0
    assert main(["volume", "rm", "db-m1-data", *args]) == FailedPrecondition.exit_code
    err = capsys.readouterr().err
    assert f"volume 'db-m1-data' is attached to instance {held.id}; destroy it first" in err
    assert _pool(POOL + "-volumes") == ["db-m1-data", "db-m1-logs", "db-m2-logs"]
    with pytest.raises(NotFound):
        provider.remove_volume("db-m2-data")
    provider.destroy(held.id)
    provider.remove_volume("db-m1-data")
    assert _pool(POOL + "-volumes") == ["db-m1-logs", "db-m2-logs"]


def test_volumes_without_a_logical_id_are_an_error_that_says_so(provider):
    with pytest.raises(InvalidArgument, match="this instance has no logical id - give the group Allocation.LogicalIDs"):
        provider.create(_spec(lid=None))
    assert provider.list({}) == []
    provider.create(_spec(lid=None, Volumes=[]))  # no volumes: no logical id needed


@pytest.mark.parametrize("volumes, message", [
    ({"Name": "data"}, 'Properties.Volumes: must be a list like [{"Name": "data", "SizeGb": 1}]'),
    (["data"], 'Properties.Volumes[0]: must be an object like {"Name": "data", "SizeGb": 1}'),
    ([{"Name": "Data", "SizeGb": 1}], "Properties.Volumes[0].Name: 'Data' must be 1-20 lower-case letters"),
    ([{"Name": "data", "SizeGb": 1}, {"Name": "data", "SizeGb": 2}], "Properties.Volumes[1].Name: 'data' given twice"),
    ([{"Name": "data", "SizeGb": 0}], "Properties.Volumes[0].SizeGb: must be a whole number of GiB from 1 to 16384, got 0"),
    ([{"Name": "data", "SizeGb": "1G"}], "Properties.Volumes[0].SizeGb: must be a whole number"),
    ([{"Name": "data", "SizeGb": 1, "Type": "ssd"}], "Properties.Volumes[0].Type: unknown key (known: Name, SizeGb)"),
])
def test_bad_volumes_are_named_at_validate(provider, volumes, message):
    with pytest.raises(InvalidArgument) as e:
        provider.validate({"Kernel": "/boot/vmlinuz-test", "Initrd": "/boot/initrd-test", "Volumes": volumes})
    assert str(e.value).startswith(message)


def test_a_quorum_group_keeps_each_members_volume_through_a_roll_and_a_scale_down(provider):
    """Through the group controller: a rolling update replaces each member (destroy, then create)
    and the new member gets its logical id's disk; a logical id taken out keeps its volume; so does
    destroying the group."""
    import time

    from mobykit.core.instance import InstanceCore
    from mobykit.flavor.vanilla import VanillaFlavor
    from mobykit.group.controller import Options
    from mobykit.group.plugin import GroupPluginImpl
    from mobykit.group.spec import parse
    from mobykit.spi.group import GroupSpec

    core = InstanceCore({"default_provider": "libvirt"}, providers={"libvirt": provider})
    flavor = VanillaFlavor()
    plugin = GroupPluginImpl(lambda name: core, lambda name: flavor,
                             options=Options(poll_interval=0.02, backoff_initial=0.01))

    def group(lids, memory):
        return GroupSpec("db", {
            "Allocation": {"LogicalIDs": lids},
            "Instance": {"Plugin": "mobykit/libvirt", "Properties": {
                "Kernel": "/boot/vmlinuz-test", "Initrd": "/boot/initrd-test", "Memory": memory,
                "Volumes": [{"Name": "data", "SizeGb": 1}]}},
            "Flavor": {"Plugin": "vanilla", "Properties": {}}})

    def settled(spec):
        deadline = time.monotonic() + 30  # a liveness bound, not a speed assertion
        want = parse(spec).hash
        while time.monotonic() < deadline:
            ms = provider.list({"infrakit.group": "db"})
            if plugin.describe_group("db").converged and all(m.tags.get("infrakit.config.hash") == want for m in ms):
                return {m.logical_id: [path for _, _, path in _disks(m.id)] for m in ms}
            time.sleep(0.02)
        raise AssertionError("group did not converge")

    try:
        v1 = group(["m1", "m2"], 256)
        plugin.commit_group(v1, False)
        disks = settled(v1)
        assert sorted(disks) == ["m1", "m2"] and all(len(p) == 1 for p in disks.values())
        before = {m.logical_id: m.id for m in provider.list({"infrakit.group": "db"})}

        v2 = group(["m1", "m2"], 320)  # a new config: each member replaced in turn
        plugin.commit_group(v2, False)
        assert settled(v2) == disks, "each new member has its logical id's disk"
        after = {m.logical_id: m.id for m in provider.list({"infrakit.group": "db"})}
        assert not set(before.values()) & set(after.values()), "every member was replaced"

        v3 = group(["m1"], 320)  # m2 leaves: its instance goes, its data stays
        plugin.commit_group(v3, False)
        assert settled(v3) == {"m1": disks["m1"]}
        plugin.destroy_group("db")
        assert provider.list({"infrakit.group": "db"}) == []
        assert _pool(POOL + "-volumes") == ["db-m1-data", "db-m2-data"]
    finally:
        plugin.close()
