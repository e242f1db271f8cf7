"""The store's domain types and interface, and ``open_store`` (URL -> backend).

A group is one record: what was committed (``spec``), the commit before it (``previous``, what
``Rollback: auto`` returns to) and what the controller decided on its own (halted, gave up,
rolled back, first-healthy times). One record per group, not one key per field, so a commit and
the controller's own state can never be half-written relative to each other.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mobykit.errors import FailedPrecondition, InProgress, InvalidArgument

FORMAT_VERSION = 1  # bumped when a record's meaning changes; a newer store is refused, never rewritten
DEFAULT_URL = "file:~/.mobykit/state"


class StoreError(FailedPrecondition):
    """The store cannot be used as it is (corrupt, newer format, locked by another server)."""


class NotLeader(InProgress):
    """This server does not (or may no longer) hold the leader lease: it must not act. An
    ``InProgress`` so that a provision refused by it is retried, not counted as a failure."""


@dataclass
class GroupRecord:
    """Everything a controller needs to resume a group. ``commit`` changes on every commit and
    resize (whoever took it), so the leader tells a new request from its own state writes."""

    id: str
    spec: dict[str, Any]  # the GroupSpec {ID, Properties} the controller works towards now
    commit: str
    previous: dict[str, Any] | None = None
    halted: str | None = None
    gave_up: str | None = None
    rolled_back_from: str | None = None
    healthy_since: dict[str, float] = field(default_factory=dict)  # instance id -> wall-clock seconds
    revision: int = 0  # the backend's version of this record (etcd mod_revision), for compare-and-swap

    def copy(self) -> GroupRecord:
        return copy.deepcopy(self)


@dataclass(frozen=True)
class Event:
    """A record was written (``record``) or removed (``record`` None) by any server."""

    id: str
    record: GroupRecord | None


class Guard(Protocol):
    """What a store write is conditional on: for etcd, the leader key this server created."""

    def condition(self) -> Any: ...


class Store(Protocol):
    url: str

    def load(self) -> dict[str, GroupRecord]:
        """Every stored group (checked: a corrupt or newer record raises StoreError naming it)."""
        ...

    def get(self, id: str) -> GroupRecord | None: ...

    def put(self, record: GroupRecord, *, expect: int | None = None, guard: Guard | None = None) -> bool:
        """Write ``record``. ``expect``: only if the stored revision is still this (0 = absent).
        ``guard``: only while the guard holds. Returns False when a condition failed."""
        ...

    def delete(self, id: str) -> bool: ...

    def watch(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` for every change made by anyone (a single-server store never calls it)."""
        ...

    def close(self) -> None: ...


def open_store(url: str | None, *, lease_ttl: float = 10.0, tls: dict[str, str] | None = None) -> Store:
    """The backend for ``url``: ``file:DIR`` (``~`` expanded) or ``etcd://HOST:PORT[,HOST:PORT...]``
    (``etcds://`` for TLS with ``tls`` {ca, cert, key}). Opening checks the store (reachable, format,
    lock) so a bad one stops the server before it serves anything."""
    url = url or DEFAULT_URL
    if url.startswith("file:"):
        from mobykit.group.store.file import FileStore

        raw = url[len("file:"):]
        if raw.startswith("//"):
            raw = raw[2:]
        if not raw:
            raise InvalidArgument(f"store {url!r}: expected file:DIR")
        return FileStore(Path(os.path.expanduser(raw)), url=url)
    if url.startswith(("etcd://", "etcds://")):
        from mobykit.group.store.etcd import EtcdStore

        return EtcdStore.open(url, tls=tls)
    raise InvalidArgument(f"store {url!r}: expected file:DIR or etcd://HOST:PORT[,HOST:PORT...]")
