"""The one small interface every place machines run implements (libvirt, AWS, GCP, memory).

The core (``mobykit.core.instance``) turns Infrakit's Instance SPI into these calls: it resolves
the provider, merges tags and validates Infrakit fields, so a provider only knows its own API.
Tags are the only state: a provider keeps every tag on the machine itself (domain metadata,
EC2 tags, GCE labels) so that ``list`` needs nothing but the provider's API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mobykit.errors import FailedPrecondition


@dataclass(frozen=True)
class BootImage:
    """A built image as the pipeline hands it over: ``id`` is ``sha256:<canonical tar digest>``."""

    id: str
    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path | None = None  # a raw/qcow2 disk, for providers that cannot boot kernel+initrd
    # ``files("aws")`` -> the files of that output format of this image, made on first use from the
    # canonical tar (``mobykit.image.store.format_files``); ``size=`` bytes for disk formats.
    files: Callable[..., list[Path]] | None = field(default=None, compare=False, repr=False)

    def format(self, name: str, size: int | None = None) -> list[Path]:
        """The files of output format ``name`` (e.g. ``qcow2-bios``, ``aws``, ``gcp``)."""
        if self.files is None:
            raise FailedPrecondition(f"image {self.id}: no image store to make the {name} format from")
        return self.files(name, size=size)


@dataclass
class MachineSpec:
    """One machine to create. ``properties`` were checked by ``Provider.validate`` first."""

    properties: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    user_data: str = ""
    logical_id: str | None = None
    # Infrakit's Spec.Attachments as (ID, Type): existing provider volumes to attach (EBS volume
    # ids, GCE disk names); ``namespace``: the core's NamespaceTags (also in ``tags``), which a
    # provider puts on what it makes besides the machine (persistent volumes) and lists them by.
    attachments: list[tuple[str, str]] = field(default_factory=list)
    namespace: dict[str, str] = field(default_factory=dict)


@dataclass
class Machine:
    """A machine as the provider reports it. ``state`` is one of STATES."""

    id: str
    tags: dict[str, str]
    state: str
    logical_id: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)


STATES = ("pending", "running", "stopping", "stopped", "terminated")


class Provider(Protocol):
    name: ClassVar[str]

    def validate(self, properties: dict[str, Any]) -> None:
        """Raise InvalidArgument naming any unknown or ill-typed key."""

    def publish_image(self, image: BootImage, properties: dict[str, Any]) -> str:
        """Make ``image`` bootable here (idempotent, keyed by image id); return the provider's ref."""

    def create(self, spec: MachineSpec) -> Machine:
        """Start one machine; it must be listed, with its tags, when this returns."""

    def set_tags(self, id: str, tags: dict[str, str]) -> None:
        """Replace the machine's tags with ``tags`` (the core does the merging). NotFound if gone."""

    def destroy(self, id: str) -> None:
        """Remove the machine and what was made for it (disks, config drives). Gone is success."""

    def list(self, tags: dict[str, str]) -> list[Machine]:
        """The members: machines not terminated whose tags include all of ``tags``, any order. A
        provider may leave out stopped machines too (AWS lists pending and running only, as
        Infrakit's AWS plugin does); it then offers ``find`` (``FindsById``) for the core to reach them."""

    def console_output(self, id: str) -> str:
        """The serial console so far ("" when none can be read). NotFound if gone."""


class FindsById(Protocol):
    """Optional, for a provider whose ``list`` leaves out machines that still exist (stopped ones):
    the core's Destroy checks a machine's namespace with ``find``, so a stopped machine that no group
    owns can still be destroyed instead of being taken for another deployment's and left running up
    a bill."""

    def find(self, id: str) -> Machine | None:
        """The machine ``id`` in any state but terminated, None when there is none."""


# ``output(text)`` with console text as it is written; ``output(None)`` once the console ended.
ConsoleOutput = Callable[[str | None], None]


class FollowsConsole(Protocol):
    """Optional, for a provider that can stream a console (libvirt's console file): health then
    reaches the moby flavor's watch, and through it the group controller, when the guest prints
    its readiness line, instead of at the next poll. Providers without it (EC2 GetConsoleOutput,
    GCE getSerialPortOutput: no stream) are polled through ``console_output`` with a short
    back-off while an instance is pending."""

    def follow_console(self, id: str, output: ConsoleOutput) -> Callable[[], None] | None:
        """Call ``output`` (from any thread) with the console from its start, then with each piece
        as it is written, and with None when the console ends (the instance was destroyed).
        Returns the function that stops following; None when this instance's console cannot be
        followed from here (e.g. a remote daemon), NotFound when the instance is gone."""


class HasVolumes(Protocol):
    """Optional, for a provider with persistent volumes (instance property ``Volumes``: a logical
    id's ``<group>-<lid>-<name>``, kept across replacements). ``mobykit volume ls|rm`` and
    ``group destroy --volumes`` use it; ``namespace`` is the config's NamespaceTags, which the cloud
    providers tag their volumes with (libvirt takes no namespace)."""

    def list_volumes(self, namespace: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Each volume as ``{"Name", "SizeGb", "Instance" ("" when detached)}``, by name; a
        provider may add keys (``Allocated`` bytes, ``Id``, ``Zone``)."""

    def remove_volume(self, name: str, namespace: dict[str, str] | None = None) -> None:
        """Delete the volume and its data: NotFound when there is none of that name,
        FailedPrecondition while an instance has it attached."""
