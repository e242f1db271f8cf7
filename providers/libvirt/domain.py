"""Domains in and out: the XML a new instance is defined with, and the Machine a listing reports.

Why qemu arguments for published ports: Debian 12's libvirt 9.0 only forwards ports for the
``passt`` backend, which it does not support yet, and its SLIRP ``<interface type='user'>`` has no
port forwards. So a domain with ``Publish`` gets its user-mode NIC from ``<qemu:commandline>``
(``-netdev user,hostfwd=``), always bound to 127.0.0.1; a domain without gets a plain
``<interface type='user'>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mobykit.providers.base import Machine
from mobykit.providers.libvirt import network
from mobykit.providers.libvirt.binding import libvirt
from mobykit.providers.libvirt.metadata import InstanceMeta
from mobykit.providers.libvirt.properties import PROPERTY_DEFAULTS, parse_publish

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

STATE_NAMES = {
    0: "pending",  # NOSTATE
    1: "running",  # RUNNING
    2: "running",  # BLOCKED (idle vCPU)
    3: "stopped",  # PAUSED
    4: "stopping",  # SHUTDOWN (in progress)
    5: "stopped",  # SHUTOFF
    6: "stopped",  # CRASHED
    7: "stopped",  # PMSUSPENDED
}


@dataclass(frozen=True)
class BootSpec:
    """What the domain boots and where its files are, as the daemon sees them: a kernel, initrd and
    command line (direct kernel boot), or a qcow2 disk (its own overlay over the image's disk,
    booted by SeaBIOS from the boot loader on it)."""

    kernel: str | None
    initrd: str | None
    cmdline: str | None
    console: str  # the serial console's log volume
    cidata: str | None  # the NoCloud ISO volume, when there is user data
    disk: str | None = None  # the instance's qcow2 overlay volume (Boot: disk)
    volumes: tuple[tuple[str, str], ...] = ()  # (Volumes name, qcow2 path): persistent disks vdb, vdc, ...


def domain_xml(instance_id: str, props: dict[str, Any], boot: BootSpec, meta: InstanceMeta, *,
               domain_type: str, machine: str, qemu_args: bool) -> str:
    """The domain XML for a new instance. ``qemu_args``: published ports become qemu arguments
    (false on the mock driver, which has no qemu; the ports are still recorded in ``meta``)."""
    nic = network.private_nic(props, meta.pool, meta.tags.get("infrakit.group"), meta.logical_id)
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = instance_id
    ET.SubElement(root, "memory", unit="MiB").text = str(props.get("Memory", PROPERTY_DEFAULTS["Memory"]))
    ET.SubElement(root, "vcpu").text = str(props.get("CPUs", PROPERTY_DEFAULTS["CPUs"]))
    ET.SubElement(root, "metadata").append(meta.element())
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=machine).text = "hvm"
    if boot.disk:
        ET.SubElement(os_el, "boot", dev="hd")
    else:
        ET.SubElement(os_el, "kernel").text = boot.kernel
        ET.SubElement(os_el, "initrd").text = boot.initrd
        ET.SubElement(os_el, "cmdline").text = f"{boot.cmdline} {nic.cmdline}" if nic else boot.cmdline
    # An immutable machine that stops has finished: never reboot it into a loop.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(root, event).text = "destroy"
    devices = ET.SubElement(root, "devices")
    if boot.disk:
        # The overlay's header names its backing file (the image's shared base) and that file's format.
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=boot.disk)
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    for i, (name, path) in enumerate(boot.volumes):
        # The serial is the Volumes name: the guest finds it as /dev/disk/by-id/virtio-<name>.
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=path)
        ET.SubElement(disk, "target", dev=f"vd{chr(ord('b') + i)}", bus="virtio")
        ET.SubElement(disk, "serial").text = name
    if boot.cidata:
        disk = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=boot.cidata)
        ET.SubElement(disk, "target", dev="hdc", bus="ide")
        ET.SubElement(disk, "readonly")
    publish = [parse_publish(p) for p in props.get("Publish", [])]
    if not publish:
        iface = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(iface, "model", type="virtio")
    if nic:  # the group's private segment (network.py), after the user-mode NIC
        devices.append(network.interface_element(nic))
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=boot.console)
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    xml = ET.tostring(root, encoding="unicode")
    if publish and qemu_args:
        fwd = ",".join(f"hostfwd={proto}:127.0.0.1:{host}-:{guest}" for proto, host, guest in publish)
        # A fixed PCI slot: qemu places these arguments before libvirt's own devices, so an automatic
        # one would take slot 2, which libvirt has given to a disk (Volumes). 0x1e: after every
        # device libvirt places, before the private network's NIC (0x1f), so the guest's eth0.
        args = ["-netdev", f"user,id=mkpub0,{fwd}", "-device", "virtio-net-pci,netdev=mkpub0,addr=0x1e"]
        extra = "".join(f"<qemu:arg value='{xml_attr(a)}'/>" for a in args)
        xml = xml.replace("<domain ", f"<domain xmlns:qemu='{QEMU_NS}' ", 1).replace(
            "</domain>", f"<qemu:commandline>{extra}</qemu:commandline></domain>")
    return xml


def domain_state(dom: Any) -> str:
    """The domain's state as a Machine state; ``terminated`` when it vanished as we asked."""
    lv = libvirt()
    try:
        return STATE_NAMES.get(dom.state()[0], "pending")
    except lv.libvirtError:
        return "terminated"


def machine(name: str, meta: InstanceMeta, state: str, uri: str) -> Machine:
    """The Machine a listing reports for a domain, built only from its metadata and state."""
    created = datetime.fromtimestamp(meta.created / 1e9, UTC)
    props: dict[str, Any] = {
        "Created": created.isoformat().replace("+00:00", "Z"),
        "CreatedNs": meta.created,
        "Image": meta.image,
        "URI": uri,
        "Pool": meta.pool,
        "Volumes": list(meta.volumes),
    }
    if meta.ports:
        props["Ports"] = {(str(guest) if proto == "tcp" else f"{guest}/{proto}"): host
                          for proto, guest, host in meta.ports}
    return Machine(id=name, tags=dict(meta.tags), state=state, logical_id=meta.logical_id, properties=props)


def copy_machine(m: Machine) -> Machine:
    """A copy a caller may change without changing ``m`` (a cached listing's Machine)."""
    props = dict(m.properties)
    for key in ("Volumes", "Ports"):
        if key in props:
            props[key] = type(props[key])(props[key])
    return Machine(id=m.id, tags=dict(m.tags), state=m.state, logical_id=m.logical_id, properties=props)


def accel_name(result: Any) -> str:
    """accel.detect() may answer with a name or an object carrying one."""
    if isinstance(result, str):
        return result
    for attr in ("name", "accel", "kind"):
        value = getattr(result, attr, None)
        if isinstance(value, str):
            return value
    return str(result)


def xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def xml_attr(s: str) -> str:
    return xml_text(s).replace("'", "&apos;").replace('"', "&quot;")
