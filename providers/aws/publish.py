"""A built image as an AMI, once per image id, found again by its tag.

Why tags and not local state: several ``mobykit serve`` processes (and restarts) share one account,
so the snapshot and the AMI carry ``mobykit.image = <image id>`` and every publish looks them up
first. Order of a publish: an AMI with the tag (pending: wait for it) -> a snapshot with the tag
(pending: another server is uploading it, wait) -> upload (``blocks.py``) -> RegisterImage.

Two servers at once: within a process one lock per image id makes later callers wait for the
first. Across processes, ``settle`` seconds after StartSnapshot the tagged snapshots are listed
again and the earliest (StartTime, then id) wins: a later one is abandoned (completed empty and
deleted, since a pending snapshot cannot be deleted) and the winner awaited, so the blocks go up
once. Why wait: StartTime has whole seconds, so two snapshots started in one second tie and only
the id decides; a listing made in that same second may not show the other one yet and would let
both win. After ``settle`` (> 1 s) every snapshot that could tie with ours is listed. The AMI
name is ``mobykit-<hex>``: the real service refuses a second AMI of that name
(``InvalidAMIName.Duplicate``), and after registering, the earliest tagged AMI is kept and a later
one of ours deregistered (the same rule, for services that do not enforce names). A failed upload
abandons its snapshot the same way, so nothing half-made is left to be found.

``Import: s3`` is the alternative for accounts that cannot use the EBS direct APIs: the disk goes
to ``s3://Bucket/mobykit/<hex>.raw`` and ImportSnapshot makes the snapshot (it needs the
``vmimport`` role); the object is deleted afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobykit.errors import FailedPrecondition, NotFound, Unavailable
from mobykit.providers.aws import blocks
from mobykit.providers.aws.clients import Clients, api
from mobykit.providers.aws.properties import IMAGE_TAG
from mobykit.providers.base import BootImage

log = logging.getLogger("mobykit.providers.aws")

FORMAT = "aws"
BOOT_MODE = {"aws": "legacy-bios"}  # the aws format is the raw-bios disk (mobykit.image.formats.cloud)
ROOT_DEVICE = "/dev/xvda"
SNAPSHOT_TIMEOUT_MIN = 60  # StartSnapshot's Timeout: an upload whose server died ends in "error"
LIVE = ("pending", "completed")
SETTLE = 2.0  # seconds between StartSnapshot and the listing that decides who uploads (see above)


@dataclass
class Publisher:
    """Publishes images into one region. ``poll`` is the waiters' delay (tests make it small)."""

    clients: Clients
    import_mode: str = "ebs"
    bucket: str | None = None
    poll: float = 15.0
    wait_timeout: float = 3600.0
    parallel: int = blocks.PARALLEL
    settle: float = SETTLE
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    uploads: int = 0  # snapshots this publisher uploaded (tests and the bench check "once")

    def publish(self, image: BootImage) -> str:
        with self._guard:
            lock = self._locks.setdefault(image.id, threading.Lock())
        with lock:
            ami = self._first(self._amis(image.id))
            if ami is not None:
                return self._available(ami)
            snapshot = self._snapshot(image)
            return self._register(image, snapshot)

    def find(self, image_id: str) -> str | None:
        """The AMI already published for ``image_id`` (the earliest, if several), or None."""
        ami = self._first(self._amis(image_id))
        return ami["ImageId"] if ami is not None else None

    # -- lookups --------------------------------------------------------------------------------

    def _tag_filter(self, image_id: str) -> list[dict[str, Any]]:
        return [{"Name": f"tag:{IMAGE_TAG}", "Values": [image_id]}]

    def _amis(self, image_id: str) -> list[dict[str, Any]]:
        with api(f"DescribeImages {IMAGE_TAG}={image_id}"):
            r = self.clients.ec2.describe_images(Owners=["self"], Filters=self._tag_filter(image_id))
        return [i for i in r.get("Images", []) if i.get("State") in ("available", "pending")]

    def _snapshots(self, image_id: str) -> list[dict[str, Any]]:
        with api(f"DescribeSnapshots {IMAGE_TAG}={image_id}"):
            pages = self.clients.ec2.get_paginator("describe_snapshots").paginate(
                OwnerIds=["self"], Filters=self._tag_filter(image_id))
            return [s for p in pages for s in p.get("Snapshots", [])]

    @staticmethod
    def _first(items: list[dict[str, Any]], when: str = "CreationDate", id_key: str = "ImageId") -> Any:
        """The earliest item (then the smallest id): the one every server agrees to keep."""
        if not items:
            return None
        return min(items, key=lambda i: (str(i.get(when) or ""), i[id_key]))

    def _wait(self, name: str, **kwargs: Any) -> None:
        attempts = max(1, int(self.wait_timeout / max(self.poll, 0.01)))
        with api(f"waiting ({name})"):
            self.clients.ec2.get_waiter(name).wait(**kwargs, WaiterConfig={"Delay": self.poll,
                                                                          "MaxAttempts": attempts})

    def _available(self, ami: dict[str, Any]) -> str:
        if ami.get("State") != "available":
            self._wait("image_available", ImageIds=[ami["ImageId"]])
        return ami["ImageId"]

    # -- the snapshot ---------------------------------------------------------------------------

    def _snapshot(self, image: BootImage) -> str:
        found = self._snapshots(image.id)
        for s in found:
            if s.get("State") == "error":  # an upload that never completed: not reusable
                self._drop_snapshot(s["SnapshotId"])
        first = self._first([s for s in found if s.get("State") in LIVE], "StartTime", "SnapshotId")
        if first is not None:
            return self._completed(first)
        path = self._disk(image)
        if self.import_mode == "s3":
            return self._import_s3(image, path)
        return self._upload_ebs(image, path)

    def _completed(self, snapshot: dict[str, Any]) -> str:
        if snapshot.get("State") != "completed":
            log.info("waiting for snapshot %s (another server is uploading it)", snapshot["SnapshotId"])
            self._wait("snapshot_completed", SnapshotIds=[snapshot["SnapshotId"]])
        return snapshot["SnapshotId"]

    def _disk(self, image: BootImage) -> Path:
        files = image.format(FORMAT)
        raws = [p for p in files if p.suffix == ".raw"]
        if len(raws) != 1:
            raise FailedPrecondition(f"image {image.id}: the {FORMAT} format made {files}, not one .raw disk")
        return raws[0]

    def _upload_ebs(self, image: BootImage, path: Path) -> str:
        ebs = self.clients.ebs
        tags = [{"Key": IMAGE_TAG, "Value": image.id}, {"Key": "Name", "Value": f"mobykit {image.name}"}]
        with api("StartSnapshot"):
            sid = ebs.start_snapshot(VolumeSize=blocks.volume_gib(path), Tags=tags, Timeout=SNAPSHOT_TIMEOUT_MIN,
                                     Description=f"mobykit image {image.id}",
                                     ClientToken=str(uuid.uuid4()))["SnapshotId"]
        try:
            time.sleep(self.settle)
            live = [s for s in self._snapshots(image.id) if s.get("State") in LIVE]
            first = self._first(live, "StartTime", "SnapshotId")
            if first is not None and first["SnapshotId"] != sid:
                log.info("snapshot %s of %s started elsewhere first: using it", first["SnapshotId"], image.id)
                self._drop_snapshot(sid, pending=True)
                return self._completed(first)

            def put(b: blocks.Block) -> None:
                with api(f"PutSnapshotBlock {sid} #{b.index}"):
                    ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=b.index, BlockData=b.data,
                                           DataLength=blocks.BLOCK, Checksum=b.checksum,
                                           ChecksumAlgorithm="SHA256")

            t0 = time.monotonic()
            count = blocks.upload(put, blocks.nonzero_blocks(path), self.parallel)
            with api(f"CompleteSnapshot {sid}"):
                ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=count)
            self.uploads += 1
            log.info("uploaded %s as snapshot %s: %d blocks in %.1fs", image.id, sid, count, time.monotonic() - t0)
        except BaseException:
            self._drop_snapshot(sid, pending=True)
            raise
        self._wait("snapshot_completed", SnapshotIds=[sid])
        return sid

    def _drop_snapshot(self, sid: str, pending: bool = False) -> None:
        """Delete a snapshot of ours; a pending one is completed empty first (the service refuses to
        delete a pending snapshot). Best effort: what cannot be deleted now ends in "error" by its
        Timeout and is deleted by the next publish of the image."""
        try:
            if pending:
                try:
                    self.clients.ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
                except Exception as e:  # already completed or failed: deleting is what matters
                    log.debug("completing abandoned snapshot %s: %s", sid, e)
            self.clients.ec2.delete_snapshot(SnapshotId=sid)
        except Exception as e:
            log.warning("could not delete abandoned snapshot %s: %s", sid, e)

    def _import_s3(self, image: BootImage, path: Path) -> str:
        if not self.bucket:
            raise FailedPrecondition("providers.aws.Bucket: required with Import: s3")
        key = f"mobykit/{image.id.removeprefix('sha256:')}.raw"
        tags = [{"Key": IMAGE_TAG, "Value": image.id}]
        with api(f"uploading s3://{self.bucket}/{key}"):
            self.clients.s3.upload_file(str(path), self.bucket, key)
        try:
            with api("ImportSnapshot"):
                task = self.clients.ec2.import_snapshot(
                    Description=f"mobykit image {image.id}", ClientToken=str(uuid.uuid4()),
                    DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": self.bucket, "S3Key": key}},
                    TagSpecifications=[{"ResourceType": "import-snapshot-task", "Tags": tags}],
                )["ImportTaskId"]
            self._wait("snapshot_imported", ImportTaskIds=[task])
            with api(f"DescribeImportSnapshotTasks {task}"):
                detail = self.clients.ec2.describe_import_snapshot_tasks(ImportTaskIds=[task])
            sid = detail["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]["SnapshotId"]
            with api(f"CreateTags {sid}"):
                self.clients.ec2.create_tags(Resources=[sid], Tags=tags)
            self.uploads += 1
            return sid
        finally:
            try:
                self.clients.s3.delete_object(Bucket=self.bucket, Key=key)
            except Exception as e:
                log.warning("could not delete s3://%s/%s: %s", self.bucket, key, e)

    # -- the AMI --------------------------------------------------------------------------------

    def _register(self, image: BootImage, snapshot: str) -> str:
        tags = [{"Key": IMAGE_TAG, "Value": image.id}, {"Key": "Name", "Value": f"mobykit {image.name}"}]
        mine = None
        try:
            with api("RegisterImage"):
                mine = self.clients.ec2.register_image(
                    Name=f"mobykit-{image.id.removeprefix('sha256:')}",
                    Description=f"mobykit image {image.id} ({image.name})",
                    Architecture="x86_64", VirtualizationType="hvm", EnaSupport=True,
                    BootMode=BOOT_MODE[FORMAT], RootDeviceName=ROOT_DEVICE,
                    BlockDeviceMappings=[{"DeviceName": ROOT_DEVICE, "Ebs": {
                        "SnapshotId": snapshot, "VolumeType": "gp3", "DeleteOnTermination": True}}],
                    TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
                )["ImageId"]
        except Exception as e:
            if "InvalidAMIName.Duplicate" not in str(e):
                raise
            log.info("AMI of %s registered by another server", image.id)
        winner = self._first(self._amis(image.id))
        if winner is None:
            raise Unavailable(f"RegisterImage of {image.id}: the AMI is not listed by its tag {IMAGE_TAG}")
        if mine is not None and winner["ImageId"] != mine:
            log.info("AMI %s of %s registered elsewhere first: deregistering ours (%s)", winner["ImageId"],
                     image.id, mine)
            try:
                with api(f"DeregisterImage {mine}"):
                    self.clients.ec2.deregister_image(ImageId=mine)
            except NotFound:
                pass  # a retry of a call whose answer was lost: already deregistered
        used = {m.get("Ebs", {}).get("SnapshotId") for m in winner.get("BlockDeviceMappings", [])}
        if winner["ImageId"] != mine and used and snapshot not in used:
            self._drop_snapshot(snapshot)  # the winning AMI boots another server's snapshot
        return self._available(winner)
