"""What a listing derives from each domain, kept per domain UUID until the domain changes.

Why: ``list`` used to read every domain's metadata and state (two daemon round trips) and parse
the metadata XML on every call, and a group's controller, Prometheus and the CLI all poll it. A
domain's view changes only when libvirt says so, or when we change it ourselves, so:

- With events (``events.subscribe``): a view is reused until a lifecycle or metadata-change event
  for its UUID arrives, or until our own ``create``/``set_tags``/``destroy`` invalidates it
  synchronously (so a Label followed by a Describe sees the new tags at once, without waiting for
  the event). A listing then costs one ``listAllDomains`` call. Views also expire after
  ``max_age`` seconds, which bounds the damage should an event ever be lost.
- Without events: every listing reads every domain's metadata and state again, but the metadata
  text is the validity key for the parse: an unchanged text reuses the parsed view.

The domain list itself is never cached: a domain undefined behind our back is not in
``listAllDomains`` and disappears from the very next listing (and its view is dropped).

Races: a view is stored only when no invalidation happened while it was being read (a global
epoch), so an event that arrives between our read and our store can never leave a stale view.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mobykit.providers.base import Machine
from mobykit.providers.libvirt.binding import libvirt
from mobykit.providers.libvirt.domain import domain_state, machine
from mobykit.providers.libvirt.metadata import InstanceMeta, read_meta_text
from mobykit.providers.libvirt.properties import ID_PREFIX

MAX_AGE = 30.0  # seconds a view is trusted without an event, should one be lost


@dataclass(frozen=True)
class DomainView:
    """One domain as the last listing saw it. ``meta`` None: not a mobykit instance. ``machine`` is
    shared by listings: hand out copies (``domain.copy_machine``)."""

    meta_text: str | None
    meta: InstanceMeta | None
    machine: Machine | None
    fetched: float  # monotonic seconds


@dataclass(frozen=True)
class CacheStats:
    """Counters for tests and benchmarks: views served from the cache, and domains read."""

    hits: int
    reads: int


class DomainCache:
    """The views of one connection's domains. Thread-safe; no libvirt call is made under the lock."""

    def __init__(self, uri: str, *, max_age: float = MAX_AGE, clock: Callable[[], float] = time.monotonic):
        self.uri = uri
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._views: dict[str, DomainView] = {}
        self._epoch = 0
        self._live = False
        self._hits = 0
        self._reads = 0

    @property
    def live(self) -> bool:
        """True while events are delivered for this connection (views are trusted until invalidated)."""
        return self._live

    def set_live(self, live: bool) -> None:
        """Events start (a fresh subscription) or stop (the connection closed, the loop died).
        Views read before a subscription existed were never watched: they are dropped."""
        with self._lock:
            if live and not self._live:
                self._views.clear()
                self._epoch += 1
            self._live = live

    def invalidate(self, uuid: str) -> None:
        """Domain ``uuid`` changed (an event, or our own write): read it again next time."""
        with self._lock:
            self._epoch += 1
            self._views.pop(uuid, None)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, reads=self._reads)

    def views(self, domains: Iterable[Any], trusted: bool = True) -> list[DomainView]:
        """The view of each mobykit domain of a fresh ``listAllDomains``, in its order.
        ``trusted`` False forces the no-events path (the caller knows the event loop is down).
        Domains that vanish while being read are left out.

        The cached views are looked up under one lock acquisition for the whole listing (a
        thousand domains must not mean two thousand lock round trips under a hundred clients);
        each domain that has to be read takes the lock again to store its view."""
        lv = libvirt()
        # Name and UUID come with the listing: no daemon round trip (and no GIL release) for either.
        ours = [(dom, name, dom.UUIDString())
                for dom in domains if (name := dom.name()).startswith(ID_PREFIX)]
        seen = {uuid for _dom, _name, uuid in ours}
        now = self._clock()
        with self._lock:
            live = self._live and trusted
            olds = [self._views.get(uuid) for _dom, _name, uuid in ours]
            for uuid in [u for u in self._views if u not in seen]:
                del self._views[uuid]  # undefined (behind our back or by us)
        out: list[DomainView] = []
        hits = reads = 0
        for (dom, name, uuid), old in zip(ours, olds, strict=True):
            if old is not None and live and now - old.fetched < self.max_age:
                hits += 1
                out.append(old)
                continue
            with self._lock:
                epoch = self._epoch
            try:
                view = self._read(dom, name, old)
            except lv.libvirtError:
                continue  # removed while we looked
            reads += 1
            # Kept unless it changed while we read, or its state could not be read: a view saying
            # "terminated" for a hiccup would hide a live instance from every listing until its next event.
            keep = view.machine is None or view.machine.state != "terminated"
            with self._lock:
                if keep and self._epoch == epoch:
                    self._views[uuid] = view
            out.append(view)
        with self._lock:
            self._hits += hits
            self._reads += reads
        return out

    def _read(self, dom: Any, name: str, old: DomainView | None) -> DomainView:
        """Read one domain; an unchanged metadata text reuses the old parse."""
        now = self._clock()
        text = read_meta_text(dom)
        if text is None:
            return DomainView(meta_text=None, meta=None, machine=None, fetched=now)
        meta = old.meta if old is not None and old.meta_text == text else InstanceMeta.parse(text)
        state = domain_state(dom)
        if old is not None and old.meta is meta and old.machine is not None and old.machine.state == state:
            return DomainView(meta_text=text, meta=meta, machine=old.machine, fetched=now)
        view = machine(name, meta, state, self.uri)
        return DomainView(meta_text=text, meta=meta, machine=view, fetched=now)
