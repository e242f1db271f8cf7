"""End to end on a real (unprivileged, private) libvirtd with real qemu under TCG.

Two VMs boot a Debian cloud kernel and a busybox initrd that prints our init's readiness line; the
test sees that line through the provider's console, the moby flavor turns HEALTHY, labels go
through the instance core, a published port is bound on 127.0.0.1, and destroy leaves no domain, no
qemu process, no volume and no file behind. ``Boot: disk``: two VMs of specs/images/minimal.yml
boot from qcow2 overlays over one shared base disk, built and published through the flavor and
the core.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt")

from harness.libvirtd import boot_files, libvirtd_session, remove_everything  # noqa: E402,F401
from mobykit.core.instance import InstanceCore  # noqa: E402
from mobykit.flavor.moby import IMAGE_TAG, MobyFlavor  # noqa: E402
from mobykit.providers.base import BootImage, MachineSpec  # noqa: E402
from mobykit.providers.libvirt import LibvirtProvider  # noqa: E402
from mobykit.spi.types import Health, Spec  # noqa: E402

pytestmark = pytest.mark.slow

BOOT_WAIT = 120.0  # generous: TCG on a loaded 2-core CI machine; reaching it is a failure, not a measure


def wait_for(what: str, cond: Callable[[], bool], timeout: float = BOOT_WAIT) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def qemu_pids(marker: str) -> list[int]:
    """PIDs of processes whose command line mentions ``marker`` (an instance id)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scratch():
    with tempfile.TemporaryDirectory(prefix="mobykit-e2e-") as d:
        yield Path(d)


@pytest.fixture
def provider(libvirtd_session):  # noqa: F811
    p = LibvirtProvider(libvirtd_session.config)
    yield p
    remove_everything(p, libvirtd_session.uri, libvirtd_session.config["Pool"], delete_dir=True)
    assert not libvirtd_session.pool_path.exists()


def _store_image(cache_root, boot) -> str:
    """Put the hand-made kernel+initrd where the built-image store keeps images (its documented
    layout <cache>/images/<hex>/{kernel,initrd.img,cmdline,image.json}), so the core finds it by id."""
    where = cache_root / "images" / boot.image_id.removeprefix("sha256:")
    where.mkdir(parents=True)
    shutil.copyfile(boot.kernel, where / "kernel")
    shutil.copyfile(boot.initrd, where / "initrd.img")
    (where / "cmdline").write_text(boot.cmdline + "\n")
    (where / "image.json").write_text(json.dumps({"id": boot.image_id, "name": "e2e"}))
    return boot.image_id


def test_two_vms_boot_become_healthy_are_labelled_and_leave_nothing(provider, boot_files, libvirtd_session, scratch):  # noqa: F811
    image = BootImage(id=boot_files.image_id, name="e2e", kernel=boot_files.kernel, initrd=boot_files.initrd,
                      cmdline=boot_files.cmdline)
    _store_image(scratch / "cache", boot_files)
    core = InstanceCore({"providers": {"libvirt": libvirtd_session.config}, "cache": str(scratch / "cache")},
                        providers={"libvirt": provider})
    flavor = MobyFlavor({"providers": {"libvirt": {}}}, instances=core)
    port = free_port()
    tags = {"infrakit.group": "e2e", IMAGE_TAG: image.id}
    # the first goes the whole way: core -> store.get -> publish_image (uploads) -> create
    ids = [core.provision("libvirt", Spec(properties={"Image": image.id}, tags=tags, init="echo one"))]
    assert provider.publish_image(image, {}) == provider.publish_image(image, {})  # idempotent
    ids.append(provider.create(MachineSpec(properties={"Image": image.id, "Publish": [f"{port}:80"], "Memory": 384},
                                           tags=tags, user_data="", logical_id="db-0")).id)
    assert ids == sorted(ids)
    described = core.describe_instances("libvirt", {"infrakit.group": "e2e"}, True)
    assert [d.id for d in described] == ids  # listed with tags as soon as create returned
    assert described[1].logical_id == "db-0"

    # the user data rides on a NoCloud ISO attached as a CD-ROM, the second VM has none
    conn = libvirt.open(libvirtd_session.uri)
    try:
        xml0, xml1 = (conn.lookupByName(i).XMLDesc(0) for i in ids)
    finally:
        conn.close()
    iso = libvirtd_session.pool_path / f"{ids[0]}.cidata.iso"
    assert "device='cdrom'" in xml0 and str(iso) in xml0 and "cdrom" not in xml1
    data = iso.read_bytes()
    assert data[0x8001:0x8006] == b"CD001" and b"cidata" in data[0x8000:0x8100] and b"echo one" in data

    for iid in ids:
        wait_for(f"{iid} readiness line",
                 lambda iid=iid: f"mobykit: ready {image.id}" in provider.console_output(iid))
    props = {"Image": {"kernel": {"image": "unused"}}}  # Healthy does not build
    for d in described:
        assert flavor.healthy("moby", props, d) == Health.HEALTHY

    # the published port is bound on the loopback address by the VM's user-mode network
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass

    core.label("libvirt", ids[0], {"role": "web"})
    fresh = LibvirtProvider(libvirtd_session.config)
    try:
        (m,) = fresh.list({"role": "web"})
        assert m.id == ids[0] and m.tags == {**tags, "role": "web"} and m.state == "running"
    finally:
        fresh.close()

    pool_dir = libvirtd_session.pool_path
    assert any(n.startswith(ids[0]) for n in os.listdir(pool_dir))
    for iid in ids:
        core.destroy("libvirt", iid)
        core.destroy("libvirt", iid)  # gone is success
    assert core.describe_instances("libvirt", {}, False) == []
    conn = libvirt.open(libvirtd_session.uri)
    try:
        assert [d.name() for d in conn.listAllDomains(0)] == []
    finally:
        conn.close()
    for iid in ids:
        assert qemu_pids(iid) == []
    left = sorted(os.listdir(pool_dir))
    assert left == sorted(f"{image.id.removeprefix('sha256:')}.{s}" for s in ("kernel", "initrd", "cmdline"))
    # the VM's port forward went with it
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_kernel_and_initrd_paths_boot_and_the_console_survives_in_the_pool(provider, boot_files):  # noqa: F811
    m = provider.create(MachineSpec(
        properties={"Kernel": str(boot_files.kernel), "Initrd": str(boot_files.initrd), "Cmdline": boot_files.cmdline},
        tags={"t": "paths"}))
    wait_for("readiness line", lambda: f"mobykit: ready {boot_files.image_id}" in provider.console_output(m.id))
    assert provider.list({"t": "paths"})[0].state == "running"
    provider.destroy(m.id)
    assert provider.list({}) == []
    assert qemu_pids(m.id) == []


def test_a_vm_that_cannot_start_leaves_no_domain_and_no_volume(provider, boot_files, libvirtd_session):  # noqa: F811
    from mobykit.errors import Unavailable

    with pytest.raises(Unavailable, match="cannot start"):
        provider.create(MachineSpec(
            properties={"Kernel": str(boot_files.kernel), "Initrd": str(boot_files.initrd), "Memory": 100_000_000},
            user_data="echo never", tags={"t": "fail"}))
    assert provider.list({}) == []
    # only the content-addressed boot files stay (a cache); nothing made for the instance
    assert all(n.endswith((".kernel", ".initrd", ".cmdline")) for n in os.listdir(libvirtd_session.pool_path))


def test_auto_published_ports_differ_per_vm_are_reported_and_bound(provider, boot_files):  # noqa: F811
    """A group's instances share ``Publish: ["0:80"]``; each VM gets its own free port on
    127.0.0.1, read back from qemu and reported in the instance properties."""
    props = {"Kernel": str(boot_files.kernel), "Initrd": str(boot_files.initrd), "Cmdline": boot_files.cmdline,
             "Publish": ["0:80", ":22"], "Memory": 256}
    made = [provider.create(MachineSpec(properties=dict(props), tags={"t": "auto"})) for _ in range(2)]
    listed = {m.id: m.properties["Ports"] for m in provider.list({"t": "auto"})}
    assert listed == {m.id: m.properties["Ports"] for m in made}
    ports = [p for m in made for p in (m.properties["Ports"]["80"], m.properties["Ports"]["22"])]
    assert len(set(ports)) == 4 and all(1024 <= p <= 65535 for p in ports)
    for port in ports:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    for m in made:
        provider.destroy(m.id)
    for port in ports:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_disk_boot_two_vms_over_one_base_through_flavor_and_core(provider, libvirtd_session, scratch, monkeypatch):  # noqa: F811
    """Prepare (Boot: disk) builds minimal.yml and its qcow2-bios disk; Provision publishes the disk
    once as the pool's base and each VM boots its own overlay to the readiness line; destroy removes
    the overlays and keeps the base."""
    from mobykit.image import store
    from mobykit.image.cache import Cache
    from mobykit.spi.types import Allocation, Index

    repo = Path(__file__).resolve().parent.parent
    if not os.environ.get("MOBYKIT_DEB_CACHE"):
        monkeypatch.setenv("MOBYKIT_DEB_CACHE", str(repo / ".cache" / "debs"))
    config = {"providers": {"libvirt": libvirtd_session.config}, "cache": str(scratch / "cache"),
              "flavors": {"moby": {"PrepareWait": "900s"}}}
    core = InstanceCore(config, providers={"libvirt": provider})
    flavor = MobyFlavor(config, instances=core)
    props = {"Image": str(repo / "specs" / "images" / "minimal.yml")}
    try:
        spec = flavor.prepare("moby", props, Spec(properties={"Boot": "disk", "Memory": 512}, tags={"t": "disk"}),
                              Allocation(), Index())
    finally:
        flavor.close()
    image_id = spec.properties["Image"]
    hexid = image_id.removeprefix("sha256:")
    ids = [core.provision("libvirt", spec) for _ in range(2)]
    pool = libvirtd_session.pool_path
    (stored,) = store.get(image_id, Cache(scratch / "cache")).format("qcow2-bios")
    assert (pool / f"{hexid}.qcow2").read_bytes() == stored.read_bytes()  # the image's disk, uploaded once
    assert not (pool / f"{hexid}.kernel").exists()  # a disk boot publishes no kernel
    conn = libvirt.open(libvirtd_session.uri)
    try:
        for iid in ids:
            xml = conn.lookupByName(iid).XMLDesc(0)
            assert "<kernel>" not in xml and f"file='{pool}/{iid}.qcow2'" in xml
            vol = conn.storagePoolLookupByName(libvirtd_session.config["Pool"]).storageVolLookupByName(f"{iid}.qcow2")
            assert f"<path>{pool}/{hexid}.qcow2</path>" in vol.XMLDesc(0)  # backed by the shared base
    finally:
        conn.close()
    for iid in ids:
        wait_for(f"{iid} readiness line", lambda iid=iid: f"mobykit: ready {image_id}" in provider.console_output(iid),
                 timeout=300)
    for d in core.describe_instances("libvirt", {"t": "disk"}, False):
        assert flavor.healthy("moby", props, d) == Health.HEALTHY
    for iid in ids:
        core.destroy("libvirt", iid)
        assert qemu_pids(iid) == []
    assert sorted(os.listdir(pool)) == [f"{hexid}.qcow2", f"{hexid}.qcow2.published"]
