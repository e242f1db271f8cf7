"""``GCPProvider``: the Provider interface over the Compute Engine API (see the package docstring)."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry

from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from mobykit.providers.base import BootImage, Machine, MachineSpec
from mobykit.providers.gcp import properties as gprops
from mobykit.providers.gcp import volumes
from mobykit.providers.gcp.api import Compute, credentials
from mobykit.providers.gcp.instances import ConsoleReader, insert_body, machine, metadata_items
from mobykit.providers.gcp.labels import (
    filter_expression,
    from_labels,
    metadata_key,
    to_labels,
    to_metadata_items,
)
from mobykit.providers.gcp.properties import GCPConfig, InstanceProperties
from mobykit.providers.gcp.publish import Publisher

log = logging.getLogger("mobykit.providers.gcp")

ENV_PROJECT = "GOOGLE_CLOUD_PROJECT"
GROUP_TAG = "infrakit.group"
PAGE_SIZE = 500  # GCE's maximum maxResults


def _suffix() -> str:
    """Base-36 milliseconds then random: names sort by creation time and never repeat."""
    ms, digits = time.time_ns() // 1_000_000, []
    while ms:
        ms, r = divmod(ms, 36)
        digits.append("0123456789abcdefghijklmnopqrstuvwxyz"[r])
    return "".join(reversed(digits)) + "-" + secrets.token_hex(3)


class GCPProvider:
    """``mobykit.providers.base.Provider`` over google-cloud-compute (REST). Thread-safe."""

    name: ClassVar[str] = "gcp"

    def __init__(self, config: dict[str, Any] | None = None):
        self.config = GCPConfig.parse(dict(config or {}))
        self.page_size = PAGE_SIZE
        self._lock = threading.Lock()
        self._compute: Compute | None = None
        self._creds: Any = None
        self._adc_project: str | None = None
        self._known_zones: set[tuple[str, str]] = set()
        self._zone_of: dict[str, str] = {}  # instance name -> zone, from our creates and listings
        self._zones_used: set[str] = set()
        self._creating: set[str] = set()  # names whose create() has not returned: not listed yet
        self._publishers: dict[str, Publisher] = {}
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="gcp-zones")
        self.console = ConsoleReader(self._fetch_console)
        self.volume_timeout = 600.0  # seconds a create waits for a deleted instance to release its disks

    def close(self) -> None:
        self.console.close()
        self._pool.shutdown(wait=False)

    # -- wiring -------------------------------------------------------------------------------------

    def compute(self) -> Compute:
        """The clients, made on first use (credentials are looked up once)."""
        with self._lock:
            if self._compute is None:
                self._creds, self._adc_project = credentials(self.config.endpoint)
                self._compute = Compute.connect(self.config.endpoint, self._creds)
            return self._compute

    def project(self, props: InstanceProperties | None = None) -> str:
        project = (props.project if props else None) or self.config.project or os.environ.get(ENV_PROJECT)
        if not project:
            self.compute()
            project = self._adc_project
        if not project:
            raise InvalidArgument("Properties.Project: no project (set Project, providers.gcp.Project or "
                                  f"${ENV_PROJECT}, or give Application Default Credentials one)")
        return project

    def _zone(self, props: InstanceProperties) -> str:
        zone = props.zone or (self.config.zones[0] if self.config.zones else None)
        if not zone:
            raise InvalidArgument("Properties.Zone: no zone (set Zone, or providers.gcp.Zone / Zones)")
        return zone

    def _check_zone(self, project: str, zone: str, key: str) -> None:
        if (project, zone) in self._known_zones:
            return
        compute = self.compute()
        try:
            compute.call(compute.zones.get, f"zones.get {zone}", project=project, zone=zone)
        except NotFound:
            raise InvalidArgument(f"{key}: unknown zone {zone!r} in project {project!r}") from None
        self._known_zones.add((project, zone))

    def _publisher(self, project: str) -> Publisher:
        with self._lock:
            pub = self._publishers.get(project)
        if pub is None:
            compute = self.compute()

            def storage() -> Any:
                from google.cloud import storage

                return storage.Client(project=project, credentials=self._creds)

            pub = Publisher(compute, project, self.config.bucket, storage)
            with self._lock:
                pub = self._publishers.setdefault(project, pub)
        return pub

    def zones(self) -> list[str]:
        """Where ``list`` looks: the configured zones, and any a create of this process used."""
        with self._lock:
            return list(dict.fromkeys([*self.config.zones, *sorted(self._zones_used)]))

    # -- Provider -----------------------------------------------------------------------------------

    def validate(self, properties: dict[str, Any]) -> None:
        """Types and names first (no API call), then credentials, project and zone (one call, cached)."""
        props = gprops.parse(properties)
        project = self.project(props)
        zone = self._zone(props)
        self._check_zone(project, zone, "Properties.Zone" if props.zone else "providers.gcp.Zone")
        for z in self.config.zones:
            self._check_zone(project, z, "providers.gcp.Zones")

    def publish_image(self, image: BootImage, properties: dict[str, Any]) -> str:
        props = gprops.parse(properties)
        return self._publisher(self.project(props)).publish(image)

    def _source_image(self, project: str, image: str | None) -> str:
        if not image:
            raise InvalidArgument("Properties.Image: required (a built image id, or a GCE source image)")
        if not image.startswith("sha256:"):
            return image  # Infrakit's shape: a GCE image URL or projects/P/global/images/[family/]NAME
        link = self._publisher(project).find(image)
        if link is None:
            raise FailedPrecondition(f"image {image} is not published to project {project} "
                                     "(the core publishes built images before create)")
        return link

    def create(self, spec: MachineSpec) -> Machine:
        props = gprops.parse(spec.properties)
        project, zone = self.project(props), self._zone(props)
        self._check_zone(project, zone, "Properties.Zone")
        compute = self.compute()
        source = self._source_image(project, props.image)
        name = gprops.instance_name(props.name_prefix, spec.logical_id, _suffix())
        # Volumes and Attachments: checked, made when missing, released by a deleted predecessor
        # (volumes.py); then attached by the insert itself.
        planned = volumes.plan(compute, project, zone, props.volumes, spec.attachments, spec.tags, spec.logical_id,
                               spec.namespace, self.volume_timeout)
        body = insert_body(props, project=project, zone=zone, name=name, source_image=source, tags=spec.tags,
                           user_data=spec.user_data, logical_id=spec.logical_id)
        body["disks"].extend(planned.body())
        with self._lock:
            self._zones_used.add(zone)
            self._creating.add(name)
        try:
            # One requestId for every retry of this insert: a retry after a lost answer is the same insert.
            op = compute.call(compute.instances.insert_unary, f"instances.insert {name}", project=project,
                              zone=zone, instance_resource=body, request_id=str(uuid.uuid4()))
            compute.wait(op, project, zone, f"instances.insert {name}")
            inst = compute.call(compute.instances.get, f"instances.get {name}", project=project, zone=zone,
                                instance=name)
        except InvalidArgument:
            raise  # refused; AlreadyExists (409) is someone else's instance of that name: not ours to delete
        except BaseException:
            # Unknown outcome (retries ran out, interrupted): whatever got made must not leak.
            try:
                self._delete(project, zone, name)
            except Exception as cleanup:  # the caller learns of the first error; this one is logged
                log.warning("gcp: could not remove %s after a failed create: %s", name, cleanup)
            raise
        finally:
            with self._lock:
                self._creating.discard(name)
        with self._lock:
            self._zone_of[name] = zone
        return machine(inst, zone)

    # -- persistent volumes (HasVolumes) ------------------------------------------------------------

    def list_volumes(self, namespace: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The disks labelled ``mobykit-volume`` (and ``namespace``) in every zone looked in."""
        project, compute = self.project(), self.compute()
        found = self._pool.map(lambda z: volumes.listing(compute, project, z, dict(namespace or {})), self.zones())
        return sorted((v for vs in found for v in vs), key=lambda v: (v["Name"], v["Zone"]))

    def remove_volume(self, name: str, namespace: dict[str, str] | None = None) -> None:
        """Delete the volume ``name``: NotFound when none, FailedPrecondition while attached."""
        project, compute = self.project(), self.compute()
        if not any([volumes.remove(compute, project, z, name, dict(namespace or {})) for z in self.zones()]):
            raise NotFound(f"volume {name!r}: no disk labelled as that volume in {', '.join(self.zones())}")

    def _locate(self, name: str, fresh: bool = False) -> tuple[str, str] | None:
        """(project, zone) of instance ``name``, or None when no zone has it. The zone a create or a
        listing saw is trusted without a call (``fresh`` asks every zone again, after a 404 there)."""
        project = self.project()
        with self._lock:
            zone = None if fresh else self._zone_of.get(name)
        if zone:
            return project, zone
        compute = self.compute()

        def probe(z: str) -> str | None:
            try:
                compute.call(compute.instances.get, f"instances.get {name}", project=project, zone=z, instance=name)
                return z
            except NotFound:
                return None

        for found in self._pool.map(probe, self.zones()):
            if found:
                with self._lock:
                    self._zone_of[name] = found
                return project, found
        with self._lock:
            self._zone_of.pop(name, None)
        return None

    def _in_zone(self, name: str, action):
        """``action(project, zone)`` where the instance is; a 404 in a remembered zone looks everywhere once."""
        where = self._locate(name)
        if where is None:
            raise NotFound(f"instance {name!r} not found")
        try:
            return action(*where)
        except NotFound:
            again = self._locate(name, fresh=True)
            if again is None or again == where:
                raise
            return action(*again)

    def set_tags(self, id: str, tags: dict[str, str]) -> None:
        self._in_zone(id, lambda project, zone: self._set_tags(project, zone, id, tags))

    def _set_tags(self, project: str, zone: str, id: str, tags: dict[str, str]) -> None:
        compute = self.compute()
        labels = to_labels(tags)

        def attempt() -> None:
            inst = compute.call(compute.instances.get, f"instances.get {id}", project=project, zone=zone, instance=id)
            if dict(inst.labels) != labels:
                op = compute.call(compute.instances.set_labels_unary, f"instances.setLabels {id}", project=project,
                                  zone=zone, instance=id, request_id=str(uuid.uuid4()),
                                  instances_set_labels_request_resource={
                                      "labels": labels, "label_fingerprint": inst.label_fingerprint})
                compute.wait(op, project, zone, f"instances.setLabels {id}")
            items = metadata_items(inst)
            old = from_labels(dict(inst.labels), items)
            wanted = {k: v for k, v in items.items() if k not in {metadata_key(t) for t in old}}
            wanted.update(to_metadata_items(tags))
            if wanted != items:
                op = compute.call(compute.instances.set_metadata_unary, f"instances.setMetadata {id}",
                                  project=project, zone=zone, instance=id, request_id=str(uuid.uuid4()),
                                  metadata_resource={"fingerprint": inst.metadata.fingerprint,
                                                     "items": [{"key": k, "value": v} for k, v in wanted.items()]})
                compute.wait(op, project, zone, f"instances.setMetadata {id}")

        # 412: someone changed the labels or metadata since we read them: read again and redo.
        try:
            gretry.Retry(predicate=gretry.if_exception_type(gexc.PreconditionFailed), initial=0.05, maximum=1.0,
                         timeout=60)(attempt)()
        except gexc.RetryError as e:
            raise Unavailable(f"gcp: labelling {id}: its labels kept changing under us (412) for 60s: {e.cause}") from None

    def _delete(self, project: str, zone: str, name: str, missing_ok: bool = True) -> None:
        compute = self.compute()
        try:
            op = compute.call(compute.instances.delete_unary, f"instances.delete {name}", project=project, zone=zone,
                              instance=name, request_id=str(uuid.uuid4()))
            compute.wait(op, project, zone, f"instances.delete {name}")
        except NotFound:
            if not missing_ok:
                raise
        with self._lock:
            self._zone_of.pop(name, None)
        self.console.forget(name)

    def destroy(self, id: str) -> None:
        """Delete the instance (its auto-delete disks go with it) and wait until it is gone."""
        try:
            self._in_zone(id, lambda project, zone: self._delete(project, zone, id, missing_ok=False))
        except NotFound:
            pass  # gone is success

    def list(self, tags: dict[str, str]) -> list[Machine]:
        """Every zone in parallel, filtered by labels on the server, all pages."""
        project, compute = self.project(), self.compute()
        flt = filter_expression(tags)

        def zone_list(zone: str) -> list[Machine]:
            pager = compute.call(compute.instances.list, f"instances.list {zone}", project=project, zone=zone,
                                 filter=flt, max_results=self.page_size)
            return [machine(inst, zone) for inst in pager]

        out: list[Machine] = []
        for machines in self._pool.map(zone_list, self.zones()):
            out.extend(machines)
        wanted = tags.items()
        with self._lock:
            # Digest labels are checked exactly here. An instance whose create() is still running is
            # not shown: a group controller counts that Provision as a member until it returns, and
            # would count the half-made instance twice and scale down.
            out = [m for m in out if wanted <= m.tags.items() and m.id not in self._creating]
            for m in out:
                self._zone_of[m.id] = m.properties["Zone"]
        if GROUP_TAG in tags:
            # A group controller's listing: its health pass reads each of these consoles next.
            self.console.listed(out)
        out.sort(key=lambda m: m.id)
        return out

    def _fetch_console(self, name: str) -> str:
        compute = self.compute()

        def read(project: str, zone: str) -> str:
            try:
                return compute.call(compute.instances.get_serial_port_output, f"instances.getSerialPortOutput {name}",
                                    project=project, zone=zone, instance=name, port=1).contents
            except (InvalidArgument, FailedPrecondition):
                return ""  # not readable yet (still provisioning): nothing printed, not a verdict

        return self._in_zone(name, read)

    def console_output(self, id: str) -> str:
        return self.console.read(id)
