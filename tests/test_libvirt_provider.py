"""Contract tests of the libvirt provider on libvirt's in-process ``test:///default`` driver.

They check what the core and the group controller rely on: an instance is listed with its tags as
soon as create returns, tags live only in libvirt (a fresh provider sees them), destroy is
idempotent and leaves no volume, IDs sort by creation, and bad properties are named.
"""

from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt")

from harness.libvirtd import remove_everything  # noqa: E402
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402
from mobykit.providers.base import BootImage, MachineSpec  # noqa: E402
from mobykit.providers.libvirt import LibvirtProvider, created_ns, parse_publish  # noqa: E402

URI = "test:///default"


@pytest.fixture
def provider():
    """A provider on the mock driver; every domain and volume it made is removed afterwards
    (test:///default keeps its state for the whole process)."""
    p = LibvirtProvider({"URI": URI, "Pool": "mobykit-test"})
    yield p
    remove_everything(p, URI, "mobykit-test")


def _spec(tags=None, **props) -> MachineSpec:
    props.setdefault("Kernel", "/boot/vmlinuz-test")
    props.setdefault("Initrd", "/boot/initrd-test")
    return MachineSpec(properties=props, tags=dict(tags or {}))


def _pool_volumes() -> list[str]:
    conn = libvirt.open(URI)
    try:
        return sorted(conn.storagePoolLookupByName("mobykit-test").listVolumes())
    finally:
        conn.close()


def test_created_instance_is_listed_with_tags_and_logical_id(provider):
    spec = _spec({"infrakit.group": "workers", "role": "web"})
    spec.logical_id = "10.0.0.5"
    m = provider.create(spec)
    assert m.id.startswith("mobykit-")
    listed = provider.list({"infrakit.group": "workers"})
    assert [x.id for x in listed] == [m.id]
    assert listed[0].tags == {"infrakit.group": "workers", "role": "web"}
    assert listed[0].logical_id == "10.0.0.5"
    assert listed[0].state == "running"
    assert listed[0].properties["CreatedNs"] == created_ns(m.id)
    assert provider.list({"infrakit.group": "other"}) == []


def test_foreign_domains_are_not_listed(provider):
    # test:///default ships a domain called "test" that mobykit did not make.
    assert all(m.id.startswith("mobykit-") for m in provider.list({}))
    assert "test" not in [m.id for m in provider.list({})]


def test_tags_live_in_libvirt_not_in_the_provider(provider):
    m = provider.create(_spec({"a": "1"}))
    provider.set_tags(m.id, {"a": "2", "b": "x"})
    fresh = LibvirtProvider({"URI": URI, "Pool": "mobykit-test"})
    try:
        (seen,) = [x for x in fresh.list({}) if x.id == m.id]
        assert seen.tags == {"a": "2", "b": "x"}  # replaced, as the Provider contract says
        assert fresh.list({"a": "1"}) == []
    finally:
        fresh.close()


def test_set_tags_on_a_gone_instance_is_not_found(provider):
    with pytest.raises(NotFound):
        provider.set_tags("mobykit-00000000000000000001-dead", {"a": "b"})


def test_destroy_is_idempotent_and_leaves_no_volume(provider):
    spec = _spec({"g": "1"})
    spec.user_data = "#!/bin/sh\necho hi\n"
    m = provider.create(spec)
    vols = _pool_volumes()
    assert f"{m.id}.console" in vols and f"{m.id}.cidata.iso" in vols
    provider.destroy(m.id)
    provider.destroy(m.id)
    provider.destroy("mobykit-00000000000000000001-dead")
    assert provider.list({}) == []
    assert not [v for v in _pool_volumes() if v.startswith(m.id)]
    conn = libvirt.open(URI)
    try:
        assert m.id not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()


def test_ids_sort_in_creation_order(provider):
    ids = [provider.create(_spec({"n": str(i)})).id for i in range(6)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 6
    assert [m.id for m in provider.list({})] == ids


@pytest.mark.parametrize(
    "props, needle",
    [
        ({"Kernel": "/k", "Initrd": "/i", "Colour": "blue"}, "Colour"),
        ({"Kernel": "/k", "Initrd": "/i", "CPUs": 0}, "CPUs"),
        ({"Kernel": "/k", "Initrd": "/i", "Memory": "lots"}, "Memory"),
        ({"Kernel": "/k", "Initrd": "/i", "Publish": "8080:80"}, "Publish"),
        ({"Kernel": "/k", "Initrd": "/i", "Publish": ["0.0.0.0:8080:80"]}, "Publish[0]"),
        ({"Kernel": "/k", "Initrd": "/i", "Publish": ["80:80", "80:81"]}, "Publish[1]"),
        ({"Image": "ubuntu"}, "Image"),
        ({"Kernel": "/k"}, "Initrd"),
        ({"Boot": "floppy"}, "Boot"),
        ({"Boot": ["disk"]}, "Boot"),
        ({"Boot": "disk", "Kernel": "/k", "Initrd": "/i"}, "Boot"),
        ({"Boot": "disk", "Image": "sha256:" + "ab" * 32, "Cmdline": "quiet"}, "Boot"),
    ],
)
def test_bad_properties_are_named(provider, props, needle):
    pattern = needle.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(InvalidArgument, match=pattern):
        provider.validate(props)
    with pytest.raises(InvalidArgument, match=pattern):
        provider.create(MachineSpec(properties=props))
    assert provider.list({}) == []


def test_nothing_to_boot_is_an_error_at_create_not_validate(provider):
    # The moby flavor adds Image in Prepare, after the group validated the instance properties.
    provider.validate({"Memory": 256})
    with pytest.raises(InvalidArgument, match="Image"):
        provider.create(MachineSpec(properties={"Memory": 256}))
    assert provider.list({}) == []


def test_missing_kernel_file_is_named_on_validate(tmp_path):
    local = LibvirtProvider({"URI": "qemu:///session"})  # validate needs no connection
    with pytest.raises(InvalidArgument, match="Properties.Kernel: .*no such file"):
        local.validate({"Kernel": str(tmp_path / "nope"), "Initrd": str(tmp_path / "nope2")})


def test_unknown_config_key_is_named():
    with pytest.raises(InvalidArgument, match="Socket"):
        LibvirtProvider({"URI": URI, "Socket": "/x"})


def test_uri_comes_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("MOBYKIT_LIBVIRT_URI", "test:///default")
    assert LibvirtProvider({}).uri == "test:///default"
    assert LibvirtProvider({"URI": "qemu:///system"}).uri == "qemu:///system"
    monkeypatch.delenv("MOBYKIT_LIBVIRT_URI")
    assert LibvirtProvider({}).uri == "qemu:///session"


def test_unpublished_image_is_a_precondition_failure_then_publish_makes_it_bootable(provider, tmp_path):
    image_id = "sha256:" + "cd" * 32
    with pytest.raises(FailedPrecondition, match=image_id):
        provider.create(MachineSpec(properties={"Image": image_id}))
    assert provider.list({}) == []
    kernel, initrd = tmp_path / "kernel", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    boot = BootImage(id=image_id, name="t", kernel=kernel, initrd=initrd, cmdline="console=ttyS0 x=1")
    ref = provider.publish_image(boot, {})
    assert ref == provider.publish_image(boot, {})  # idempotent
    m = provider.create(MachineSpec(properties={"Image": image_id, "Memory": 256, "CPUs": 2}))
    assert m.properties["Image"] == image_id
    conn = libvirt.open(URI)
    try:
        xml = conn.lookupByName(m.id).XMLDesc(0)
    finally:
        conn.close()
    assert f"<kernel>{kernel}</kernel>" in xml
    assert "<cmdline>console=ttyS0 x=1</cmdline>" in xml
    assert "<vcpu placement='static'>2</vcpu>" in xml
    assert "262144" in xml  # 256 MiB in KiB


def test_publish_parsing():
    assert parse_publish("8080:80") == ("tcp", 8080, 80)
    assert parse_publish("127.0.0.1:53:53/udp") == ("udp", 53, 53)
    with pytest.raises(InvalidArgument):
        parse_publish("70000:80")


def test_tags_with_markup_and_unicode_round_trip(provider):
    tags = {"note": "<a href='x'>&amp; \"q\"</a>", "städte": "Zürich ✓", "empty": ""}
    m = provider.create(_spec(tags))
    assert provider.list({"städte": "Zürich ✓"})[0].tags == tags
    provider.set_tags(m.id, {**tags, "note": "]]>"})
    assert provider.list({})[0].tags["note"] == "]]>"


def test_publish_host_port_zero_or_empty_means_any_free_port():
    assert parse_publish("0:80") == ("tcp", 0, 80)
    assert parse_publish(":80") == ("tcp", 0, 80)
    assert parse_publish("127.0.0.1::53/udp") == ("udp", 0, 53)
    for bad in ("80", "0.0.0.0::80", ":0", "::80", "x:80"):
        with pytest.raises(InvalidArgument, match="Publish"):
            parse_publish(bad)


def test_a_group_can_share_auto_ports_but_not_a_fixed_host_port(provider):
    provider.validate({"Kernel": "/k", "Initrd": "/i", "Publish": ["0:80", ":443", "0:80/udp"]})
    with pytest.raises(InvalidArgument, match=r"Publish\[1\]: host port 8080/tcp published twice"):
        provider.validate({"Kernel": "/k", "Initrd": "/i", "Publish": ["8080:80", "8080:81"]})


def test_fixed_published_ports_are_reported_and_survive_retagging_and_a_new_provider(provider):
    m = provider.create(_spec({"t": "ports"}, Publish=["8080:80", "127.0.0.1:5353:53/udp", "0:443"]))
    # the mock driver runs no qemu, so only the auto-assigned 443 is unknown here (see the e2e test)
    assert m.properties["Ports"] == {"80": 8080, "53/udp": 5353}
    provider.set_tags(m.id, {"t": "ports", "more": "1"})
    fresh = LibvirtProvider({"URI": URI, "Pool": "mobykit-test"})
    try:
        (again,) = fresh.list({"more": "1"})
        assert again.properties["Ports"] == {"80": 8080, "53/udp": 5353}
    finally:
        fresh.close()
    assert "Ports" not in provider.create(_spec({"t": "none"})).properties


def _half_made_domain(name: str, created_ns: int) -> None:
    """A domain as create() leaves it when the plugin dies between defineXML and its last step."""
    from mobykit.providers.libvirt import NS

    xml = (f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
           f"<metadata><mobykit:instance xmlns:mobykit='{NS}' creating='1' created='{created_ns}' pool='mobykit-test'>"
           "<mobykit:tag key='infrakit.group'>g</mobykit:tag></mobykit:instance></metadata></domain>")
    conn = libvirt.open(URI)
    try:
        conn.defineXML(xml).create()
    finally:
        conn.close()


def test_a_domain_is_listed_only_once_create_has_finished_with_it_or_long_after(provider):
    """A group controller counts a Provision in flight as a member: a half-made domain listed as
    well would be counted twice (and a scale down would destroy a healthy one)."""
    import time

    from mobykit.providers.libvirt import CREATE_GRACE

    assert provider.list({}) == []  # opens the provider's connection: the mock's state lives while one is open
    now = time.time_ns()
    young, old = f"mobykit-{now:020d}-0001", f"mobykit-{now - int(CREATE_GRACE * 2e9):020d}-0002"
    _half_made_domain(young, now)
    _half_made_domain(old, now - int(CREATE_GRACE * 2e9))
    done = provider.create(_spec({"infrakit.group": "g"}))
    assert [m.id for m in provider.list({"infrakit.group": "g"})] == [old, done.id]  # a dead create is found
    provider.destroy(young)  # and whatever is hidden can still be destroyed by id
    provider.destroy(old)
    assert [m.id for m in provider.list({})] == [done.id]


# --- Boot: disk ------------------------------------------------------------------------------

class _DiskImage:
    """A BootImage whose qcow2-bios format is a local file, counting how often it is asked for."""

    def __init__(self, tmp_path, image_id: str):
        self.disk = tmp_path / "image.qcow2"
        self.disk.write_bytes(b"QFI\xfb" + bytes(4092))
        self.asked: list[str] = []
        self.image = BootImage(id=image_id, name="t", kernel=tmp_path / "k", initrd=tmp_path / "i", cmdline="",
                               files=self._files)

    def _files(self, name: str, size=None):
        self.asked.append(name)
        return [self.disk]


def _xml(name: str, vol: str | None = None) -> str:
    conn = libvirt.open(URI)
    try:
        if vol is not None:
            return conn.storagePoolLookupByName("mobykit-test").storageVolLookupByName(vol).XMLDesc(0)
        return conn.lookupByName(name).XMLDesc(0)
    finally:
        conn.close()


def test_disk_boot_shares_one_base_per_image_and_gives_each_instance_an_overlay(provider, tmp_path):
    image_id = "sha256:" + "de" * 32
    hexid = image_id[7:]
    fake = _DiskImage(tmp_path, image_id)
    props = {"Image": image_id, "Boot": "disk"}
    assert provider.publish_image(fake.image, props) == f"mobykit-test/{hexid}.qcow2"
    provider.publish_image(fake.image, props)
    assert fake.asked == ["qcow2-bios"]  # published once: the marker volume says it is complete
    made = [provider.create(MachineSpec(properties=dict(props), tags={"t": "disk"}, user_data="x")) for _ in range(2)]
    base = f"/mobykit-test-pool/{hexid}.qcow2"
    for m in made:
        xml = _xml(m.id)
        assert "<kernel>" not in xml and "<initrd>" not in xml and "<cmdline>" not in xml
        assert "<boot dev='hd'/>" in xml
        disk = xml[xml.index("<disk type='file' device='disk'>"):]
        disk = disk[:disk.index("</disk>")]
        assert "<driver name='qemu' type='qcow2'/>" in disk
        assert f"<source file='/mobykit-test-pool/{m.id}.qcow2'" in disk and "bus='virtio'" in disk
        volume = _xml(m.id, f"{m.id}.qcow2")
        assert "<format type='qcow2'/>" in volume
        assert f"<backingStore>\n    <path>{base}</path>\n    <format type='qcow2'/>" in volume
        assert f"{m.id}.qcow2" in m.properties["Volumes"]
    provider.destroy(made[0].id)
    vols = _pool_volumes()
    assert f"{made[0].id}.qcow2" not in vols and f"{made[1].id}.qcow2" in vols
    provider.destroy(made[1].id)
    assert _pool_volumes() == [f"{hexid}.qcow2", f"{hexid}.qcow2.published"]  # the base stays


def test_disk_boot_needs_a_published_disk_and_leaves_nothing_when_refused(provider, tmp_path):
    image_id = "sha256:" + "ef" * 32
    provider.validate({"Boot": "disk"})  # the moby flavor adds Image in Prepare
    with pytest.raises(InvalidArgument, match="Properties.Image: Boot: disk"):
        provider.create(MachineSpec(properties={"Boot": "disk"}))
    kernel_only = _DiskImage(tmp_path, image_id)
    provider.publish_image(kernel_only.image, {})  # published for kernel boots only
    with pytest.raises(FailedPrecondition, match="its disk is not published"):
        provider.create(MachineSpec(properties={"Image": image_id, "Boot": "disk"}))
    assert provider.list({}) == [] and _pool_volumes() == []


def test_an_interrupted_disk_upload_is_uploaded_again(provider, tmp_path):
    image_id = "sha256:" + "fa" * 32
    fake = _DiskImage(tmp_path, image_id)
    provider.publish_image(fake.image, {"Boot": "disk"})
    conn = libvirt.open(URI)
    try:
        conn.storagePoolLookupByName("mobykit-test").storageVolLookupByName(f"{image_id[7:]}.qcow2.published").delete(0)
    finally:
        conn.close()
    provider.publish_image(fake.image, {"Boot": "disk"})
    assert fake.asked == ["qcow2-bios", "qcow2-bios"]
    assert f"{image_id[7:]}.qcow2.published" in _pool_volumes()


def test_prepare_for_a_disk_boot_makes_the_disk_in_the_build_job(tmp_path):
    """The moby flavor's Prepare makes the disk format inside its build job (and its wait budget),
    so that Provision only uploads it; a kernel boot does not pay for it."""
    from mobykit.flavor.moby import MobyFlavor
    from mobykit.spi.types import Allocation, Index, Spec

    spec_file = tmp_path / "spec.yml"
    spec_file.write_text("kernel: {image: k}\n")
    fake = _DiskImage(tmp_path, "sha256:" + "0d" * 32)
    flavor = MobyFlavor({}, build=lambda sources, progress: fake.image)
    try:
        out = flavor.prepare("", {"Image": str(spec_file)}, Spec(properties={"Boot": "disk"}), Allocation(), Index())
        assert out.properties == {"Boot": "disk", "Image": fake.image.id} and fake.asked == ["qcow2-bios"]
        flavor.prepare("", {"Image": str(spec_file)}, Spec(properties={}), Allocation(), Index())
        assert fake.asked == ["qcow2-bios"]
    finally:
        flavor.close()
