"""Progress of long steps (pulls, imports, the build), for people watching a terminal only.

stdout belongs to machine-readable results (``mobykit build`` prints just the image id there), so
progress goes to stderr, and only when stderr is a terminal; in CI logs and pipes it is silent.
``rich`` is imported lazily so commands that never show progress do not pay for it.
"""

from __future__ import annotations

import sys
import threading
from typing import IO


class Task:
    """Handle for one line of progress. Safe to use when the display is silent."""

    def __init__(self, owner: Progress, task_id, total: int | None):
        self._owner, self._id, self.total, self.completed = owner, task_id, total, 0

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._owner._advance(self._id, n)

    def done(self) -> None:
        self._owner._done(self._id, self)


class Progress:
    """``with Progress() as p: t = p.task("pull x", total); t.advance(n); t.done()``.

    ``enabled`` defaults to "stderr is a TTY"; pass False to force silence (tests, --quiet) or
    True to force rendering to ``stream``.
    """

    def __init__(self, stream: IO[str] | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._rich = None
        self._lock = threading.Lock()
        self._next = 0

    def _start(self):
        if self._rich is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.start()
        return self._rich

    def task(self, description: str, total: int | None = None) -> Task:
        with self._lock:
            if not self.enabled:
                self._next += 1
                return Task(self, self._next, total)
            return Task(self, self._start().add_task(description, total=total), total)

    def _advance(self, task_id, n: int) -> None:
        if self.enabled and self._rich is not None:
            self._rich.advance(task_id, n)

    def _done(self, task_id, task: Task) -> None:
        if self.enabled and self._rich is not None:
            total = task.total if task.total is not None else task.completed
            self._rich.update(task_id, total=total, completed=total)

    def close(self) -> None:
        with self._lock:
            if self._rich is not None:
                self._rich.stop()
                self._rich = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(Progress):
    def __init__(self):
        super().__init__(enabled=False)


def silent() -> Progress:
    """A Progress that never renders (default for library callers that pass none)."""
    return _Silent()
