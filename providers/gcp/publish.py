"""Publishing a built image to GCE, once per image id.

The ``gcp`` format of the image (``NAME.img.tar.gz``, made on demand by the image store) is uploaded
to Cloud Storage (``providers.gcp.Bucket``, object ``mobykit/<hex>.img.tar.gz``), then
``images.insert`` makes the image from it (``rawDisk.source``), in family ``mobykit``, labelled
``mobykit-image`` = the first 63 hex digits of the id (a label value holds at most 63 characters),
the whole id in the description. That label is how the image is found again, by this process after
a restart or by another one: the name (``mobykit-<first 40 hex>``) is deterministic too, so two
publishers racing make one image (the second gets 409 and finds the first).

The staging object is deleted once the image is READY (GCE has copied it). Storage's endpoint is the
library's: ``STORAGE_EMULATOR_HOST`` when set.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc

from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound
from mobykit.providers.base import BootImage
from mobykit.providers.gcp.api import AlreadyExists, Compute
from mobykit.providers.gcp.labels import IMAGE_LABEL

FAMILY = "mobykit"
OBJECT_PREFIX = "mobykit/"


def image_name(image_id: str) -> str:
    return f"mobykit-{image_id.removeprefix('sha256:')[:40]}"


def image_label(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:63]


@dataclass
class Publisher:
    """Publishes images of one project; remembers what it found (image id -> selfLink)."""

    compute: Compute
    project: str
    bucket: str | None
    storage_factory: Any  # () -> google.cloud.storage.Client
    known: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._per_image: dict[str, threading.Lock] = {}

    def find(self, image_id: str) -> str | None:
        """The selfLink of the READY image of ``image_id`` in this project, or None."""
        if image_id in self.known:
            return self.known[image_id]
        flt = f'labels.{IMAGE_LABEL} = "{image_label(image_id)}"'
        pager = self.compute.call(self.compute.images.list, f"images.list {flt}", project=self.project,
                                  filter=flt)
        for img in pager:
            if image_id in img.description and img.status == "READY":
                self.known[image_id] = img.self_link
                return img.self_link
        return None

    def publish(self, image: BootImage) -> str:
        with self._lock:
            lock = self._per_image.setdefault(image.id, threading.Lock())
        with lock:  # parallel provisions of one image publish it once
            found = self.find(image.id)
            if found:
                return found
            return self._publish(image)

    def _publish(self, image: BootImage) -> str:
        if not self.bucket:
            raise InvalidArgument("providers.gcp.Bucket: required to publish an image (the Cloud Storage bucket "
                                  "its gcp format is uploaded to)")
        name = image_name(image.id)
        existing = self._existing(name)
        if existing is not None and existing.status != "FAILED":
            # READY, or PENDING: another publisher's import, which GCE finishes whether or not that
            # publisher is still alive: wait for it rather than upload again.
            link = self._wait_ready(name, image.id)
            self.known[image.id] = link
            return link
        if existing is not None:  # a failed import: remove it and start again
            self._delete(name)
        files = [p for p in image.format("gcp") if p.name.endswith(".img.tar.gz")]
        if not files:
            raise FailedPrecondition(f"image {image.id}: the gcp format made no .img.tar.gz")
        obj = f"{OBJECT_PREFIX}{image.id.removeprefix('sha256:')}.img.tar.gz"
        blob = self.storage_factory().bucket(self.bucket).blob(obj)
        try:
            from google.cloud.storage.retry import DEFAULT_RETRY

            blob.upload_from_filename(str(files[0]), content_type="application/gzip", retry=DEFAULT_RETRY,
                                      timeout=600)
        except gexc.NotFound:
            raise InvalidArgument(f"providers.gcp.Bucket: bucket {self.bucket!r} does not exist") from None
        body = {"name": name, "family": FAMILY, "labels": {IMAGE_LABEL: image_label(image.id)},
                "description": f"mobykit image {image.id} ({image.name})",
                "raw_disk": {"source": f"https://storage.googleapis.com/{self.bucket}/{obj}"}}
        try:
            op = self.compute.call(self.compute.images.insert_unary, f"images.insert {name}", project=self.project,
                                   image_resource=body, request_id=str(uuid.uuid4()))
            self.compute.wait(op, self.project, None, f"images.insert {name}")
        except AlreadyExists:
            pass  # another publisher made it meanwhile: wait for it below
        link = self._wait_ready(name, image.id)
        try:
            blob.delete(retry=DEFAULT_RETRY)
        except gexc.NotFound:
            pass
        self.known[image.id] = link
        return link

    def _existing(self, name: str) -> Any:
        try:
            return self.compute.call(self.compute.images.get, f"images.get {name}", project=self.project, image=name)
        except NotFound:
            return None

    def _wait_ready(self, name: str, image_id: str) -> str:
        """The image's selfLink once it is READY (another publisher's insert may still run)."""

        class NotReady(Exception):
            pass

        def check() -> str:
            img = self._existing(name)
            if img is None or img.status == "FAILED":
                raise FailedPrecondition(f"gcp: image {name} of {image_id} failed to import")
            if img.status != "READY":
                raise NotReady(name)
            return img.self_link

        from google.api_core import retry as gretry

        return gretry.Retry(predicate=gretry.if_exception_type(NotReady), initial=0.1, maximum=5.0,
                            timeout=1800)(check)()

    def _delete(self, name: str) -> None:
        try:
            op = self.compute.call(self.compute.images.delete_unary, f"images.delete {name}", project=self.project,
                                   image=name, request_id=str(uuid.uuid4()))
            self.compute.wait(op, self.project, None, f"images.delete {name}")
        except NotFound:
            pass
