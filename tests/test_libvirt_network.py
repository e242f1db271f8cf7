"""A private network per group on libvirt (providers/libvirt/network.py).

Fast tests: the segment, addresses, MACs and domain XML a group's instances get, and the errors
of a bad ``PrivateNetwork``. Slow test: two VMs of one group on a real session libvirtd under TCG,
booted with the real guest init, configure their private NIC from the command line
(/usr/bin/mobykit-privnet, specs/pkgs/etcd) and ping each other at their logical ids, while still
reaching the host through user-mode networking; a VM of another group on the same machine does
not hear them."""

from __future__ import annotations

import http.server
import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mobykit.errors import InvalidArgument
from mobykit.providers.libvirt import network
from mobykit.providers.libvirt.domain import BootSpec, domain_xml
from mobykit.providers.libvirt.metadata import InstanceMeta
from mobykit.providers.libvirt.properties import validate_properties

ROOT = Path(__file__).resolve().parent.parent
PRIVNET = ROOT / "specs" / "pkgs" / "etcd" / "rootfs" / "usr" / "bin" / "mobykit-privnet"
SUBNET = "10.77.0.0/24"


def _xml(props: dict, group: str | None = "etcd", lid: str | None = "10.77.0.11", pool: str = "mobykit") -> ET.Element:
    meta = InstanceMeta(tags={"infrakit.group": group} if group else {}, logical_id=lid, image=None,
                        created=1, volumes=[], pool=pool, creating=True)
    boot = BootSpec(kernel="/k", initrd="/i", cmdline="console=ttyS0", console="/c", cidata=None)
    return ET.fromstring(domain_xml("mobykit-1", props, boot, meta, domain_type="qemu", machine="pc", qemu_args=True))


def test_group_instances_share_one_segment_on_loopback_other_groups_do_not():
    a = _xml({"PrivateNetwork": SUBNET}, lid="10.77.0.11")
    b = _xml({"PrivateNetwork": SUBNET}, lid="10.77.0.12")
    other = _xml({"PrivateNetwork": SUBNET}, group="web", lid="10.77.0.11")
    srcs = [x.find("devices/interface[@type='mcast']/source") for x in (a, b, other)]
    assert srcs[0].attrib == srcs[1].attrib
    assert srcs[0].attrib != srcs[2].attrib
    assert srcs[0].find("local").get("address") == "127.0.0.1"
    assert srcs[0].get("address").startswith("239.")
    # the user-mode NIC is still there (eth0), the private one in the last PCI slot (eth1)
    assert a.find("devices/interface[@type='user']") is not None
    assert a.find("devices/interface[@type='mcast']/address").get("slot") == "0x1f"
    assert a.find("os/cmdline").text == "console=ttyS0 mobykit.privnet=eth1:10.77.0.11/24"
    macs = {x.find("devices/interface[@type='mcast']/mac").get("address") for x in (a, b)}
    assert len(macs) == 2 and all(m.startswith("52:54:00:") for m in macs)


def test_no_private_network_unless_asked():
    x = _xml({})
    assert x.find("devices/interface[@type='mcast']") is None
    assert x.find("os/cmdline").text == "console=ttyS0"


def test_a_logical_id_that_is_no_address_gets_a_stable_one_in_the_subnet():
    net = network.parse_subnet(SUBNET)
    one, again = network.address_of(net, "etcd-1"), network.address_of(net, "etcd-1")
    assert one == again and one.ip in net and one.network == net
    assert one.ip not in (net.network_address, net.broadcast_address)


@pytest.mark.parametrize("props, lid, message", [
    ({"PrivateNetwork": "10.77.0.0/33"}, "x", "not an IPv4 subnet"),
    ({"PrivateNetwork": "10.77.0.1/24"}, "x", "not an IPv4 subnet"),
    ({"PrivateNetwork": "8.8.8.0/24"}, "x", "not a private range"),
    ({"PrivateNetwork": "10.0.0.0/8"}, "x", "/16 to /29"),
    ({"PrivateNetwork": 24}, "x", "must be a subnet"),
    ({"PrivateNetwork": SUBNET, "Boot": "disk", "Image": "sha256:" + "0" * 64}, "x", "needs Boot: kernel"),
])
def test_bad_private_network_is_refused_at_validate(props, lid, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)) as e:
        validate_properties(props)
    assert "Properties.PrivateNetwork" in str(e.value)


@pytest.mark.parametrize("group, lid, message", [
    (None, "10.77.0.11", "no group or no logical id"),
    ("etcd", None, "no group or no logical id"),
    ("etcd", "10.78.0.11", "outside the usable hosts of 10.77.0.0/24"),
    ("etcd", "10.77.0.255", "outside the usable hosts"),
])
def test_an_instance_without_a_place_on_the_segment_is_refused(group, lid, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        _xml({"PrivateNetwork": SUBNET}, group=group, lid=lid)


# --- two VMs on a real session libvirtd -----------------------------------------------------

PROBE = r"""
echo "probe: eth1 $(ip -4 -o addr show eth1 | awk '{print $4}')"
echo "probe: host says $(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 10 10.0.2.2 HOSTPORT | tail -n 1)"
for i in $(seq 1 240); do
  if ping -c 1 -W 1 PEER >/dev/null 2>&1; then echo "probe: peer PEER answered"; break; fi
  sleep 0.5
done
exec sleep 3600
"""


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_group_members_reach_each_other_and_the_host(libvirtd_session, tmp_path):  # noqa: F811
    pytest.importorskip("libvirt")
    from harness import guestkit as gk
    from mobykit.providers.base import MachineSpec
    from mobykit.providers.libvirt import LibvirtProvider

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = b"hello-from-the-host"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host_port = server.server_address[1]

    parts = gk.parts()
    members = {"10.77.0.11": "10.77.0.12", "10.77.0.12": "10.77.0.11"}
    initrds = {}
    for lid, peer in [*members.items(), ("10.77.0.13", "10.77.0.11")]:
        w = tmp_path / lid
        w.mkdir()
        img = gk.GuestImage(w, parts)
        img.add_system(image_id="sha256:" + "77" * 32)
        net_host = ("pid", "mount", "ipc", "uts")
        img.add_bundle("onboot", "000-privnet", gk.oci_config(["/usr/bin/mobykit-privnet"], caps=["CAP_NET_ADMIN"],
                                                               namespaces=net_host),
                       files={"usr/bin/mobykit-privnet": PRIVNET.read_text()})
        img.add_bundle("services", "probe", gk.oci_config(
            ["/bin/sh", "-c", PROBE.replace("PEER", peer).replace("HOSTPORT", str(host_port))],
            caps=["CAP_NET_RAW"], namespaces=net_host))
        initrds[lid] = img.write_initrd(w / "initrd.gz")

    provider = LibvirtProvider(libvirtd_session.config)
    ids = {}
    try:
        for lid, group in (("10.77.0.11", "netgrp"), ("10.77.0.12", "netgrp"), ("10.77.0.13", "othergrp")):
            props = {"Kernel": str(parts.kernel), "Initrd": str(initrds[lid]), "Memory": 384,
                     "Cmdline": "console=ttyS0 panic=-1 quiet mobykit.metadata=none", "PrivateNetwork": SUBNET}
            ids[lid] = provider.create(MachineSpec(properties=props, tags={"infrakit.group": group},
                                                   logical_id=lid)).id

        def console(lid: str) -> str:
            return provider.console_output(ids[lid])

        deadline = time.monotonic() + 300
        want = {lid: f"probe: peer {peer} answered" for lid, peer in members.items()}
        while time.monotonic() < deadline:
            if all(w in console(lid) and "probe: eth1" in console(lid) for lid, w in want.items()) \
                    and "probe: eth1" in console("10.77.0.13"):
                break
            time.sleep(1)
        for lid, w in want.items():
            text = console(lid)
            assert w in text, text[-4000:]
            assert f"privnet: eth1 {lid}/24" in text
            assert "probe: host says hello-from-the-host" in text, text[-3000:]
            assert f"probe: eth1 {lid}/24" in text
        # the other group's VM, same subnet and an address of a member as its peer, hears nothing
        other = console("10.77.0.13")
        assert "probe: eth1 10.77.0.13/24" in other, other[-3000:]
        assert "probe: peer 10.77.0.11 answered" not in other
    finally:
        server.shutdown()
        server.server_close()
        remove_everything(provider, libvirtd_session.uri, libvirtd_session.config["Pool"], ids=list(ids.values()),
                          delete_dir=True)


from harness.libvirtd import libvirtd_session, remove_everything  # noqa: E402,F401 (the session daemon fixture)
