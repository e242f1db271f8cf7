"""``LibvirtProvider``: the Provider interface over libvirt connections (see the package docstring)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from mobykit.core import paths
from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from mobykit.providers.base import BootImage, Machine, MachineSpec
from mobykit.providers.libvirt import diskboot, events
from mobykit.providers.libvirt.binding import is_test, libvirt
from mobykit.providers.libvirt.cache import DomainCache
from mobykit.providers.libvirt.consolewatch import ConsoleFiles
from mobykit.providers.libvirt.domain import (
    BootSpec,
    accel_name,
    copy_machine,
    domain_state,
    domain_xml,
    machine,
)
from mobykit.providers.libvirt.metadata import InstanceMeta, read_meta, write_meta
from mobykit.providers.libvirt.ports import bound_ports
from mobykit.providers.libvirt.properties import (
    CONFIG_KEYS,
    CREATE_GRACE,
    DEFAULT_CMDLINE,
    DEFAULT_POOL,
    DEFAULT_URI,
    ENV_URI,
    VOLUME_POOL_SUFFIX,
    boot_mode,
    created_ns,
    new_id,
    parse_publish,
    validate_properties,
    volume_name,
    volume_specs,
)
from mobykit.providers.libvirt.storage import Storage, cidata, persistent_volume, quietly

log = logging.getLogger("mobykit.providers.libvirt")


@dataclass
class Connection:
    """One open connection, the listing cache of its domains, and the event subscription that
    keeps that cache honest (None: the driver gives no events, the cache re-reads every listing)."""

    uri: str
    conn: Any
    cache: DomainCache
    subscription: events.Subscription | None = None

    def close(self) -> None:
        if self.subscription is not None:
            self.subscription.cancel()
            self.subscription = None
        self.cache.set_live(False)
        quietly(self.conn.close)


@dataclass
class Found:
    """A mobykit instance looked up by id, read fresh (never from the listing cache)."""

    connection: Connection
    dom: Any
    meta: InstanceMeta


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
        self._conns: dict[str, Connection] = {}
        # Its own lock: a listing must never wait behind an image upload, which holds ``_lock``.
        self._conns_lock = threading.Lock()
        self._lock = threading.RLock()
        self._storage = Storage(self.pool_name, self.pool_path, self._lock)
        # test:///default cannot upload: published images are referenced by their paths there.
        self._local_images: dict[str, BootImage] = {}
        self._consoles: ConsoleFiles | None = None  # console files followed (consolewatch.py)

    # -- connections --------------------------------------------------------------------------

    def _connection(self, uri: str | None = None) -> Connection:
        """The open connection to ``uri`` (default: the configured one), reopened when it died."""
        lv = libvirt()
        uri = uri or self.uri
        with self._conns_lock:
            current = self._conns.get(uri)
            if current is not None and current.conn.isAlive():
                return current
            if current is not None:
                current.close()  # its events stopped with it: a fresh cache goes with the new one
            events.ensure_loop()  # before open: a connection only gets events from a loop that existed
            try:
                conn = lv.open(uri)
            except lv.libvirtError as e:
                raise Unavailable(f"libvirt {uri}: cannot connect: {e.get_error_message()}") from None
            connection = Connection(uri, conn, DomainCache(uri))
            cache = connection.cache
            connection.subscription = events.subscribe(conn, cache.invalidate, lambda: cache.set_live(False))
            cache.set_live(connection.subscription is not None)
            self._conns[uri] = connection
            return connection

    def _conn(self, uri: str | None = None) -> Any:
        return self._connection(uri).conn

    def listing_cache(self, uri: str | None = None) -> DomainCache:
        """The listing cache of ``uri``'s connection (for tests, benchmarks and diagnostics)."""
        return self._connection(uri).cache

    def close(self) -> None:
        with self._conns_lock:
            for connection in self._conns.values():
                connection.close()
            self._conns.clear()
            consoles, self._consoles = self._consoles, None
        if consoles is not None:
            consoles.close()

    def _uris(self) -> list[str]:
        with self._conns_lock:
            return [self.uri] + [u for u in self._conns if u != self.uri]

    def _domain_type(self, conn: Any) -> str:
        if is_test(conn):
            return "test"
        if self.domain_type:
            return self.domain_type
        from mobykit.run import accel

        return "kvm" if accel_name(accel.detect()) == "kvm" else "qemu"

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
        the cmdline volume is written last, so its presence means the image is complete); for
        ``Boot: disk`` the image's disk instead, as the base of every instance's overlay (``diskboot``)."""
        properties = properties or {}
        conn = self._conn(properties.get("URI"))
        pool = self._storage.pool(conn, properties.get("Pool"))
        hexid = image.id.removeprefix("sha256:")
        if boot_mode(properties) == "disk":
            with self._lock:  # the mock driver too: its volumes stand for the files
                diskboot.publish(self._storage, conn, pool, image)
            return f"{pool.name()}/{diskboot.base_name(image.id)}"
        if is_test(conn):
            self._local_images[image.id] = image
            return f"{pool.name()}/{hexid}"
        volume, upload = self._storage.volume, self._storage.upload
        with self._lock:
            if volume(pool, f"{hexid}.cmdline") is None:
                for suffix in ("kernel", "initrd"):
                    old = volume(pool, f"{hexid}.{suffix}")
                    if old is not None:
                        old.delete(0)  # a half-published image from an interrupted upload
                made = []
                try:
                    made.append(upload(conn, pool, f"{hexid}.kernel", Path(image.kernel)))
                    made.append(upload(conn, pool, f"{hexid}.initrd", Path(image.initrd)))
                    made.append(upload(conn, pool, f"{hexid}.cmdline", image.cmdline.encode()))
                except BaseException:
                    for vol in made:
                        vol.delete(0)
                    raise
        return f"{pool.name()}/{hexid}"

    def _boot_files(self, conn: Any, pool: Any, props: dict[str, Any]) -> tuple[str, str, str, str | None]:
        """(kernel path, initrd path, cmdline, image id) as the daemon sees them."""
        image = props.get("Image")
        if props.get("Kernel"):
            kernel, initrd = Path(props["Kernel"]), Path(props["Initrd"])
            cmdline = props.get("Cmdline") or DEFAULT_CMDLINE
            if is_test(conn):
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
            volume = self._storage.volume
            return (volume(pool, f"{hexid}.kernel").path(), volume(pool, f"{hexid}.initrd").path(),
                    cmdline, image)
        if not image:
            raise InvalidArgument("Properties: Image (a built image id) or Kernel and Initrd are required")
        if is_test(conn):
            local = self._local_images.get(image)
            if local is None:
                raise FailedPrecondition(f"image {image} is not published to libvirt pool {pool.name()}")
            return str(local.kernel), str(local.initrd), props.get("Cmdline") or local.cmdline, image
        hexid = image.removeprefix("sha256:")
        vols = [self._storage.volume(pool, f"{hexid}.{s}") for s in ("kernel", "initrd", "cmdline")]
        if any(v is None for v in vols):
            raise FailedPrecondition(
                f"image {image} is not published to libvirt pool {pool.name()} "
                "(the core publishes built images)"
            )
        cmdline = props.get("Cmdline") or self._storage.download(conn, vols[2]).decode().strip()
        return vols[0].path(), vols[1].path(), cmdline, image

    def create(self, spec: MachineSpec) -> Machine:
        lv = libvirt()
        props = dict(spec.properties or {})
        validate_properties(props)
        connection = self._connection(props.get("URI"))
        conn = connection.conn
        pool = self._storage.pool(conn, props.get("Pool"))
        instance_id = new_id()
        made_vols: list[Any] = []
        dom = None
        try:
            disk = None
            if boot_mode(props) == "disk":
                kernel = initrd = cmdline = None
                image = props.get("Image")
                disk = diskboot.overlay(self._storage, pool, image, instance_id)
                made_vols.append(disk)
            else:
                kernel, initrd, cmdline, image = self._boot_files(conn, pool, props)
            console = self._storage.upload(conn, pool, f"{instance_id}.console", b"")
            made_vols.append(console)
            attached = self._attach_volumes(conn, props, spec, made_vols)
            drive = None
            if spec.user_data:
                iso = cidata(spec.user_data, instance_id)
                drive = self._storage.upload(conn, pool, f"{instance_id}.cidata.iso", iso)
                made_vols.append(drive)
            meta = InstanceMeta(tags=dict(spec.tags), logical_id=spec.logical_id, image=image,
                                created=created_ns(instance_id) or time.time_ns(),
                                volumes=[v.name() for v in made_vols if v.name().startswith(f"{instance_id}.")],
                                pool=pool.name(), creating=True)
            boot = BootSpec(kernel=kernel, initrd=initrd, cmdline=cmdline, console=console.path(),
                            cidata=drive.path() if drive else None, disk=disk.path() if disk else None,
                            volumes=attached)
            xml = domain_xml(instance_id, props, boot, meta, domain_type=self._domain_type(conn),
                             machine=self.machine, qemu_args=not is_test(conn))
            dom = conn.defineXML(xml)
            dom.create()
            publish = [parse_publish(p) for p in props.get("Publish", [])]
            if publish:
                meta.ports = bound_ports(conn, dom, publish)
            meta.creating = False  # from now on list() shows it
            write_meta(dom, meta, lv.VIR_DOMAIN_AFFECT_CONFIG | lv.VIR_DOMAIN_AFFECT_LIVE)
        except BaseException as e:
            if dom is not None:
                quietly(dom.destroy)
                quietly(lambda: dom.undefineFlags(0))
            for vol in made_vols:
                quietly(lambda v=vol: v.delete(0))
            if isinstance(e, lv.libvirtError):
                raise Unavailable(
                    f"libvirt {conn.getURI()}: cannot start {instance_id}: {e.get_error_message()}") from None
            raise
        finally:
            if dom is not None:
                # A listing during create may have kept the half-made view; the event may come late.
                connection.cache.invalidate(dom.UUIDString())
        return machine(dom.name(), meta, domain_state(dom), conn.getURI())

    # -- persistent volumes (Volumes: a logical id's disks, kept across replacements) ---------

    def _volumes_pool(self, conn: Any, pool: str | None = None) -> Any:
        return self._storage.pool(conn, (pool or self.pool_name) + VOLUME_POOL_SUFFIX)

    def _attach_volumes(self, conn: Any, props: dict[str, Any], spec: MachineSpec,
                        made: list[Any]) -> tuple[tuple[str, str], ...]:
        """(name, path) of each of ``Volumes``, made on first use; a volume made now is appended to
        ``made`` (deleted again if the create fails: it holds nothing yet). One still attached to
        another instance (which must be destroyed first, as a quorum group replaces) is refused."""
        wanted = volume_specs(props)
        if not wanted:
            return ()
        group = spec.tags.get("infrakit.group")
        if not spec.logical_id or not group:
            raise InvalidArgument(
                "Properties.Volumes: volumes belong to a logical id (<group>-<logical id>-<name>, kept across "
                "replacements); this instance has no logical id - give the group Allocation.LogicalIDs")
        vpool = self._volumes_pool(conn, props.get("Pool"))
        out = []
        with self._lock:
            for name, size in wanted:
                vol, new = persistent_volume(vpool, volume_name(group, spec.logical_id, name), size)
                if new:
                    made.append(vol)
                holder = None if new else self._holder(conn, vol.path())
                if holder is not None:
                    raise FailedPrecondition(f"Properties.Volumes: volume {vol.name()} is still attached to "
                                             f"instance {holder}; destroy it first")
                out.append((name, vol.path()))
        return tuple(out)

    @staticmethod
    def _holders(conn: Any) -> dict[str, str]:
        """Disk path -> name of the (defined) domain that has it."""
        import xml.etree.ElementTree as ET

        out = {}
        for dom in conn.listAllDomains(0):
            try:
                root = ET.fromstring(dom.XMLDesc(0))
            except libvirt().libvirtError:
                continue  # gone meanwhile
            for src in root.iterfind("devices/disk/source"):
                if src.get("file"):
                    out[src.get("file")] = dom.name()
        return out

    def _holder(self, conn: Any, path: str) -> str | None:
        return self._holders(conn).get(path)

    def list_volumes(self) -> list[dict[str, Any]]:
        """The persistent volumes: name, capacity (GiB), bytes allocated, and the instance that has
        it attached ("" when none), by name."""
        conn = self._conn()
        vpool = self._volumes_pool(conn)
        quietly(lambda: vpool.refresh(0))
        holders = self._holders(conn)
        out = []
        for vol in vpool.listAllVolumes(0):
            _type, capacity, allocation = vol.info()
            out.append({"Name": vol.name(), "SizeGb": capacity / (1 << 30), "Allocated": allocation,
                        "Instance": holders.get(vol.path(), "")})
        return sorted(out, key=lambda v: v["Name"])

    def remove_volume(self, name: str) -> None:
        """Delete a persistent volume and its data (``mobykit volume rm``): NotFound when there is
        none of that name, FailedPrecondition while an instance has it attached."""
        conn = self._conn()
        vpool = self._volumes_pool(conn)
        with self._lock:
            quietly(lambda: vpool.refresh(0))
            vol = self._storage.volume(vpool, name)
            if vol is None:
                raise NotFound(f"volume {name!r} not found in libvirt pool {vpool.name()}")
            holder = self._holder(conn, vol.path())
            if holder is not None:
                raise FailedPrecondition(f"volume {name!r} is attached to instance {holder}; destroy it first")
            vol.delete(0)

    def _find(self, instance_id: str) -> Found | None:
        """A mobykit instance by id, or None when it does not exist."""
        lv = libvirt()
        for uri in self._uris():
            connection = self._connection(uri)
            try:
                dom = connection.conn.lookupByName(instance_id)
            except lv.libvirtError as e:
                if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                    continue
                raise Unavailable(f"libvirt {uri}: {e.get_error_message()}") from None
            meta = read_meta(dom)
            if meta is not None:
                return Found(connection, dom, meta)
        return None

    def set_tags(self, id: str, tags: dict[str, str]) -> None:
        lv = libvirt()
        found = self._find(id)
        if found is None:
            raise NotFound(f"instance {id!r} not found")
        dom, meta = found.dom, found.meta
        meta.tags = dict(tags)
        flags = lv.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= lv.VIR_DOMAIN_AFFECT_LIVE
        try:
            write_meta(dom, meta, flags)
        except lv.libvirtError as e:
            if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"instance {id!r} not found") from None
            raise Unavailable(f"libvirt: cannot tag {id}: {e.get_error_message()}") from None
        finally:
            # Synchronously: the next listing must see the new tags, not wait for the event.
            found.connection.cache.invalidate(dom.UUIDString())

    def destroy(self, id: str) -> None:
        """Stop and undefine the domain, then delete every volume made for it. Gone is success."""
        lv = libvirt()
        found = self._find(id)
        if found is None:
            return
        conn, dom, meta = found.connection.conn, found.dom, found.meta
        try:
            try:
                if dom.isActive():
                    dom.destroy()
            except lv.libvirtError as e:
                if e.get_error_code() not in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
                    raise Unavailable(f"libvirt: cannot stop {id}: {e.get_error_message()}") from None
            try:
                dom.undefineFlags(0)
            except lv.libvirtError as e:
                if e.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                    raise Unavailable(f"libvirt: cannot undefine {id}: {e.get_error_message()}") from None
        finally:
            found.connection.cache.invalidate(dom.UUIDString())
        pool = self._storage.pool(conn, meta.pool or None)
        names = set(meta.volumes)
        try:
            pool.refresh(0)
            names.update(n for n in pool.listVolumes() if n.startswith(f"{id}."))
        except lv.libvirtError:
            pass
        for name in sorted(names):
            vol = self._storage.volume(pool, name)
            if vol is not None:
                quietly(lambda v=vol: v.delete(0))

    def list(self, tags: dict[str, str]) -> list[Machine]:
        """Listed from a fresh ``listAllDomains``; each domain's view comes from the listing cache
        (``cache.py``), re-read when libvirt or our own writes said it changed."""
        lv = libvirt()
        trusted = events.loop_running()
        wanted = dict(tags).items()
        out = []
        for uri in self._uris():
            connection = self._connection(uri)
            try:
                domains = connection.conn.listAllDomains(0)
            except lv.libvirtError as e:
                raise Unavailable(f"libvirt {uri}: {e.get_error_message()}") from None
            for view in connection.cache.views(domains, trusted=trusted):
                meta = view.meta
                if meta is None or view.machine is None:
                    continue  # a domain named like ours that we did not make
                if not wanted <= meta.tags.items():  # every wanted tag, with its value
                    continue
                if meta.creating and time.time_ns() - meta.created < CREATE_GRACE * 1e9:
                    continue  # create() has not returned it yet (see the package docstring)
                out.append(copy_machine(view.machine))
        out.sort(key=lambda m: m.id)
        return out

    def console_output(self, id: str) -> str:
        found = self._find(id)
        if found is None:
            raise NotFound(f"instance {id!r} not found")
        conn, meta = found.connection.conn, found.meta
        pool = self._storage.pool(conn, meta.pool or None)
        vol = self._storage.volume(pool, f"{id}.console")
        if vol is None:
            return ""
        try:
            return self._storage.download(conn, vol).decode("utf-8", errors="replace")
        except libvirt().libvirtError:
            return ""

    def follow_console(self, id: str, output: Callable[[str | None], None]) -> Callable[[], None] | None:
        """``providers.base.FollowsConsole``: the console volume's file, followed with inotify
        (``consolewatch.py``) when the daemon runs on this host and the file is ours to read;
        None otherwise (a remote daemon, the mock driver, no inotify), and callers poll."""
        found = self._find(id)
        if found is None:
            raise NotFound(f"instance {id!r} not found")
        conn, meta = found.connection.conn, found.meta
        if is_test(conn) or urlparse(found.connection.uri).hostname:
            return None
        pool = self._storage.pool(conn, meta.pool or None)
        vol = self._storage.volume(pool, f"{id}.console")
        if vol is None:
            return None
        with self._conns_lock:
            if self._consoles is None:
                self._consoles = ConsoleFiles()
            consoles = self._consoles
        try:
            return consoles.follow(vol.path(), output)
        except (OSError, ImportError) as e:
            log.info("console of %s not followed (polled instead): %s", id, e)
            return None
