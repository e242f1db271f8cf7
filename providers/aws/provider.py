"""``AWSProvider``: the Provider interface over EC2 and the EBS direct APIs (see the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound
from mobykit.providers.aws import instances, volumes
from mobykit.providers.aws.clients import ClientCache, Clients, api
from mobykit.providers.aws.console import ConsoleReads, Expected
from mobykit.providers.aws.properties import (
    IMAGE_TAG,
    LOGICAL_ID_TAG,
    InstanceProperties,
    Settings,
    parse,
    private_ip,
    user_data,
)
from mobykit.providers.aws.publish import Publisher
from mobykit.providers.aws.recent import Recent
from mobykit.providers.base import BootImage, Machine, MachineSpec

GROUP_TAG = "infrakit.group"  # what a group controller lists by (Infrakit's tag)
REAP_INTERVAL = 30.0  # seconds between looks for a group's stopped instances (see ``reap``)

log = logging.getLogger("mobykit.providers.aws")


class AWSProvider:
    """``mobykit.providers.base.Provider`` over EC2. Thread-safe; clients are made per region.

    ``poll`` (seconds between waiter polls), ``parallel`` (PutSnapshotBlock calls in flight),
    ``settle`` (publish.SETTLE), ``reap_interval`` and ``early_consoles`` (and ``consoles.share``) are
    attributes a test or benchmark may change;
    the config keys are Region, Import and Bucket.
    """

    name: ClassVar[str] = "aws"

    def __init__(self, config: dict[str, Any] | None = None):
        self.settings = Settings.parse(config)
        self.clients = ClientCache(self.settings.region)
        self.poll = 15.0
        self.parallel: int | None = None
        self.settle: float | None = None  # publish.SETTLE unless set (tests)
        self._lock = threading.Lock()
        self._publishers: dict[str, Publisher] = {}
        self._amis: dict[tuple[str, str], str] = {}  # (region, image id) -> AMI, once published
        self._zones: dict[str, frozenset[str]] = {}  # region -> its availability zones, listed once
        self._regions: dict[str, None] = {}  # regions used besides the default, in first-use order
        self.reap_interval = REAP_INTERVAL
        self._reaps: dict[tuple[tuple[str, str], ...], float] = {}  # a group's tags -> its last reap
        self._reaper: ThreadPoolExecutor | None = None
        self._region_pool: ThreadPoolExecutor | None = None
        self.consoles = ConsoleReads(self._console)
        self.expected = Expected()  # what each group's next listing shows: its consoles are read meanwhile
        self.recent = Recent()  # launches EC2's eventually consistent listings may not show yet
        self.early_consoles = True  # read those while the listing runs (False: after it; bench comparisons)
        self.volume_timeout = 600.0  # seconds a launch waits for its volumes (released, running, attached)

    # -- helpers --------------------------------------------------------------------------------

    def _clients(self, region: str | None = None) -> Clients:
        return self.clients.get(region)

    def publisher(self, region: str | None = None) -> Publisher:
        clients = self._clients(region)
        with self._lock:
            p = self._publishers.get(clients.region)
            if p is None:
                p = Publisher(clients, self.settings.import_mode, self.settings.bucket, poll=self.poll)
                self._publishers[clients.region] = p
            p.poll = self.poll
            if self.settle is not None:
                p.settle = self.settle
            if self.parallel:
                p.parallel = self.parallel
            return p

    # -- Provider -------------------------------------------------------------------------------

    def validate(self, properties: dict[str, Any]) -> None:
        parse(properties)

    def publish_image(self, image: BootImage, properties: dict[str, Any] | None = None) -> str:
        """The AMI of ``image`` in the properties' region, published on first use (``publish.py``).
        An explicit ``RunInstancesInput.ImageId`` wins: nothing is uploaded then."""
        props = parse({**(properties or {}), "Image": image.id})
        if props.explicit_ami:
            return props.explicit_ami
        self.clients.credentials_present()
        region = self.clients.region(props.region)
        with self._lock:
            known = self._amis.get((region, image.id))
        if known:
            return known
        self._used(region)
        ami = self.publisher(region).publish(image)
        with self._lock:
            self._amis[(region, image.id)] = ami
        return ami

    def _ami(self, props: InstanceProperties) -> str:
        if props.explicit_ami:
            return props.explicit_ami
        if props.image is None:
            raise InvalidArgument("Properties: Image (a built image id, written by the moby flavor) or "
                                  "RunInstancesInput.ImageId is required to launch an instance")
        region = self.clients.region(props.region)
        with self._lock:
            known = self._amis.get((region, props.image))
        if known:
            return known
        ami = self.publisher(region).find(props.image)
        if ami is None:
            raise FailedPrecondition(f"image {props.image} is not published to {region} (the core publishes "
                                     "built images before Provision)")
        return ami

    def create(self, spec: MachineSpec) -> Machine:
        props = parse(spec.properties)
        if not props.explicit_ami and props.image is None:
            self._ami(props)  # the error, before any call
        self.clients.credentials_present()
        ec2 = self._clients(props.region).ec2
        tags = {**props.tags, **spec.tags}
        if props.image:
            tags.setdefault(IMAGE_TAG, props.image)
        if spec.logical_id:
            tags[LOGICAL_ID_TAG] = spec.logical_id
        request = dict(props.run)
        request.pop("MinCount", None)
        request.pop("MaxCount", None)
        request["ImageId"] = self._ami(props)
        zone = (request.get("Placement") or {}).get("AvailabilityZone")
        self._check_zone(ec2, self.clients.region(props.region), zone)
        # Volumes and Attachments: checked (and waited for, when a terminated instance still holds
        # one) before the launch, which goes to their zone (volumes.py).
        planned = volumes.plan(ec2, props.volumes, spec.attachments, spec.tags, spec.logical_id,
                               spec.namespace, zone)
        if planned:
            volumes.wait_released(ec2, sorted(planned.found.values()), self.volume_timeout, self._volume_poll())
            if planned.zone and planned.zone != zone:
                request["Placement"] = {**(request.get("Placement") or {}), "AvailabilityZone": planned.zone}
        data = user_data(spec.user_data, props.run)
        request.pop("UserData", None)
        if data:
            request["UserData"] = data
        ip = private_ip(spec.logical_id)
        if ip and "PrivateIpAddress" not in request and not request.get("NetworkInterfaces"):
            request["PrivateIpAddress"] = ip
        # The spec's own TagSpecifications stay; for the instance and its volumes ours are added (and win).
        given = {ts.get("ResourceType"): ts for ts in request.pop("TagSpecifications", [])}
        for kind in ("instance", "volume"):
            merged = {**instances.tag_dict(given.get(kind, {}).get("Tags")), **tags}
            given[kind] = {"ResourceType": kind, "Tags": instances.tag_list(merged)}
        request["TagSpecifications"] = list(given.values())
        self._used(self.clients.region(props.region))
        made = instances.run(ec2, request)
        own = {k: v for k, v in instances.tag_dict(given["instance"]["Tags"]).items() if not k.startswith("aws:")}
        made = dataclasses.replace(made, tags={**made.tags, **own})  # as tagged, whatever the answer echoed
        self.recent.launched(made)
        if self.expected.launched(made.id, made.tags):  # a listing of its group runs: it will show it
            self.consoles.prefetch([made.id])  # so its console is read meanwhile (console.py)
        if planned:
            self._attach(ec2, made, planned)
        return made

    def _volume_poll(self) -> float:
        return min(self.poll, 2.0)

    def _attach(self, ec2: Any, made: Machine, planned: volumes.Planned) -> None:
        """Make the logical id's missing volumes in the instance's zone and attach them all once it
        runs; if that fails the instance is terminated (it would run without its data) and the error
        raised. A volume made here stays: it is the logical id's, and empty."""
        try:
            zone = made.properties.get("Placement") or planned.zone
            if planned.make and not zone:
                zone = instances.get(ec2, made.id).properties.get("Placement")
            attached = {**planned.found, **volumes.make(ec2, planned, zone)}
            volumes.attach(ec2, made.id, attached, self._volume_poll(), self.volume_timeout)
        except Exception:
            log.warning("terminating %s: its volumes could not be attached", made.id)
            self.destroy(made.id)
            raise

    # -- persistent volumes (HasVolumes) --------------------------------------------------------

    def list_volumes(self, namespace: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The EBS volumes tagged ``mobykit.volume`` (and ``namespace``) in every region looked in."""
        found = [v for vs in self._each_region(lambda ec2: volumes.listing(ec2, dict(namespace or {}))) for v in vs]
        return sorted(found, key=lambda v: (v["Name"], v["Id"]))

    def remove_volume(self, name: str, namespace: dict[str, str] | None = None) -> None:
        """Delete the EBS volume tagged ``mobykit.volume=name``: NotFound when none, FailedPrecondition
        while attached."""
        removed = [volumes.remove(ec2, name, dict(namespace or {})) for ec2 in self._ec2s()]
        if not any(removed):
            raise NotFound(f"volume {name!r}: no EBS volume tagged {volumes.VOLUME_TAG}={name}")

    def _check_zone(self, ec2: Any, region: str, zone: str | None) -> None:
        """An unknown ``Placement.AvailabilityZone`` is named before RunInstances (whose own error
        would not say which field), from the region's zones, listed once per region."""
        if not zone:
            return
        with self._lock:
            known = self._zones.get(region)
        if known is None:
            with api(f"DescribeAvailabilityZones {region}"):
                r = ec2.describe_availability_zones(AllAvailabilityZones=True)
            known = frozenset(z["ZoneName"] for z in r.get("AvailabilityZones", []))
            with self._lock:
                self._zones[region] = known
        if zone not in known:
            shown = ", ".join(sorted(known)[:8])
            raise InvalidArgument(f"Properties.RunInstancesInput.Placement.AvailabilityZone: unknown zone {zone!r} "
                                  f"in {region} (known: {shown})")

    # Instances are looked for in the default region and in every region this provider launched or
    # published in since it started (``Properties.Region``): ids are unique across regions.

    def _used(self, region: str) -> None:
        with self._lock:
            self._regions.setdefault(region, None)

    def _ec2s(self) -> list[Any]:
        with self._lock:
            extra = list(self._regions)
        regions = list(dict.fromkeys([self.clients.region(), *extra]))
        return [self._clients(r).ec2 for r in regions]

    def _each_region(self, call: Callable[[Any], Any]) -> list[Any]:
        """``call(ec2)`` in every region looked in, at once when there are several (a listing costs
        one round trip, not one per region); the first failure is raised."""
        ec2s = self._ec2s()
        if len(ec2s) == 1:
            return [call(ec2s[0])]
        with self._lock:
            if self._region_pool is None:
                self._region_pool = ThreadPoolExecutor(8, thread_name_prefix="aws-regions")
            pool = self._region_pool
        return list(pool.map(call, ec2s))

    def _in_regions(self, id: str, call: Callable[[Any], Any]) -> Any:
        for ec2 in self._ec2s():
            try:
                return call(ec2)
            except NotFound:
                continue
        raise NotFound(f"aws: no live instance {id!r}")

    def find(self, id: str) -> Machine | None:
        """The instance ``id`` in any state but terminated (stopped ones too, which ``list`` leaves
        out), in whichever region looked in holds it; None when none does."""
        for ec2 in self._ec2s():
            found = instances.describe(ec2, {}, [id], states=instances.EXISTING_STATES)
            if found:
                return found[0]
        return self.recent.get(id)

    def set_tags(self, id: str, tags: dict[str, str]) -> None:
        self._in_regions(id, lambda ec2: instances.set_tags(ec2, id, tags))
        self.recent.retagged(id, {k: v for k, v in tags.items() if not k.startswith("aws:")})

    def destroy(self, id: str) -> None:
        self.recent.gone(id)
        self.expected.gone(id)
        self.consoles.forget(id)
        self._each_region(lambda ec2: instances.terminate(ec2, id))  # a no-op where another region holds it

    def list(self, tags: dict[str, str]) -> list[Machine]:
        """Pending and running instances with ``tags`` (both filtered by EC2), and the ones launched
        here that EC2 does not show yet (``recent.py``). A group's listing also starts its
        consoles' reads (console.py) and, now and then, its ``reap``."""
        group = GROUP_TAG in tags  # a group's listing: its health pass reads these consoles next
        expected: frozenset[str] = frozenset()
        if group and self.early_consoles:
            expected = self.expected.before(tags)
            self.consoles.prefetch(sorted(expected))  # while the listing runs (console.py)
        # EC2's answer, plus what this provider launched that it does not show yet (recent.py).
        try:
            found = self.recent.merge([m for ms in self._each_region(lambda ec2: instances.describe(ec2, dict(tags)))
                                       for m in ms], tags)
        except BaseException:
            if group and self.early_consoles:
                self.expected.after(tags, expected, None)
            raise
        if group:
            ids = [m.id for m in found]
            if self.early_consoles:
                self.expected.after(tags, expected, ids)
            self.consoles.prefetch([i for i in ids if i not in expected])
            self._start_reap(tags)
        return found

    def reap(self, tags: dict[str, str]) -> list[str]:
        """Terminate the stopping and stopped instances with ``tags`` (a group's, with the core's
        NamespaceTags); returns their ids.

        Why: a group lists only pending and running instances, so one that stops (by hand, an
        instance retirement, a shutdown inside the guest) stops being a member and is replaced. Left
        alone it would stay behind with the group's tags and its volumes, costing money, and no
        Destroy would ever reach it. An EC2 Auto Scaling group does the same: an instance that is
        not running is unhealthy and is terminated. To keep a stopped instance, take it out of
        its group first (change its ``infrakit.group`` tag)."""
        reaped = []
        for ec2 in self._ec2s():
            for m in instances.describe(ec2, dict(tags), states=instances.OFF_STATES):
                log.warning("terminating %s instance %s of %s: it is no longer a member and was replaced",
                            m.state, m.id, tags.get(GROUP_TAG))
                self.expected.gone(m.id)
                self.recent.gone(m.id)
                instances.terminate(ec2, m.id)
                reaped.append(m.id)
        return reaped

    def _start_reap(self, tags: dict[str, str]) -> None:
        """``reap`` in the background, at most once per ``reap_interval`` per group (it costs one
        DescribeInstances, and the listing that triggers it must not wait for it)."""
        key = tuple(sorted(tags.items()))
        now = time.monotonic()
        with self._lock:
            last = self._reaps.get(key)
            if last is not None and now - last < self.reap_interval:
                return
            self._reaps[key] = now
            if self._reaper is None:
                self._reaper = ThreadPoolExecutor(1, thread_name_prefix="aws-reap")
            self._reaper.submit(self._reap_in_background, key)

    def _reap_in_background(self, key: tuple[tuple[str, str], ...]) -> None:
        try:
            self.reap(dict(key))
        except Exception as e:  # the next listing tries again
            log.warning("looking for stopped instances of %s failed: %s", dict(key).get(GROUP_TAG), e)
            with self._lock:
                self._reaps.pop(key, None)

    def console_output(self, id: str) -> str:
        """GetConsoleOutput (through a listing's prefetched reads, console.py)."""
        return self.consoles.get(id)

    def _console(self, id: str) -> str:
        return self._in_regions(id, lambda ec2: instances.console(ec2, id))

    def close(self) -> None:
        self.consoles.close()
        with self._lock:
            reaper, self._reaper = self._reaper, None
            regions, self._region_pool = self._region_pool, None
        if reaper is not None:
            reaper.shutdown(wait=True, cancel_futures=True)
        if regions is not None:
            regions.shutdown(wait=False)
