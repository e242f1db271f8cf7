"""Keep a flood of identical warnings (and tracebacks) from flooding the server's log.

Why: a client that sends garbage in a loop would otherwise write one line, or one traceback, per
request, burying everything else and filling the disk. A ``LogThrottle`` is a ``logging.Filter``:
the first record of each kind is logged, then at most one per ``interval`` seconds, and that one
carries how many like it were held back. ``flush()`` reports what is still held back (a server
calls it when it stops, so the count of a flood that ended is not lost).

A record's kind is its logger, level and message template, plus, for a record with a traceback,
the exception type and the place it was raised: the first traceback of every distinct bug is still
logged in full, only its repeats are counted. Records below ``level`` (debug and info) pass as they
are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Kind = tuple[str, int, str, str]

# Where throttled records come from: our transports, core.errors.classify (logs on mobykit.rpc),
# and grpcio's own "Exception deserializing/serializing/calling application" lines.
LOGGERS = ("mobykit.rpc", "mobykit.jsonrpc", "grpc._server", "grpc._common")

_SUMMARY = "mobykit_throttle_summary"  # set on flush()'s own records so they are never held back


@dataclass
class _Window:
    opened: float
    held: int = 0
    last: str = ""  # the latest held-back message, for flush()


class LogThrottle(logging.Filter):
    """See the module docstring. Thread-safe; ``clock`` is injectable so tests need not wait."""

    def __init__(
        self,
        interval: float = 60.0,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 1024,
    ):
        super().__init__()
        self.interval, self.level, self.clock, self.max_kinds = interval, level, clock, max_kinds
        self._windows: dict[Kind, _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, _SUMMARY, False):
            return True
        kind = _kind(record)
        now = self.clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is not None and now - window.opened < self.interval:
                window.held += 1
                window.last = _message(record)
                return False
            if window is None and len(self._windows) >= self.max_kinds:
                self._forget_closed(now)
            self._windows[kind] = _Window(opened=now)
        if window is not None and window.held:
            _append(
                record,
                f" [{window.held} more like this in the last {now - window.opened:.0f} s were not logged]",
            )
        return True

    def flush(self) -> None:
        """Log one summary line per kind that has records held back, and start over."""
        with self._lock:
            pending = [(kind, w) for kind, w in self._windows.items() if w.held]
            self._windows.clear()
        for (name, level, _template, _where), w in pending:
            logging.getLogger(name).log(
                level,
                "%s [the last of %d like this that were not logged]",
                w.last,
                w.held,
                extra={_SUMMARY: True},
            )

    def reset(self) -> None:
        """Forget everything held back, without logging it (tests start from a clean slate)."""
        with self._lock:
            self._windows.clear()

    def _forget_closed(self, now: float) -> None:
        # Bounded memory. A closed window only holds a count for the next line; when none is closed,
        # the oldest goes (its count is lost: more than max_kinds kinds at once is not a flood of one).
        closed = [k for k, w in self._windows.items() if now - w.opened >= self.interval]
        if not closed:
            closed = [min(self._windows, key=lambda k: self._windows[k].opened)]
        for k in closed:
            del self._windows[k]


def _kind(record: logging.LogRecord) -> Kind:
    where = ""
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        site = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        where = f"{type(exc).__qualname__}@{site}"
    return (record.name, record.levelno, str(record.msg), where)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a record whose arguments do not fit its template: keep the template
        return str(record.msg)


def _append(record: logging.LogRecord, suffix: str) -> None:
    record.msg = _message(record) + suffix
    record.args = None


THROTTLE = LogThrottle()


def install(names: Iterable[str] = LOGGERS, throttle: LogThrottle = THROTTLE) -> None:
    """Attach ``throttle`` to the named loggers (once; calling again changes nothing)."""
    for name in names:
        logger = logging.getLogger(name)
        if throttle not in logger.filters:
            logger.addFilter(throttle)
