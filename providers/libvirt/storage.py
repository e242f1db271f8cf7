"""Volumes in a ``dir`` storage pool: boot files, disks, config drives, console logs; and, in a
pool of their own (``<Pool>-volumes``), the persistent volumes logical ids own (``Volumes``).

Why volumes rather than files we write ourselves: the daemon creates the files, so a session
daemon running as another user owns and can open them, and a remote daemon works the same as a
local one: volumes are uploaded and the console is downloaded through libvirt's stream API rather
than by path. libvirt's mock driver has neither upload nor download: there a volume stands for the
file and reads come back empty.
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mobykit.errors import FailedPrecondition, Unavailable
from mobykit.providers.libvirt.binding import is_test, libvirt
from mobykit.providers.libvirt.domain import xml_text

CHUNK = 1 << 20


@dataclass
class Storage:
    """Pools and volumes on behalf of one provider. ``lock`` serialises pool creation and image
    publication (shared with the provider, which holds it around whole publications)."""

    pool_name: str
    pool_path: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    def default_pool_path(self, conn: Any, name: str) -> str:
        """Where to put a new pool: beside libvirt's ``default`` pool, else the daemon's usual place."""
        lv = libvirt()
        if self.pool_path:
            if name == self.pool_name:
                return self.pool_path
            # another pool (<Pool>-volumes): beside the configured one, never the same directory
            # (libvirt refuses two pools on one path)
            suffix = name.removeprefix(self.pool_name) if name.startswith(self.pool_name) else f"-{name}"
            return self.pool_path.rstrip("/") + suffix
        try:
            default = conn.storagePoolLookupByName("default")
            path = ET.fromstring(default.XMLDesc(0)).findtext("target/path")
            if path:
                return str(Path(path).parent / name)
        except lv.libvirtError:
            pass
        if is_test(conn):
            return f"/{name}-pool"
        if urlparse(conn.getURI()).path.startswith("/session"):
            data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
            return os.path.join(data, "libvirt", "images", name)
        return f"/var/lib/libvirt/images/{name}"

    def pool(self, conn: Any, name: str | None = None) -> Any:
        """The storage pool, defined, built and started on first use."""
        lv = libvirt()
        name = name or self.pool_name
        with self.lock:
            try:
                pool = conn.storagePoolLookupByName(name)
            except lv.libvirtError as e:
                if e.get_error_code() != lv.VIR_ERR_NO_STORAGE_POOL:
                    raise Unavailable(f"libvirt pool {name}: {e.get_error_message()}") from None
                root = ET.Element("pool", type="dir")
                ET.SubElement(root, "name").text = name
                ET.SubElement(ET.SubElement(root, "target"), "path").text = self.default_pool_path(conn, name)
                try:
                    pool = conn.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
                    try:
                        pool.build(0)
                    except lv.libvirtError:
                        pass  # the directory exists already, or the driver builds nothing
                    pool.setAutostart(1)
                except lv.libvirtError as e:
                    raise FailedPrecondition(
                        f"libvirt pool {name}: cannot create it: {e.get_error_message()}") from None
            if not pool.isActive():
                try:
                    pool.create(0)
                except lv.libvirtError as e:
                    raise FailedPrecondition(
                        f"libvirt pool {name}: cannot start it: {e.get_error_message()}") from None
            return pool

    @staticmethod
    def volume(pool: Any, name: str) -> Any | None:
        """The volume called ``name``, or None when the pool has none."""
        lv = libvirt()
        try:
            return pool.storageVolLookupByName(name)
        except lv.libvirtError as e:
            if e.get_error_code() == lv.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    @staticmethod
    def upload(conn: Any, pool: Any, name: str, data: bytes | Path) -> Any:
        """Create volume ``name`` holding ``data``; on any failure the volume is deleted again."""
        lv = libvirt()
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        xml = (f"<volume><name>{xml_text(name)}</name><capacity unit='bytes'>{size}</capacity>"
               "<target><format type='raw'/></target></volume>")
        vol = pool.createXML(xml, 0)
        if is_test(conn):
            return vol  # the mock has no upload; the volume stands for the file
        stream = conn.newStream(0)
        try:
            vol.upload(stream, 0, size, 0)
            if isinstance(data, Path):
                with open(data, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        _send_all(stream, chunk)
            else:
                _send_all(stream, data)
            stream.finish()
        except BaseException:
            try:
                stream.abort()
            except lv.libvirtError:
                pass
            vol.delete(0)
            raise
        return vol

    @staticmethod
    def overlay(pool: Any, name: str, base: Any) -> Any:
        """A new qcow2 volume ``name`` over ``base`` (a qcow2 volume): reads fall through to the base,
        writes stay in the overlay. One VM's disk over an image's shared one, which no VM writes."""
        capacity = base.info()[1]  # for a qcow2 file, libvirt reports the disk's virtual size
        return pool.createXML(overlay_xml(name, base.path(), capacity), 0)

    @staticmethod
    def download(conn: Any, vol: Any) -> bytes:
        """A volume's bytes; read by path when the daemon is on this host and the file readable."""
        path = vol.path()
        if not urlparse(conn.getURI()).hostname and os.access(path, os.R_OK):
            try:
                return Path(path).read_bytes()
            except OSError:
                pass
        if is_test(conn):
            return b""
        stream = conn.newStream(0)
        vol.download(stream, 0, 0, 0)
        chunks = []
        while True:
            chunk = stream.recv(1 << 18)
            if not chunk:
                break
            if isinstance(chunk, int):  # -2: would block (never for a blocking stream)
                continue
            chunks.append(chunk)
        stream.finish()
        return b"".join(chunks)


def persistent_volume(pool: Any, name: str, size_gb: int) -> tuple[Any, bool]:
    """(the volume ``name``, made now?): a logical id's data disk, a sparse qcow2 of ``size_gb``
    GiB made on first use and then reused as it is (never resized, never formatted here: the
    guest formats a blank disk once). Lives in the volumes pool, where nothing else is."""
    vol = Storage.volume(pool, name)
    if vol is not None:
        return vol, False
    xml = (f"<volume><name>{xml_text(name)}</name><capacity unit='GiB'>{size_gb}</capacity>"
           "<allocation unit='bytes'>0</allocation><target><format type='qcow2'/></target></volume>")
    return pool.createXML(xml, 0), True


def overlay_xml(name: str, base_path: str, capacity: int) -> str:
    """The volume XML of a qcow2 overlay; the backing format is explicit, never probed from the file."""
    return (f"<volume><name>{xml_text(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
            "<target><format type='qcow2'/></target>"
            f"<backingStore><path>{xml_text(base_path)}</path><format type='qcow2'/></backingStore></volume>")


def _send_all(stream: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view[: 1 << 18]))
        if sent < 0:
            continue  # -2: would block (never for a blocking stream)
        view = view[sent:]


def cidata(user_data: str, instance_id: str) -> bytes:
    """The NoCloud config drive for ``user_data`` (built by mobykit.run.cidata, in a temp dir)."""
    import tempfile

    from mobykit.run import cidata as nocloud

    meta = f"instance-id: {instance_id}\nlocal-hostname: {instance_id}\n"
    with tempfile.TemporaryDirectory(prefix="mobykit-cidata-") as tmp:
        return nocloud.make_iso(Path(tmp) / "cidata.iso", user_data, meta).read_bytes()


def quietly(fn) -> None:
    """Run a best-effort cleanup step after an earlier error; its own failure must not hide that one."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - best-effort cleanup after an earlier error
        pass
