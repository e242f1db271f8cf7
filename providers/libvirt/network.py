"""A private network per group: the VMs of a group on one Ethernet segment of their own, each at a
stable address per logical id, beside the user-mode NIC that reaches the host.

Why qemu's multicast socket networking (libvirt ``<interface type='mcast'>``): it needs no
privileges (the session daemon runs as an unprivileged user), no bridge, no tap, no helper process
and no libvirt network, so nothing can go wrong on the host, and a VM joins the segment by being
started. Every NIC of the group sends its frames as UDP datagrams to one multicast group on the
loopback interface (``<local address='127.0.0.1'/>``: qemu sets IP_MULTICAST_IF to it, TTL 1), and
receives those of the others; traffic never leaves this machine, and libvirt's NAT network is not
involved. (UDP point-to-point sockets would need a NIC per peer; a bridge in a network namespace
needs root.) Checked on this machine with the session libvirtd and qemu under TCG.

The segment of a group is derived from (pool, group name): a multicast address in 239.0.0.0/8
(administratively scoped) and a port, so every instance of the group, made by any process,
joins the same one; another group gets another one.

Addresses: ``PrivateNetwork`` is the group's subnet (``"10.77.0.0/24"``). A logical id that is an
IPv4 address in it is the instance's address (Infrakit's convention: a logical id may be a
private IP); any other logical id gets a host address hashed from it (stable, but two ids may
collide in a small subnet: use addresses as logical ids for a cluster). The guest learns its
address from the kernel command line, ``mobykit.privnet=eth1:ADDR/PREFIX`` (the user-mode NIC
stays eth0: the private NIC sits in the last PCI slot), and configures it itself
(``/usr/bin/mobykit-privnet`` in specs/pkgs/etcd). Direct kernel boot only, as the command line
of a disk boot is inside the image's boot loader.
"""

from __future__ import annotations

import hashlib
import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from mobykit.errors import InvalidArgument

PROPERTY = "PrivateNetwork"
GUEST_NIC = "eth1"  # eth0 is the user-mode NIC (DHCP, the host, published ports)
CMDLINE_KEY = "mobykit.privnet"
PCI_SLOT = 0x1F  # the last slot: enumerated after every other NIC, so the guest names it last
MCAST_PORT_BASE = 20000
MCAST_PORT_SPAN = 20000  # ports 20000-39999: above the usual services, below the ephemeral range
MAC_PREFIX = (0x52, 0x54, 0x00)  # qemu's locally administered OUI


@dataclass(frozen=True)
class PrivateNic:
    """One instance's NIC on its group's segment."""

    group_address: str  # the multicast group (239.x.y.z)
    port: int
    address: ipaddress.IPv4Interface  # this instance's address with the subnet's prefix
    mac: str

    @property
    def cmdline(self) -> str:
        return f"{CMDLINE_KEY}={GUEST_NIC}:{self.address.with_prefixlen}"


def parse_subnet(value: Any, where: str = f"Properties.{PROPERTY}") -> ipaddress.IPv4Network:
    """``"10.77.0.0/24"`` -> the subnet; a private IPv4 network of 4 to 65,534 hosts."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: must be a subnet like \"10.77.0.0/24\", got {type(value).__name__}")
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise InvalidArgument(f"{where}: {value!r} is not an IPv4 subnet like \"10.77.0.0/24\" ({e})") from None
    if not net.is_private:
        raise InvalidArgument(f"{where}: {value!r} is not a private range (10/8, 172.16/12, 192.168/16)")
    if not 16 <= net.prefixlen <= 29:
        raise InvalidArgument(f"{where}: {value!r}: the prefix must be /16 to /29")
    return net


def validate(properties: dict[str, Any]) -> None:
    """Check ``PrivateNetwork`` alone (the logical id is checked at create, in ``private_nic``)."""
    value = properties.get(PROPERTY)
    if value is None:
        return
    parse_subnet(value)
    if properties.get("Boot") == "disk":
        raise InvalidArgument(f"Properties.{PROPERTY}: needs Boot: kernel (the address is given to the guest on "
                              "the kernel command line, which a disk boot takes from the image's boot loader)")


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def segment(pool: str, group: str) -> tuple[str, int]:
    """The multicast group and port of ``group``'s segment (the same for every instance of it)."""
    d = _digest("mobykit-privnet", pool, group)
    address = f"239.{d[0]}.{d[1]}.{max(d[2], 1)}"
    port = MCAST_PORT_BASE + int.from_bytes(d[3:5], "big") % MCAST_PORT_SPAN
    return address, port


def address_of(subnet: ipaddress.IPv4Network, logical_id: str) -> ipaddress.IPv4Interface:
    """The logical id itself when it is an address in ``subnet``; else a host address hashed from it."""
    try:
        ip = ipaddress.IPv4Address(logical_id)
    except ValueError:
        ip = None
    if ip is not None:
        if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
            raise InvalidArgument(f"Properties.{PROPERTY}: logical id {logical_id} is an address outside the "
                                  f"usable hosts of {subnet}")
        return ipaddress.IPv4Interface(f"{ip}/{subnet.prefixlen}")
    hosts = subnet.num_addresses - 2
    n = 1 + int.from_bytes(_digest("mobykit-privnet-host", logical_id)[:8], "big") % hosts
    return ipaddress.IPv4Interface(f"{subnet.network_address + n}/{subnet.prefixlen}")


def private_nic(properties: dict[str, Any], pool: str, group: str | None, logical_id: str | None) -> PrivateNic | None:
    """The private NIC of a new instance, or None without ``PrivateNetwork``. A group and a logical
    id are required: the segment is the group's, the address the logical id's."""
    value = properties.get(PROPERTY)
    if value is None:
        return None
    subnet = parse_subnet(value)
    if not group or not logical_id:
        raise InvalidArgument(f"Properties.{PROPERTY}: a private network is a group's, and an address a logical "
                              "id's; this instance has no group or no logical id - give the group "
                              "Allocation.LogicalIDs")
    address = address_of(subnet, logical_id)
    mcast, port = segment(pool, group)
    # the MAC from the segment and the address: stable for the logical id, unique on the segment
    d = _digest("mobykit-privnet-mac", mcast, str(port))
    mac = ":".join(f"{b:02x}" for b in (*MAC_PREFIX, d[0], *int(address.ip).to_bytes(4, "big")[2:]))
    return PrivateNic(group_address=mcast, port=port, address=address, mac=mac)


def interface_element(nic: PrivateNic) -> ET.Element:
    """``<interface type='mcast'>`` on the loopback interface, in the last PCI slot."""
    iface = ET.Element("interface", type="mcast")
    ET.SubElement(iface, "mac", address=nic.mac)
    source = ET.SubElement(iface, "source", address=nic.group_address, port=str(nic.port))
    ET.SubElement(source, "local", address="127.0.0.1")
    ET.SubElement(iface, "model", type="virtio")
    ET.SubElement(iface, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{PCI_SLOT:02x}",
                  function="0x0")
    return iface
