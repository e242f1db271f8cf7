"""Machines as libvirt domains: qemu direct kernel boot, user-mode networking, serial console to a file.

Why the design is what it is:
- The domain is the only state. Tags, logical id, image id, creation time and the volumes made for
  the instance live in the domain's ``<metadata>`` under our XML namespace, so ``list`` is one
  ``listAllDomains`` call and a restarted plugin loses nothing.
- Everything the guest needs (kernel, initrd, cidata ISO, the console log) is a volume in a ``dir``
  storage pool. The daemon creates those files itself, so a session daemon running as another user
  owns and can open them, and a remote daemon works the same as a local one: volumes are uploaded and
  the console is downloaded through libvirt's stream API rather than by path.
- Published ports: Debian 12's libvirt 9.0 only forwards ports for the ``passt`` backend, which it
  does not support yet, and its SLIRP ``<interface type='user'>`` has no port forwards. So a domain
  with ``Publish`` gets its user-mode NIC from ``<qemu:commandline>`` (``-netdev user,hostfwd=``),
  always bound to 127.0.0.1; a domain without gets a plain ``<interface type='user'>``.
  The instances of a group share their properties, so ``"0:80"`` (or ``":80"``) asks for any free
  host port: qemu binds port 0, the kernel picks, and the provider reads the port back from qemu's
  ``info usernet`` (through libvirt's monitor passthrough) right after the start. Picking a port
  ourselves and handing it to qemu would race every other process on the host. Every published
  port is kept in the domain metadata and reported as Description property ``Ports``
  (``{"80": 34567, "53/udp": 40001}``), so a user reaches each VM without asking qemu again.
- ``list`` shows a domain only once ``create`` has finished with it (the metadata carries a
  ``creating`` mark until then). A group controller counts a Provision in flight as a member until
  it returns; were the half-made domain listed too, it would count it twice and scale down. A
  create that never finished (the plugin died) is listed again after CREATE_GRACE seconds, so the
  domain is found and cleaned up rather than leaked.
- IDs are ``mobykit-<20-digit ns timestamp>-<4 hex>``: they sort by creation time and never repeat.

Connection URI: property ``URI``, else config ``URI``, else ``$MOBYKIT_LIBVIRT_URI``, else
``qemu:///session``. ``test:///default`` (libvirt's in-process mock) is supported for fast tests:
it has no volume upload/download, so there images are referenced by path and the console is empty.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from mobykit.core import paths
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from mobykit.providers.base import BootImage, Machine, MachineSpec

NS = "https://mobykit.dev/xmlns/libvirt/instance/1"
NS_PREFIX = "mobykit"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ID_PREFIX = "mobykit-"
ENV_URI = "MOBYKIT_LIBVIRT_URI"
DEFAULT_URI = "qemu:///session"
DEFAULT_POOL = "mobykit"

# property -> (type check, default); defaults are documented in the README table via this dict.
PROPERTY_DEFAULTS: dict[str, Any] = {
    "CPUs": 1,
    "Memory": 512,
    "Image": None,
    "Kernel": None,
    "Initrd": None,
    "Cmdline": None,
    "Publish": [],
    "URI": None,
    "Pool": None,
}
CONFIG_KEYS = ("URI", "Pool", "PoolPath", "DomainType", "Machine")
DEFAULT_CMDLINE = "console=ttyS0 panic=-1"
CREATE_GRACE = 300.0  # seconds after which an unfinished create is listed anyway (see the docstring)

_STATE_NAMES = {
    0: "pending",  # NOSTATE
    1: "running",  # RUNNING
    2: "running",  # BLOCKED (idle vCPU)
    3: "stopped",  # PAUSED
    4: "stopping",  # SHUTDOWN (in progress)
    5: "stopped",  # SHUTOFF
    6: "stopped",  # CRASHED
    7: "stopped",  # PMSUSPENDED
}
_PUBLISH = re.compile(r"^(?:(?P<addr>[0-9.]+):)?(?P<host>\d{0,5}):(?P<guest>\d{1,5})(?:/(?P<proto>tcp|udp))?$")
# A host forward row of qemu's "info usernet": "TCP[HOST_FORWARD]  8  127.0.0.1 38299  10.0.2.15  80 ..."
_USERNET_FWD = re.compile(r"^\s*(?P<proto>TCP|UDP)\[HOST_FORWARD\]\s+-?\d+\s+\S+\s+(?P<host>\d+)\s+\S+\s+(?P<guest>\d+)",
                          re.MULTILINE)
_IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


def _libvirt():
    """Import libvirt lazily (it is an optional extra) and silence its default stderr printer."""
    try:
        import libvirt
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise Unavailable(f"the libvirt provider needs libvirt-python: {e}") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def new_id() -> str:
    """A fresh instance id that sorts after every id this process made before."""
    with _id_lock:
        global _last_ns
        now = max(time.time_ns(), _last_ns + 1)
        _last_ns = now
    return f"{ID_PREFIX}{now:020d}-{secrets.token_hex(2)}"


_id_lock = threading.Lock()
_last_ns = 0


def created_ns(instance_id: str) -> int | None:
    """Creation time (ns since the epoch) encoded in an instance id, or None for a foreign id."""
    m = re.match(rf"^{ID_PREFIX}(\d{{20}})-", instance_id)
    return int(m.group(1)) if m else None


def parse_publish(value: str, where: str = "Publish") -> tuple[str, int, int]:
    """``"8080:80"`` / ``"127.0.0.1:8080:80/tcp"`` -> (proto, host port, guest port). Loopback only.
    Host port 0 (``"0:80"``, ``":80"``, ``"127.0.0.1::80"``) means any free port, chosen at start."""
    m = _PUBLISH.match(value) if isinstance(value, str) else None
    if not m:
        raise InvalidArgument(f"{where}: {value!r} is not [HOSTPORT]:GUESTPORT[/tcp|udp] (HOSTPORT 0 or empty: any free port)")
    addr = m.group("addr") or "127.0.0.1"
    if addr != "127.0.0.1":
        raise InvalidArgument(f"{where}: {value!r}: ports are only published on 127.0.0.1")
    host, guest = int(m.group("host") or 0), int(m.group("guest"))
    if not 0 <= host <= 65535:
        raise InvalidArgument(f"{where}: {value!r}: port {host} out of range")
    if not 1 <= guest <= 65535:
        raise InvalidArgument(f"{where}: {value!r}: port {guest} out of range")
    return m.group("proto") or "tcp", host, guest


def validate_properties(properties: dict[str, Any]) -> None:
    """Check instance properties; raise InvalidArgument naming the first bad key."""
    if not isinstance(properties, dict):
        raise InvalidArgument("Properties: must be an object")
    unknown = sorted(set(properties) - set(PROPERTY_DEFAULTS))
    if unknown:
        raise InvalidArgument(
            f"Properties: unknown key(s) {', '.join(unknown)} for libvirt (known: {', '.join(PROPERTY_DEFAULTS)})"
        )
    for key in ("CPUs", "Memory"):
        v = properties.get(key, PROPERTY_DEFAULTS[key])
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidArgument(f"Properties.{key}: must be a positive integer, got {v!r}")
    if properties.get("Memory", 512) < 64:
        raise InvalidArgument("Properties.Memory: at least 64 (MiB) is needed to boot a kernel")
    for key in ("Image", "Kernel", "Initrd", "Cmdline", "URI", "Pool"):
        v = properties.get(key)
        if v is not None and not isinstance(v, str):
            raise InvalidArgument(f"Properties.{key}: must be a string, got {type(v).__name__}")
    image = properties.get("Image")
    if image is not None and not _IMAGE_ID.match(image):
        raise InvalidArgument(f"Properties.Image: {image!r} is not a built image id (sha256:<64 hex>)")
    if image and (properties.get("Kernel") or properties.get("Initrd")):
        raise InvalidArgument("Properties: give either Image or Kernel/Initrd, not both")
    if bool(properties.get("Kernel")) != bool(properties.get("Initrd")):
        raise InvalidArgument("Properties: Kernel and Initrd go together")
    publish = properties.get("Publish", [])
    if not isinstance(publish, list):
        raise InvalidArgument("Properties.Publish: must be a list like [\"8080:80\"]")
    seen = set()
    for i, p in enumerate(publish):
        proto, host, _guest = parse_publish(p, f"Properties.Publish[{i}]")
        if host and (proto, host) in seen:  # any number of auto-assigned (0) ports
            raise InvalidArgument(f"Properties.Publish[{i}]: host port {host}/{proto} published twice")
        seen.add((proto, host))


class LibvirtProvider:
    """``mobykit.providers.base.Provider`` over libvirt. Thread-safe: one connection per URI."""

    name: ClassVar[str] = "libvirt"

    def __init__(self, config: dict[str, Any] | None = None):
        config = dict(config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise InvalidArgument(
                f"providers.libvirt: unknown key(s) {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})"
            )
        self.uri: str = config.get("URI") or os.environ.get(ENV_URI) or DEFAULT_URI
        self.pool_name: str = config.get("Pool") or DEFAULT_POOL
        self.pool_path: str | None = config.get("PoolPath")
        self.domain_type: str | None = config.get("DomainType")
        self.machine: str = config.get("Machine") or "pc"
        self._conns: dict[str, Any] = {}
        self._lock = threading.RLock()
        # test:///default cannot upload: published images are referenced by their paths there.
        self._local_images: dict[str, BootImage] = {}

    # -- connection and pool ------------------------------------------------------------------

    def _conn(self, uri: str | None = None):
        libvirt = _libvirt()
        uri = uri or self.uri
        with self._lock:
            conn = self._conns.get(uri)
            if conn is not None and conn.isAlive():
                return conn
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as e:
                raise Unavailable(f"libvirt {uri}: cannot connect: {e.get_error_message()}") from None
            self._conns[uri] = conn
            return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a dead connection is not an error
                    pass
            self._conns.clear()

    @staticmethod
    def _is_test(conn) -> bool:
        return conn.getType().upper() == "TEST"

    def _default_pool_path(self, conn, name: str) -> str:
        """Where to put a new pool: beside libvirt's ``default`` pool, else the daemon's usual place."""
        libvirt = _libvirt()
        if self.pool_path:
            return self.pool_path
        try:
            default = conn.storagePoolLookupByName("default")
            path = ET.fromstring(default.XMLDesc(0)).findtext("target/path")
            if path:
                return str(Path(path).parent / name)
        except libvirt.libvirtError:
            pass
        if self._is_test(conn):
            return f"/{name}-pool"
        if urlparse(conn.getURI()).path.startswith("/session"):
            data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
            return os.path.join(data, "libvirt", "images", name)
        return f"/var/lib/libvirt/images/{name}"

    def _pool(self, conn, name: str | None = None):
        """The storage pool, defined, built and started on first use."""
        libvirt = _libvirt()
        name = name or self.pool_name
        with self._lock:
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise Unavailable(f"libvirt pool {name}: {e.get_error_message()}") from None
                root = ET.Element("pool", type="dir")
                ET.SubElement(root, "name").text = name
                ET.SubElement(ET.SubElement(root, "target"), "path").text = self._default_pool_path(conn, name)
                try:
                    pool = conn.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
                    try:
                        pool.build(0)
                    except libvirt.libvirtError:
                        pass  # the directory exists already, or the driver builds nothing
                    pool.setAutostart(1)
                except libvirt.libvirtError as e:
                    raise FailedPrecondition(f"libvirt pool {name}: cannot create it: {e.get_error_message()}") from None
            if not pool.isActive():
                try:
                    pool.create(0)
                except libvirt.libvirtError as e:
                    raise FailedPrecondition(f"libvirt pool {name}: cannot start it: {e.get_error_message()}") from None
            return pool

    @staticmethod
    def _volume(pool, name: str):
        libvirt = _libvirt()
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    def _upload(self, conn, pool, name: str, data: bytes | Path):
        """Create volume ``name`` holding ``data``; on any failure the volume is deleted again."""
        libvirt = _libvirt()
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        xml = (f"<volume><name>{_xml_text(name)}</name><capacity unit='bytes'>{size}</capacity>"
               "<target><format type='raw'/></target></volume>")
        vol = pool.createXML(xml, 0)
        if self._is_test(conn):
            return vol  # the mock has no upload; the volume stands for the file
        stream = conn.newStream(0)
        try:
            vol.upload(stream, 0, size, 0)
            if isinstance(data, Path):
                with open(data, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        _send_all(stream, chunk)
            else:
                _send_all(stream, data)
            stream.finish()
        except BaseException:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
            vol.delete(0)
            raise
        return vol

    def _download(self, conn, vol) -> bytes:
        """A volume's bytes; read by path when the daemon is on this host and the file readable."""
        path = vol.path()
        if not urlparse(conn.getURI()).hostname and os.access(path, os.R_OK):
            try:
                return Path(path).read_bytes()
            except OSError:
                pass
        if self._is_test(conn):
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

    # -- Provider -----------------------------------------------------------------------------

    def validate(self, properties: dict[str, Any]) -> None:
        validate_properties(properties)
        uri = urlparse(properties.get("URI") or self.uri)
        if properties.get("URI") and uri.scheme.startswith("test") and uri.path not in ("", "/default"):
            # test:///FILE makes libvirt read FILE (a custom driver state): a path like any other.
            paths.resolve(uri.path, "Properties.URI")
        # Kernel/Initrd are read by this server (and uploaded), whichever driver: always checked
        # against its allowed roots; whether they exist only where the files are read at all.
        local = not (uri.hostname or uri.scheme == "test")
        for key in ("Kernel", "Initrd"):
            path = properties.get(key)
            if path and not paths.resolve(path, f"Properties.{key}").is_file() and local:
                raise InvalidArgument(f"Properties.{key}: {path}: no such file")

    def publish_image(self, image: BootImage, properties: dict[str, Any] | None = None) -> str:
        """Upload kernel, initrd and cmdline as volumes ``<hex>.kernel|.initrd|.cmdline`` (idempotent:
        the cmdline volume is written last, so its presence means the image is complete)."""
        properties = properties or {}
        conn = self._conn(properties.get("URI"))
        pool = self._pool(conn, properties.get("Pool"))
        hexid = image.id.removeprefix("sha256:")
        if self._is_test(conn):
            self._local_images[image.id] = image
            return f"{pool.name()}/{hexid}"
        with self._lock:
            if self._volume(pool, f"{hexid}.cmdline") is None:
                for suffix in ("kernel", "initrd"):
                    old = self._volume(pool, f"{hexid}.{suffix}")
                    if old is not None:
                        old.delete(0)  # a half-published image from an interrupted upload
                made = []
                try:
                    made.append(self._upload(conn, pool, f"{hexid}.kernel", Path(image.kernel)))
                    made.append(self._upload(conn, pool, f"{hexid}.initrd", Path(image.initrd)))
                    made.append(self._upload(conn, pool, f"{hexid}.cmdline", image.cmdline.encode()))
                except BaseException:
                    for vol in made:
                        vol.delete(0)
                    raise
        return f"{pool.name()}/{hexid}"

    def _boot_files(self, conn, pool, props: dict[str, Any]) -> tuple[str, str, str, str | None]:
        """(kernel path, initrd path, cmdline, image id) as the daemon sees them."""
        image = props.get("Image")
        if props.get("Kernel"):
            kernel, initrd = Path(props["Kernel"]), Path(props["Initrd"])
            cmdline = props.get("Cmdline") or DEFAULT_CMDLINE
            if self._is_test(conn):
                for key in ("Kernel", "Initrd"):
                    paths.resolve(props[key], f"Properties.{key}")
                return str(kernel), str(initrd), cmdline, image
            # Publish the files content-addressed so the daemon's user owns a copy it can open. Each
            # is opened once through the server's path policy and copied while hashed, so what is
            # published is what was checked and hashed (a file swapped meanwhile cannot slip in).
            digest = hashlib.sha256()
            with tempfile.TemporaryDirectory(prefix="mobykit-boot-") as tmp:
                copies = []
                for key in ("Kernel", "Initrd"):
                    copy = Path(tmp) / key.lower()
                    try:
                        src = paths.open_file(props[key], f"Properties.{key}")
                    except OSError as e:
                        raise InvalidArgument(f"Properties.{key}: {props[key]}: {e.strerror}") from None
                    with src, open(copy, "wb") as out:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                    digest.update(b"\0")
                    copies.append(copy)
                boot = BootImage(id="sha256:" + digest.hexdigest(), name=kernel.name, kernel=copies[0],
                                 initrd=copies[1], cmdline=cmdline)
                self.publish_image(boot, props)
            hexid = digest.hexdigest()
            return (self._volume(pool, f"{hexid}.kernel").path(), self._volume(pool, f"{hexid}.initrd").path(),
                    cmdline, image)
        if not image:
            raise InvalidArgument("Properties: Image (a built image id) or Kernel and Initrd are required")
        if self._is_test(conn):
            local = self._local_images.get(image)
            if local is None:
                raise FailedPrecondition(f"image {image} is not published to libvirt pool {pool.name()}")
            return str(local.kernel), str(local.initrd), props.get("Cmdline") or local.cmdline, image
        hexid = image.removeprefix("sha256:")
        vols = [self._volume(pool, f"{hexid}.{s}") for s in ("kernel", "initrd", "cmdline")]
        if any(v is None for v in vols):
            raise FailedPrecondition(
                f"image {image} is not published to libvirt pool {pool.name()} (the core publishes built images)"
            )
        cmdline = props.get("Cmdline") or self._download(conn, vols[2]).decode().strip()
        return vols[0].path(), vols[1].path(), cmdline, image

    def _domain_type(self, conn) -> str:
        if self._is_test(conn):
            return "test"
        if self.domain_type:
            return self.domain_type
        from mobykit.run import accel

        return "kvm" if _accel_name(accel.detect()) == "kvm" else "qemu"

    def create(self, spec: MachineSpec) -> Machine:
        libvirt = _libvirt()
        props = dict(spec.properties or {})
        validate_properties(props)
        conn = self._conn(props.get("URI"))
        pool = self._pool(conn, props.get("Pool"))
        instance_id = new_id()
        made_vols: list[Any] = []
        dom = None
        try:
            kernel, initrd, cmdline, image = self._boot_files(conn, pool, props)
            console = self._upload(conn, pool, f"{instance_id}.console", b"")
            made_vols.append(console)
            cidata = None
            if spec.user_data:
                cidata = self._upload(conn, pool, f"{instance_id}.cidata.iso", _cidata(spec.user_data, instance_id))
                made_vols.append(cidata)
            meta = _Meta(tags=dict(spec.tags), logical_id=spec.logical_id, image=image,
                         created=created_ns(instance_id) or time.time_ns(),
                         volumes=[v.name() for v in made_vols], pool=pool.name(), creating=True)
            xml = self._domain_xml(conn, instance_id, props, kernel, initrd, cmdline,
                                   console.path(), cidata.path() if cidata else None, meta)
            dom = conn.defineXML(xml)
            dom.create()
            publish = [parse_publish(p) for p in props.get("Publish", [])]
            if publish:
                meta.ports = self._bound_ports(conn, dom, publish)
            meta.creating = False  # from now on list() shows it
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta.xml(), NS_PREFIX, NS, flags)
        except BaseException as e:
            if dom is not None:
                _quietly(dom.destroy)
                _quietly(lambda: dom.undefineFlags(0))
            for vol in made_vols:
                _quietly(lambda v=vol: v.delete(0))
            if isinstance(e, libvirt.libvirtError):
                raise Unavailable(f"libvirt {conn.getURI()}: cannot start {instance_id}: {e.get_error_message()}") from None
            raise
        return self._machine(dom, meta, conn.getURI())

    def _bound_ports(self, conn, dom, publish: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """(proto, guest port, host port) for each published port, auto-assigned ones read from qemu.

        Explicit host ports are known already; for port 0 the host port qemu bound is in its
        ``info usernet`` table, matched by protocol and guest port. libvirt's mock driver has no
        qemu, so there auto-assigned ports stay unknown (left out)."""
        known = [(proto, guest, host) for proto, host, guest in publish if host]
        auto = [(proto, guest) for proto, host, guest in publish if not host]
        if not auto or self._is_test(conn):
            return known
        libvirt = _libvirt()
        import libvirt_qemu

        try:
            table = libvirt_qemu.qemuMonitorCommand(dom, "info usernet", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        except libvirt.libvirtError as e:
            raise Unavailable(f"libvirt: cannot read the ports qemu bound for {dom.name()}: {e.get_error_message()}") from None
        taken = {(proto, host) for proto, _guest, host in known}
        rows = [(m.group("proto").lower(), int(m.group("guest")), int(m.group("host"))) for m in _USERNET_FWD.finditer(table)]
        out = list(known)
        for proto, guest in auto:
            row = next((r for r in rows if r[0] == proto and r[1] == guest and (proto, r[2]) not in taken), None)
            if row is None:
                raise Unavailable(f"libvirt: qemu reports no host port for {guest}/{proto} of {dom.name()}:\n{table}")
            taken.add((proto, row[2]))
            out.append(row)
        return out

    def _domain_xml(self, conn, instance_id: str, props: dict[str, Any], kernel: str, initrd: str, cmdline: str,
                    console: str, cidata: str | None, meta: _Meta) -> str:
        root = ET.Element("domain", type=self._domain_type(conn))
        ET.SubElement(root, "name").text = instance_id
        ET.SubElement(root, "memory", unit="MiB").text = str(props.get("Memory", PROPERTY_DEFAULTS["Memory"]))
        ET.SubElement(root, "vcpu").text = str(props.get("CPUs", PROPERTY_DEFAULTS["CPUs"]))
        ET.SubElement(root, "metadata").append(meta.element())
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine=self.machine).text = "hvm"
        ET.SubElement(os_el, "kernel").text = kernel
        ET.SubElement(os_el, "initrd").text = initrd
        ET.SubElement(os_el, "cmdline").text = cmdline
        # An immutable machine that stops has finished: never reboot it into a loop.
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            ET.SubElement(root, event).text = "destroy"
        devices = ET.SubElement(root, "devices")
        if cidata:
            disk = ET.SubElement(devices, "disk", type="file", device="cdrom")
            ET.SubElement(disk, "driver", name="qemu", type="raw")
            ET.SubElement(disk, "source", file=cidata)
            ET.SubElement(disk, "target", dev="hdc", bus="ide")
            ET.SubElement(disk, "readonly")
        publish = [parse_publish(p) for p in props.get("Publish", [])]
        if not publish:
            iface = ET.SubElement(devices, "interface", type="user")
            ET.SubElement(iface, "model", type="virtio")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=console)
        ET.SubElement(serial, "target", port="0")
        ET.SubElement(devices, "memballoon", model="none")
        xml = ET.tostring(root, encoding="unicode")
        if publish and not self._is_test(conn):
            fwd = ",".join(f"hostfwd={proto}:127.0.0.1:{host}-:{guest}" for proto, host, guest in publish)
            args = ["-netdev", f"user,id=mkpub0,{fwd}", "-device", "virtio-net-pci,netdev=mkpub0"]
            extra = "".join(f"<qemu:arg value='{_xml_attr(a)}'/>" for a in args)
            xml = xml.replace("<domain ", f"<domain xmlns:qemu='{QEMU_NS}' ", 1).replace(
                "</domain>", f"<qemu:commandline>{extra}</qemu:commandline></domain>")
        return xml

    def _machine(self, dom, meta: _Meta, uri: str) -> Machine:
        libvirt = _libvirt()
        try:
            state = _STATE_NAMES.get(dom.state()[0], "pending")
        except libvirt.libvirtError:
            state = "terminated"
        created = datetime.fromtimestamp(meta.created / 1e9, UTC)
        props = {
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
        return Machine(id=dom.name(), tags=dict(meta.tags), state=state, logical_id=meta.logical_id, properties=props)

    def _uris(self) -> list[str]:
        with self._lock:
            return [self.uri] + [u for u in self._conns if u != self.uri]

    def _find(self, instance_id: str):
        """(connection, domain, metadata) for a mobykit instance, or None when it does not exist."""
        libvirt = _libvirt()
        for uri in self._uris():
            conn = self._conn(uri)
            try:
                dom = conn.lookupByName(instance_id)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                raise Unavailable(f"libvirt {uri}: {e.get_error_message()}") from None
            meta = _read_meta(dom)
            if meta is not None:
                return conn, dom, meta
        return None

    def set_tags(self, id: str, tags: dict[str, str]) -> None:
        libvirt = _libvirt()
        found = self._find(id)
        if found is None:
            raise NotFound(f"instance {id!r} not found")
        _conn, dom, meta = found
        meta.tags = dict(tags)
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, meta.xml(), NS_PREFIX, NS, flags)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"instance {id!r} not found") from None
            raise Unavailable(f"libvirt: cannot tag {id}: {e.get_error_message()}") from None

    def destroy(self, id: str) -> None:
        """Stop and undefine the domain, then delete every volume made for it. Gone is success."""
        libvirt = _libvirt()
        found = self._find(id)
        if found is None:
            return
        conn, dom, meta = found
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise Unavailable(f"libvirt: cannot stop {id}: {e.get_error_message()}") from None
        try:
            dom.undefineFlags(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise Unavailable(f"libvirt: cannot undefine {id}: {e.get_error_message()}") from None
        pool = self._pool(conn, meta.pool or None)
        names = set(meta.volumes)
        try:
            pool.refresh(0)
            names.update(n for n in pool.listVolumes() if n.startswith(f"{id}."))
        except libvirt.libvirtError:
            pass
        for name in sorted(names):
            vol = self._volume(pool, name)
            if vol is not None:
                _quietly(lambda v=vol: v.delete(0))

    def list(self, tags: dict[str, str]) -> list[Machine]:
        libvirt = _libvirt()
        out = []
        for uri in self._uris():
            conn = self._conn(uri)
            try:
                domains = conn.listAllDomains(0)
            except libvirt.libvirtError as e:
                raise Unavailable(f"libvirt {uri}: {e.get_error_message()}") from None
            for dom in domains:
                try:
                    if not dom.name().startswith(ID_PREFIX):
                        continue
                    meta = _read_meta(dom)
                except libvirt.libvirtError:
                    continue  # removed while we looked
                if meta is None or any(meta.tags.get(k) != v for k, v in tags.items()):
                    continue
                if meta.creating and time.time_ns() - meta.created < CREATE_GRACE * 1e9:
                    continue  # create() has not returned it yet (see the module docstring)
                out.append(self._machine(dom, meta, uri))
        out.sort(key=lambda m: m.id)
        return out

    def console_output(self, id: str) -> str:
        found = self._find(id)
        if found is None:
            raise NotFound(f"instance {id!r} not found")
        conn, _dom, meta = found
        pool = self._pool(conn, meta.pool or None)
        vol = self._volume(pool, f"{id}.console")
        if vol is None:
            return ""
        try:
            return self._download(conn, vol).decode("utf-8", errors="replace")
        except _libvirt().libvirtError:
            return ""


class _Meta:
    """What we keep on the domain, as ``<mobykit:instance>`` XML (attributes and ``<tag>`` children)."""

    def __init__(self, tags: dict[str, str], logical_id: str | None, image: str | None, created: int,
                 volumes: list[str], pool: str, ports: list[tuple[str, int, int]] | None = None,
                 creating: bool = False):
        self.tags, self.logical_id, self.image = tags, logical_id, image
        self.created, self.volumes, self.pool = created, volumes, pool
        self.ports = list(ports or [])  # (proto, guest port, host port on 127.0.0.1)
        self.creating = creating  # create() has not finished with the domain yet

    def element(self) -> ET.Element:
        root = ET.Element(f"{{{NS}}}instance")
        root.set("created", str(self.created))
        root.set("pool", self.pool)
        if self.creating:
            root.set("creating", "1")
        if self.logical_id is not None:
            root.set("logical-id", self.logical_id)
        if self.image:
            root.set("image", self.image)
        for k in sorted(self.tags):
            ET.SubElement(root, f"{{{NS}}}tag", key=k).text = self.tags[k]
        for v in self.volumes:
            ET.SubElement(root, f"{{{NS}}}volume").text = v
        for proto, guest, host in self.ports:
            ET.SubElement(root, f"{{{NS}}}port", proto=proto, guest=str(guest), host=str(host))
        return root

    def xml(self) -> str:
        """Unqualified XML for setMetadata, which adds the namespace itself."""
        root = ET.Element("instance", {k: v for k, v in self.element().attrib.items()})
        for k in sorted(self.tags):
            ET.SubElement(root, "tag", key=k).text = self.tags[k]
        for v in self.volumes:
            ET.SubElement(root, "volume").text = v
        for proto, guest, host in self.ports:
            ET.SubElement(root, "port", proto=proto, guest=str(guest), host=str(host))
        return ET.tostring(root, encoding="unicode")

    @classmethod
    def parse(cls, text: str) -> _Meta:
        root = ET.fromstring(text)

        def local(el: ET.Element) -> str:
            return el.tag.rsplit("}", 1)[-1]

        tags = {el.get("key", ""): el.text or "" for el in root if local(el) == "tag"}
        volumes = [el.text or "" for el in root if local(el) == "volume"]
        ports = [(el.get("proto", "tcp"), int(el.get("guest", "0")), int(el.get("host", "0")))
                 for el in root if local(el) == "port"]
        return cls(tags=tags, logical_id=root.get("logical-id"), image=root.get("image"),
                   created=int(root.get("created", "0")), volumes=volumes, pool=root.get("pool", ""), ports=ports,
                   creating=root.get("creating") == "1")


def _read_meta(dom) -> _Meta | None:
    libvirt = _libvirt()
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise
    return _Meta.parse(text)


def _send_all(stream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view[: 1 << 18]))
        if sent < 0:
            continue  # -2: would block (never for a blocking stream)
        view = view[sent:]


def _cidata(user_data: str, instance_id: str) -> bytes:
    """The NoCloud config drive for ``user_data`` (built by mobykit.run.cidata, in a temp dir)."""
    import tempfile

    from mobykit.run import cidata

    meta = f"instance-id: {instance_id}\nlocal-hostname: {instance_id}\n"
    with tempfile.TemporaryDirectory(prefix="mobykit-cidata-") as tmp:
        return cidata.make_iso(Path(tmp) / "cidata.iso", user_data, meta).read_bytes()


def _accel_name(result: Any) -> str:
    """accel.detect() may answer with a name or an object carrying one."""
    if isinstance(result, str):
        return result
    for attr in ("name", "accel", "kind"):
        value = getattr(result, attr, None)
        if isinstance(value, str):
            return value
    return str(result)


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - best-effort cleanup after an earlier error
        pass


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _xml_attr(s: str) -> str:
    return _xml_text(s).replace("'", "&apos;").replace('"', "&quot;")
