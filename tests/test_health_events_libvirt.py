"""A real VM's readiness line reaches a health listener through the followed console file.

On the session libvirtd with real qemu under TCG: the moby flavor asks about a VM once (UNKNOWN,
which starts following its console volume's file with inotify), the guest prints our init's
readiness line, and the listener is told with no further question asked; Healthy then answers
HEALTHY from what the watch knows, without reading the console again. Destroying the VM (its
console volume goes with it) is an event too.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("libvirt")

from harness.libvirtd import boot_files, libvirtd_session, remove_everything  # noqa: E402,F401
from mobykit.core.instance import InstanceCore  # noqa: E402
from mobykit.flavor.moby import IMAGE_TAG, MobyFlavor  # noqa: E402
from mobykit.providers.base import BootImage, MachineSpec  # noqa: E402
from mobykit.providers.libvirt import LibvirtProvider  # noqa: E402
from mobykit.spi.types import Description, Health  # noqa: E402

pytestmark = pytest.mark.slow

BOOT_WAIT = 120.0  # a bound on a hang under TCG on a loaded machine, not a measure


def test_the_readiness_line_of_a_real_vm_is_an_event(boot_files, libvirtd_session, tmp_path):  # noqa: F811
    provider = LibvirtProvider(libvirtd_session.config)
    core = InstanceCore({"providers": {"libvirt": libvirtd_session.config}}, providers={"libvirt": provider})
    flavor = MobyFlavor({"providers": {"libvirt": {}}}, instances=core)
    told: list[str] = []
    cond = threading.Condition()

    def listener(iid: str) -> None:
        with cond:
            told.append(iid)
            cond.notify_all()

    flavor.subscribe_health(listener)
    image = BootImage(id=boot_files.image_id, name="events", kernel=boot_files.kernel, initrd=boot_files.initrd,
                      cmdline=boot_files.cmdline)
    provider.publish_image(image, {})
    props = {"Image": str(tmp_path / "unused.yml"), "Health": {"Deadline": "600s"}}
    try:
        vm = provider.create(MachineSpec(properties={"Image": image.id, "Memory": 256}, tags={IMAGE_TAG: image.id}))
        desc = Description(vm.id, {IMAGE_TAG: image.id})
        assert flavor.healthy("moby", props, desc) == Health.UNKNOWN  # starts following the console
        watch = flavor.watch()
        assert watch.followed() == 1
        reads = watch.reads
        with cond:
            assert cond.wait_for(lambda: vm.id in told, BOOT_WAIT), "no health event from the console"
        assert flavor.healthy("moby", props, desc) == Health.HEALTHY
        assert watch.reads == reads  # served from the stream, not a download of the console
        provider.destroy(vm.id)
        with cond:
            assert cond.wait_for(lambda: told.count(vm.id) >= 2, BOOT_WAIT), "destroying it was not an event"
        assert flavor.healthy("moby", props, desc) == Health.UNHEALTHY
    finally:
        flavor.close()
        # Every domain and volume this test made, the pool, and the provider's connection.
        remove_everything(provider, libvirtd_session.uri, libvirtd_session.config["Pool"])
