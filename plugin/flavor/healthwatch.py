"""What the moby flavor knows of each instance's health, kept current as it changes, and who to tell.

Why: Flavor.Healthy used to read the whole console on every call, and the group controller called
it every PollInterval, so a rolling update learnt of a readiness line only at the next poll (and
a libvirt console was downloaded per instance per poll). The watch instead:

- follows the console where the provider can stream it (``providers.base.FollowsConsole``: the
  libvirt console file, with inotify): the verdict changes the moment the line is written;
- polls ``console_output`` where it cannot (EC2 GetConsoleOutput, GCE getSerialPortOutput have no
  stream), in the background with a short back-off (``poll_first`` doubling to ``poll_max``) and
  only while the instance is pending; a Healthy call about such an instance still reads it when
  the last read is older than ``refresh`` (default 0: every call, exactly what it cost before,
  since nothing else would tell it of a later "not ready");
- probes the tcp/http port of Health Mode tcp/http on its own short schedule once the console is
  ready, until it passes (then it stays HEALTHY, as before);
- tells the listeners (``subscribe``: the group controllers) the instance's id whenever what it
  knows changes: a verdict, the console ending (destroyed), a port passing, a Deadline running out.

Healthy is served from this (cheap, and as exact as the stream; the first call about an instance
reads its console synchronously), so Infrakit's own controller, which only asks Healthy, gains
too. One background thread does the polls, probes and deadlines; with nothing pending it sleeps
without a timeout. Instances nobody asked about for ``forget`` seconds are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mobykit.errors import NotFound
from mobykit.flavor import health as probes

log = logging.getLogger("mobykit.flavor")

Listener = Callable[[str], None]


@dataclass(frozen=True)
class PortCheck:
    mode: str  # tcp | http
    port: int
    path: str = "/"

    def ok(self) -> bool:
        return probes.tcp_open(self.port, 1.0) if self.mode == "tcp" else probes.http_ok(self.port, self.path, 2.0)


@dataclass(frozen=True)
class Seen:
    """What the watch knows of one instance."""

    verdict: bool | None  # the console's last readiness line: ready, not ready, or none yet
    gone: bool = False  # the instance (its console) no longer exists
    port_ok: bool = False  # the PortCheck asked for passed (False when none was asked)


class _Entry:
    def __init__(self, iid: str, image_id: str | None, now: float):
        self.id, self.image_id = iid, image_id
        self.scanner = probes.ConsoleScanner(image_id)
        self.verdict: bool | None = None
        self.gone = False
        self.cancel: Callable[[], None] | None = None  # set while the console is followed
        self.read_at = now
        self.asked_at = now
        self.poll_at: float | None = None
        self.poll_delay = 0.0
        self.port: PortCheck | None = None
        self.port_ok = False
        self.port_at: float | None = None
        self.port_delay = 0.0
        self.deadline_at: float | None = None
        self.deadline_told = False

    def state(self) -> tuple:
        return (self.verdict, self.gone, self.port_ok, self.deadline_told)

    def pending(self) -> bool:
        return not self.gone and self.verdict is None


class HealthWatch:
    """See the module docstring. ``probe()`` returns the flavor's InstanceProbe (made lazily)."""

    def __init__(self, probe: Callable[[], probes.InstanceProbe], *, clock: Callable[[], float] = time.time,
                 poll_first: float = 0.5, poll_max: float = 4.0, port_first: float = 0.25, port_max: float = 2.0,
                 refresh: float = 0.0, forget: float = 600.0, thread: bool = True):
        self._probe = probe
        self.clock = clock
        self.poll_first, self.poll_max = poll_first, poll_max
        self.port_first, self.port_max = port_first, port_max
        self.refresh, self.forget = refresh, forget
        self._use_thread = thread  # False: tests call run_due() with a virtual clock
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._listeners: list[Listener] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.reads = 0  # console_output calls (first reads, polls, refreshes): for tests and benches

    # -- listeners ------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        with self._cond:
            self._listeners.append(listener)

        def cancel() -> None:
            with self._cond:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return cancel

    def _tell(self, ids: list[str]) -> None:
        if not ids:
            return
        with self._cond:
            listeners = list(self._listeners)
        for iid in ids:
            for listener in listeners:
                try:
                    listener(iid)
                except Exception:  # noqa: BLE001 - one broken listener must not silence the others
                    log.exception("health listener failed for %s", iid)

    # -- what Healthy asks ----------------------------------------------------------------------

    def seen(self, iid: str, image_id: str | None, *, port: PortCheck | None = None,
             deadline_at: float | None = None) -> Seen:
        """What is known of ``iid`` now. The first question about an instance reads its console
        (and starts following or polling it); NotFound from the provider is ``gone``; any other
        error of that first read is raised (the caller cannot tell)."""
        now = self.clock()
        with self._cond:
            e = self._entries.get(iid)
            fresh = e is not None and e.image_id == image_id
        told: list[str] = []
        if not fresh:
            e = self._start(iid, image_id, now)
        elif e.cancel is None and not e.gone and now - e.read_at >= self.refresh:
            told = self._read(e)  # a polled console: as exact as a read, as every call was before
        with self._cond:
            e.asked_at = now
            e.deadline_at = deadline_at
            probe_now = False
            if port is not None and port != e.port:
                e.port, e.port_ok, e.port_at, e.port_delay = port, False, None, 0.0
                probe_now = e.verdict is True
            seen = Seen(e.verdict, e.gone, e.port_ok if port is not None else False)
            self._cond.notify_all()  # the thread may have a new deadline to wait for
        if probe_now:
            told += self._probe_port(e, self.clock())  # the first answer is exact, later ones scheduled
            seen = Seen(e.verdict, e.gone, e.port_ok)
        self._tell(told)
        self._ensure_thread()
        return seen

    # -- the console ----------------------------------------------------------------------------

    def _start(self, iid: str, image_id: str | None, now: float) -> _Entry:
        e = _Entry(iid, image_id, now)
        self._read(e)
        cancel = None
        if not e.gone:
            follow = getattr(self._probe(), "follow_console", None)
            if callable(follow):
                try:
                    cancel = follow(iid, lambda text: self._output(e, text))
                except NotFound:
                    e.gone = True
        with self._cond:
            old = self._entries.get(iid)
            self._entries[iid] = e
            e.cancel = cancel
            if cancel is None and e.pending():
                e.poll_delay = self.poll_first
                e.poll_at = now + e.poll_delay
            self._cond.notify_all()
        if old is not None and old.cancel is not None:
            old.cancel()  # another image id asked for: start over
        return e

    def _read(self, e: _Entry) -> list[str]:
        """Read the whole console (polled instances, first reads); returns the ids to tell."""
        self.reads += 1
        try:
            text = self._probe().console_output(e.id)
            verdict, gone = probes.console_verdict(text, e.image_id), False
        except NotFound:
            verdict, gone = e.verdict, True
        with self._cond:
            before = e.state()
            if e.cancel is None:  # a followed console is exact already; its stream wins
                e.verdict = verdict
            e.gone = e.gone or gone
            e.read_at = self.clock()
            if e.verdict is True and e.port is not None and not e.port_ok and e.port_at is None:
                e.port_at = e.read_at
            return [e.id] if e.state() != before else []

    def _output(self, e: _Entry, text: str | None) -> None:
        """A followed console grew (or ended: None)."""
        with self._cond:
            before = e.state()
            if text is None:
                e.gone = True
            else:
                e.verdict = e.scanner.feed(text)
            e.read_at = self.clock()
            if e.verdict is True and e.port is not None and not e.port_ok and e.port_at is None:
                e.port_at = e.read_at  # probe the port now
                self._cond.notify_all()
            changed = e.state() != before
        if changed:
            self._tell([e.id])

    def _probe_port(self, e: _Entry, now: float) -> list[str]:
        check = e.port
        if check is None:
            return []
        ok = check.ok()
        with self._cond:
            if e.port != check or e.port_ok:
                return []
            if ok:
                e.port_ok, e.port_at = True, None
                return [e.id]
            e.port_delay = min(self.port_max, e.port_delay * 2 or self.port_first)
            e.port_at = now + e.port_delay
            return []

    # -- the background thread ------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if not self._use_thread:
            return
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                nxt = self.run_due()
            except Exception:  # noqa: BLE001 - the watch must outlive a bug in one pass
                log.exception("health watch pass failed")
                nxt = self.clock() + self.poll_max
            with self._cond:
                if self._closed:
                    return
                timeout = None if nxt is None else max(0.0, nxt - self.clock())
                if timeout is None or timeout > 0:
                    self._cond.wait(timeout)

    def run_due(self) -> float | None:
        """Do the polls, port probes and deadline notices that are due; returns when the next one
        is (None: nothing is pending)."""
        now = self.clock()
        told: list[str] = []
        cancels: list[Callable[[], None]] = []
        with self._cond:
            for iid, e in list(self._entries.items()):
                if now - e.asked_at > self.forget:
                    del self._entries[iid]
                    if e.cancel is not None:
                        cancels.append(e.cancel)
            entries = list(self._entries.values())
            reads = [e for e in entries if e.poll_at is not None and e.poll_at <= now]
            ports = [e for e in entries if e.port_at is not None and e.port_at <= now]
            for e in entries:
                if e.pending() and e.deadline_at is not None and not e.deadline_told and now >= e.deadline_at:
                    e.deadline_told = True  # Healthy now answers UNHEALTHY: the controller should ask
                    told.append(e.id)
        for cancel in cancels:
            cancel()
        for e in reads:
            try:
                told += self._read(e)
            except Exception as err:  # noqa: BLE001 - a cloud API hiccup: try again after the back-off
                log.info("console of %s not read: %s", e.id, err)
            with self._cond:
                if e.pending() and e.cancel is None:
                    e.poll_delay = min(self.poll_max, e.poll_delay * 2 or self.poll_first)
                    e.poll_at = self.clock() + e.poll_delay
                else:
                    e.poll_at = None
        for e in ports:
            told += self._probe_port(e, self.clock())
        self._tell(list(dict.fromkeys(told)))
        with self._cond:
            times = [t for e in self._entries.values() for t in (e.poll_at, e.port_at) if t is not None]
            times += [e.deadline_at for e in self._entries.values()
                      if e.pending() and e.deadline_at is not None and not e.deadline_told]
            return min(times) if times else None

    def watched(self) -> dict[str, Seen]:
        """Every instance known, for tests and diagnostics."""
        with self._cond:
            return {i: Seen(e.verdict, e.gone, e.port_ok) for i, e in self._entries.items()}

    def followed(self) -> int:
        with self._cond:
            return sum(1 for e in self._entries.values() if e.cancel is not None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            cancels = [e.cancel for e in self._entries.values() if e.cancel is not None]
            self._entries.clear()
            self._cond.notify_all()
        for cancel in cancels:
            cancel()
