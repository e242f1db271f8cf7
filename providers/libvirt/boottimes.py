"""When each domain started, said ready on its console, and was undefined: the stopwatch of the
group benchmark and of ``make demo``.

Why here: a rolling update's speed is judged against how long the machines themselves take to
boot, measured in the same run. The domain's start and undefine come from libvirt's lifecycle
events, its readiness line from its console file followed with inotify (``consolewatch.py``), all
on this process's own connection and clock, so neither the server's polls nor the observer's own
listings add to the figures. Only for a daemon on this host (console files must be readable).
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mobykit.providers.libvirt import events
from mobykit.providers.libvirt.binding import libvirt
from mobykit.providers.libvirt.consolewatch import ConsoleFiles
from mobykit.providers.libvirt.properties import DEFAULT_POOL, ID_PREFIX

log = logging.getLogger("mobykit.providers.libvirt")
READY = "mobykit: ready"  # our init's readiness line (mobykit.flavor.health reads it for Healthy)


@dataclass
class Domain:
    """Monotonic times of one domain's life, as far as seen."""

    name: str
    started: float | None = None
    ready: float | None = None
    undefined: float | None = None

    @property
    def boot(self) -> float | None:
        """Seconds from the domain starting to its readiness line."""
        return None if self.started is None or self.ready is None else self.ready - self.started


@dataclass
class BootTimes:
    """Start with ``start()`` (before the domains of interest start), ``close()`` at the end."""

    config: dict[str, Any]
    domains: dict[str, Domain] = field(default_factory=dict)

    def start(self) -> BootTimes:
        lv = libvirt()
        events.ensure_loop()
        self._lock = threading.Lock()
        self._files = ConsoleFiles()
        self._cancels: list[Any] = []
        self._todo: queue.Queue[str | None] = queue.Queue()
        self._conn = lv.open(self.config["URI"])
        self._pool: Any = None  # looked up when first needed: a fresh daemon has none until the first create
        self._cb = self._conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)
        # Console files are looked up off the event loop's thread (a libvirt call from inside a
        # callback would wait on the loop that runs it).
        self._worker = threading.Thread(target=self._follow_loop, name="boot-times", daemon=True)
        self._worker.start()
        return self

    def _event(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        lv = libvirt()
        name, now = dom.name(), time.monotonic()
        if not name.startswith(ID_PREFIX):
            return
        with self._lock:
            d = self.domains.setdefault(name, Domain(name))
            if event == lv.VIR_DOMAIN_EVENT_STARTED and d.started is None:
                d.started = now
                self._todo.put(name)
            elif event == lv.VIR_DOMAIN_EVENT_UNDEFINED:
                d.undefined = now

    def _follow_loop(self) -> None:
        while (name := self._todo.get()) is not None:
            try:
                if self._pool is None:
                    self._pool = self._conn.storagePoolLookupByName(self.config.get("Pool") or DEFAULT_POOL)
                path = self._pool.storageVolLookupByName(f"{name}.console").path()
                tail = [""]  # the unfinished last line
                self._cancels.append(self._files.follow(path, lambda text, n=name, t=tail: self._text(n, t, text)))
            except Exception as e:  # noqa: BLE001 - a domain gone already has no boot to time
                log.info("boot times: %s not followed: %s", name, e)

    def _text(self, name: str, tail: list[str], text: str | None) -> None:
        if text is None:
            return
        now = time.monotonic()
        lines = (tail[0] + text).split("\n")
        tail[0] = lines.pop()[-4096:]
        if any(READY in line for line in lines):
            with self._lock:
                d = self.domains[name]
                if d.ready is None:
                    d.ready = now

    def snapshot(self) -> dict[str, Domain]:
        with self._lock:
            return {n: Domain(d.name, d.started, d.ready, d.undefined) for n, d in self.domains.items()}

    def median_boot(self, names: list[str] | None = None) -> float | None:
        boots = [d.boot for n, d in self.snapshot().items() if d.boot is not None and (names is None or n in names)]
        return statistics.median(boots) if boots else None

    def close(self) -> None:
        self._todo.put(None)
        self._worker.join(5)
        try:
            self._conn.domainEventDeregisterAny(self._cb)
        except libvirt().libvirtError:
            pass
        self._files.close()
        self._conn.close()
