"""GCE instances as mobykit sees them: the insert body from properties and tags, the Machine back
from an instance, and console reads.

Why the body carries the init three times: LinuxKit images read user data from the metadata key
``user-data`` (newer) or ``userdata`` (older), and ``startup-script`` is what GCE's own guest agent
runs; all three hold the same text. Tags are labels (filterable, escaped) and metadata items (exact,
Infrakit's key escape), see ``labels.py``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mobykit.providers.base import Machine
from mobykit.providers.gcp.labels import from_labels, to_labels, to_metadata_items
from mobykit.providers.gcp.properties import InstanceProperties

USER_DATA_KEYS = ("user-data", "userdata", "startup-script")
LOGICAL_ID_ITEM = "mobykit-logical-id"
# GCE status -> mobykit state. TERMINATED is GCE's word for a stopped (still existing) VM.
STATES = {"PROVISIONING": "pending", "STAGING": "pending", "RUNNING": "running", "STOPPING": "stopping",
          "SUSPENDING": "stopping", "REPAIRING": "pending", "SUSPENDED": "stopped", "TERMINATED": "stopped"}


def _zone_url(project: str, zone: str, kind: str, name: str) -> str:
    if "/" in name:  # already a partial or full URL (Infrakit users wrote both)
        return name
    return f"projects/{project}/zones/{zone}/{kind}/{name}"


def insert_body(props: InstanceProperties, *, project: str, zone: str, name: str, source_image: str,
                tags: dict[str, str], user_data: str, logical_id: str | None) -> dict[str, Any]:
    """The ``instances.insert`` resource (field names as the client's protos spell them)."""
    items = to_metadata_items(tags)
    for key in USER_DATA_KEYS:
        if user_data:
            items[key] = user_data
    if logical_id is not None:
        items[LOGICAL_ID_ITEM] = logical_id
    if props.connect:
        items["serial-port-enable"] = "true"  # Infrakit's Connect: the interactive serial console
    network = props.network if "/" in props.network else f"global/networks/{props.network}"
    nic: dict[str, Any] = {"network": network}
    if props.subnetwork:
        region = zone.rsplit("-", 1)[0]
        nic["subnetwork"] = props.subnetwork if "/" in props.subnetwork else \
            f"regions/{region}/subnetworks/{props.subnetwork}"
    if props.private_ip:
        nic["network_i_p"] = props.private_ip
    disks = props.disks or []
    if not disks:
        from mobykit.providers.gcp.properties import Disk

        disks = [Disk()]
    attached = []
    for i, d in enumerate(disks):
        init: dict[str, Any] = {"disk_size_gb": d.size_gb,
                                "disk_type": _zone_url(project, zone, "diskTypes", d.type)}
        if d.boot:
            init["source_image"] = source_image
        attached.append({"boot": d.boot, "auto_delete": d.auto_delete, "initialize_params": init,
                         "device_name": f"{name}-{i}"[:63]})
    return {
        "name": name,
        "description": props.description,
        "machine_type": _zone_url(project, zone, "machineTypes", props.machine_type),
        "labels": to_labels(tags),
        "metadata": {"items": [{"key": k, "value": v} for k, v in items.items()]},
        "tags": {"items": props.tags},
        "network_interfaces": [nic],
        "disks": attached,
        "service_accounts": [{"email": "default", "scopes": props.scopes}],
        "scheduling": {"preemptible": props.preemptible, "automatic_restart": not props.preemptible,
                       "on_host_maintenance": "TERMINATE" if props.preemptible else "MIGRATE"},
    }


def metadata_items(instance: Any) -> dict[str, str]:
    return {i.key: i.value for i in instance.metadata.items} if instance.metadata else {}


def machine(instance: Any, zone: str) -> Machine:
    items = metadata_items(instance)
    created = instance.creation_timestamp
    props: dict[str, Any] = {"Zone": zone, "Status": instance.status, "Created": created,
                             "MachineType": instance.machine_type.rsplit("/", 1)[-1]}
    try:
        props["CreatedNs"] = int(datetime.fromisoformat(created).timestamp() * 1e9)
    except ValueError:
        pass
    if instance.network_interfaces:
        props["PrivateIP"] = instance.network_interfaces[0].network_i_p
    return Machine(id=instance.name, tags=from_labels(dict(instance.labels), items),
                   state=STATES.get(instance.status, "pending"), logical_id=items.get(LOGICAL_ID_ITEM),
                   properties=props)


@dataclass
class _Read:
    started: float
    future: Future[str]


@dataclass
class ConsoleReader:
    """Serial port 1 of instances, read in parallel ahead of the health checks.

    Why: the group controller asks each instance's health one after the other, and each answer is an
    API round trip; with 20 instances and a slow API a pass would take 20 round trips. So ``listed``
    (a group's listing) starts a read of each running instance's console in the background, and ``read``
    hands out a read started less than ``fresh`` seconds ago (waiting for it if it is still running)
    instead of making its own; an instance the last listing showed still booting has printed nothing
    yet, so its console is "" without a call. Health lags by at most ``fresh``, under a poll interval.
    """

    fetch: Any  # (instance id) -> str, raising NotFound when gone
    fresh: float = 2.0
    workers: int = 32
    _reads: dict[str, _Read] = field(default_factory=dict)
    _booting: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gcp-console")

    def listed(self, machines: list[Machine]) -> None:
        now = time.monotonic()
        with self._lock:
            for m in machines:
                if m.state == "pending":
                    self._booting[m.id] = now
                    continue
                self._booting.pop(m.id, None)
                if m.state != "running":
                    continue
                current = self._reads.get(m.id)
                if current is None or now - current.started >= self.fresh:
                    self._reads[m.id] = _Read(now, self._pool.submit(self.fetch, m.id))
            for table in (self._reads, self._booting):
                for old in [i for i, v in table.items() if now - (v.started if isinstance(v, _Read) else v)
                            >= 10 * self.fresh]:
                    del table[old]  # instances no listing shows any more

    def read(self, iid: str) -> str:
        now = time.monotonic()
        with self._lock:
            current = self._reads.get(iid)
            booting = self._booting.get(iid)
        if booting is not None and now - booting < self.fresh:
            return ""
        if current is not None and now - current.started < self.fresh:
            return current.future.result()
        return self.fetch(iid)

    def forget(self, iid: str) -> None:
        with self._lock:
            self._reads.pop(iid, None)
            self._booting.pop(iid, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
