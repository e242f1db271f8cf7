"""Console files followed as qemu writes them: inotify, one descriptor and one thread per provider.

Why: the guest's readiness line (``mobykit: ready <image id>``) is what a rolling update waits
for, and qemu appends it to the console volume's file the moment the guest prints it. Reading
that file through libvirt's stream API on every health poll costs a download per instance per
poll and learns of the line only at the next poll; inotify says when the file grows, so the new
bytes are read at once and nothing at all is done while nothing is written (an idle server's
thread sleeps in ``poll``). Only for a daemon on this host (the volume's path is ours to open);
``inotify_simple`` (a maintained ctypes wrapper of the three syscalls) does the kernel side.

A followed file is kept open: when the instance is destroyed its volume is unlinked, which
inotify reports as an attribute change (IN_ATTRIB: the link count), and a link count of 0 ends
the console (``output(None)``). An overflowed event queue re-reads every followed file.
"""

from __future__ import annotations

import codecs
import logging
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mobykit.providers.libvirt")

CHUNK = 1 << 16


@dataclass(eq=False)
class _Followed:
    path: str
    file: Any  # the open file (binary)
    output: Callable[[str | None], None]
    wd: int
    offset: int = 0
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    ended: bool = False


class ConsoleFiles:
    """Follows growing files. ``follow`` raises OSError (or ImportError without inotify_simple)
    when a file cannot be followed; callers then read it the slow way."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._inotify: Any = None
        self._flags: Any = None
        self._by_wd: dict[int, list[_Followed]] = {}
        self._wakeup: tuple[int, int] | None = None  # a pipe that ends the thread's poll on close
        self._thread: threading.Thread | None = None
        self._closed = False

    def follow(self, path: str, output: Callable[[str | None], None]) -> Callable[[], None]:
        with self._lock:
            if self._closed:
                raise OSError("console watch closed")
            self._ensure()
            f = open(path, "rb")  # noqa: SIM115 - kept open while followed (see the module docstring)
            try:
                fl = self._flags
                wd = self._inotify.add_watch(path, fl.MODIFY | fl.ATTRIB | fl.DELETE_SELF | fl.MOVE_SELF)
            except BaseException:
                f.close()
                raise
            item = _Followed(path, f, output, wd)
            self._by_wd.setdefault(wd, []).append(item)
            self._read(item)  # what is there already; the watch came first, so nothing is missed
        return lambda: self._cancel(item)

    def followed(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._by_wd.values())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for items in self._by_wd.values():
                for item in items:
                    item.file.close()
            self._by_wd.clear()
            if self._wakeup is not None:
                os.write(self._wakeup[1], b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    # -- internals -----------------------------------------------------------------------------

    def _ensure(self) -> None:
        if self._inotify is not None:
            return
        from inotify_simple import INotify, flags

        self._inotify, self._flags = INotify(), flags
        self._wakeup = os.pipe()
        self._thread = threading.Thread(target=self._run, name="libvirt-consoles", daemon=True)
        self._thread.start()

    def _cancel(self, item: _Followed) -> None:
        with self._lock:
            items = self._by_wd.get(item.wd)
            if items is None or item not in items:
                return
            items.remove(item)
            item.file.close()
            if not items:
                del self._by_wd[item.wd]
                try:
                    self._inotify.rm_watch(item.wd)
                except OSError:
                    pass  # the file is gone: so is its watch

    def _read(self, item: _Followed) -> None:
        """Deliver what was appended since the last read (the caller holds the lock)."""
        if item.ended:
            return
        try:
            st = os.fstat(item.file.fileno())
            if st.st_size < item.offset:  # truncated (qemu reopened it): read it again from the start
                item.offset = 0
            text = []
            while True:
                data = os.pread(item.file.fileno(), CHUNK, item.offset)
                if not data:
                    break
                item.offset += len(data)
                text.append(item.decoder.decode(data))
        except OSError as e:
            log.info("console %s: cannot read: %s", item.path, e)
            return
        if text and any(text):
            self._deliver(item, "".join(text))
        if st.st_nlink == 0:
            self._end(item)

    def _end(self, item: _Followed) -> None:
        item.ended = True
        self._deliver(item, None)
        self._cancel(item)

    def _deliver(self, item: _Followed, text: str | None) -> None:
        try:
            item.output(text)
        except Exception:  # noqa: BLE001 - a listener's bug must not stop every console
            log.exception("console %s: output callback failed", item.path)

    def _run(self) -> None:
        poller = select.poll()
        with self._lock:
            if self._closed or self._wakeup is None:
                return
            fd, wakeup = self._inotify.fileno(), self._wakeup[0]
            fl = self._flags
        poller.register(fd, select.POLLIN)
        poller.register(wakeup, select.POLLIN)
        while True:
            poller.poll()  # no timeout: an idle server does nothing here
            with self._lock:
                if self._closed:
                    break
                events = self._inotify.read(timeout=0)
                touched: dict[int, None] = {}
                overflow = False
                for ev in events:
                    if ev.mask & fl.Q_OVERFLOW:
                        overflow = True
                    elif ev.wd in self._by_wd:
                        touched[ev.wd] = None
                wds = list(self._by_wd) if overflow else list(touched)
                for wd in wds:
                    for item in list(self._by_wd.get(wd, ())):
                        self._read(item)
        with self._lock:
            self._inotify.close()
            os.close(self._wakeup[0])
            os.close(self._wakeup[1])
            self._wakeup = None
