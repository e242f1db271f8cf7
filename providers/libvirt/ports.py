"""Host ports a started domain was given for its ``Publish`` entries.

Why read them back: the instances of a group share their properties, so ``"0:80"`` asks for any
free host port. qemu binds port 0 and the kernel picks; the provider reads the port from qemu's
``info usernet`` (through libvirt's monitor passthrough) right after the start. Picking a port
ourselves and handing it to qemu would race every other process on the host.
"""

from __future__ import annotations

import re
from typing import Any

from mobykit.errors import Unavailable
from mobykit.providers.libvirt.binding import is_test, libvirt

# A host forward row of qemu's "info usernet": "TCP[HOST_FORWARD]  8  127.0.0.1 38299  10.0.2.15  80 ..."
_USERNET_FWD = re.compile(
    r"^\s*(?P<proto>TCP|UDP)\[HOST_FORWARD\]\s+-?\d+\s+\S+\s+(?P<host>\d+)\s+\S+\s+(?P<guest>\d+)",
    re.MULTILINE)


def bound_ports(conn: Any, dom: Any, publish: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """(proto, guest port, host port) for each published port, auto-assigned ones read from qemu.

    Explicit host ports are known already; for port 0 the host port qemu bound is in its
    ``info usernet`` table, matched by protocol and guest port. libvirt's mock driver has no
    qemu, so there auto-assigned ports stay unknown (left out)."""
    known = [(proto, guest, host) for proto, host, guest in publish if host]
    auto = [(proto, guest) for proto, host, guest in publish if not host]
    if not auto or is_test(conn):
        return known
    lv = libvirt()
    import libvirt_qemu

    try:
        table = libvirt_qemu.qemuMonitorCommand(dom, "info usernet",
                                                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    except lv.libvirtError as e:
        raise Unavailable(
            f"libvirt: cannot read the ports qemu bound for {dom.name()}: {e.get_error_message()}") from None
    taken = {(proto, host) for proto, _guest, host in known}
    rows = [(m.group("proto").lower(), int(m.group("guest")), int(m.group("host")))
            for m in _USERNET_FWD.finditer(table)]
    out = list(known)
    for proto, guest in auto:
        row = next((r for r in rows if r[0] == proto and r[1] == guest and (proto, r[2]) not in taken), None)
        if row is None:
            raise Unavailable(
                f"libvirt: qemu reports no host port for {guest}/{proto} of {dom.name()}:\n{table}")
        taken.add((proto, row[2]))
        out.append(row)
    return out
